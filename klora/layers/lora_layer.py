"""The low-rank update shared by `LoRADense` and `LoRAEinsumDense`.

A LoRA layer keeps its frozen base computation `f(x; W)` and adds

    scale * B(A(dropout(x)))        scale = alpha / rank  (alpha / sqrt(rank) with rslora)

with `A: (fan_in, rank)` and `B: (rank, fan_out)` over the flattened input and
output axes of the kernel. The update is computed on activations, never folded
into the kernel during training, so no full-size kernel gradient is formed.
"""

import math

import keras
from keras import ops

INITS = ("kaiming", "gaussian")


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
    sizes, in kernel order), `_lora_project(x)` (applies `A` then `B` to a
    layer input) and `_to_kernel_layout(delta)` (reshapes an `(fan_in, fan_out)`
    matrix into the kernel's shape).
    """

    def _init_lora(self, rank, alpha, lora_dropout, use_rslora, init, seed, merged):
        check_lora_arguments(rank, alpha, lora_dropout, init)
        self.rank = rank
        self.alpha = alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.init = init
        self.seed = seed
        self.merged = bool(merged)

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
        if self.init == "kaiming":
            # PEFT's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            a_init = keras.initializers.VarianceScaling(
                scale=1.0 / 3.0, mode="fan_in", distribution="uniform", seed=self.seed
            )
        else:
            a_init = keras.initializers.RandomNormal(stddev=1.0 / self.rank, seed=self.seed)
        # Adapters stay float32 under mixed precision, like PEFT's autocast_adapter_dtype.
        dtype = "float64" if self.variable_dtype == "float64" else "float32"
        was_locked = self._tracker.locked
        self._tracker.unlock()
        try:
            self.lora_a = self.add_weight(
                name="lora_a", shape=(fan_in, self.rank), initializer=a_init, dtype=dtype
            )
            self.lora_b = self.add_weight(
                name="lora_b", shape=(self.rank, fan_out), initializer="zeros", dtype=dtype
            )
            self.lora_seed_generator = (
                keras.random.SeedGenerator(self.seed) if self.lora_dropout > 0 else None
            )
        finally:
            if was_locked:
                self._tracker.lock()

    def _lora_update(self, inputs, training):
        x = inputs
        if training and self.lora_dropout > 0:
            x = keras.random.dropout(x, self.lora_dropout, seed=self.lora_seed_generator)
        return ops.multiply(self._lora_project(x), ops.cast(self.scale, x.dtype))

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
