"""Exact interoperability with Hugging Face PEFT, in both directions.

The PEFT side always runs on torch (whatever KERAS_BACKEND is). keras-hub's
BERT uses the tanh GELU, so the `transformers` BERT uses `gelu_new`; keras-hub's
DistilBERT uses the exact (erf) GELU, which is `transformers`' default `gelu`.
"""

import keras
import keras_hub
import numpy as np
import pytest

import klora
from tests.conftest import (VOCAB, minilm_path, randomize_adapters, requires_minilm,
                            token_inputs, to_numpy)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOLERANCE = 1e-5
SMALL = dict(layers=2, heads=2, hidden=8, intermediate=16, positions=16)


def save_tiny_hf(arch, directory, seed=0):
    """A random tiny `transformers` model in `directory` (keras-hub reads it with from_preset)."""
    torch.manual_seed(seed)
    if arch == "bert":
        config = transformers.BertConfig(
            num_labels=3, vocab_size=VOCAB, hidden_size=SMALL["hidden"], num_hidden_layers=SMALL["layers"],
            num_attention_heads=SMALL["heads"], intermediate_size=SMALL["intermediate"],
            max_position_embeddings=SMALL["positions"], hidden_act="gelu_new")
        model = transformers.BertForSequenceClassification(config)
    else:
        config = transformers.DistilBertConfig(
            vocab_size=VOCAB, dim=SMALL["hidden"], n_layers=SMALL["layers"],
            n_heads=SMALL["heads"], hidden_dim=SMALL["intermediate"],
            max_position_embeddings=SMALL["positions"], num_labels=3)
        model = transformers.DistilBertForSequenceClassification(config)
    # Non-trivial layer norms and biases, so that a mixed-up mapping would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return str(directory)


KERAS = {
    "bert": (keras_hub.models.BertBackbone, keras_hub.models.BertTextClassifier),
    "distil_bert": (keras_hub.models.DistilBertBackbone,
                    keras_hub.models.DistilBertTextClassifier),
}
HF = {
    "bert": (lambda: transformers.BertModel, lambda: transformers.BertForSequenceClassification),
    "distil_bert": (lambda: transformers.DistilBertModel,
                    lambda: transformers.DistilBertForSequenceClassification),
}
# The trained head as PEFT users declare it (task_type="SEQ_CLS" adds the same): DistilBERT's
# `pre_classifier` is no pretrained weight, so it is trained and saved with the classifier.
HEADS = {"bert": ["classifier"], "distil_bert": ["pre_classifier", "classifier"]}
TARGETS = {  # one query/value adapter, one on every linear layer
    "qv": (("query", "value"), {"bert": ["query", "value"], "distil_bert": ["q_lin", "v_lin"]}),
    "all": ("all-linear", {"bert": ["query", "key", "value", "dense"],
                           "distil_bert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1",
                                           "lin2"]}),
}


def keras_model(arch, directory, task, num_classes=3, dropout=None):
    backbone_class, task_class = KERAS[arch]
    kwargs = {} if dropout is None else {"dropout": dropout}
    backbone = backbone_class.from_preset(directory, **kwargs)
    if not task:
        return backbone
    return task_class(backbone=backbone, num_classes=num_classes, preprocessor=None, **kwargs)


def hf_model(arch, directory, task, num_classes=3):
    base, head = HF[arch]
    cls = head() if task else base()
    kwargs = {"num_labels": num_classes} if task else {}
    extra = {"hidden_act": "gelu_new"} if arch == "bert" else {}
    return cls.from_pretrained(directory, **kwargs, **extra).eval()


def keras_outputs(model, x):
    out = model(x)
    if isinstance(out, dict):
        out = out["sequence_output"]
    return to_numpy(out)


