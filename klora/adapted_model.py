"""What every model-level klora function sits on: adapting a model, finding its adapters,
switching them, freezing the base, and recording the adapters for `.keras` saving.

`adapt_model` is the one path that adds an adapter to a model: `klora.apply`,
`klora.load_adapter` and `keras.saving.load_model` all go through it.

Trained weights that are not low-rank updates (a Task's classification head,
a layer norm made trainable) belong to the adapter that was active while they
trained, like PEFT's per-adapter `modules_to_save`: `activate` stores their
values per adapter on the layer that owns them and swaps them with the
adapter. Their values from before any adapter (when klora saw the model
first, on `apply` or `load_adapter`) are what a disabled or new adapter gets.

keras-hub layers rebuild their sub-layers from their own configs, which know
nothing of adapters. An adapted model therefore gets a subclass of its own
class (`AdaptedModel`) whose `get_config` wraps the plain config with each
adapted layer's `LoraConfig`, keyed by layer path; loading rebuilds the plain
model, adapts it through `adapt_model`, then Keras loads the weights.
"""

import keras
import numpy as np
from keras.src.saving import object_registration

from klora.config import LoraConfig
from klora.layers import LoRADense, LoRAEinsumDense, LoRALayer
from klora.layers.quantized import quantizes_inputs
from klora.speed.fast_layers import use_fast_layers

LORA_CLASSES = {keras.layers.Dense: LoRADense, keras.layers.EinsumDense: LoRAEinsumDense}
REGISTERED_NAME = "klora>AdaptedModel"
ORIGINAL = None  # the key of head values from before any adapter


def adapted_layers(model):
    """The LoRA layers inside `model`, in traversal order.

    >>> [layer.path for layer in klora.adapted_layers(backbone)][:2]
    ['transformer_layer_0/self_attention_layer/value', 'transformer_layer_0/self_attention_layer/query']
    """
    return [l for l in model._flatten_layers(include_self=False) if isinstance(l, LoRALayer)]


def require_adapters(model):
    """`adapted_layers(model)`, or a `ValueError` when there are none."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError(f"Model '{model.name}' has no LoRA layers: call `klora.apply(model)` "
                         "first.")
    return layers


def adapter_names(model):
    """Names of the adapters on `model`, in the order they were added."""
    names = {}
    for layer in adapted_layers(model):
        names.update(dict.fromkeys(layer.adapter_names))
    return list(names)


def active_adapter(model):
    """The name of `model`'s active adapter (`None` if it has no adapters)."""
    names = {l.active_adapter for l in adapted_layers(model)} - {None}
    return next(iter(names), None)


def reset_compiled_functions(model):
    """Drops `model`'s compiled train/test/predict functions (they captured the old state)."""
    for layer in model._flatten_layers(include_self=True):
        if isinstance(layer, keras.Model):
            layer.train_function = layer.test_function = layer.predict_function = None


def lora_class(layer):
    """The LoRA class `layer` becomes (its own if it is one); `ValueError` if unsupported."""
    if isinstance(layer, LoRALayer):
        return type(layer)
    if type(layer) not in LORA_CLASSES:
        raise ValueError(f"Layer '{layer.path}' of type {type(layer).__name__} is not "
                         "supported: klora adapts keras.layers.Dense and "
                         "keras.layers.EinsumDense (exactly those classes, not subclasses).")
    if getattr(layer, "lora_enabled", False):
        raise ValueError(f"Layer '{layer.path}' already has Keras' built-in LoRA enabled "
                         "(`enable_lora`); use one or the other.")
    return LORA_CLASSES[type(layer)]


def check_built(model):
    """Raises a `ValueError` unless `model` is a built Keras model or layer."""
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(f"`model` must be a Keras model or layer. Received: {type(model)}")
    if not model.built:
        raise ValueError(f"Model '{model.name}' is not built: build it first (load it with "
                         "`from_preset`, call it on data, or call `model.build(input_shape)`).")


