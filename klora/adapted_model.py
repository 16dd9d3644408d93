"""How a model records the adapters `klora.apply` added, so that saving survives.

keras-hub layers rebuild their sub-layers from their own configs, which know
nothing of adapters. `klora.apply` therefore gives the model it adapted a
subclass of its own class whose `get_config` wraps the plain config with the
adapter settings, keyed by layer path. `keras.saving.load_model` rebuilds the
plain model from that config, re-applies the adapters, then loads the weights.
"""

import keras
from keras.src.saving import object_registration

REGISTERED_NAME = "klora>AdaptedModel"


def find_layer(model, path):
    """The layer at `path` (a `layer.path`) inside `model`."""
    for layer in model._flatten_layers(include_self=False):
        if layer.path == path:
            return layer
    raise ValueError(f"No layer with path '{path}' in model '{model.name}'.")


class AdaptedModel:
    """Mixin placed in front of an adapted model's own class."""

    def get_config(self):
        from klora.layers import LoRALayer

        adapted_class = type(self)
        self.__class__ = self._klora_base_class
        try:
            model = keras.saving.serialize_keras_object(self)
        finally:
            self.__class__ = adapted_class
        adapters = {}
        active = None
        for path in self._klora_paths:
            layer = find_layer(self, path)
            if isinstance(layer, LoRALayer):
                adapters[path] = layer.lora_config()
                active = active or layer.active_adapter
        # Only the active adapter is saved (in the layers' variables).
        return {"model": model, "adapters": adapters, "active_adapter": active}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        from klora.apply import adapt_layer, freeze_base_weights, record_adapters
        from klora.fast_layers import use_fast_layers

        model = keras.saving.deserialize_keras_object(
            config["model"], custom_objects=custom_objects
        )
        for path, settings in config["adapters"].items():
            adapt_layer(find_layer(model, path), **settings,
                        adapter_name=config.get("active_adapter") or "default")
        freeze_base_weights(model)
        use_fast_layers(model)
        record_adapters(model, list(config["adapters"]))
        return model


keras.saving.get_custom_objects()[REGISTERED_NAME] = AdaptedModel
_adapted_classes = {}


def adapted_class(base):
    """The `AdaptedModel` subclass of `base`, made once per class."""
    if base not in _adapted_classes:
        cls = type(base.__name__, (AdaptedModel, base), {"__module__": base.__module__})
        cls._klora_base_class = base
        object_registration.GLOBAL_CUSTOM_NAMES[cls] = REGISTERED_NAME
        _adapted_classes[base] = cls
    return _adapted_classes[base]


def forget_adapters(model):
    """Gives an adapted model its own class back (used by `klora.unload`)."""
    if isinstance(model, AdaptedModel):
        model.__class__ = model._klora_base_class
        del model._klora_paths
