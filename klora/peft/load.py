"""`klora.load_adapter`: a PEFT (or klora) adapter directory into a model.

Only JSON and safetensors are read, so loading an adapter never runs code.
Everything is checked before anything is assigned: a bad file raises a
`ValueError` naming it and the problem, and leaves the model untouched.
"""

import hashlib
import json
import os
import warnings

from klora.adapted_model import (adapt_model, adapter_names, check_adaptable, check_built,
                                 lora_class)
from klora.config import DEFAULT_ADAPTER
from klora.peft.config import module_config, read_config
from klora.peft.match import check_head, check_lora, split_keys, tensor_key
from klora.peft.names import architecture, architecture_of_module, head_modules, \
    peft_module_names, resolve_module
from klora.peft.safetensors import read_safetensors
from klora.peft.save import CONFIG_NAME, PREFIX, WEIGHTS_NAME


def _files(path):
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"Adapter directory '{path}' does not exist." if not
                         os.path.exists(path) else f"'{path}' is not a directory; pass the "
                         f"directory holding {CONFIG_NAME} and {WEIGHTS_NAME}.")
    files = [os.path.join(path, n) for n in (CONFIG_NAME, WEIGHTS_NAME)]
    for filename in files:
        if not os.path.isfile(filename):
            raise ValueError(f"Adapter directory '{path}' has no {os.path.basename(filename)}.")
    return files


def _klora_header(file_metadata, weights_file):
    """klora's own header in the safetensors metadata (`{}` for a PEFT-made file)."""
    if "klora" not in file_metadata:
        return {}
    try:
        header = json.loads(file_metadata["klora"])
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("metadata") or {}, dict):
        raise ValueError(f"'{weights_file}' has an unreadable klora header.")
    return header


def read_adapter_metadata(path):
    """The `metadata` dict saved with the adapter in directory `path` (`{}` if none).

    Reads only the safetensors header; use it to rebuild the model (e.g. the
    number of labels) before `load_adapter`.

    >>> labels = klora.read_adapter_metadata("sst2-adapter")["label_map"]
    """
    _, weights_file = _files(path)
    _, file_metadata = read_safetensors(weights_file)
    return dict(_klora_header(file_metadata, weights_file).get("metadata") or {})


