import keras_hub
import numpy as np

from klora.data import TokenBatches
from klora.data.token_batches import bucket_lengths

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "was", "good", "bad",
         "very", "not", ",", "."]
TEXTS = ["the film was good .", "bad", "the film was not very very very good , not bad .",
         "very bad film", "good", "the the the the the the the the the the the the the the the the the the the"]


def tokenizer():
    return keras_hub.models.BertTokenizer(vocabulary=VOCAB)


def test_bucket_lengths():
    assert bucket_lengths(128) == [16, 32, 64, 128]
    assert bucket_lengths(100) == [16, 32, 64, 100]
    assert bucket_lengths(16) == [16]


def test_packing_matches_keras_hub_preprocessor():
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer(), sequence_length=16)
    expected = preprocessor(TEXTS)
    batches = TokenBatches(TEXTS, None, tokenizer(), max_length=16, batch_size=len(TEXTS))
    (indices, length), = list(batches.index_batches())
    x = batches._batch(indices, length)
    for key in ("token_ids", "padding_mask", "segment_ids"):
        want = np.asarray(expected[key])[indices]
        np.testing.assert_array_equal(x[key], want.astype("int32"), err_msg=key)


def test_every_example_once_per_epoch_in_few_shapes():
    texts = [" ".join(["very"] * n) for n in range(1, 60)]
    labels = list(range(59))
    batches = TokenBatches(texts, labels, tokenizer(), max_length=64, batch_size=8)
    seen, shapes, count = [], set(), 0
    for x, y in batches.batches(shuffle=True, seed=1):
        seen.extend(y.tolist())
        shapes.add(x["token_ids"].shape[1])
        assert x["token_ids"].shape[1] >= x["padding_mask"].sum(1).max()
        count += 1
    assert sorted(seen) == labels
    assert count == len(batches)
    assert shapes <= {16, 32, 64}
    first = [y.tolist() for _, y in batches.batches(shuffle=True, seed=1)]
    second = [y.tolist() for _, y in batches.batches(shuffle=True, seed=2)]
    assert first != second


def test_no_segment_ids_for_distil_bert():
    batches = TokenBatches(TEXTS, [0] * 6, tokenizer(), 16, 4, segment_ids=False)
    x, _ = next(batches.batches())
    assert set(x) == {"token_ids", "padding_mask"}


def test_predict_restores_input_order():
    class Echo:
        def predict_on_batch(self, x):
            return x["padding_mask"].sum(1, keepdims=True)

    batches = TokenBatches(TEXTS, None, tokenizer(), 16, 2)
    lengths = batches.predict(Echo())[:, 0]
    np.testing.assert_array_equal(lengths, [len(s) for s in batches.sequences])
    assert lengths[1] == 3  # [CLS] bad [SEP]


def test_dataset_cardinality():
    batches = TokenBatches(TEXTS, [0, 1, 0, 1, 0, 1], tokenizer(), 16, 4)
    dataset = batches.dataset(shuffle=True)
    assert int(dataset.cardinality()) == len(batches) == len(list(dataset))


def test_random_lengths_mix_buckets_and_cover_every_example():
    texts = [" ".join(["very"] * n) for n in range(1, 60)]
    grouped = TokenBatches(texts, list(range(59)), tokenizer(), max_length=64, batch_size=8)
    mixed = grouped.random_lengths()
    assert grouped.by_length  # the copy leaves the original grouped
    batches = list(mixed.batches(shuffle=True, seed=3))
    assert len(batches) == len(mixed) == 8  # ceil(59 / 8): no partial batch per bucket
    assert sorted(v for _, y in batches for v in y.tolist()) == list(range(59))
    for x, _ in batches:  # each padded to the bucket of its longest text
        longest = x["padding_mask"].sum(1).max()
        assert x["token_ids"].shape[1] == min(b for b in mixed.buckets if b >= longest)
    spans = [np.ptp(x["padding_mask"].sum(1)) for x, _ in batches]
    assert max(spans) > 16  # lengths from different buckets share a batch
    assert int(mixed.dataset(shuffle=True).cardinality()) == len(list(mixed.dataset(shuffle=True)))
    sharded = mixed.shard(0, 2, drop_remainder=True)
    assert len(sharded) == 7 and sharded.examples_per_epoch() == 56