def hf_outputs(model, x):
    inputs = {"input_ids": torch.tensor(np.asarray(x["token_ids"], "int64")),
              "attention_mask": torch.tensor(np.asarray(x["padding_mask"], "int64"))}
    if "segment_ids" in x:
        inputs["token_type_ids"] = torch.tensor(np.asarray(x["segment_ids"], "int64"))
    with torch.no_grad():
        out = model(**inputs)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def klora_to_peft(arch, directory, adapter_dir, task, targets, rank=2, alpha=4, **settings):
    model = keras_model(arch, directory, task)
    klora.apply(model, rank=rank, alpha=alpha, targets=targets, seed=0, **settings)
    randomize_adapters(model, seed=1)
    rng = np.random.default_rng(5)
    for layer in klora.adapted_layers(model):  # DoRA: magnitudes away from the norms
        if layer.lora_config.use_dora:
            layer.lora_magnitude.assign(to_numpy(layer.lora_magnitude) *
                                        rng.uniform(0.5, 1.5, layer.lora_magnitude.shape))
    if task:  # a trained head
        rng = np.random.default_rng(2)
        for variable in model.trainable_weights:
            if "lora" not in variable.path:
                variable.assign(rng.normal(size=variable.shape).astype("float32"))
    x = token_inputs(getattr(model, "backbone", model))
    expected = keras_outputs(model, x)
    klora.save_adapter(model, adapter_dir)
    peft_model = peft.PeftModel.from_pretrained(hf_model(arch, directory, task),
                                                str(adapter_dir)).eval()
    return max_diff(hf_outputs(peft_model, x), expected), expected, hf_outputs(
        hf_model(arch, directory, task), x)


def peft_to_klora(arch, directory, adapter_dir, task, targets, rank=2, alpha=4,
                  rank_pattern=None, **settings):
    torch.manual_seed(3)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                             init_lora_weights=False, rank_pattern=rank_pattern or {},
                             modules_to_save=HEADS[arch] if task else None, **settings)
    peft_model = peft.get_peft_model(hf_model(arch, directory, task), config).eval()
    if task:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "modules_to_save" in name:
                    p.copy_(torch.randn_like(p))
    peft_model.save_pretrained(str(adapter_dir))
    model = keras_model(arch, directory, task)
    x = token_inputs(getattr(model, "backbone", model))
    klora.load_adapter(model, adapter_dir)
    return max_diff(keras_outputs(model, x), hf_outputs(peft_model, x))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {arch: save_tiny_hf(arch, root / arch) for arch in KERAS}


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("task", [False, True], ids=["backbone", "classifier"])
@pytest.mark.parametrize("arch", KERAS)
def test_klora_adapter_loads_in_peft(arch, task, targets, hf_dirs, tmp_path):
    diff, expected, base = klora_to_peft(arch, hf_dirs[arch], tmp_path / "adapter", task,
                                         TARGETS[targets][0])
    assert diff <= TOLERANCE
    assert max_diff(expected, base) > 1e-2  # the adapter (and head) really changed outputs


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("task", [False, True], ids=["backbone", "classifier"])
@pytest.mark.parametrize("arch", KERAS)
def test_peft_adapter_loads_in_klora(arch, task, targets, hf_dirs, tmp_path):
    diff = peft_to_klora(arch, hf_dirs[arch], tmp_path / "adapter", task,
                         TARGETS[targets][1][arch])
    assert diff <= TOLERANCE


def test_peft_rank_and_alpha_patterns(hf_dirs, tmp_path):
    diff = peft_to_klora("bert", hf_dirs["bert"], tmp_path / "adapter", False,
                         ["query", "value"], rank=2,
                         rank_pattern={"encoder.layer.1.attention.self.value": 4})
    assert diff <= TOLERANCE


@pytest.mark.large
@requires_minilm
@pytest.mark.parametrize("direction", ["klora_to_peft", "peft_to_klora"])
def test_minilm_interop(direction, tmp_path):
    if direction == "klora_to_peft":
        diff, _, _ = klora_to_peft("bert", minilm_path(), tmp_path / "a", False,
                                   ("query", "value"), rank=8, alpha=16)
    else:
        diff = peft_to_klora("bert", minilm_path(), tmp_path / "a", False,
                             ["query", "value", "dense"], rank=8, alpha=16)
    assert diff <= TOLERANCE


# ---- variants ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", [False, True], ids=["backbone", "classifier"])
@pytest.mark.parametrize("arch", KERAS)
def test_dora_adapters_both_ways(arch, task, hf_dirs, tmp_path):
    diff, expected, base = klora_to_peft(arch, hf_dirs[arch], tmp_path / "k", task,
                                         "all-linear", use_dora=True)
    assert diff <= TOLERANCE and max_diff(expected, base) > 1e-2
    assert peft_to_klora(arch, hf_dirs[arch], tmp_path / "p", task, TARGETS["all"][1][arch],
                         use_dora=True) <= TOLERANCE


