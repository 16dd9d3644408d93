"""Tokenized, length-bucketed `tf.data` batches for encoder models.

Sentences are tokenized once. Each epoch they are shuffled and grouped by
length into a few bucket lengths (16, 32, 64, ... up to `max_length`), so a
batch is padded to its bucket, not to `max_length`, and XLA compiles a handful
of shapes instead of one per batch. `random_lengths()` gives freely shuffled
batches instead (as transformers' `Trainer` draws them), each padded to the
bucket of its longest text: the same shapes, more padding.

>>> batches = TokenBatches(texts, labels, tokenizer, max_length=128, batch_size=32)
>>> model.fit(batches.dataset(shuffle=True, seed=0), epochs=3)
"""

import copy
import math

import numpy as np


def bucket_lengths(max_length, smallest=16):
    """Powers of two from `smallest` up to `max_length`, then `max_length` itself."""
    lengths = []
    length = smallest
    while length < max_length:
        lengths.append(length)
        length *= 2
    return lengths + [max_length]


def token_lists(tokenizer, texts):
    """Token ids of each text (no special tokens), as Python lists of ints."""
    import tensorflow as tf

    out = []
    for start in range(0, len(texts), 4096):
        ids = tokenizer(tf.constant(texts[start:start + 4096]))
        ids = ids.to_list() if hasattr(ids, "to_list") else [list(x) for x in ids]
        out.extend([int(t) for t in row] for row in ids)
    return out


