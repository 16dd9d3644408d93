"""Dropout whose random mask costs less: XLA's RngBitGenerator on the JAX backend.

Keras' JAX dropout draws its mask with `jax.random.bernoulli`, i.e. JAX's
Threefry hash computed element by element in generic HLO; on a CPU that costs
more than the matmuls it regularizes (a BERT step draws ~58M values). XLA's
`RngBitGenerator` produces the same kind of counter-based bits several times
faster (a 32x12x128x128 attention mask: 173 ms -> 36 ms on this project's
2-core CPU). On CPU it runs XLA's Threefry; on GPU/TPU the platform default
(Philox / the hardware generator). A value is kept when its 32 random bits are
at least `round(rate * 2**32)`, so the keep probability is exact to 2**-33.

Everything else is `keras.random.dropout`: the seeds come from the layer's
`SeedGenerator`, kept values are scaled by `1 / (1 - rate)`. Other backends,
and JAX under a `keras.distribution` (whose partitioner would have to split
the generator), fall back to `keras.random.dropout`.

>>> layer = FastDropout(0.1)           # a drop-in for keras.layers.Dropout
>>> y = layer(x, training=True)
"""

import keras

THRESHOLD_BITS = 32
# `jax.ad_checkpoint.checkpoint_name` of the keep masks, for `klora.remat`'s policy.
DROPOUT_MASK = "klora_dropout_mask"


def _jax_dropout(inputs, rate, seed, noise_shape):
    import jax
    import jax.numpy as jnp
    from jax.ad_checkpoint import checkpoint_name

    key = jnp.concatenate([jnp.asarray(seed).astype(jnp.uint32).reshape(2),
                           jnp.zeros(2, jnp.uint32)])
    algorithm = (jax.lax.RandomAlgorithm.RNG_THREE_FRY if jax.default_backend() == "cpu"
                 else jax.lax.RandomAlgorithm.RNG_DEFAULT)
    _, bits = jax.lax.rng_bit_generator(key, noise_shape, jnp.uint32, algorithm=algorithm)
    threshold = min(round(rate * 2**THRESHOLD_BITS), 2**THRESHOLD_BITS - 1)
    keep = checkpoint_name(bits >= jnp.uint32(threshold), DROPOUT_MASK)
    return jnp.where(keep, inputs / (1.0 - rate), jnp.zeros_like(inputs))


def dropout(inputs, rate, seed_generator, noise_shape=None):
    """`keras.random.dropout(inputs, rate, noise_shape, seed=seed_generator)`, cheaper on JAX.

    Args:
        inputs: A tensor.
        rate: Fraction of the values to drop, in [0, 1].
        seed_generator: A `keras.random.SeedGenerator`, advanced once per call.
        noise_shape: Optional shape of the mask, broadcast to `inputs`
            (`None` entries take the size of `inputs`).
    """
    if (keras.backend.backend() != "jax" or not 0 < rate < 1
            or keras.distribution.distribution() is not None):
        return keras.random.dropout(inputs, rate, noise_shape=noise_shape, seed=seed_generator)
    shape = tuple(inputs.shape)
    if noise_shape is not None:
        shape = tuple(s if n is None else n for n, s in zip(noise_shape, shape))
    return _jax_dropout(inputs, rate, seed_generator.next(), shape)


@keras.saving.register_keras_serializable(package="klora")
class FastDropout(keras.layers.Dropout):
    """`keras.layers.Dropout` drawing its mask with `klora.layers.fast_dropout.dropout`.

    Same arguments, config and statistics as `keras.layers.Dropout`.
    `klora.apply` turns a model's `Dropout` layers into this class in place
    (see `klora.fast_layers`).
    """

    def call(self, inputs, training=False):
        if training and self.rate > 0:
            return dropout(inputs, self.rate, self.seed_generator, self.noise_shape)
        return inputs
