"""`klora.save_adapter`: one adapter of a model as a PEFT adapter directory."""

import hashlib
import json
import os

import keras
import numpy as np

from klora.adapted_model import (active_adapter, adapted_layers, adapter_names,
                                 stored_head_values)
from klora.atomic import atomic_directory
from klora.layers import LoRALayer
from klora.peft.card import model_card
from klora.peft.config import peft_config
from klora.peft.names import HF_CLASSES, architecture, is_task, peft_module_names, task_type
from klora.peft.safetensors import write_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
PREFIX = "base_model.model."
FORMAT_VERSION = 1


def check_metadata(metadata):
    """`metadata` (a JSON dict) or `{}`; a `ValueError` if it would not load back unchanged."""
    if metadata is None:
        return {}
    try:
        round_trip = json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as e:
        raise ValueError(f"`metadata` must be JSON-serializable: {e}") from None
    if not isinstance(metadata, dict) or round_trip != metadata:
        raise ValueError(
            "`metadata` must be a dict of JSON data with string keys (e.g. "
            "{'label_map': {'0': 'negative', '1': 'positive'}}), so that it loads back "
            f"unchanged. Received: {metadata!r}")
    return metadata


def _head_tensors(model, names, adapter_name):
    """PEFT `modules_to_save` tensors (and raw variables) of the adapter's trained heads."""
    values = stored_head_values(model, adapter_name)
    tensors, modules = {}, []
    for module, layer in names.items():
        if (type(layer) is keras.layers.Dense and layer.quantization_mode is None
                and layer.kernel.path in values):  # a quantized layer is never a head
            tensors[f"{PREFIX}{module}.weight"] = values.pop(layer.kernel.path).T
            if layer.bias is not None:
                bias = values.pop(layer.bias.path, None)
                tensors[f"{PREFIX}{module}.bias"] = (
                    keras.ops.convert_to_numpy(layer.bias) if bias is None else bias)
            modules.append(module)
    tensors.update({PREFIX + path: value for path, value in values.items()})
    return tensors, modules


def plain_lora(config, values):
    """`(config, values)` of an adapter as a plain LoRA adapter of the original kernel.

    A PiSSA / OLoRA adapter trains `A`, `B` on the residual `W - scale * A0 @ B0`;
    on the original `W` the trained model is `W + scale * (A @ B - A0 @ B0)`, a
    rank-2r update `[A, A0] @ [B; -B0]` at the same scale (alpha doubled; with
    rslora, times sqrt(2)): PEFT's conversion on save.
    """
    if not config.changes_base:
        return config, values
    rank = 2 * config.rank
    alpha = (config.rank if config.alpha is None else config.alpha) * (
        2 ** 0.5 if config.use_rslora else 2)
    values = {**values, "lora_a": np.concatenate([values["lora_a"], values["lora_a0"]], 1),
              "lora_b": np.concatenate([values["lora_b"], -values["lora_b0"]], 0)}
    return config.replace(rank=rank, alpha=alpha, init="kaiming"), values


def save_adapter(model, path, metadata=None, adapter_name=None):
    """Saves one adapter of `model` (and its trained head) as PEFT files in directory `path`.

    Writes `adapter_config.json`, `adapter_model.safetensors` (keyed by layer) and
    a model card `README.md` (from `metadata`: `base_model`, `task`, `labels`,
    `metrics`, `command`), loadable by `klora.load_adapter` and by PEFT's
    `PeftModel.from_pretrained` on the matching `transformers` model
    (`BertModel` / `DistilBertModel` for a backbone, `*ForSequenceClassification`
    for a text classifier, `*ForTokenClassification` / `*ForQuestionAnswering` for
    klora's `TokenClassifier` / `SpanExtractor`). A PiSSA / OLoRA adapter
    is written as the plain LoRA adapter it amounts to on the original base
    kernel (see `plain_lora`); a DoRA adapter with its magnitudes. The directory is
    replaced atomically: an interrupted save leaves the previous adapter in
    `path` as it was (see `klora.atomic.atomic_directory`).

    Args:
        model: An adapted model (a backbone or a Task).
        path: Directory to write (created if needed).
        metadata: Optional JSON dict stored with the weights and returned by
            `load_adapter`, e.g. `{"label_map": {"0": "negative", "1": "positive"}}`.
        adapter_name: Which adapter; default: the active one.

    Example:

    >>> klora.save_adapter(classifier, "sst2-adapter", metadata={"label_map": labels})
    """
    metadata = check_metadata(metadata)
    if not adapted_layers(model):
        raise ValueError(f"Model '{model.name}' has no adapters: call `klora.apply` first.")
    adapter_name = adapter_name or active_adapter(model) or adapter_names(model)[0]
    if adapter_name not in adapter_names(model):
        raise ValueError(f"Model '{model.name}' has no adapter named {adapter_name!r}; "
                         f"it has {adapter_names(model)}.")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"Adapter path '{path}' exists and is not a directory.")
    arch = architecture(model)
    names = peft_module_names(model)
    tensors, configs = {}, {}
    for module, layer in names.items():
        if isinstance(layer, LoRALayer) and adapter_name in layer.adapter_names:
            config, values = plain_lora(layer.adapter_config(adapter_name),
                                        layer.adapter_values(adapter_name))
            tensors[f"{PREFIX}{module}.lora_A.weight"] = values["lora_a"].T
            tensors[f"{PREFIX}{module}.lora_B.weight"] = values["lora_b"].T
            if config.use_dora:
                tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = values["lora_magnitude"]
            configs[module] = config
    heads, head_modules = _head_tensors(model, names, adapter_name)
    tensors.update(heads)
    kind = task_type(model) if arch in HF_CLASSES else None
    auto_mapping = None if is_task(model) or arch not in HF_CLASSES else {
        "base_model_class": HF_CLASSES[arch][None],
        "parent_library": f"transformers.models.{arch}.modeling_{arch}"}
    config = peft_config(configs, head_modules, kind, auto_mapping)
    config_bytes = json.dumps(config, indent=2, sort_keys=True).encode()
    header = {
        "version": FORMAT_VERSION,
        "model_class": getattr(model, "_klora_base_class", type(model)).__name__,
        "backbone_class": type(getattr(model, "backbone", model)).__name__,
        "adapter_name": adapter_name,
        "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
        "metadata": metadata,
    }
    weights_bytes = write_safetensors(tensors, {"format": "pt", "klora": json.dumps(header)})
    card = model_card(config, metadata, adapter_name).encode()
    with atomic_directory(path) as directory:
        for name, data in ((WEIGHTS_NAME, weights_bytes), (CONFIG_NAME, config_bytes),
                           (CARD_NAME, card)):
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
    return path

