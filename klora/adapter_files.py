"""`klora.save_adapter` / `klora.load_adapter`: adapters as Hugging Face PEFT files.

An adapter directory holds `adapter_config.json` (PEFT's `LoraConfig`) and
`adapter_model.safetensors` with PEFT's parameter names, e.g.
`base_model.model.encoder.layer.0.attention.self.query.lora_A.weight` of
shape `[r, in]` and `...lora_B.weight` of shape `[out, r]`. Weights are keyed
by layer (see `klora.peft_names`), never by position. Trained head layers are
saved like PEFT's `modules_to_save` (`base_model.model.classifier.weight`,
`[out, in]`, and `.bias`); other trainable non-adapter weights are saved under
`base_model.model.<variable.path>`. klora's own information (the model class
and the caller's `metadata`, e.g. a label map) lives in the safetensors
header's `__metadata__`, so the config stays a plain PEFT config.

Only JSON and safetensors are read, so loading an adapter never runs code.
Everything is checked before anything is assigned: a bad file leaves the
model untouched.
"""

import collections
import hashlib
import json
import math
import os
import re
import tempfile

import keras
import numpy as np

from klora.apply import adapt_layer, adapted_layers, freeze_base_weights, record_adapters
from klora.layers import LoRALayer
from klora.layers.lora_layer import DEFAULT_ADAPTER, check_lora_arguments
from klora.peft_names import (HF_CLASSES, architecture, architecture_of_module, is_task,
                              peft_module_names)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100 * 2**20

# PEFT `LoraConfig` fields (up to peft 0.21) that do not change what a loaded
# plain LoRA adapter computes: any value is accepted.
FREE_FIELDS = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "corda_config",
    "ensure_weight_tying", "eva_config", "exclude_modules", "inference_mode",
    "init_lora_weights", "layers_pattern", "layers_to_transform", "loftq_config",
    "lora_alpha", "lora_dropout", "lora_ga_config", "megatron_core", "modules_to_save",
    "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern", "revision",
    "runtime_config", "target_modules", "task_type", "use_rslora",
}
# Fields of PEFT features klora does not implement: they must be off.
OFF_FIELDS = {
    "alora_invocation_tokens": None, "arrow_config": None, "bias": "none",
    "fan_in_fan_out": False, "kasa_config": None, "layer_replication": None,
    "lora_bias": False, "megatron_config": None, "monteclora_config": None,
    "target_parameters": None, "trainable_token_indices": None, "use_bdlora": None,
    "use_dora": False, "use_qalora": False, "velora_config": None,
}
_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<u2"}


# ---------------------------------------------------------------- saving


def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def _check_metadata(metadata):
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
            f"unchanged. Received: {metadata!r}"
        )
    return metadata


def _head_tensors(model, names, adapter_ids):
    """PEFT `modules_to_save` tensors and raw variables for trainable non-adapter weights."""
    tensors, modules = {}, []
    trainable = [v for v in model.trainable_weights if id(v) not in adapter_ids]
    covered = set()
    for name, layer in names.items():
        if type(layer) is keras.layers.Dense and any(v is layer.kernel for v in trainable):
            kernel = keras.ops.convert_to_numpy(layer.kernel).astype("float32")
            tensors[f"{PREFIX}{name}.weight"] = kernel.T
            covered.add(id(layer.kernel))
            if layer.bias is not None:
                tensors[f"{PREFIX}{name}.bias"] = keras.ops.convert_to_numpy(layer.bias)
                covered.add(id(layer.bias))
            modules.append(name)
    for variable in trainable:
        if id(variable) not in covered:
            tensors[PREFIX + variable.path] = keras.ops.convert_to_numpy(variable)
    return tensors, modules


def _peft_config(arch, task, modules, settings, heads):
    """PEFT's `LoraConfig` as a dict, with per-module ranks and alphas as patterns."""
    ranks = {m: s["rank"] for m, s in settings.items()}
    alphas = {m: s["rank"] if s["alpha"] is None else s["alpha"] for m, s in settings.items()}
    rank, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    rslora = {s["use_rslora"] for s in settings.values()}
    if len(rslora) > 1:
        raise ValueError("PEFT's format has one `use_rslora` for the whole adapter, but the "
                         "adapter's layers mix use_rslora=True and False.")
    first = settings[modules[0]]
    base_class, task_class = HF_CLASSES.get(arch, (None, None))
    config = {
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
        "auto_mapping": None if task or not base_class else {
            "base_model_class": base_class,
            "parent_library": f"transformers.models.{arch}.modeling_{arch}",
        },
        "base_model_name_or_path": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True if first["init"] == "kaiming" else "gaussian",
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": first["lora_dropout"],
        "modules_to_save": heads or None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
        "revision": None,
        "target_modules": sorted(modules),
        "task_type": "SEQ_CLS" if task and task_class and "TextClassifier" in
                     type(task).__name__ else None,
        "use_dora": False,
        "use_rslora": rslora.pop(),
    }
    return config


