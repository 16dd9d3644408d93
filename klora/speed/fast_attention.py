"""Multi-head attention whose batched matmuls use every core of a CPU under XLA.

XLA's CPU backend runs a batched matmul, such as attention's `QK^T` and `PV`
einsums, on one thread (~55 GFLOP/s here, where its plain matmuls reach ~170
on two cores), but runs independent operations side by side. On the JAX
backend with CPU devices, `FastMultiHeadAttention` therefore attends the batch
in one chunk per core: independent einsums that XLA schedules concurrently.
Projections, masks and results are Keras'; each chunk's attention-dropout
mask is the matching slice of the mask `FastDropout` draws for the whole
batch (one seed, positions offset), so outputs and gradients do not depend
on the chunking. On GPU/TPU, under a `keras.distribution`, on the TensorFlow
and torch backends, and for attention-score outputs it is Keras' layer.

>>> layer = FastMultiHeadAttention(num_heads=12, key_dim=32)  # as keras.layers.MultiHeadAttention
>>> y = layer(x, x, training=True)
"""

import os

import keras
from keras import ops

from klora.speed.fast_dropout import MAX_MASK_SIZE, FastDropout, jax_dropout


def cpu_cores():
    """Cores this process may run on: the size of XLA CPU's thread pool."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def attention_chunks(batch_size):
    """How many batch chunks attention is split into: one per CPU core on JAX's
    CPU backend without a distribution (the chunks' einsums run concurrently),
    else 1."""
    if batch_size is None or batch_size < 2 or keras.backend.backend() != "jax":
        return 1
    import jax

    if jax.default_backend() != "cpu" or keras.distribution.distribution() is not None:
        return 1
    return min(batch_size, cpu_cores())


def chunk_bounds(size, chunks):
    """`chunks` contiguous (start, stop) ranges covering `range(size)`, sizes within one."""
    bounds, start = [], 0
    for i in range(chunks):
        stop = start + size // chunks + (i < size % chunks)
        bounds.append((start, stop))
        start = stop
    return bounds


@keras.saving.register_keras_serializable(package="klora")
class FastMultiHeadAttention(keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` that splits attention into per-core
    batch chunks on a CPU under JAX.

    Same arguments, config, weights and results as Keras' class. `klora.apply`
    turns a model's `MultiHeadAttention` layers into this class in place, and
    its `Dropout` layers (this layer's attention dropout among them) into
    `FastDropout` (see `klora.speed.fast_layers`).
    """

    def _compute_attention(self, query, key, value, attention_mask=None, training=None,
                           return_attention_scores=False, use_causal_mask=False):
        causal = {"use_causal_mask": True} if use_causal_mask else {}
        drops = bool(training) and self._dropout > 0
        chunks = self._chunk_count(query, key, drops, return_attention_scores, use_causal_mask)
        if chunks == 1:
            return super()._compute_attention(query, key, value, attention_mask, training,
                                              return_attention_scores, **causal)
        batch_size = query.shape[0]
        example_size = self._num_heads * query.shape[1] * key.shape[1]  # [heads, queries, keys]
        seed = self._dropout_layer.seed_generator.next() if drops else None
        outputs = []
        for start, stop in chunk_bounds(batch_size, chunks):
            mask = attention_mask
            if mask is not None and mask.shape[0] == batch_size:
                mask = mask[start:stop]
            chunk = (query[start:stop], key[start:stop], value[start:stop], mask)
            if drops:
                outputs.append(self._attend(*chunk, seed, start * example_size))
            else:
                outputs.append(super()._compute_attention(*chunk, training, **causal)[0])
        return ops.concatenate(outputs, axis=0), None

    def _chunk_count(self, query, key, drops, return_attention_scores, use_causal_mask):
        """Batch chunks for this call: 1 (Keras' path) unless the inputs are the
        default 4-D layout, no scores are returned, and any dropout can be drawn
        as slices of one `FastDropout` mask."""
        chunks = attention_chunks(query.shape[0])
        if chunks == 1 or len(query.shape) != 4 or return_attention_scores:
            return 1
        if drops:
            scores_size = query.shape[0] * self._num_heads * query.shape[1] * key.shape[1]
            if (use_causal_mask or type(self._dropout_layer) is not FastDropout
                    or scores_size >= MAX_MASK_SIZE):
                return 1
        return chunks

    def _attend(self, query, key, value, attention_mask, seed, offset):
        """Keras' explicit attention with dropout, the mask drawn at `offset`."""
        query = ops.multiply(query, ops.cast(self._inverse_sqrt_key_dim, query.dtype))
        scores = ops.einsum(self._dot_product_equation, key, query)
        scores = self._masked_softmax(scores, attention_mask)
        scores = ops.cast(scores, self._dropout_layer.compute_dtype)  # as the layer would
        scores = jax_dropout(scores, self._dropout, seed, tuple(scores.shape), offset)
        return ops.einsum(self._combine_equation, scores, value)