def check_adaptable(model, plan, adapter_name):
    """Raises a `ValueError` if `adapt_model(model, plan, adapter_name)` would fail."""
    check_built(model)
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"`adapter_name` must be a non-empty string. Received: "
                         f"{adapter_name!r}")
    if not plan:
        raise ValueError(f"No layers to adapt in model '{model.name}'.")
    already = [l.path for l in plan if isinstance(l, LoRALayer) and adapter_name in
               l.adapter_names]
    if already:
        raise ValueError(f"Layers already adapted (adapter {adapter_name!r}): {already}. Call "
                         "`klora.unload(model)` first, choose other layers, or pass another "
                         "`adapter_name`.")
    if any(l.merged for l in adapted_layers(model)):
        raise ValueError("The model's adapters are merged: call `klora.unmerge(model)` before "
                         "adding an adapter.")
    paths = [layer.path for layer in plan]
    if len(set(paths)) != len(paths):
        raise ValueError(f"Layers to adapt share a path, so adapters cannot be recorded: {paths}")
    for layer, config in plan.items():
        lora_class(layer).check_adaptable(layer, config)
    _check_base_changes(model, plan, adapter_name)
    scope = frozen_scope(model)
    inside = {id(l) for l in scope._flatten_layers(include_self=True)}
    quantized_heads = [l.path for l in model._flatten_layers(include_self=False)
                       if scope is not model and id(l) not in inside
                       and getattr(l, "quantization_mode", None) is not None]
    if quantized_heads:
        raise ValueError(f"The head of '{model.name}' is quantized ({quantized_heads}), so it "
                         "cannot train: quantize the backbone (`model.backbone.quantize(...)`), "
                         "not the Task.")


def _check_base_changes(model, plan, adapter_name):
    """PiSSA / OLoRA adapters replace the base kernel by a residual, which every other
    adapter of the layer would see: such an adapter must be the model's only one."""
    others = [n for n in adapter_names(model) if n != adapter_name]
    changing = [l for l in adapted_layers(model)
                if any(l.adapter_config(n).changes_base for n in l.adapter_names)]
    if any(c.changes_base for c in plan.values()) and others:
        raise ValueError(f"init={next(iter(plan.values())).init!r} replaces the base kernels "
                         f"by residuals, which the model's other adapters {others} would see: "
                         "use it on a model without adapters (or another init).")
    if changing and any(n != adapter_name for l in changing for n in l.adapter_names):
        raise ValueError(f"Model '{model.name}' holds a PiSSA / OLoRA adapter, whose base "
                         "kernels are residuals: it cannot take other adapters.")


def adapt_model(model, plan, adapter_name, values=None, trainable=(), initialize=True):
    """Adds adapter `adapter_name` to `model` (or to more of its layers) and makes it active.

    Args:
        model: A built Keras model.
        plan: `{layer: LoraConfig}` for each layer to adapt.
        adapter_name: Name of the new adapter.
        values: Optional `{layer: {"lora_a": array, "lora_b": array}}` (as in
            `LoRALayer.adapter_values`); other layers are initialized.
        trainable: Other variables that train with this adapter (they stay
            trainable when the base is frozen).
        initialize: Whether kernel-based inits (PiSSA, OLoRA) decompose the kernel;
            `False` when the adapter's values, and the kernel's, will be loaded.

    Everything is checked before anything changes. The plain layers become
    LoRA layers, every base weight is frozen, the fast layers are installed
    (`klora.speed.fast_layers`) and the adapted paths are recorded.
    """
    check_adaptable(model, plan, adapter_name)
    values = values or {}
    previous = active_adapter(model)
    # A Task's head layers keep training as heads when they are adapted too.
    scope = {id(l) for l in frozen_scope(model)._flatten_layers(include_self=True)}
    heads = [v for layer in plan if id(layer) not in scope
             for v in (layer.kernel, layer.bias) if v is not None and v.trainable]
    for layer, config in plan.items():
        if isinstance(layer, LoRALayer):
            layer.add_adapter(adapter_name, config, values.get(layer))
        else:
            lora_class(layer).convert(layer, config, adapter_name, initialize)
            for name, value in values.get(layer, {}).items():
                getattr(layer, name).assign(value)
    freeze_base_weights(model)
    for variable in [*trainable, *heads]:
        variable.trainable = True
    if previous is None:
        _remember_original_heads(model)
    _switch(model, previous, adapter_name)
    use_fast_layers(model)
    _record_paths(model, [layer.path for layer in plan])
    reset_compiled_functions(model)
    return model