def _atomic_write(directory, name, data):
    """Writes `data` to a temporary file next to `name`; returns its path."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def save_adapter(model, path, metadata=None, adapter_name=None):
    """Saves one adapter of `model` (and its trained head) as PEFT files in directory `path`.

    Writes `adapter_config.json` and `adapter_model.safetensors`, keyed by
    layer, loadable by `klora.load_adapter` and by PEFT's
    `PeftModel.from_pretrained` on the matching `transformers` model
    (`BertModel` / `DistilBertModel` for a backbone,
    `*ForSequenceClassification` for a text classifier). The files are written
    to temporary names and renamed, so an interrupted save leaves a previous
    adapter in `path` intact.

    Args:
        model: An adapted model (a backbone or a Task).
        path: Directory to write (created if needed).
        metadata: Optional JSON dict stored with the weights and returned by
            `load_adapter`, e.g. `{"label_map": {"0": "negative", "1": "positive"}}`.
        adapter_name: Which adapter; default: the active one.

    Example:

    >>> klora.save_adapter(classifier, "sst2-adapter", metadata={"label_map": labels})
    """
    from safetensors.numpy import save as safetensors_bytes

    metadata = _check_metadata(metadata)
    layers = adapted_layers(model)
    if not layers:
        raise ValueError(f"Model '{model.name}' has no adapters: call `klora.apply` first.")
    if adapter_name is None:
        from klora.adapters import active_adapter

        adapter_name = active_adapter(model) or layers[0].adapter_names[0]
    holders = {id(l) for l in layers if adapter_name in l.adapter_names}
    if not holders:
        names = sorted({n for l in layers for n in l.adapter_names})
        raise ValueError(f"Model '{model.name}' has no adapter named {adapter_name!r}; "
                         f"it has {names}.")
    arch = architecture(model)
    names = peft_module_names(model)
    tensors, settings = {}, {}
    for module, layer in names.items():
        if id(layer) in holders:
            a, b = layer.adapter_weights(adapter_name)
            tensors[f"{PREFIX}{module}.lora_A.weight"] = np.asarray(a, "float32").T
            tensors[f"{PREFIX}{module}.lora_B.weight"] = np.asarray(b, "float32").T
            settings[module] = layer.adapter_settings(adapter_name)
    adapter_ids = {id(v) for l in layers for v in (l.lora_a, l.lora_b)}
    heads, head_modules = _head_tensors(model, names, adapter_ids)
    tensors.update(heads)
    config = _peft_config(arch, model if is_task(model) else None, list(settings), settings,
                          head_modules)
    config_bytes = json.dumps(config, indent=2, sort_keys=True).encode()
    header = {
        "version": FORMAT_VERSION,
        "model_class": getattr(model, "_klora_base_class", type(model)).__name__,
        "backbone_class": type(getattr(model, "backbone", model)).__name__,
        "adapter_name": adapter_name,
        "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
        "metadata": metadata,
    }
    weights_bytes = safetensors_bytes(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        metadata={"format": "pt", "klora": json.dumps(header)},
    )
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"Adapter path '{path}' exists and is not a directory.")
    os.makedirs(path, exist_ok=True)
    temporary = []
    try:
        temporary.append(_atomic_write(path, WEIGHTS_NAME, weights_bytes))
        temporary.append(_atomic_write(path, CONFIG_NAME, config_bytes))
        # Rename only once both are on disk. The weights record their config's hash,
        # so a pair from two different saves is detected on load.
        os.replace(temporary[0], os.path.join(path, WEIGHTS_NAME))
        os.replace(temporary[1], os.path.join(path, CONFIG_NAME))
    finally:
        for tmp in temporary:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


# ---------------------------------------------------------------- reading


def read_safetensors(filename):
    """`(tensors, metadata)` from a safetensors file, validating its structure first.

    Pure parsing (JSON header + raw little-endian arrays): nothing is executed.
    Raises a `ValueError` naming the file for a truncated or corrupt file.
    """
    def corrupt(why):
        return ValueError(f"'{filename}' is not a valid safetensors file: {why}.")

    with open(filename, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise corrupt(f"only {len(data)} bytes")
    header_size = int.from_bytes(data[:8], "little")
    if header_size > min(len(data) - 8, MAX_HEADER_BYTES):
        raise corrupt(f"header of {header_size} bytes but the file has {len(data)} (truncated?)")
    try:
        header = json.loads(data[8:8 + header_size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise corrupt(f"unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise corrupt("`__metadata__` is not an object")
    body = memoryview(data)[8 + header_size:]
    tensors, end = {}, 0
    for name, info in header.items():
        try:
            dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(d) for d in shape)
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad entry for tensor '{name}'") from None
        if dtype not in _DTYPES:
            raise ValueError(f"Tensor '{name}' in '{filename}' has dtype {dtype}; adapters "
                             f"must be floating point ({sorted(_DTYPES)}).")
        size = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if not 0 <= begin <= stop <= len(body) or stop - begin != size:
            raise corrupt(f"tensor '{name}' lies outside the data or has the wrong size "
                          "(truncated?)")
        array = np.frombuffer(body[begin:stop], dtype=_DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            array = (array.astype("<u4") << 16).view("<f4")
        tensors[name] = array.astype("float32")
        end = max(end, stop)
    if end != len(body):
        raise corrupt(f"{len(body) - end} bytes of data belong to no tensor")
    return tensors, metadata


def _read_config(filename):
    try:
        with open(filename, "rb") as f:
            raw = f.read()
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"'{filename}' is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"'{filename}' must hold a JSON object.")
    unknown = sorted(set(config) - FREE_FIELDS - set(OFF_FIELDS))
    if unknown:
        raise ValueError(f"Unknown field(s) {unknown} in '{filename}': klora reads PEFT LoRA "
                         "configs (peft <= 0.21) and will not guess what they mean.")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"'{filename}' is a {config['peft_type']} adapter; klora loads LORA.")
    on = {k: config[k] for k, off in OFF_FIELDS.items()
          if k in config and config[k] not in (off, None, False, {}, [])}
    if on:
        raise ValueError(f"'{filename}' uses PEFT features klora does not implement: {on}.")
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise ValueError(f"'{filename}' lacks the field '{field}'.")
    rank, alpha = config["r"], config["lora_alpha"]
    dropout = config.get("lora_dropout", 0.0)
    try:
        check_lora_arguments(rank, alpha, dropout, "kaiming")
    except ValueError as e:
        raise ValueError(f"Invalid LoRA settings in '{filename}': {e}") from None
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"'use_rslora' in '{filename}' must be true or false.")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise ValueError(f"'{field}' in '{filename}' must be an object.")
    heads = config.get("modules_to_save") or []
    if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads):
        raise ValueError(f"'modules_to_save' in '{filename}' must be a list of names.")
    return config, raw


def _pattern_value(pattern, module, default):
    """PEFT's `rank_pattern` / `alpha_pattern` lookup for one module."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module_settings(config, module, filename):
    rank = _pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    try:
        check_lora_arguments(rank, alpha, config.get("lora_dropout", 0.0), "kaiming")
    except ValueError as e:
        raise ValueError(f"Invalid pattern settings for '{module}' in '{filename}': {e}") \
            from None
    init = "gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming"
    return dict(rank=rank, alpha=alpha, lora_dropout=float(config.get("lora_dropout", 0.0)),
                use_rslora=bool(config.get("use_rslora", False)), init=init, seed=None)


