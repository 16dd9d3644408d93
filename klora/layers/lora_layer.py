"""The low-rank update shared by `LoRADense` and `LoRAEinsumDense`.

A LoRA layer keeps its frozen base computation `f(x; W)` and adds

    scale * B(A(dropout(x)))        scale = alpha / rank  (alpha / sqrt(rank) with rslora)

with `A: (fan_in, rank)` and `B: (rank, fan_out)` over the flattened input and
output axes of the kernel. The update is computed on activations, never folded
into the kernel during training, so no full-size kernel gradient is formed.
"""

import math

import keras
import numpy as np
from keras import ops

from klora.layers.fast_dropout import dropout

INITS = ("kaiming", "gaussian")
DEFAULT_ADAPTER = "default"
# The per-adapter settings; `merged` is a state of the layer, not of an adapter.
SETTINGS = ("rank", "alpha", "lora_dropout", "use_rslora", "init", "seed")


def check_lora_arguments(rank, alpha, lora_dropout, init):
    """Raise a `ValueError` naming the first invalid LoRA hyper-parameter."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be an integer >= 1. Received: rank={rank!r}")
    if alpha is not None and (
        isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0
    ):
        raise ValueError(
            f"`alpha` must be a positive number or None (None means alpha = rank). "
            f"Received: alpha={alpha!r}"
        )
    if not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(
            f"`dropout` must be a number in [0, 1). Received: dropout={lora_dropout!r}"
        )
    if init not in INITS:
        raise ValueError(f"`init` must be one of {INITS}. Received: init={init!r}")


class LoRALayer:
    """Mixin holding the adapter state of a LoRA layer.

    Subclasses provide `_lora_shapes()` (the kernel's input and output axis
    sizes, in kernel order), `_lora_project(x)` (`scale * B(A(x))` for a
    layer input) and `_to_kernel_layout(delta)` (reshapes an `(fan_in, fan_out)`
    matrix into the kernel's shape).

    A layer can hold several named adapters. The active one lives in the
    variables `lora_a` / `lora_b` (and `rank`, `alpha`, ... describe it); the
    others are kept as host arrays. Switching assigns values into the same
    variables, so compiled functions stay valid when the shapes and scales
    agree. `active_adapter` is `None` when the layer holds none of the model's
    active adapter: `lora_b` is then zero and frozen.
    """

    def _init_lora(self, rank, alpha, lora_dropout, use_rslora, init, seed, merged,
                   adapter_name=DEFAULT_ADAPTER):
        check_lora_arguments(rank, alpha, lora_dropout, init)
        self._set_lora_settings(dict(rank=rank, alpha=alpha, lora_dropout=lora_dropout,
                                     use_rslora=use_rslora, init=init, seed=seed))
        self.merged = bool(merged)
        self.active_adapter = adapter_name
        # name -> settings for every adapter; name -> (A, B) arrays for inactive ones.
        object.__setattr__(self, "_lora_adapters", {adapter_name: self._lora_settings()})
        object.__setattr__(self, "_lora_values", {})

    def _lora_settings(self):
        return {name: getattr(self, name) for name in SETTINGS}

    def _set_lora_settings(self, settings):
        self.rank = settings["rank"]
        self.alpha = settings["alpha"]
        self.lora_dropout = float(settings["lora_dropout"])
        self.use_rslora = bool(settings["use_rslora"])
        self.init = settings["init"]
        self.seed = settings["seed"]

    @property
    def scale(self):
        """The factor applied to `B(A(x))`."""
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def _build_lora(self):
        if self.quantization_mode is not None:
            raise ValueError(
                f"Layer '{self.name}' is quantized ({self.quantization_mode}); "
                "LoRA adapters need a floating-point kernel."
            )
        in_dims, out_dims = self._lora_shapes()
        fan_in, fan_out = math.prod(in_dims), math.prod(out_dims)
        if self.rank > min(fan_in, fan_out):
            raise ValueError(
                f"`rank`={self.rank} is too large for layer '{self.name}' with "
                f"input width {fan_in} and output width {fan_out}: use a rank "
                f"between 1 and {min(fan_in, fan_out)}."
            )
        self._create_lora_variables(fan_in, fan_out)

    def _a_initializer(self, settings):
        if settings["init"] == "kaiming":
            # PEFT's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            return keras.initializers.VarianceScaling(
                scale=1.0 / 3.0, mode="fan_in", distribution="uniform", seed=settings["seed"]
            )
        return keras.initializers.RandomNormal(stddev=1.0 / settings["rank"],
                                               seed=settings["seed"])

    def _create_lora_variables(self, fan_in, fan_out):
        # Adapters stay float32 under mixed precision, like PEFT's autocast_adapter_dtype.
        dtype = "float64" if self.variable_dtype == "float64" else "float32"
        was_locked = self._tracker.locked
        self._tracker.unlock()
        try:
            self.lora_a = self.add_weight(
                name="lora_a", shape=(fan_in, self.rank),
                initializer=self._a_initializer(self._lora_settings()), dtype=dtype
            )
            self.lora_b = self.add_weight(
                name="lora_b", shape=(self.rank, fan_out), initializer="zeros", dtype=dtype
            )
            if getattr(self, "lora_seed_generator", None) is None:
                self.lora_seed_generator = (
                    keras.random.SeedGenerator(self.seed) if self.lora_dropout > 0 else None
                )
        finally:
            if was_locked:
                self._tracker.lock()

    def _drop_lora_variables(self):
        """Untracks `lora_a` and `lora_b` (before re-creating or removing them)."""
        for variable in (self.lora_a, self.lora_b):
            self._untrack_variable(variable)

    def _drop_lora(self):
        """Removes every adapter attribute and variable; the kernel is left as it is."""
        self._drop_lora_variables()
        if self.lora_seed_generator is not None:
            self._tracker.untrack(self.lora_seed_generator)
            self._post_untrack_variable(self.lora_seed_generator.state)
        for name in ("lora_a", "lora_b", "lora_seed_generator", "merged", "active_adapter",
                     "_lora_adapters", "_lora_values") + SETTINGS:
            if name in vars(self):
                object.__delattr__(self, name)

    # Named adapters. The model-level functions in `klora.adapters` keep the
    # layers of a model consistent; these act on one layer.

    @property
    def adapter_names(self):
        """Names of the adapters this layer holds, in the order they were added."""
        return list(self._lora_adapters)

    def _lora_fans(self):
        in_dims, out_dims = self._lora_shapes()
        return math.prod(in_dims), math.prod(out_dims)

    def add_adapter(self, name, settings, lora_a=None, lora_b=None):
        """Adds an inactive adapter; `A` is initialized and `B` zero unless given.

        `settings` holds `rank`, `alpha`, `lora_dropout`, `use_rslora`, `init`
        and `seed`; `lora_a` / `lora_b` are arrays of shapes `(fan_in, rank)` /
        `(rank, fan_out)`.
        """
        if name in self._lora_adapters:
            raise ValueError(f"Layer '{self.path}' already has an adapter named {name!r}.")
        settings = {key: settings[key] for key in SETTINGS}
        check_lora_arguments(settings["rank"], settings["alpha"], settings["lora_dropout"],
                             settings["init"])
        fan_in, fan_out = self._lora_fans()
        rank = settings["rank"]
        if rank > min(fan_in, fan_out):
            raise ValueError(
                f"`rank`={rank} is too large for layer '{self.path}' with input width "
                f"{fan_in} and output width {fan_out}."
            )
        if lora_a is None:
            lora_a = ops.convert_to_numpy(self._a_initializer(settings)((fan_in, rank)))
        if lora_b is None:
            lora_b = np.zeros((rank, fan_out), "float32")
        lora_a, lora_b = np.asarray(lora_a), np.asarray(lora_b)
        if lora_a.shape != (fan_in, rank) or lora_b.shape != (rank, fan_out):
            raise ValueError(
                f"Adapter {name!r} for layer '{self.path}' needs A {(fan_in, rank)} and "
                f"B {(rank, fan_out)}; received {lora_a.shape} and {lora_b.shape}."
            )
        self._lora_adapters[name] = settings
        self._lora_values[name] = (lora_a, lora_b)

    def adapter_weights(self, name):
        """`(A, B)` of adapter `name` as NumPy arrays, shapes `(fan_in, r)`, `(r, fan_out)`."""
        if name not in self._lora_adapters:
            raise ValueError(f"Layer '{self.path}' has no adapter named {name!r}; it has "
                             f"{self.adapter_names}.")
        if name == self.active_adapter:
            return ops.convert_to_numpy(self.lora_a), ops.convert_to_numpy(self.lora_b)
        return self._lora_values[name]

    def adapter_settings(self, name):
        """The settings (`rank`, `alpha`, ...) of adapter `name`."""
        self.adapter_weights(name)  # raises for an unknown name
        return dict(self._lora_adapters[name])

    def activate_adapter(self, name):
        """Puts adapter `name` (or, for `None`, a zero update) into `lora_a` / `lora_b`.

        Returns whether anything a compiled function captured changed (the
        variables' shapes or trainability, the scale, the dropout), i.e.
        whether compiled functions must be rebuilt.
        """
        if name == self.active_adapter:
            return False
        if name is not None and name not in self._lora_adapters:
            raise ValueError(f"Layer '{self.path}' has no adapter named {name!r}.")
        if self.merged:
            raise ValueError(f"Layer '{self.path}' is merged: unmerge it before switching "
                             "adapters.")
        before = (self.lora_a.trainable, self.scale, self.lora_dropout)
        if self.active_adapter is not None:
            self._lora_values[self.active_adapter] = self.adapter_weights(self.active_adapter)
        if name is None:
            self.lora_b.assign(np.zeros(self.lora_b.shape, "float32"))
            self.lora_a.trainable = self.lora_b.trainable = False
            self.active_adapter = None
            return before[0]
        settings = self._lora_adapters[name]
        lora_a, lora_b = self._lora_values.pop(name)
        reshaped = settings["rank"] != self.lora_a.shape[-1]
        self._set_lora_settings(settings)
        if reshaped:
            self._drop_lora_variables()
            self._create_lora_variables(*self._lora_fans())
        if self.lora_dropout > 0 and self.lora_seed_generator is None:
            was_locked = self._tracker.locked
            self._tracker.unlock()
            self.lora_seed_generator = keras.random.SeedGenerator(self.seed)
            if was_locked:
                self._tracker.lock()
            reshaped = True
        self.lora_a.assign(lora_a)
        self.lora_b.assign(lora_b)
        self.lora_a.trainable = self.lora_b.trainable = True
        self.active_adapter = name
        return reshaped or before != (True, self.scale, self.lora_dropout)

    def delete_adapter(self, name):
        """Forgets the inactive adapter `name` (activate another one first)."""
        if name == self.active_adapter:
            raise ValueError(f"Adapter {name!r} is active on layer '{self.path}': "
                             "activate another one before deleting it.")
        self.adapter_weights(name)
        del self._lora_adapters[name]
        del self._lora_values[name]

    def _flat_lora_project(self, x):
        """`B(A(x))` on `x` flattened to 2-D: `(N, fan_in) @ A @ B`, reshaped back.

        Valid when the contracted axes are the trailing axes of `x` and the
        output is `x`'s leading axes followed by the output axes. XLA on CPU
        runs these thin rank-r products several times faster as 2-D matmuls
        than on 3-D or 4-D operands (measured: a 4096x384->1536 layer's LoRA
        forward+backward took 36 ms instead of 67 ms).
        """
        in_dims, out_dims = self._lora_shapes()
        shape = ops.shape(x)
        lead = tuple(shape[: len(shape) - len(in_dims)])
        hidden = ops.matmul(ops.reshape(x, (-1, math.prod(in_dims))), self.lora_a)
        # Scaling the (N, rank) hidden is far cheaper than scaling the output.
        hidden = ops.multiply(hidden, ops.cast(self.scale, hidden.dtype))
        return ops.reshape(ops.matmul(hidden, self.lora_b), lead + tuple(out_dims))

    def _kernel_for(self, inputs, training):
        """`(kernel, add_update)`: what to multiply `inputs` by, and whether to add `B(A(x))`.

        Training keeps the update factored: the frozen product plus
        `scale * B(A(dropout(x)))`, so no kernel-sized gradient is ever formed.
        At inference, when `inputs` are larger than the kernel, the adapter is
        added to the kernel instead (exactly what `merge` would store): one
        product over the inputs instead of three, so an unmerged model predicts
        at about the base model's cost. Small inference inputs (a few tokens)
        stay factored, which is cheaper than touching the whole kernel.
        """
        if self.merged:
            return self._kernel, False
        fan_in, fan_out = self._lora_fans()
        shape = tuple(inputs.shape)
        if training or None in shape or math.prod(shape) // fan_in * (fan_in + fan_out) <= (
                fan_in * fan_out):
            return self._kernel, True
        return ops.cast(ops.add(self._kernel, self.delta_kernel()), self.compute_dtype), False

    def _lora_update(self, inputs, training):
        x = inputs
        if training and self.lora_dropout > 0:
            x = dropout(x, self.lora_dropout, self.lora_seed_generator)
        return self._lora_project(x)

    def delta_kernel(self):
        """`scale * A @ B` in the kernel's shape: what merging adds to the kernel."""
        delta = ops.matmul(self.lora_a, self.lora_b) * self.scale
        return ops.cast(self._to_kernel_layout(delta), self._kernel.dtype)

    def merge(self):
        """Folds the adapter into the kernel; the forward pass then skips it."""
        if not self.merged:
            self._kernel.assign(self._kernel + self.delta_kernel())
            self.merged = True

    def unmerge(self):
        """Subtracts the adapter from the kernel again (inverse of `merge`)."""
        if self.merged:
            self._kernel.assign(self._kernel - self.delta_kernel())
            self.merged = False

    def lora_config(self):
        """The adapter settings, as `klora.apply` and `get_config` record them."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "lora_dropout": self.lora_dropout,
            "use_rslora": self.use_rslora,
            "init": self.init,
            "seed": self.seed,
            "merged": self.merged,
        }

    def _saved_variables(self):
        variables = [self._kernel]
        if self.bias is not None:
            variables.append(self.bias)
        return variables + [self.lora_a, self.lora_b]

    def save_own_variables(self, store):
        if not self.built:
            return
        for i, variable in enumerate(self._saved_variables()):
            store[str(i)] = variable

    def load_own_variables(self, store):
        if not self.built:
            return
        variables = self._saved_variables()
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"Layer '{self.name}' expects {len(variables)} saved variables "
                f"(kernel, bias, lora_a, lora_b) but the file holds {len(store.keys())}."
            )
        for i, variable in enumerate(variables):
            variable.assign(store[str(i)])