def frozen_scope(model):
    """The part of `model` whose weights LoRA freezes: a Task's backbone, else all."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, keras.layers.Layer) else model


def freeze_base_weights(model):
    """Freezes every weight under `model` (a Task: its backbone) but the active adapters."""
    adapters = {id(v) for l in adapted_layers(model) if l.active_adapter is not None
                for v in l.lora_variables()}
    for variable in frozen_scope(model).weights:
        if id(variable) not in adapters:
            variable.trainable = False


# ---------------------------------------------------------------- switching


def head_variables(model):
    """`[(layer, [variable, ...])]`: trainable weights of `model` that no adapter holds."""
    lora = {id(v) for l in adapted_layers(model) for v in l.lora_variables()}
    owners = {layer.path: layer for layer in model._flatten_layers(include_self=True)}
    heads = {}
    for variable in model.trainable_weights:
        if id(variable) not in lora:
            owner = owners.get(variable.path.rpartition("/")[0])
            if owner is not None:
                heads.setdefault(id(owner), (owner, []))[1].append(variable)
    return list(heads.values())


def _head_store(layer):
    if "_klora_heads" not in vars(layer):
        object.__setattr__(layer, "_klora_heads", {})
    return layer._klora_heads


def _values(variables):
    return {v.name: np.array(keras.ops.convert_to_numpy(v)) for v in variables}


def _remember_original_heads(model):
    for layer, variables in head_variables(model):
        _head_store(layer).setdefault(ORIGINAL, _values(variables))


def stored_head_values(model, adapter_name):
    """`{variable path: array}` of the head weights adapter `adapter_name` trained."""
    values = {}
    for layer, variables in head_variables(model):
        stored = _head_store(layer).get(adapter_name)
        current = _values(variables) if stored is None else stored
        values.update({v.path: current[v.name] for v in variables if v.name in current})
    return values


def swap_heads(model, old, new):
    """Stores the head weights under adapter `old`; loads `new`'s (or the original ones)."""
    for layer, variables in head_variables(model):
        store = _head_store(layer)
        if old is not None:
            store[old] = _values(variables)
        saved = store.pop(new) if new is not ORIGINAL and new in store else \
            store.get(ORIGINAL, {})
        for variable in variables:
            if variable.name in saved:
                variable.assign(saved[variable.name])


def forget_heads(model, adapter_name=ORIGINAL, everything=False):
    """Drops the stored head weights of one adapter, or all of them."""
    for layer in model._flatten_layers(include_self=True):
        store = vars(layer).get("_klora_heads")
        if store is not None and everything:
            object.__delattr__(layer, "_klora_heads")
        elif store is not None:
            store.pop(adapter_name, None)


def activate(model, name):
    """Makes adapter `name` active on every layer (layers without it get a zero update)
    and swaps the head weights; resets compiled functions when they must retrace."""
    _switch(model, active_adapter(model), name)


def _switch(model, old, new):
    changed = False
    for layer in adapted_layers(model):
        changed |= layer.activate_adapter(new if new in layer.adapter_names else None)
    if old != new:
        swap_heads(model, old, new)
    if changed:
        reset_compiled_functions(model)


# ---------------------------------------------------------------- saving