def _fans(layer):
    from klora.apply import LORA_CLASSES

    lora_class = type(layer) if isinstance(layer, LoRALayer) else LORA_CLASSES.get(type(layer))
    if lora_class is None:
        raise ValueError(f"Layer '{layer.path}' of type {type(layer).__name__} cannot hold "
                         "an adapter.")
    in_dims, out_dims = lora_class._lora_shapes(layer)
    return math.prod(in_dims), math.prod(out_dims)


def _resolve(module, names, model):
    """The model's key for a file's module name, allowing a task/backbone prefix difference."""
    if module in names:
        return module
    arch = architecture(model)
    if arch:
        if is_task(model) and f"{arch}.{module}" in names:
            return f"{arch}.{module}"
        if not is_task(model) and module.startswith(f"{arch}.") and \
                module[len(arch) + 1:] in names:
            return module[len(arch) + 1:]
    return None


def _plan(model, path):
    """Reads and checks the adapter at `path` against `model` without changing it.

    Returns `(config, lora, heads, raw, metadata)`: `lora` maps layers to
    `(settings, A, B)`, `heads` Dense layers to `(kernel, bias)`, `raw`
    variables to values, all ready to assign.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"Adapter directory '{path}' does not exist." if not
                         os.path.exists(path) else f"'{path}' is not a directory; pass the "
                         f"directory holding {CONFIG_NAME} and {WEIGHTS_NAME}.")
    config_file, weights_file = (os.path.join(path, n) for n in (CONFIG_NAME, WEIGHTS_NAME))
    for filename in (config_file, weights_file):
        if not os.path.isfile(filename):
            raise ValueError(f"Adapter directory '{path}' has no {os.path.basename(filename)}.")
    config, config_bytes = _read_config(config_file)
    tensors, file_metadata = read_safetensors(weights_file)
    header = {}
    if "klora" in file_metadata:
        try:
            header = json.loads(file_metadata["klora"])
            assert isinstance(header, dict)
        except (ValueError, AssertionError):
            raise ValueError(f"'{weights_file}' has an unreadable klora header.") from None
        digest = header.get("config_sha256")
        if digest and digest != hashlib.sha256(config_bytes).hexdigest():
            raise ValueError(f"'{config_file}' does not belong to '{weights_file}' (they come "
                             "from different saves, e.g. an interrupted save).")

    names = peft_module_names(model)
    arch = architecture(model)
    saved_backbone = header.get("backbone_class")
    model_backbone = type(getattr(model, "backbone", model)).__name__
    if saved_backbone and arch and saved_backbone != model_backbone:
        raise ValueError(f"The adapter in '{path}' was saved from a {saved_backbone}; "
                         f"model '{model.name}' is a {model_backbone}.")

    lora_parts, head_parts, raw, extra = {}, {}, {}, []
    variables = {v.path: v for v in model.weights}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            extra.append(key)
            continue
        rest = key[len(PREFIX):]
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", rest)
        if match:
            lora_parts.setdefault(match.group(1), {})[match.group(2)] = value
            continue
        match = re.fullmatch(r"(.+)\.(weight|bias)", rest)
        module = _resolve(match.group(1), names, model) if match else None
        if module is not None and not isinstance(names[module], LoRALayer):
            head_parts.setdefault(module, {})[match.group(2)] = value
        elif rest in variables:
            raw[variables[rest]] = value
        else:
            extra.append(key)

    file_archs = {architecture_of_module(m) for m in lora_parts} - {None}
    if file_archs and file_archs != {arch}:
        found = ", ".join(sorted(file_archs))
        raise ValueError(f"The adapter in '{path}' is for {found} (by its parameter names); "
                         f"model '{model.name}' is {arch or 'neither BERT nor DistilBERT'}.")

    lora, problems = {}, []
    for module, parts in lora_parts.items():
        target = _resolve(module, names, model)
        if target is None:
            extra += [f"{PREFIX}{module}.lora_{p}.weight" for p in parts]
            continue
        if set(parts) != {"A", "B"}:
            missing = "B" if "A" in parts else "A"
            problems.append(f"missing key {PREFIX}{module}.lora_{missing}.weight")
            continue
        layer = names[target]
        settings = _module_settings(config, module, config_file)
        a, b = parts["A"], parts["B"]
        fan_in, fan_out = _fans(layer)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"'{module}': lora_A {a.shape} and lora_B {b.shape} do not form "
                            "a low-rank pair")
        elif a.shape[1] != fan_in or b.shape[0] != fan_out:
            problems.append(f"'{module}': the adapter maps {a.shape[1]} -> {b.shape[0]} "
                            f"features but layer '{layer.path}' maps {fan_in} -> {fan_out} "
                            "(a model of another width?)")
        elif a.shape[0] != settings["rank"]:
            problems.append(f"'{module}': rank mismatch, the config says r={settings['rank']} "
                            f"but the weights have rank {a.shape[0]}")
        elif settings["rank"] > min(fan_in, fan_out):
            problems.append(f"'{module}': rank {settings['rank']} exceeds the layer's width")
        else:
            lora[layer] = (settings, a.T, b.T)

    heads = {}
    for module, parts in head_parts.items():
        layer = names[module]
        kernel_shape = tuple(layer.kernel.shape)
        if type(layer) is not keras.layers.Dense or len(kernel_shape) != 2:
            problems.append(f"head '{module}' (layer '{layer.path}') is not a Dense layer")
            continue
        want = {"weight"} | ({"bias"} if layer.bias is not None else set())
        if set(parts) != want:
            problems.append(f"head '{module}': expected {sorted(want)}, found {sorted(parts)}")
        elif parts["weight"].shape != kernel_shape[::-1] or (
                "bias" in parts and parts["bias"].shape != tuple(layer.bias.shape)):
            problems.append(f"head '{module}': weight {parts['weight'].shape} does not fit "
                            f"layer '{layer.path}' (kernel {kernel_shape}; another number of "
                            "classes?)")
        else:
            heads[layer] = (parts["weight"].T, parts.get("bias"))
    for module in config.get("modules_to_save") or []:
        listed = [m for m in head_parts if m == module or m.endswith("." + module)]
        exists = any(m == module or m.endswith("." + module) for m in names)
        if not listed and exists:
            problems.append(f"missing key {PREFIX}{module}.weight (listed in modules_to_save)")
    for variable, value in raw.items():
        if value.shape != tuple(variable.shape):
            problems.append(f"variable '{variable.path}': shape {value.shape} in the file, "
                            f"{tuple(variable.shape)} in the model")
    if extra:
        problems.append(f"unexpected keys (no such layer in model '{model.name}'): "
                        f"{sorted(extra)[:5]}{' ...' if len(extra) > 5 else ''}")
    if not lora and not problems:
        problems.append("the file holds no LoRA weights")
    if problems:
        raise ValueError(f"Cannot load the adapter in '{path}' into model '{model.name}': "
                         + "; ".join(problems) + ".")
    return config, lora, heads, raw, header.get("metadata") or {}


def read_adapter_metadata(path):
    """The `metadata` dict saved with the adapter in directory `path` (`{}` if none).

    Reads only the safetensors header; use it to rebuild the model (e.g. the
    number of labels) before `load_adapter`.

    >>> labels = klora.read_adapter_metadata("sst2-adapter")["label_map"]
    """
    path = os.fspath(path)
    weights_file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights_file):
        raise ValueError(f"Adapter directory '{path}' does not exist." if not
                         os.path.exists(path) else f"'{path}' has no {WEIGHTS_NAME}.")
    _, file_metadata = read_safetensors(weights_file)
    try:
        header = json.loads(file_metadata.get("klora", "{}"))
        return dict(header.get("metadata") or {})
    except (ValueError, AttributeError, TypeError):
        raise ValueError(f"'{weights_file}' has an unreadable klora header.") from None


def load_adapter(model, path, adapter_name=DEFAULT_ADAPTER):
    """Loads a PEFT / klora adapter directory into `model` and makes it the active adapter.

    Layers named by the file are adapted (a plain model from the same preset
    is fine, as in PEFT's `PeftModel.from_pretrained`), their adapter weights
    set, head weights (`modules_to_save`) restored and base weights frozen.
    The whole file is checked first; on any problem a `ValueError` says what
    is wrong and the model is left untouched.

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
    from klora.adapters import adapter_names, set_adapter
    from klora.merge import _reset_compiled_functions

    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"`adapter_name` must be a non-empty string. Received: {adapter_name!r}")
    if not isinstance(model, keras.layers.Layer) or not model.built:
        raise ValueError("`model` must be a built Keras model (e.g. from `from_preset`).")
    if adapter_name in adapter_names(model):
        raise ValueError(f"Model '{model.name}' already has an adapter named {adapter_name!r}: "
                         "pass another `adapter_name` or `klora.delete_adapter` it first.")
    if any(l.merged for l in adapted_layers(model)):
        raise ValueError("The model's adapters are merged: call `klora.unmerge(model)` before "
                         "loading another adapter.")
    config, lora, heads, raw, metadata = _plan(model, path)
    had_adapters = bool(adapted_layers(model))
    for layer, (settings, a, b) in lora.items():
        if isinstance(layer, LoRALayer):
            layer.add_adapter(adapter_name, settings, a, b)
        else:
            adapt_layer(layer, **settings, adapter_name=adapter_name)
            layer.lora_a.assign(a)
            layer.lora_b.assign(b)
    for layer, (kernel, bias) in heads.items():
        layer.kernel.assign(kernel)
        if bias is not None:
            layer.bias.assign(bias)
    for variable, value in raw.items():
        variable.assign(value)
    freeze_base_weights(model)
    record_adapters(model, [layer.path for layer in lora])
    if had_adapters:
        set_adapter(model, adapter_name)
    _reset_compiled_functions(model)
    return metadata