@pytest.mark.parametrize("arch", KERAS)
def test_dora_training_step_matches_peft(arch, hf_dirs, tmp_path):
    """Same weights, dropout 0: one step of cross-entropy gives PEFT's loss and gradients."""
    directory = hf_dirs[arch]
    torch.manual_seed(4)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS["qv"][1][arch],
                             init_lora_weights=False, use_dora=True,
                             modules_to_save=HEADS[arch])
    peft_model = peft.get_peft_model(hf_model(arch, directory, True), config)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    model = keras_model(arch, directory, True, dropout=0.0)
    klora.load_adapter(model, tmp_path / "adapter")
    x = token_inputs(model.backbone, batch=4)
    labels = np.array([0, 2, 1, 2])
    peft_model.eval()  # no dropout; gradients still flow
    inputs = {"input_ids": torch.tensor(x["token_ids"].astype("int64")),
              "attention_mask": torch.tensor(x["padding_mask"].astype("int64")),
              "labels": torch.tensor(labels)}
    if "segment_ids" in x:
        inputs["token_type_ids"] = torch.tensor(x["segment_ids"].astype("int64"))
    loss = peft_model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.numpy() for n, p in peft_model.named_parameters() if p.requires_grad}
    model.compile(optimizer=keras.optimizers.SGD(1.0),  # the update is minus the gradient
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = {v.path: to_numpy(v).copy() for v in model.trainable_variables}
    klora_loss = float(model.train_on_batch(x, labels, return_dict=True)["loss"])
    assert abs(klora_loss - float(loss)) <= TOLERANCE
    names = {l.path: m for m, l in klora.peft.names.peft_module_names(model).items()}
    compared = 0
    for variable in model.trainable_variables:
        gradient = before[variable.path] - to_numpy(variable)
        layer_path, name = variable.path.rsplit("/", 1)
        module = names.get(layer_path, layer_path)
        key = {"lora_a": f"{module}.lora_A.default.weight",
               "lora_b": f"{module}.lora_B.default.weight",
               "lora_magnitude": f"{module}.lora_magnitude_vector.default.weight",
               "kernel": f"{module}.modules_to_save.default.weight",
               "bias": f"{module}.modules_to_save.default.bias"}[name]
        reference = grads[f"base_model.model.{key}"]
        reference = reference.T if reference.ndim == 2 else reference
        np.testing.assert_allclose(gradient, reference, atol=TOLERANCE, err_msg=variable.path)
        compared += 1
    assert compared == len(grads) > 4


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("arch", KERAS)
def test_pissa_and_olora_adapters_apply_to_the_original_model_in_peft(arch, init, hf_dirs,
                                                                      tmp_path):
    diff, expected, base = klora_to_peft(arch, hf_dirs[arch], tmp_path / "k", True,
                                         "all-linear", init=init)
    assert diff <= TOLERANCE and max_diff(expected, base) > 1e-2


def test_peft_converted_pissa_adapter_loads_in_klora(hf_dirs, tmp_path):
    directory = hf_dirs["bert"]
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                             init_lora_weights="pissa")
    initial = peft.get_peft_model(hf_model("bert", directory, False), config)
    initial.save_pretrained(str(tmp_path / "initial"))
    unconverted = keras_model("bert", directory, False)
    with pytest.raises(ValueError, match="change the base weights"):
        klora.load_adapter(unconverted, tmp_path / "initial")  # for the residual base only
    with torch.no_grad():
        for name, p in initial.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))
    x = token_inputs(keras_model("bert", directory, False))
    trained = hf_outputs(initial, x)
    initial.save_pretrained(str(tmp_path / "converted"),
                            path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    model = keras_model("bert", directory, False)
    klora.load_adapter(model, tmp_path / "converted")
    assert max_diff(keras_outputs(model, x), trained) <= TOLERANCE


def test_klora_rank_patterns_load_in_peft(hf_dirs, tmp_path):
    directory = hf_dirs["bert"]
    model = keras_model("bert", directory, False)
    klora.apply(model, rank=2, alpha=4, targets="all-linear", seed=0,
                rank_pattern={"query": 4}, alpha_pattern={"feedforward_output_dense": 1})
    randomize_adapters(model, seed=1)
    x = token_inputs(model)
    klora.save_adapter(model, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf_model("bert", directory, False),
                                                str(tmp_path / "adapter")).eval()
    assert max_diff(hf_outputs(peft_model, x), keras_outputs(model, x)) <= TOLERANCE


@pytest.mark.large
@requires_minilm
@pytest.mark.parametrize("direction", ["klora_to_peft", "peft_to_klora"])
def test_minilm_dora_interop(direction, tmp_path):
    if direction == "klora_to_peft":
        diff, _, _ = klora_to_peft("bert", minilm_path(), tmp_path / "a", False,
                                   ("query", "value"), rank=8, alpha=16, use_dora=True)
    else:
        diff = peft_to_klora("bert", minilm_path(), tmp_path / "a", False,
                             ["query", "value"], rank=8, alpha=16, use_dora=True)
    assert diff <= TOLERANCE


# ---- token-classification and question-answering adapters ---------------------------------


def task_models(arch, directory, kind):
    """klora's task model on the keras-hub backbone, and the matching transformers model."""
    from klora.tasks import SpanExtractor, TokenClassifier

    backbone = KERAS[arch][0].from_preset(directory)
    prefix = "Bert" if arch == "bert" else "DistilBert"
    if kind == "token":
        extra = {"hidden_act": "gelu_new"} if arch == "bert" else {}
        hf = getattr(transformers, f"{prefix}ForTokenClassification").from_pretrained(
            directory, num_labels=3, **extra)
        return TokenClassifier(backbone, num_tags=3), hf.eval()
    extra = {"hidden_act": "gelu_new"} if arch == "bert" else {}
    hf = getattr(transformers, f"{prefix}ForQuestionAnswering").from_pretrained(
        directory, num_labels=2, **extra)
    return SpanExtractor(backbone), hf.eval()


def task_outputs(model, hf, x, kind):
    """`(klora, transformers)` logits on the unpadded positions."""
    ours = to_numpy(model(x))
    inputs = {"input_ids": torch.tensor(x["token_ids"].astype("int64")),
              "attention_mask": torch.tensor(x["padding_mask"].astype("int64"))}
    if "segment_ids" in x:
        inputs["token_type_ids"] = torch.tensor(x["segment_ids"].astype("int64"))
    with torch.no_grad():
        out = hf(**inputs)
    theirs = out.logits.numpy() if kind == "token" else np.stack(
        [out.start_logits.numpy(), out.end_logits.numpy()], -1)
    real = x["padding_mask"].astype(bool)
    return ours[real], theirs[real]


@pytest.mark.parametrize("kind", ["token", "qa"])
@pytest.mark.parametrize("arch", KERAS)
def test_task_adapters_load_in_peft_and_back(arch, kind, hf_dirs, tmp_path):
    import json

    model, _ = task_models(arch, hf_dirs[arch], kind)
    klora.apply(model, rank=2, alpha=4, targets="all-linear", seed=0)
    randomize_adapters(model, seed=1)
    head = model.get_layer("token_logits" if kind == "token" else "span_logits")
    head.kernel.assign(0.2 * np.random.default_rng(2).normal(size=head.kernel.shape).astype(
        "float32"))
    klora.save_adapter(model, tmp_path / "k")
    config = json.loads((tmp_path / "k" / "adapter_config.json").read_text())
    assert config["task_type"] == {"token": "TOKEN_CLS", "qa": "QUESTION_ANS"}[kind]
    assert config["modules_to_save"] == [{"token": "classifier", "qa": "qa_outputs"}[kind]]
    _, hf = task_models(arch, hf_dirs[arch], kind)
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "k")).eval()
    x = token_inputs(model.backbone)
    ours, theirs = task_outputs(model, peft_model, x, kind)
    assert max_diff(ours, theirs) <= TOLERANCE
    # and a PEFT-made adapter of that task type into klora's head
    torch.manual_seed(5)
    _, hf = task_models(arch, hf_dirs[arch], kind)
    peft_config = peft.LoraConfig(task_type={"token": "TOKEN_CLS", "qa": "QUESTION_ANS"}[kind],
                                  r=2, lora_alpha=4, target_modules=TARGETS["qv"][1][arch],
                                  init_lora_weights=False)
    made = peft.get_peft_model(hf, peft_config).eval()
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "modules_to_save" in name:
                p.copy_(torch.randn_like(p))
    made.save_pretrained(str(tmp_path / "p"))
    fresh, _ = task_models(arch, hf_dirs[arch], kind)
    klora.load_adapter(fresh, tmp_path / "p")
    ours, theirs = task_outputs(fresh, made, x, kind)
    assert max_diff(ours, theirs) <= TOLERANCE
