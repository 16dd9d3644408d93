"""Matching an adapter file's tensors to a model's layers, and checking their shapes.

>>> lora, heads, raw, extra = split_keys(tensors, peft_module_names(model), model)
"""

import re

import keras

from klora.adapted_model import lora_class
from klora.layers import LoRALayer
from klora.peft.names import resolve_module
from klora.peft.save import PREFIX


def split_keys(tensors, names, model):
    """`(lora, heads, raw, extra)`: the file's tensors sorted by what they belong to."""
    lora, heads, raw, extra = {}, {}, {}, []
    variables = {v.path for v in model.weights}
    for key, value in tensors.items():
        rest = key[len(PREFIX):] if key.startswith(PREFIX) else None
        lora_key = re.fullmatch(r"(.+)\.lora_(?:([AB])\.weight|(magnitude_vector))", rest or "")
        head_key = re.fullmatch(r"(.+)\.(weight|bias)", rest or "")
        module = resolve_module(head_key.group(1), names, model) if head_key else None
        if lora_key:
            lora.setdefault(lora_key.group(1), {})[lora_key.group(2) or "m"] = value
        elif module is not None and not isinstance(names[module], LoRALayer):
            heads.setdefault(module, {})[head_key.group(2)] = value
        elif rest in variables:
            raw[rest] = value
        else:
            extra.append(key)
    return lora, heads, raw, extra


def tensor_key(module, part):
    """The file's key of an adapter part: `A`, `B` or `m` (DoRA's magnitude)."""
    return f"{PREFIX}{module}.lora_" + ("magnitude_vector" if part == "m" else f"{part}.weight")


def check_lora(module, parts, layer, config, problems):
    """The layer's `{"lora_a", "lora_b"[, "lora_magnitude"]}` values, or `None` after
    noting the problem (DoRA adapters carry PEFT's `lora_magnitude_vector`)."""
    expected = {"A", "B", "m"} if config.use_dora else {"A", "B"}
    if set(parts) != expected:
        problems += [f"missing key {tensor_key(module, p)}" for p in sorted(expected - set(parts))]
        problems += [f"unexpected key {tensor_key(module, p)} (use_dora is {config.use_dora})"
                     for p in sorted(set(parts) - expected)]
        return None
    a, b = parts["A"], parts["B"]
    fan_in, fan_out = lora_class(layer).layer_fans(layer)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        problems.append(f"'{module}': lora_A {a.shape} and lora_B {b.shape} do not form a "
                        "low-rank pair")
    elif a.shape[1] != fan_in or b.shape[0] != fan_out:
        problems.append(f"'{module}': the adapter maps {a.shape[1]} -> {b.shape[0]} features "
                        f"but layer '{layer.path}' maps {fan_in} -> {fan_out} (a model of "
                        "another width?)")
    elif a.shape[0] != config.rank:
        problems.append(f"'{module}': rank mismatch, the config says r={config.rank} but the "
                        f"weights have rank {a.shape[0]}")
    elif config.rank > min(fan_in, fan_out):
        problems.append(f"'{module}': rank {config.rank} exceeds the layer's width")
    elif config.use_dora and parts["m"].shape != (fan_out,):
        problems.append(f"'{module}': lora_magnitude_vector has shape {parts['m'].shape}, not "
                        f"({fan_out},)")
    else:
        values = {"lora_a": a.T, "lora_b": b.T}
        return {**values, "lora_magnitude": parts["m"]} if config.use_dora else values
    return None


def check_head(module, parts, layer, problems):
    """The head Dense layer's `(kernel, bias)`, or `None` after noting the problem."""
    kernel_shape = tuple(layer.kernel.shape) if hasattr(layer, "kernel") else ()
    if type(layer) is not keras.layers.Dense or len(kernel_shape) != 2:
        problems.append(f"head '{module}' (layer '{layer.path}') is not a Dense layer")
        return None
    want = {"weight"} | ({"bias"} if layer.bias is not None else set())
    if set(parts) != want:
        problems.append(f"head '{module}': expected {sorted(want)}, found {sorted(parts)}")
    elif parts["weight"].shape != kernel_shape[::-1] or (
            "bias" in parts and parts["bias"].shape != tuple(layer.bias.shape)):
        problems.append(f"head '{module}': weight {parts['weight'].shape} does not fit layer "
                        f"'{layer.path}' (kernel {kernel_shape}; another number of classes?)")
    else:
        return parts["weight"].T, parts.get("bias")
    return None