def plan_adapter(model, path):
    """Reads and checks the adapter at `path` against `model` without changing it.

    Returns `(lora, heads, raw, metadata)`: `lora` maps layers to
    `(LoraConfig, values)`, `heads` Dense layers to `(kernel, bias)`, `raw`
    variable paths to values, all ready to assign.
    """
    config_file, weights_file = _files(path)
    config, config_bytes = read_config(config_file)
    tensors, file_metadata = read_safetensors(weights_file)
    header = _klora_header(file_metadata, weights_file)
    digest = header.get("config_sha256")
    if digest and digest != hashlib.sha256(config_bytes).hexdigest():
        raise ValueError(f"'{config_file}' does not belong to '{weights_file}' (they come from "
                         "different saves).")
    names, arch = peft_module_names(model), architecture(model)
    saved_backbone = header.get("backbone_class")
    model_backbone = type(getattr(model, "backbone", model)).__name__
    if saved_backbone and arch and saved_backbone != model_backbone:
        raise ValueError(f"The adapter in '{path}' was saved from a {saved_backbone}; model "
                         f"'{model.name}' is a {model_backbone}.")
    lora_parts, head_parts, raw, extra = split_keys(tensors, names, model)
    file_archs = {architecture_of_module(m) for m in lora_parts} - {None}
    if file_archs and file_archs != {arch}:
        raise ValueError(f"The adapter in '{path}' is for {', '.join(sorted(file_archs))} (by "
                         f"its parameter names); model '{model.name}' is "
                         f"{arch or 'neither BERT nor DistilBERT'}.")
    lora, heads, problems = {}, {}, []
    for module, parts in lora_parts.items():
        target = resolve_module(module, names, model)
        if target is None:
            extra += [tensor_key(module, p) for p in parts]
            continue
        try:
            layer_config = module_config(config, module, config_file)
            lora_class(names[target])
        except ValueError as e:
            problems.append(str(e))
            continue
        values = check_lora(module, parts, names[target], layer_config, problems)
        if values is not None:
            lora[names[target]] = (layer_config, values)
    for module, parts in head_parts.items():
        head = check_head(module, parts, names[module], problems)
        if head is not None:
            heads[names[module]] = head
    for module in config.get("modules_to_save") or []:
        listed = any(m == module or m.endswith("." + module) for m in head_parts)
        if not listed and any(m == module or m.endswith("." + module) for m in names):
            problems.append(f"missing key {PREFIX}{module}.weight (listed in modules_to_save)")
    variables = {v.path: v for v in model.weights}
    problems += [f"variable '{p}': shape {v.shape} in the file, {tuple(variables[p].shape)} in "
                 "the model" for p, v in raw.items() if v.shape != tuple(variables[p].shape)]
    if extra:
        problems.append(f"unexpected keys (no such layer in model '{model.name}'): "
                        f"{sorted(extra)[:5]}{' ...' if len(extra) > 5 else ''}")
    if not lora and not problems:
        problems.append("the file holds no LoRA weights")
    if problems:
        raise ValueError(f"Cannot load the adapter in '{path}' into model '{model.name}': "
                         + "; ".join(problems) + ".")
    restored = {module for module, layer in names.items() if layer in heads}
    missing = [m for m in head_modules(model) if m not in restored]
    if restored and missing:  # e.g. PEFT's SEQ_CLS default saves a DistilBERT `classifier` only
        warnings.warn(f"The adapter in '{path}' restores the head layer(s) {sorted(restored)} "
                      f"but not {missing}: those keep model '{model.name}''s current "
                      "(untrained) weights, so its outputs differ from the model the adapter "
                      f"was trained with. Train with modules_to_save={head_modules(model)} "
                      "to keep the whole head.", stacklevel=3)
    return lora, heads, raw, header.get("metadata") or {}


def load_adapter(model, path, adapter_name=DEFAULT_ADAPTER):
    """Loads a PEFT / klora adapter directory into `model` and makes it the active adapter.

    Layers named by the file are adapted (a plain model from the same preset
    is fine, as in PEFT's `PeftModel.from_pretrained`), their adapter weights
    set, head weights (`modules_to_save`) restored as this adapter's own, and
    base weights frozen. The whole file is checked first; on any problem a
    `ValueError` says what is wrong and the model is left untouched.

    Args:
        model: A built backbone or Task (e.g. a fresh one from the same preset).
        path: The adapter directory.
        adapter_name: Name for the loaded adapter; a model can hold several.

    Returns:
        The `metadata` dict given to `save_adapter` (`{}` if none).

    Example:

    >>> backbone = keras_hub.models.BertBackbone.from_preset(path)
    >>> classifier = keras_hub.models.BertTextClassifier(backbone, num_classes=2)
    >>> labels = klora.load_adapter(classifier, "sst2-adapter")["label_map"]
    """
    check_built(model)
    if adapter_name in adapter_names(model):
        raise ValueError(f"Model '{model.name}' already has an adapter named {adapter_name!r}: "
                         "pass another `adapter_name` or `klora.delete_adapter` it first.")
    lora, heads, raw, metadata = plan_adapter(model, path)
    plan = {layer: config for layer, (config, _) in lora.items()}
    check_adaptable(model, plan, adapter_name)
    variables = {v.path: v for v in model.weights}
    extra = [variables[p] for p in raw] + [v for layer in heads for v in
                                           (layer.kernel, layer.bias) if v is not None]
    adapt_model(model, plan, adapter_name, {layer: v for layer, (_, v) in lora.items()}, extra)
    for layer, (kernel, bias) in heads.items():
        layer.kernel.assign(kernel)
        if bias is not None:
            layer.bias.assign(bias)
    for variable_path, value in raw.items():
        variables[variable_path].assign(value)
    return metadata
