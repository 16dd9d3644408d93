"""The LoRA mechanism, written once for every Keras linear layer.

A LoRA layer keeps its frozen base `f(x; W)` (a float kernel, or one Keras
quantized to int8 / int4: see `quantized`) and adds

    scale * B(A(dropout(x)))        scale = alpha / rank  (alpha / sqrt(rank) with rslora)

with `A: (fan_in, rank)` and `B: (rank, fan_out)` over the flattened input and
output axes of the kernel, computed on activations, never folded into the kernel
in training, so no kernel-sized gradient is formed.

A concrete layer is `LoRALayer` placed before a Keras linear layer
(`LoRADense(LoRALayer, keras.layers.Dense)`); it only describes its kernel
layout (`_lora_dims`, `_kernel_axes`, `_lora_equations`, `_product`: see
`kernel_layout`). A variant (`variants.Dora`, by `LoraConfig.use_dora`) fills
in the extension points: its variables, its update, how it merges into and out
of the kernel, and its values that change nothing. How an adapter starts
(random, or decomposed from the kernel: PiSSA, OLoRA) is `initializers`'.

A layer holds several named adapters. The active one lives in the layer's
variables (`lora_a`, `lora_b`, ...) and `lora_config`; the others are host
arrays. Switching assigns values into the same variables, so compiled
functions stay valid when the shapes and settings agree.
"""

import contextlib
import math
import re

import keras
import numpy as np
from keras import ops
from keras.src.utils.naming import auto_name

from klora.config import DEFAULT_ADAPTER, LEGACY_NAMES, LoraConfig, derive_seed
from klora.layers import quantized
from klora.layers.initializers import a_initializer, decompose
from klora.layers.kernel_layout import KernelLayout
from klora.layers.variants import variant_for
from klora.speed.fast_dropout import dropout

TRAINABLE = ("lora_a", "lora_b", "lora_magnitude")


def _numpy(value):
    return np.array(ops.convert_to_numpy(value))