class TokenBatches:
    """Batches of `{"token_ids", "padding_mask"[, "segment_ids"]}` and labels.

    Args:
        texts: List of strings.
        labels: List of integer class ids, or None for unlabelled text.
        tokenizer: A keras-hub WordPiece tokenizer (its `cls_token_id`,
            `sep_token_id` and `pad_token_id` frame each sequence).
        max_length: Longest packed sequence, special tokens included; longer
            texts are truncated.
        batch_size: Examples per batch.
        segment_ids: Whether the model takes `segment_ids` (BERT does,
            DistilBERT does not).
    """

    def __init__(self, texts, labels, tokenizer, max_length, batch_size, segment_ids=True):
        sequences = [
            [tokenizer.cls_token_id] + ids[: max_length - 2] + [tokenizer.sep_token_id]
            for ids in token_lists(tokenizer, list(texts))
        ]
        self._setup(sequences, labels, tokenizer.pad_token_id, max_length, batch_size,
                    segment_ids)

    @classmethod
    def from_sequences(cls, sequences, labels, pad_id, max_length, batch_size, segment_ids=True,
                       segments=None, token_labels=False, label_pad=-100):
        """Batches of already framed token id sequences (e.g. `[CLS] q [SEP] c [SEP]`).

        `labels` holds one label (or a fixed-size label vector) per sequence, or,
        with `token_labels=True`, one list of per-token labels per sequence, padded
        with `label_pad`. `segments` gives per-token segment ids (default zeros).

        >>> batches = TokenBatches.from_sequences([[2, 7, 3]], [[-100, 4, -100]], 0,
        ...                                       max_length=16, batch_size=8, token_labels=True)
        """
        too_long = [i for i, s in enumerate(sequences) if len(s) > max_length]
        if too_long:
            raise ValueError(f"Sequence {too_long[0]} has {len(sequences[too_long[0]])} tokens, "
                             f"more than max_length={max_length}.")
        batches = cls.__new__(cls)
        batches._setup(sequences, labels, pad_id, max_length, batch_size, segment_ids,
                       segments, token_labels, label_pad)
        return batches

    def _setup(self, sequences, labels, pad_id, max_length, batch_size, segment_ids,
               segments=None, token_labels=False, label_pad=-100):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1. Received: {batch_size}")
        self.batch_size = batch_size
        self.segment_ids = segment_ids
        self.buckets = bucket_lengths(max_length)
        self.pad_id = pad_id
        self.sequences = [list(s) for s in sequences]
        self.segments = segments
        self.token_labels, self.label_pad = token_labels, label_pad
        if labels is None or token_labels:
            self.labels = labels
        else:
            self.labels = np.asarray(labels, "int32")
        lengths = np.array([len(s) for s in self.sequences])
        self.bucket_of = np.searchsorted(self.buckets, lengths)
        self.shard_index, self.shard_count, self.drop_remainder = 0, 1, False
        self.by_length = True

    def shard(self, index, count, drop_remainder=False):
        """A copy yielding only this shard's block of rows of every (global) batch.

        `batch_size` must divide by `count`; with `drop_remainder`, partial
        batches are skipped, so every step has a full global batch.

        For multi-host training (`klora.distribution.shard_batches`): every host
        builds the same `TokenBatches` (same texts, batch size and seed, hence
        the same global batches, order and bucket lengths) and feeds
        `shard(host, hosts, drop_remainder=True)`: `batch_size // count` rows of
        each. A partial batch cannot be split evenly, so `count > 1` needs
        `drop_remainder`. `predict` is not sharded.
        """
        if not 0 <= index < count or self.batch_size % count:
            raise ValueError(f"Cannot take shard {index} of {count} of batches of "
                             f"{self.batch_size} (the batch size must divide by the count).")
        if count > 1 and not drop_remainder:
            raise ValueError("Sharded batches need drop_remainder=True: a partial last "
                             "batch cannot be split evenly over the shards.")
        sharded = copy.copy(self)
        sharded.shard_index, sharded.shard_count = index, count
        sharded.drop_remainder = drop_remainder
        return sharded

    def random_lengths(self):
        """A copy whose shuffled batches mix lengths, each padded to the bucket of its
        longest text (`predict` still groups by length)."""
        mixed = copy.copy(self)
        mixed.by_length = False
        return mixed

    def __len__(self):
        """Batches per epoch (independent of the shuffle)."""
        if not self.by_length:
            whole, partial = divmod(len(self.sequences), self.batch_size)
            return whole + (bool(partial) and not self.drop_remainder)
        counts = np.bincount(self.bucket_of, minlength=len(self.buckets))
        leftover = int(np.sum(counts % self.batch_size))
        if self.drop_remainder:
            return int(np.sum(counts // self.batch_size)) + leftover // self.batch_size
        return int(np.sum(counts // self.batch_size)) + math.ceil(leftover / self.batch_size)

    def examples_per_epoch(self):
        """How many examples one epoch yields (all, unless partial batches are dropped)."""
        if not self.drop_remainder:
            return len(self.sequences)
        return sum(len(i) for i, _ in self.index_batches(by_length=self.by_length)
                   if len(i) == self.batch_size)

    def _batch(self, indices, length):
        ids = np.full((len(indices), length), self.pad_id, "int32")
        mask = np.zeros_like(ids)
        segments = np.zeros_like(ids)
        labels = (np.full_like(ids, self.label_pad)
                  if self.token_labels and self.labels is not None else None)
        for row, i in enumerate(indices):
            n = len(self.sequences[i])
            ids[row, :n] = self.sequences[i]
            mask[row, :n] = 1
            if self.segments is not None:
                segments[row, :n] = self.segments[i]
            if labels is not None:
                labels[row, :n] = self.labels[i]
        x = {"token_ids": ids, "padding_mask": mask}
        if self.segment_ids:
            x["segment_ids"] = segments
        if self.labels is None:
            return x
        return x, (labels if self.token_labels else self.labels[indices])

    def index_batches(self, shuffle=False, seed=0, by_length=True):
        """Yields `(indices, length)` of each batch of one epoch, grouped by bucket
        (or, without `by_length`, in the shuffled order)."""
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.sequences)) if shuffle else np.arange(len(self.sequences))
        if not by_length:
            for start in range(0, len(order), self.batch_size):
                chunk = [int(i) for i in order[start:start + self.batch_size]]
                yield chunk, self.buckets[max(self.bucket_of[i] for i in chunk)]
            return
        pending = [[] for _ in self.buckets]
        for i in order:
            bucket = pending[self.bucket_of[i]]
            bucket.append(i)
            if len(bucket) == self.batch_size:
                yield list(bucket), self.buckets[self.bucket_of[i]]
                bucket.clear()
        leftover = sorted((i for bucket in pending for i in bucket), key=self.bucket_of.__getitem__)
        for start in range(0, len(leftover), self.batch_size):
            chunk = leftover[start:start + self.batch_size]
            yield chunk, self.buckets[max(self.bucket_of[i] for i in chunk)]

    def batches(self, shuffle=False, seed=0):
        """Yields the batches of one epoch, in bucket-grouped (shuffled) order."""
        rows = self.batch_size // self.shard_count
        for indices, length in self.index_batches(shuffle, seed, self.by_length):
            if self.drop_remainder and len(indices) < self.batch_size:
                continue
            if self.shard_count > 1:
                indices = indices[self.shard_index * rows:(self.shard_index + 1) * rows]
            yield self._batch(indices, length)

    def predict(self, model, per_token=False, progress=False):
        """`model`'s outputs for every text, in the original order.

        With `per_token`, returns a list of each sequence's per-token outputs
        (padding cut off) instead of one stacked array; with `progress`, shows a
        progress bar over the examples.
        """
        import keras

        outputs = [None] * len(self.sequences)
        bar = keras.utils.Progbar(len(self.sequences), unit_name="example") if progress else None
        for indices, length in self.index_batches():
            # Full batches only: one compiled shape per bucket, and a batch that
            # always splits evenly over the devices of a keras.distribution.
            padded = indices + [indices[-1]] * (self.batch_size - len(indices))
            x = self._batch(padded, length)
            x = x if self.labels is None else x[0]
            for i, row in zip(indices, np.asarray(model.predict_on_batch(x))):
                outputs[i] = row[: len(self.sequences[i])] if per_token else row
            if bar is not None:
                bar.add(len(indices))
        return outputs if per_token else np.stack(outputs)

    def dataset(self, shuffle=False, seed=0, first_epoch=0):
        """A prefetched `tf.data.Dataset`; with `shuffle`, each epoch reshuffles.

        `first_epoch` continues the sequence of shuffles after a resume.
        """
        import tensorflow as tf

        epoch = [first_epoch]

        def generate():
            epoch[0] += 1
            yield from self.batches(shuffle, seed + epoch[0])

        spec = tf.TensorSpec((None, None), tf.int32)
        x_spec = {"token_ids": spec, "padding_mask": spec}
        if self.segment_ids:
            x_spec["segment_ids"] = spec
        if self.labels is None:
            signature = x_spec
        elif self.token_labels:
            signature = (x_spec, spec)
        else:
            signature = (x_spec, tf.TensorSpec((None, *self.labels.shape[1:]), tf.int32))
        dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(self)))
        return dataset.prefetch(tf.data.AUTOTUNE)
