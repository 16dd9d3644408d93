"""End-to-end runs of recipes/sentiment.py on tiny presets and the shipped sample."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from klora.training import ResumableTraining
from tests.conftest import SAMPLE_DATA

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "sentiment.py")
TRAIN = os.path.join(SAMPLE_DATA, "sentiment_train.tsv")
VALID = os.path.join(SAMPLE_DATA, "sentiment_valid.tsv")


def recipe():
    spec = importlib.util.spec_from_file_location("sentiment_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_args(preset, out, *extra):
    return ["train", "--preset", preset, "--data", TRAIN, "--validation-data", VALID,
            "--epochs", "2", "--batch-size", "32", "--max-length", "32", "--rank", "2",
            "--output-dir", str(out), *extra]


def test_train_writes_every_output_then_predicts(tiny_preset, tmp_path, capsys):
    sentiment = recipe()
    assert sentiment.main(train_args(tiny_preset, tmp_path)) == 0
    for name in ("history.json", "metrics.json", "curves.png", "checkpoints/last.npz"):
        assert (tmp_path / name).is_file(), name
    assert os.listdir(tmp_path / "adapter")
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["loss"]) == 2 and len(history["val_accuracy"]) == 2
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["validation_accuracy"] <= 1 and metrics["validation_examples"] == 80
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()

    sentences = tmp_path / "sentences.txt"
    sentences.write_text("a lovely evening\n\nthe worst service ever\n", encoding="utf-8")
    code = sentiment.main(["predict", "--adapter", str(tmp_path / "adapter"), "--preset",
                           tiny_preset, "--file", str(sentences), "an extra one"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()[-3:]
    assert [l.split("\t")[2] for l in lines] == ["an extra one", "a lovely evening",
                                                "the worst service ever"]
    assert all(l.split("\t")[0] in ("negative", "positive") for l in lines)


def test_evaluate_reproduces_train_and_export_loads_without_klora(tiny_preset, tmp_path,
                                                                   capsys):
    sentiment = recipe()
    assert sentiment.main(train_args(tiny_preset, tmp_path / "run", "--tensorboard")) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    adapter = str(tmp_path / "run" / "adapter")
    # the validation set train recorded, rebuilt: the same figures
    assert sentiment.main(["evaluate", "--adapter", adapter,
                           "--output", str(tmp_path / "eval.json")]) == 0
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["accuracy"] == metrics["validation_accuracy"] and scores["examples"] == 80
    assert scores["per_class"].keys() == {"negative", "positive"} and "macro_f1" in scores
    assert (tmp_path / "eval_confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert sentiment.main(["evaluate", "--adapter", adapter, "--data", VALID, "--output",
                           str(tmp_path / "file.json")]) == 0
    assert json.loads((tmp_path / "file.json").read_text())["accuracy"] == scores["accuracy"]
    # training you can watch: per-step history, TensorBoard, the model card
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history["steps"]["loss"]) == history["steps"]["epoch_end"][-1] > 2
    assert history["steps"]["learning_rate"][0] < max(history["steps"]["learning_rate"])
    assert [f for f in os.listdir(tmp_path / "run" / "tensorboard") if "tfevents" in f]
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert "recipes/sentiment.py train" in card and "| accuracy |" in card
    for fmt in ("transformers", "keras-hub"):
        out = tmp_path / fmt
        assert sentiment.main(["export", "--adapter", adapter, "--format", fmt,
                               "--output", str(out)]) == 0
        assert os.listdir(out)
    assert sentiment.main(["export", "--adapter", adapter, "--output",
                           str(tmp_path / "transformers")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def strip_klora_metadata(adapter):
    """The adapter as PEFT would have written it: no klora header in the weights file."""
    from klora.peft.safetensors import read_safetensors, write_safetensors

    weights = adapter / "adapter_model.safetensors"
    tensors, metadata = read_safetensors(weights)
    metadata.pop("klora")
    weights.write_bytes(write_safetensors(tensors, metadata))


def test_predict_with_a_peft_made_adapter_names_the_missing_flags(tiny_preset, tmp_path, capsys):
    sentiment = recipe()
    assert sentiment.main(train_args(tiny_preset, tmp_path, "--epochs", "1")) == 0
    strip_klora_metadata(tmp_path / "adapter")
    capsys.readouterr()
    predict = ["predict", "--adapter", str(tmp_path / "adapter"), "a lovely evening"]
    assert sentiment.main(predict) == 2
    error = capsys.readouterr().err
    assert "pass --preset, --labels, --max-length" in error
    assert sentiment.main(predict + ["--preset", tiny_preset, "--labels", "neg,pos",
                                     "--max-length", "32"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].split("\t")[0] in ("neg", "pos")


@pytest.mark.parametrize("optimization", [
    [], ["--schedule", "linear", "--weight-decay", "0", "--clip-norm", "0", "--batching", "random"]])
def test_resume_after_interruption(tiny_bert_preset, tmp_path, monkeypatch, capsys, optimization):
    sentiment = recipe()
    args = train_args(tiny_bert_preset, tmp_path, "--patience", "10", *optimization)
    args[args.index("--epochs") + 1] = "4"
    original = ResumableTraining.on_epoch_end

    def crash_after_two(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 1:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(ResumableTraining, "on_epoch_end", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        sentiment.main(args)
    first = json.loads((tmp_path / "checkpoints" / "history.json").read_text())
    assert len(first["loss"]) == 2
    monkeypatch.setattr(ResumableTraining, "on_epoch_end", original)
    capsys.readouterr()
    assert sentiment.main(args) == 0
    assert "Resuming after epoch 2" in capsys.readouterr().out
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["loss"]) == 4
    assert history["loss"][:2] == first["loss"] and history["val_accuracy"][:2] == first["val_accuracy"]


def test_killed_process_resumes(tiny_bert_preset, tmp_path):
    args = [sys.executable, RECIPE] + train_args(tiny_bert_preset, tmp_path, "--patience", "100")
    args[args.index("--epochs") + 1] = "20"
    env = {**os.environ, "CI": "1"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoint = tmp_path / "checkpoints" / "last.npz"
    deadline = time.time() + 240
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), process.stdout.read().decode()[-2000:]
    with np.load(checkpoint) as saved:  # the history saved with the weights
        done = len(json.loads(str(saved["history:json"]))["loss"])
    assert 1 <= done < 20
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming after epoch {done}" in result.stdout
    assert len(json.loads((tmp_path / "history.json").read_text())["loss"]) == 20


@pytest.mark.parametrize("extra, clip_norm", [([], 1.0), (["--clip-norm", "0"], None),
                                              (["--clip-norm", "2.5"], 2.5)])
def test_gradients_are_clipped_unless_switched_off(tiny_bert_preset, tmp_path, extra, clip_norm):
    sentiment = recipe()
    args = sentiment.parse_args(train_args(tiny_bert_preset, tmp_path, "--epochs", "1", *extra))
    classifier, _, _ = sentiment.train(args)
    assert classifier.optimizer.global_clipnorm == clip_norm


@pytest.mark.parametrize("extra, message", [
    (["--max-length", "100"], "exceeds the model's limit of 64"),
    (["--rank", "0"], "--rank must be >= 1"),
    (["--dropout", "1.5"], "--dropout"),
    (["--clip-norm", "-1", "--weight-decay", "-1"],
     "--weight-decay must be >= 0 .*--clip-norm must be >= 0"),
    (["--text-column", "sentence"], r"missing column\(s\) \['sentence'\]; the file has \['text', 'label'\]"),
])
def test_bad_arguments_fail_before_training(tiny_bert_preset, tmp_path, capsys, extra, message):
    assert recipe().main(train_args(tiny_bert_preset, tmp_path, *extra)) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "checkpoints").exists()


def test_remat_flag_trains_on_jax_and_is_refused_elsewhere(tiny_bert_preset, tmp_path, capsys):
    import keras

    code = recipe().main(train_args(tiny_bert_preset, tmp_path, "--remat", "--epochs", "1"))
    if keras.backend.backend() == "jax":
        assert code == 0 and os.listdir(tmp_path / "adapter")
    else:
        assert code == 2 and "--remat uses jax.checkpoint" in capsys.readouterr().err
        assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("content, message", [
    (b"", "no examples"),
    (b"text\tlabel\nfine\tpositive\nodd\tneutral\n", r"\['neutral'\] not in the label map"),
    (b"text\tlabel\nfine\tpositive\nbad\t1\n", "mix numbers and words"),
    (b"text\tlabel\ncaf\xe9\tpositive\n", "not valid UTF-8"),
])
def test_bad_validation_files(tiny_bert_preset, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(content)
    args = train_args(tiny_bert_preset, tmp_path / "out")
    args[args.index("--validation-data") + 1] = str(bad)
    assert recipe().main(args) == 2
    assert re.search(message, capsys.readouterr().err)


def test_missing_data_file(tiny_bert_preset, tmp_path, capsys):
    args = train_args(tiny_bert_preset, tmp_path)
    args[args.index("--data") + 1] = str(tmp_path / "nope.tsv")
    assert recipe().main(args) == 2
    assert "not found" in capsys.readouterr().err


def test_tfds_name_offline_fails_fast(tiny_bert_preset, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    from klora.data import tfds_text

    monkeypatch.setattr(tfds_text, "DOWNLOAD_HOST", ("127.0.0.1", 9))  # nothing listens there
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    args = train_args(tiny_bert_preset, tmp_path)
    args[args.index("--data") + 1] = "glue/sst2"
    start = time.time()
    assert recipe().main(args) == 2
    assert time.time() - start < 30
    assert "no network" in capsys.readouterr().err