class LoRALayer(KernelLayout):
    """Adds named low-rank adapters to the Keras linear layer it precedes in the MRO.

    Args (besides the Keras layer's own):
        rank, alpha, dropout, use_rslora, init, seed, use_dora: the
            `klora.LoraConfig` of the layer's first adapter, `"default"`.
        merged: Whether the update is folded into the kernel (see `merge`).
    """

    def __init__(self, *args, rank=8, alpha=None, dropout=0.0, use_rslora=False,
                 init="kaiming", seed=None, use_dora=False, merged=False, **kwargs):
        config = LoraConfig(rank, alpha, dropout, use_rslora, init, seed, use_dora)
        kwargs.setdefault("name", auto_name(re.sub("LoRA", "Lora", type(self).__name__)))
        super().__init__(*args, **kwargs)
        self._lora_equations()  # raises for a kernel layout LoRA cannot factor
        self._init_lora(config, DEFAULT_ADAPTER, merged)

    def _init_lora(self, config, adapter_name, merged=False):
        """Sets up the adapter state of a (possibly just converted) layer."""
        self.lora_config = config
        self.merged = bool(merged)
        self.active_adapter = adapter_name
        self.lora_seed_generator = None
        # name -> LoraConfig of every adapter; name -> {variable: array} of inactive ones;
        # name -> dropout seed state of inactive ones; the active one's variable names.
        object.__setattr__(self, "_lora_adapters", {adapter_name: config})
        object.__setattr__(self, "_lora_values", {})
        object.__setattr__(self, "_lora_seed_states", {})
        object.__setattr__(self, "_lora_names", [])
        # Keras binds a `quantize` wrapper to each instance; while the layer holds
        # adapters, the class's own `quantize` (a refusal) must answer instead.
        object.__setattr__(self, "_keras_quantize", vars(self).pop("quantize", None))

    def build(self, input_shape):
        super().build(input_shape)
        self._build_lora()

    @classmethod
    def convert(cls, layer, config, adapter_name=DEFAULT_ADAPTER, initialize=True):
        """Turns a built instance of this class's Keras base (a `Dense` for `LoRADense`)
        into `cls` in place, keeping its name, path, kernel and bias (now frozen).
        `initialize=False` skips decomposing the kernel (its values will be loaded)."""
        base_class = type(layer)
        layer.__class__ = cls
        try:
            layer._init_lora(config, adapter_name)
            layer._build_lora(initialize)
        except Exception:
            layer.__class__ = base_class
            raise
        return layer

    def revert(self):
        """Turns this layer back into its Keras class (what is merged stays in the kernel)."""
        self._drop_lora()
        self.__class__ = next(c for c in type(self).__mro__ if issubclass(
            c, keras.layers.Layer) and not issubclass(c, LoRALayer))

    def _build_lora(self, initialize=True):
        """Creates the active adapter's variables and freezes the base weights."""
        self.check_adaptable(self, self.lora_config)
        self._kernel.trainable = False
        if self.bias is not None:
            self.bias.trainable = False
        values, residual = self.initial_values(self.lora_config, initialize)
        if residual is not None:
            self._kernel.assign(self._to_kernel_layout(residual))
        self._create_variables(self.lora_config, values)

    def quantize(self, mode=None, type_check=True, config=None):
        raise ValueError(f"Layer '{self.path}' holds LoRA adapters: quantize the model before "
                         "`klora.apply` (a Task's backbone, so that its head stays float).")

    # ------------------------------------------------------------ forward pass

    @property
    def scale(self):
        """The factor applied to `B(A(x))`."""
        return self.lora_config.scale

    @property
    def variant(self):
        """The active adapter's variant (`klora.layers.variants`)."""
        return variant_for(self.lora_config)

    def low_rank(self, x):
        """`scale * B(A(x))` in the layer's output layout."""
        to_rank = self._lora_equations()
        hidden_scale = lambda h: ops.multiply(h, ops.cast(self.scale, h.dtype))
        if to_rank is None:
            # 2-D matmuls: XLA on CPU runs these thin products several times faster
            # than on 3-D or 4-D operands. Scaling the (N, rank) hidden is cheapest.
            in_dims, out_dims = self._lora_dims()
            shape = ops.shape(x)
            lead = tuple(shape[: len(shape) - len(in_dims)])
            hidden = hidden_scale(ops.matmul(ops.reshape(x, (-1, math.prod(in_dims))),
                                             self.lora_a))
            return ops.reshape(ops.matmul(hidden, self.lora_b), lead + tuple(out_dims))
        (in_dims, out_dims), rank = self._lora_dims(), self.lora_a.shape[-1]
        hidden = hidden_scale(ops.einsum(to_rank[0], x, ops.reshape(self.lora_a,
                                                                    in_dims + (rank,))))
        return ops.einsum(to_rank[1], hidden, ops.reshape(self.lora_b, (rank,) + out_dims))

    def _kernel_for(self, inputs, training):
        """`(kernel, factored)`: what to multiply `inputs` by, and whether to add the update.

        Training keeps the update factored, so no kernel-sized gradient is
        formed. At inference, when `inputs` are larger than the kernel, the
        adapter is folded into the kernel (what `merge` would store): one
        product over the inputs instead of three. Small inputs stay factored.
        """
        if self.merged:
            return self.base_kernel(), False
        fan_in, fan_out = self.layer_fans(self)
        shape = tuple(inputs.shape)
        if (training or None in shape or quantized.quantizes_inputs(self) or
                math.prod(shape) // fan_in * (fan_in + fan_out) <= fan_in * fan_out):
            return self.base_kernel(), True
        merged = self.variant.merged(self, self.flat_kernel())
        return ops.cast(self._to_kernel_layout(merged), self.compute_dtype), False

    def quantized_call(self, *args, **kwargs):
        # Keras sends a quantized layer's calls here instead of to `call`.
        return self.call(*args, **kwargs)

    def call(self, inputs, training=None):
        kernel, factored = self._kernel_for(inputs, training)
        product = self._product(quantized.base_inputs(self, inputs), kernel)
        x = product if self.bias is None else ops.add(product, self.bias)
        if factored:
            dropped = inputs
            if training and self.lora_config.dropout > 0:
                dropped = dropout(inputs, self.lora_config.dropout, self.lora_seed_generator)
            x = ops.add(x, self.variant.update(self, inputs, dropped, product))
        if self.activation is not None:
            x = self.activation(x)
        return x

    # ------------------------------------------------------------ merging

    def delta(self):
        """`scale * A @ B`, `(fan_in, fan_out)` float32: plain LoRA's change of the kernel."""
        return ops.multiply(ops.matmul(self.lora_a, self.lora_b), self.scale)

    def merge(self):
        """Folds the active adapter into the kernel; the forward pass then skips it.
        A quantized base becomes a float kernel holding the merged weights."""
        if self.merged:
            return
        weight = self.flat_kernel()
        self.variant.remember(self, weight)
        kernel = ops.cast(self._to_kernel_layout(self.variant.merged(self, weight)),
                          self.variable_dtype)
        if self.quantization_mode is None:
            self._kernel.assign(kernel)
        else:
            with self._unlocked():
                quantized.to_float(self, kernel)
        self.merged = True

    def unmerge(self):
        """Takes the adapter out of the kernel again (inverse of `merge`)."""
        if self.merged:
            unmerged = self.variant.unmerged(self, self.flat_kernel())
            self._kernel.assign(self._to_kernel_layout(unmerged))
            self.merged = False

    # ------------------------------------------------------------ variables

    @contextlib.contextmanager
    def _unlocked(self):
        """Lets a built layer track new state (Keras locks it after `build`)."""
        was_locked = self._tracker.locked
        self._tracker.unlock()
        try:
            yield
        finally:
            if was_locked:
                self._tracker.lock()

    def initial_values(self, config, initialize=True):
        """`(values, residual)`: host arrays of a new adapter's variables, and the kernel
        a kernel-based init leaves (`(fan_in, fan_out)`; `None` otherwise)."""
        fan_in, fan_out = self.layer_fans(self)
        values = {"lora_a": _numpy(a_initializer(config)((fan_in, config.rank), "float32")),
                  "lora_b": np.zeros((config.rank, fan_out), "float32")}
        residual = None
        if config.changes_base:
            if initialize:
                a, b, residual = decompose(_numpy(self.flat_kernel()), config)
                values = {"lora_a": a, "lora_b": b}
            values.update(lora_a0=values["lora_a"], lora_b0=values["lora_b"])
        return variant_for(config).initial_values(self, config, values, residual), residual

    def _create_variables(self, config, values):
        # Adapters stay float32 under mixed precision, like PEFT's autocast_adapter_dtype.
        dtype = "float64" if self.variable_dtype == "float64" else "float32"
        with self._unlocked():
            for name, value in values.items():
                setattr(self, name, self.add_weight(
                    name=name, shape=value.shape, dtype=dtype, trainable=name in TRAINABLE,
                    initializer=lambda shape, dtype=None, value=value: ops.cast(value, dtype)))
        self._lora_names[:] = list(values)
        self._ensure_seed_generator(config)

    def _ensure_seed_generator(self, config):
        """Creates the layer's dropout seed generator when `config` drops out."""
        if config.dropout > 0 and self.lora_seed_generator is None:
            with self._unlocked():
                self.lora_seed_generator = keras.random.SeedGenerator(
                    derive_seed(config.seed, "dropout"))

    def lora_variables(self):
        """The variables of the active adapter (`lora_a`, `lora_b`, ...)."""
        return [getattr(self, name) for name in self._lora_names]

    def _drop_lora(self):
        """Removes every adapter attribute and variable; the kernel is left as it is."""
        for variable in self.lora_variables():
            self._untrack_variable(variable)
        if self.lora_seed_generator is not None:
            self._tracker.untrack(self.lora_seed_generator)
            self._post_untrack_variable(self.lora_seed_generator.state)
        if self._keras_quantize is not None:
            object.__setattr__(self, "quantize", self._keras_quantize)
        names = [*self._lora_names, "lora_seed_generator", "merged", "active_adapter",
                 "lora_config", "_lora_adapters", "_lora_values", "_lora_seed_states",
                 "_lora_names", "_keras_quantize"]
        for name in names:
            if name in vars(self):
                object.__delattr__(self, name)

    def _saved_variables(self):
        names = self.variable_serialization_spec[self.quantization_mode]
        base = [self._kernel if n == "kernel" else getattr(self, n, None) for n in names]
        return [v for v in base if v is not None] + self.lora_variables()

    def save_own_variables(self, store):
        if self.built:
            for i, variable in enumerate(self._saved_variables()):
                store[str(i)] = variable

    def load_own_variables(self, store):
        if not self.built:
            return
        variables = self._saved_variables()
        if len(store.keys()) != len(variables):
            raise ValueError(f"Layer '{self.name}' expects {len(variables)} saved variables "
                             f"({', '.join(v.name for v in variables)}) but the file holds "
                             f"{len(store.keys())}.")
        for i, variable in enumerate(variables):
            variable.assign(store[str(i)])

    def get_config(self):
        return {**super().get_config(), **self.lora_config.to_dict(), "merged": self.merged}

    @classmethod
    def from_config(cls, config):
        # klora 0.1 wrote `lora_dropout`.
        return super().from_config({LEGACY_NAMES.get(k, k): v for k, v in config.items()})

    # ------------------------------------------------------------ named adapters

    @property
    def adapter_names(self):
        """Names of the adapters this layer holds, in the order they were added."""
        return list(self._lora_adapters)

    def adapter_config(self, name):
        """The `LoraConfig` of adapter `name`."""
        if name not in self._lora_adapters:
            raise ValueError(f"Layer '{self.path}' has no adapter named {name!r}; it has "
                             f"{self.adapter_names}.")
        return self._lora_adapters[name]

    def adapter_values(self, name):
        """`{variable name: array}` of adapter `name` (`lora_a`: `(fan_in, r)`, ...)."""
        self.adapter_config(name)
        if name == self.active_adapter:
            return {v.name: _numpy(v) for v in self.lora_variables()}
        return self._lora_values[name]

    def add_adapter(self, name, config, values=None):
        """Adds the inactive adapter `name`: initialized as `config` says, or `values`."""
        if name in self._lora_adapters:
            raise ValueError(f"Layer '{self.path}' already has an adapter named {name!r}.")
        self.check_adaptable(self, config)
        initial, _ = self.initial_values(config, initialize=False)
        values = {**initial, **(values or {})}
        for key, value in initial.items():
            values[key] = np.asarray(values[key], "float32")
            if values[key].shape != value.shape:
                raise ValueError(f"Adapter {name!r} of layer '{self.path}': {key} must have "
                                 f"shape {value.shape}, not {values[key].shape}.")
        self._lora_adapters[name] = config
        self._lora_values[name] = {key: values[key] for key in initial}

    def neutral_values(self):
        """Values of the active adapter's variables for which it changes nothing."""
        values = self.adapter_values(self.active_adapter)
        if self.lora_config.changes_base:  # the kernel holds W - scale * B0 @ A0
            values.update(lora_a=values["lora_a0"], lora_b=values["lora_b0"])
        else:
            values["lora_b"] = np.zeros_like(values["lora_b"])
        return self.variant.neutral(self, values)

    def _compiled_state(self):
        """What compiled functions capture of the adapter: shapes, trainability, settings."""
        variables = self.lora_variables()
        return ([(v.name, tuple(v.shape)) for v in variables], variables[0].trainable,
                self.scale, self.lora_config.dropout, self.variant,
                self.lora_seed_generator is None)

    def activate_adapter(self, name):
        """Puts adapter `name` (or, for `None`, one that changes nothing) into the variables.

        Returns whether anything a compiled function captured changed (variable
        shapes or trainability, scale, dropout, variant), i.e. whether compiled
        functions must be rebuilt.
        """
        if name == self.active_adapter:
            return False
        if name is not None:
            self.adapter_config(name)
        if self.merged:
            raise ValueError(f"Layer '{self.path}' is merged: unmerge it before switching "
                             "adapters.")
        before = self._compiled_state()
        old, generator = self.active_adapter, self.lora_seed_generator
        if old is not None:
            self._lora_values[old] = self.adapter_values(old)
            if generator is not None:
                self._lora_seed_states[old] = _numpy(generator.state)
        if name is None:
            for key, value in self.neutral_values().items():
                getattr(self, key).assign(value)
            for variable in self.lora_variables():
                variable.trainable = False
            self.active_adapter = None
            return before != self._compiled_state()
        config, values = self._lora_adapters[name], self._lora_values.pop(name)
        reshaped = [(v.name, tuple(v.shape)) for v in self.lora_variables()] != [
            (k, v.shape) for k, v in values.items()]
        if reshaped:
            for variable in self.lora_variables():
                self._untrack_variable(variable)
            self._create_variables(config, values)
        self.lora_config = config
        self._ensure_seed_generator(config)
        for variable in self.lora_variables():
            variable.assign(values[variable.name])
            variable.trainable = variable.name in TRAINABLE
        # Each adapter continues its own dropout stream.
        if generator is not None and name in self._lora_seed_states:
            generator.state.assign(self._lora_seed_states.pop(name))
        elif generator is not None and config.seed is not None:
            generator.state.assign(np.array([derive_seed(config.seed, "dropout"), 0],
                                            _numpy(generator.state).dtype))
        self.active_adapter = name
        return before != self._compiled_state()

    def delete_adapter(self, name):
        """Forgets the inactive adapter `name` (activate another one first)."""
        if name == self.active_adapter:
            raise ValueError(f"Adapter {name!r} is active on layer '{self.path}': "
                             "activate another one before deleting it.")
        self.adapter_config(name)
        del self._lora_adapters[name]
        del self._lora_values[name]
        self._lora_seed_states.pop(name, None)
