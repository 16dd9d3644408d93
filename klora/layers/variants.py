"""The LoRA variants: what each one does at `LoRALayer`'s extension points.

A variant is chosen per adapter by its `LoraConfig` and says

- `initial_values`: the variables it owns besides `A` and `B`, and their start;
- `update`: what it adds to the base product, from the layer input;
- `merged` / `unmerged`: the flat `(fan_in, fan_out)` kernel with the adapter folded
  in, and back (`remember` keeps what unmerging needs, when merging for good);
- `neutral`: the values of its variables for which it changes nothing.

>>> variant_for(LoraConfig(use_dora=True))
<klora.layers.variants.Dora object at ...>
"""

import numpy as np
from keras import ops


def column_norms(weight):
    """The norm of each output unit's weights: `||W[:, j]||` of a `(fan_in, fan_out)` W."""
    return ops.sqrt(ops.sum(ops.square(weight), axis=0))


def host_column_norms(weight):
    """`column_norms` of a host array, in float64, as float32."""
    return np.sqrt(np.square(np.asarray(weight, "float64")).sum(axis=0)).astype("float32")


class Lora:
    """Plain LoRA: `scale * B(A(dropout(x)))` is added; merging adds `scale * A @ B`."""

    def initial_values(self, layer, config, values, residual):
        return values

    def update(self, layer, x, dropped, product):
        return layer.low_rank(dropped)

    def merged(self, layer, weight):
        return ops.add(weight, layer.delta())

    def remember(self, layer, weight):
        pass

    def unmerged(self, layer, weight):
        return ops.subtract(weight, layer.delta())

    def neutral(self, layer, values):
        return values


class Dora(Lora):
    """DoRA (Liu et al. 2024), as PEFT computes it.

    The adapted kernel is split into a direction and a magnitude `m` (one trained
    value per output unit, `lora_magnitude`, starting at the adapted kernel's
    column norms):

        W' = m * (W + scale * A @ B) / ||W + scale * A @ B||

    The norm is detached from the gradient (the paper's section 4.3). In training
    the base product is recomputed on the dropped-out input when LoRA dropout is on,
    as in PEFT, so the output is `x @ W + (f - 1) * x_d @ W + f * scale * B(A(x_d))`
    with `f = m / ||W + scale * A @ B||`. Merging keeps `||W + scale * A @ B||` in
    `lora_weight_norm`, which unmerging divides out again.
    """

    def initial_values(self, layer, config, values, residual):
        weight = np.asarray(layer.flat_kernel()) if residual is None else residual
        norms = host_column_norms(weight + config.scale * values["lora_a"] @ values["lora_b"])
        return {**values, "lora_magnitude": norms, "lora_weight_norm": np.ones_like(norms)}

    def _factor(self, layer, weight):
        norm = ops.stop_gradient(column_norms(ops.add(weight, layer.delta())))
        return ops.divide(layer.lora_magnitude, norm), norm

    def update(self, layer, x, dropped, product):
        factor, _ = self._factor(layer, layer.flat_kernel())
        base = product if dropped is x else layer.base_product(dropped)
        factor = ops.cast(factor, base.dtype)
        return ops.add(layer.along_outputs(ops.subtract(factor, 1.0), base),
                       layer.along_outputs(factor, layer.low_rank(dropped)))

    def merged(self, layer, weight):
        factor, _ = self._factor(layer, weight)
        return ops.multiply(ops.add(weight, layer.delta()), factor[None, :])

    def remember(self, layer, weight):
        layer.lora_weight_norm.assign(self._factor(layer, weight)[1])

    def unmerged(self, layer, weight):
        factor = ops.divide(layer.lora_magnitude, layer.lora_weight_norm)
        return ops.subtract(ops.divide(weight, factor[None, :]), layer.delta())

    def neutral(self, layer, values):
        # With the neutral A and B the magnitude must be the norm: a factor of 1.
        weight = np.asarray(layer.flat_kernel())
        return {**values, "lora_magnitude": host_column_norms(
            weight + layer.scale * values["lora_a"] @ values["lora_b"])}


LORA, DORA = Lora(), Dora()


def variant_for(config):
    """The variant an adapter's `LoraConfig` asks for."""
    return DORA if config.use_dora else LORA