def find_layer(model, path):
    """The layer at `path` (a `layer.path`) inside `model`."""
    for layer in model._flatten_layers(include_self=False):
        if layer.path == path:
            return layer
    raise ValueError(f"No layer with path '{path}' in model '{model.name}'.")


class AdaptedModel:
    """Mixin placed in front of an adapted model's own class, for `.keras` saving."""

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        raise ValueError(f"Model '{self.name}' holds LoRA adapters: quantize it before "
                         "`klora.apply` (a Task's backbone, so that its head stays float). "
                         "Nothing was quantized.")

    def get_config(self):
        adapted_class = type(self)
        self.__class__ = self._klora_base_class
        try:
            model = keras.saving.serialize_keras_object(self)
        finally:
            self.__class__ = adapted_class
        adapters, active = {}, None
        for path in self._klora_paths:
            layer = find_layer(self, path)
            if isinstance(layer, LoRALayer) and layer.active_adapter is not None:
                adapters[path] = {**layer.lora_config.to_dict(), "merged": layer.merged,
                                  "quantizes_inputs": quantizes_inputs(layer)}
                active = layer.active_adapter
        # Only the active adapter is saved (in the layers' variables).
        return {"model": model, "adapters": adapters, "active_adapter": active}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        model = keras.saving.deserialize_keras_object(config["model"],
                                                      custom_objects=custom_objects)
        plan, states = {}, {}
        for path, settings in config["adapters"].items():
            settings = dict(settings)
            layer = find_layer(model, path)
            states[layer] = (settings.pop("merged", False), settings.pop("quantizes_inputs", None))
            plan[layer] = LoraConfig.from_dict(settings, f"adapter of '{path}'")
        adapt_model(model, plan, config.get("active_adapter") or "default", initialize=False)
        for layer, (merged, inputs) in states.items():
            layer.merged = merged  # the saved kernel holds the adapter
            if inputs is False and quantizes_inputs(layer):
                # keras-hub rebuilds quantized layers with Keras' default int8 config,
                # which quantizes activations: a weight-only layer must not.
                layer.inputs_quantizer = None
        return model


keras.saving.get_custom_objects()[REGISTERED_NAME] = AdaptedModel
_adapted_classes = {}


def _adapted_class(base):
    """The `AdaptedModel` subclass of `base`, made once per class."""
    if base not in _adapted_classes:
        cls = type(base.__name__, (AdaptedModel, base), {"__module__": base.__module__})
        cls._klora_base_class = base
        object_registration.GLOBAL_CUSTOM_NAMES[cls] = REGISTERED_NAME
        _adapted_classes[base] = cls
    return _adapted_classes[base]


def _record_paths(model, paths):
    """Remembers on `model` which layer paths it adapted, for `get_config`."""
    if not isinstance(model, AdaptedModel):
        model.__class__ = _adapted_class(type(model))
        object.__setattr__(model, "_klora_paths", ())
        # Keras binds `quantize` to each instance: let the class's refusal answer.
        object.__setattr__(model, "_keras_quantize", vars(model).pop("quantize", None))
    new = tuple(p for p in paths if p not in model._klora_paths)
    object.__setattr__(model, "_klora_paths", model._klora_paths + new)


def forget_removed_layers(model):
    """Drops the paths of layers that are no longer LoRA layers from every
    `AdaptedModel` in `model`; one left with none gets its own class back."""
    for sub in model._flatten_layers(include_self=True):
        if isinstance(sub, AdaptedModel):
            remaining = {l.path for l in adapted_layers(sub)}
            paths = tuple(p for p in sub._klora_paths if p in remaining)
            object.__setattr__(sub, "_klora_paths", paths)
            if not paths:
                sub.__class__ = sub._klora_base_class
                if sub._keras_quantize is not None:
                    object.__setattr__(sub, "quantize", sub._keras_quantize)
                del sub._klora_paths, sub._keras_quantize
