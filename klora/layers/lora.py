"""The LoRA mechanism, written once for every Keras linear layer.

A LoRA layer keeps its frozen base computation `f(x; W)` and adds

    scale * B(A(dropout(x)))        scale = alpha / rank  (alpha / sqrt(rank) with rslora)

with `A: (fan_in, rank)` and `B: (rank, fan_out)` over the flattened input and
output axes of the kernel. The update is computed on activations, never folded
into the kernel during training, so no kernel-sized gradient is formed.

A concrete layer is `LoRALayer` placed before a Keras linear layer
(`LoRADense(LoRALayer, keras.layers.Dense)`); it only describes its kernel:

- `_lora_dims()`: the sizes of the kernel's input and output axes, `(in_dims, out_dims)`;
- `_kernel_axes()`: the kernel's axes as positions in `in_dims + out_dims`;
- `_lora_equations()`: einsum equations `x -> hidden -> output` for the
  update, or `None` when `x` ends with the input axes and the output with the
  output axes (then the update runs as two 2-D matmuls);
- `_product(x, kernel)`: the base layer's product, without bias.

A variant of LoRA (DoRA, ...) overrides the extension points, all below:
`_variable_specs` (the variables an adapter owns), `_update` (what is added
to the base product), `_merged_kernel` / `_unmerged_kernel` (how it folds into
the kernel) and `neutral_values` (the values of an update that changes nothing).

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
from klora.speed.fast_dropout import dropout


def _numpy(variable):
    return np.array(ops.convert_to_numpy(variable))


class LoRALayer:
    """Adds named low-rank adapters to the Keras linear layer it precedes in the MRO.

    Args (besides the Keras layer's own):
        rank, alpha, dropout, use_rslora, init, seed: the `klora.LoraConfig`
            of the layer's first adapter, `"default"`.
        merged: Whether the update is folded into the kernel (see `merge`).
    """

    def __init__(self, *args, rank=8, alpha=None, dropout=0.0, use_rslora=False,
                 init="kaiming", seed=None, merged=False, **kwargs):
        config = LoraConfig(rank, alpha, dropout, use_rslora, init, seed)
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
        # name -> LoraConfig of every adapter; name -> {variable: array} of inactive ones.
        object.__setattr__(self, "_lora_adapters", {adapter_name: config})
        object.__setattr__(self, "_lora_values", {})
        object.__setattr__(self, "_lora_seed_states", {})

    def build(self, input_shape):
        super().build(input_shape)
        self._build_lora()

    @classmethod
    def convert(cls, layer, config, adapter_name=DEFAULT_ADAPTER):
        """Turns a built instance of this class's Keras base (a `Dense` for `LoRADense`)
        into `cls` in place, keeping its name, path, kernel and bias (now frozen)."""
        base_class = type(layer)
        layer.__class__ = cls
        try:
            layer._init_lora(config, adapter_name)
            layer._build_lora()
        except Exception:
            layer.__class__ = base_class
            raise
        return layer

    def revert(self):
        """Turns this layer back into its Keras class (what is merged stays in the kernel)."""
        self._drop_lora()
        mro = type(self).__mro__
        self.__class__ = mro[mro.index(LoRALayer) + 1]

    def _build_lora(self):
        """Creates the active adapter's variables and freezes the base weights."""
        if self.quantization_mode is not None:
            raise ValueError(f"Layer '{self.name}' is quantized ({self.quantization_mode}); "
                             "LoRA adapters need a floating-point kernel.")
        self.check_rank(self, self.lora_config.rank)
        self._kernel.trainable = False
        if self.bias is not None:
            self.bias.trainable = False
        self._create_variables(self.lora_config)

    # ------------------------------------------------------------ kernel layout

    @classmethod
    def layer_fans(cls, layer):
        """`(fan_in, fan_out)`: the flattened input and output widths of `layer`'s kernel
        (`layer` is an instance of this class or of its Keras base class)."""
        in_dims, out_dims = cls._lora_dims(layer)
        return math.prod(in_dims), math.prod(out_dims)

    @classmethod
    def check_rank(cls, layer, rank):
        """Raises a `ValueError` unless `rank` fits `layer`'s widths (see `layer_fans`)."""
        fan_in, fan_out = cls.layer_fans(layer)
        if rank > min(fan_in, fan_out):
            raise ValueError(f"`rank`={rank} is too large for layer '{layer.path or layer.name}' "
                             f"(input width {fan_in}, output width {fan_out}): use a rank "
                             f"between 1 and {min(fan_in, fan_out)}.")

    def _to_kernel_layout(self, matrix):
        """An `(fan_in, fan_out)` matrix reshaped and transposed into the kernel's shape."""
        in_dims, out_dims = self._lora_dims()
        matrix = ops.reshape(matrix, in_dims + out_dims)
        axes = self._kernel_axes()
        return matrix if list(axes) == sorted(axes) else ops.transpose(matrix, axes)

    # ------------------------------------------------------------ extension points

    def _variable_specs(self, config):
        """`{name: (shape, initializer)}` of the variables an adapter owns."""
        fan_in, fan_out = self.layer_fans(self)
        seed = derive_seed(config.seed, "init")
        if config.init == "kaiming":
            # PEFT's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            a_init = keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform", seed)
        else:
            a_init = keras.initializers.RandomNormal(stddev=1.0 / config.rank, seed=seed)
        return {"lora_a": ((fan_in, config.rank), a_init),
                "lora_b": ((config.rank, fan_out), "zeros")}

    def _update(self, inputs, product, training):
        """What is added to the base output (`product` is `x @ W`, without bias)."""
        x = inputs
        if training and self.lora_config.dropout > 0:
            x = dropout(x, self.lora_config.dropout, self.lora_seed_generator)
        return self._low_rank(x)

    def _merged_kernel(self, kernel):
        """The kernel with the active adapter folded in."""
        return ops.add(kernel, self.delta_kernel())

    def _unmerged_kernel(self, kernel):
        """The base kernel from a merged one (inverse of `_merged_kernel`)."""
        return ops.subtract(kernel, self.delta_kernel())

    def neutral_values(self):
        """Variable values that make the update zero (a disabled adapter)."""
        return {"lora_b": np.zeros(self.lora_b.shape, "float32")}

    # ------------------------------------------------------------ forward pass

    @property
    def scale(self):
        """The factor applied to `B(A(x))`."""
        return self.lora_config.scale

    def _low_rank(self, x):
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
        """`(kernel, factored)`: what to multiply `inputs` by, and whether to add `_update`.

        Training keeps the update factored, so no kernel-sized gradient is
        formed. At inference, when `inputs` are larger than the kernel, the
        adapter is folded into the kernel (what `merge` would store): one
        product over the inputs instead of three. Small inputs stay factored.
        """
        if self.merged:
            return self._kernel, False
        fan_in, fan_out = self.layer_fans(self)
        shape = tuple(inputs.shape)
        if training or None in shape or (
                math.prod(shape) // fan_in * (fan_in + fan_out) <= fan_in * fan_out):
            return self._kernel, True
        return ops.cast(self._merged_kernel(self._kernel), self.compute_dtype), False

    def call(self, inputs, training=None):
        kernel, factored = self._kernel_for(inputs, training)
        product = self._product(inputs, kernel)
        x = product if self.bias is None else ops.add(product, self.bias)
        if factored:
            x = ops.add(x, self._update(inputs, product, training))
        if self.activation is not None:
            x = self.activation(x)
        return x

    # ------------------------------------------------------------ merging

    def delta_kernel(self):
        """`scale * A @ B` in the kernel's shape: what merging plain LoRA adds."""
        delta = ops.multiply(ops.matmul(self.lora_a, self.lora_b), self.scale)
        return ops.cast(self._to_kernel_layout(delta), self._kernel.dtype)

    def merge(self):
        """Folds the active adapter into the kernel; the forward pass then skips it."""
        if not self.merged:
            self._kernel.assign(self._merged_kernel(self._kernel))
            self.merged = True

    def unmerge(self):
        """Takes the adapter out of the kernel again (inverse of `merge`)."""
        if self.merged:
            self._kernel.assign(self._unmerged_kernel(self._kernel))
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

    def _create_variables(self, config):
        # Adapters stay float32 under mixed precision, like PEFT's autocast_adapter_dtype.
        dtype = "float64" if self.variable_dtype == "float64" else "float32"
        with self._unlocked():
            for name, (shape, initializer) in self._variable_specs(config).items():
                setattr(self, name, self.add_weight(name=name, shape=shape,
                                                    initializer=initializer, dtype=dtype))
        if config.dropout > 0 and self.lora_seed_generator is None:
            self._create_seed_generator(config)

    def _create_seed_generator(self, config):
        with self._unlocked():
            self.lora_seed_generator = keras.random.SeedGenerator(
                derive_seed(config.seed, "dropout"))

    def lora_variables(self):
        """The variables of the active adapter (`lora_a`, `lora_b`, ...)."""
        return [getattr(self, name) for name in self._variable_specs(self.lora_config)]

    def _drop_variables(self):
        for variable in self.lora_variables():
            self._untrack_variable(variable)

    def _drop_lora(self):
        """Removes every adapter attribute and variable; the kernel is left as it is."""
        self._drop_variables()
        if self.lora_seed_generator is not None:
            self._tracker.untrack(self.lora_seed_generator)
            self._post_untrack_variable(self.lora_seed_generator.state)
        names = [*self._variable_specs(self.lora_config), "lora_seed_generator", "merged",
                 "active_adapter", "lora_config", "_lora_adapters", "_lora_values",
                 "_lora_seed_states"]
        for name in names:
            if name in vars(self):
                object.__delattr__(self, name)

    def _saved_variables(self):
        base = [self._kernel] + ([] if self.bias is None else [self.bias])
        return base + self.lora_variables()

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
        self.check_rank(self, config.rank)
        specs = self._variable_specs(config)
        values = dict(values or {})
        for key, (shape, initializer) in specs.items():
            if key not in values:
                values[key] = _numpy(keras.initializers.get(initializer)(shape, "float32"))
            values[key] = np.asarray(values[key], "float32")
            if values[key].shape != tuple(shape):
                raise ValueError(f"Adapter {name!r} of layer '{self.path}': {key} must have "
                                 f"shape {tuple(shape)}, not {values[key].shape}.")
        self._lora_adapters[name] = config
        self._lora_values[name] = {key: values[key] for key in specs}

    def activate_adapter(self, name):
        """Puts adapter `name` (or, for `None`, a zero update) into the layer's variables.

        Returns whether anything a compiled function captured changed (variable
        shapes or trainability, scale, dropout), i.e. whether compiled
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
        reshaped = any(tuple(v.shape) != values[v.name].shape for v in self.lora_variables())
        if reshaped:
            self._drop_variables()
        self.lora_config = config
        if reshaped:
            self._create_variables(config)
        elif config.dropout > 0 and generator is None:
            self._create_seed_generator(config)
        for variable in self.lora_variables():
            variable.assign(values[variable.name])
            variable.trainable = True
        # Each adapter continues its own dropout stream.
        if generator is not None and name in self._lora_seed_states:
            generator.state.assign(self._lora_seed_states.pop(name))
        elif generator is not None and config.seed is not None:
            generator.state.assign(np.array([derive_seed(config.seed, "dropout"), 0],
                                            _numpy(generator.state).dtype))
        self.active_adapter = name
        return before != self._compiled_state()

    def _compiled_state(self):
        """What compiled functions capture of the adapter: shapes, trainability, settings."""
        variables = self.lora_variables()
        return ([tuple(v.shape) for v in variables], variables[0].trainable, self.scale,
                self.lora_config.dropout, self.lora_seed_generator is None)

    def delete_adapter(self, name):
        """Forgets the inactive adapter `name` (activate another one first)."""
        if name == self.active_adapter:
            raise ValueError(f"Adapter {name!r} is active on layer '{self.path}': "
                             "activate another one before deleting it.")
        self.adapter_config(name)
        del self._lora_adapters[name]
        del self._lora_values[name]
        self._lora_seed_states.pop(name, None)
