"""Word -> sub-token alignment, character offsets and chunking, case by case."""

import keras_hub
import numpy as np
import pytest

from klora.data.word_alignment import (IGNORE, WordPieces, align_words, split_words,
                                       word_predictions)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "zu", "##rich", "cafe", "new", "york",
         "u", "s", ".", ",", "'", "1990", "##s", "wash", "##ing", "##ton", "a", "b", "c"]


def pieces(lowercase=True):
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=VOCAB, lowercase=lowercase)
    return WordPieces(tokenizer)


def token(name):
    return VOCAB.index(name)


def test_split_words_keeps_character_spans():
    text = "Zürich, the 1990s: New-York's café!"
    words = split_words(text)
    assert [w for w, _, _ in words] == ["Zürich", ",", "the", "1990s", ":", "New", "-", "York",
                                        "'", "s", "café", "!"]
    assert all(text[s:e] == w for w, s, e in words)


@pytest.mark.parametrize("word, ids, offsets", [
    ("Zürich", ["zu", "##rich"], [(0, 2), (2, 6)]),           # accent stripped, two pieces
    ("Zu\u0308rich", ["zu", "##rich"], [(0, 3), (3, 7)]),     # decomposed accent stays with u
    ("Café", ["cafe"], [(0, 4)]),
    ("Washington", ["wash", "##ing", "##ton"], [(0, 4), (4, 7), (7, 10)]),
    ("U.S.", ["u", ".", "s", "."], [(0, 1), (1, 2), (2, 3), (3, 4)]),   # CoNLL-style token
    ("1990s", ["1990", "##s"], [(0, 4), (4, 5)]),
    ("Xylophone", ["[UNK]"], [(0, 9)]),
])
def test_pieces_and_offsets(word, ids, offsets):
    wp = pieces()
    [found] = wp.ids([word])
    assert found == [token(t) for t in ids]
    assert wp.offsets(word, found) == offsets


def test_word_the_tokenizer_drops_becomes_unknown():
    wp = pieces()
    assert wp.ids(["\u200b"]) == [[token("[UNK]")]]


def test_cased_vocabulary_is_not_lowercased():
    wp = pieces(lowercase=False)
    assert wp.ids(["Cafe", "cafe"]) == [[token("[UNK]")], [token("cafe")]]


def test_label_goes_on_first_sub_token_only():
    chunks = align_words([["Washington", "U.S.", "a"]], [[5, 6, 0]], pieces(), max_length=32)
    cls, sep = token("[CLS]"), token("[SEP]")
    assert chunks.sequences == [[cls, token("wash"), token("##ing"), token("##ton"), token("u"),
                                 token("."), token("s"), token("."), token("a"), sep]]
    assert chunks.labels == [[IGNORE, 5, IGNORE, IGNORE, 6, IGNORE, IGNORE, IGNORE, 0, IGNORE]]
    assert chunks.word_starts == [[1, 4, 8]]


def test_long_sentences_are_chunked_without_losing_words():
    words = ["Washington", "a", "b", "U.S.", "c", "Zürich"]   # 3 + 1 + 1 + 4 + 1 + 2 pieces
    tags = [[1, 2, 3, 4, 5, 6]]
    chunks = align_words([["a"], words], [[0]] + tags, pieces(), max_length=7)  # 5 per chunk
    assert chunks.sentence == [0, 1, 1, 1]
    assert chunks.first_word == [0, 0, 3, 5]
    assert all(len(s) <= 7 for s in chunks.sequences)
    labelled = [l for k in (1, 2, 3) for l in chunks.labels[k] if l != IGNORE]
    assert labelled == [1, 2, 3, 4, 5, 6]
    # Token logits whose argmax is the label give back every word's tag, in order.
    logits = [np.eye(8)[np.where(np.array(l) == IGNORE, 0, l)] for l in chunks.labels]
    assert word_predictions(chunks, logits, 2) == [[0], [1, 2, 3, 4, 5, 6]]


def test_word_longer_than_the_window_is_truncated():
    chunks = align_words([["Washington"]], [[3]], pieces(), max_length=4)
    assert chunks.sequences == [[token("[CLS]"), token("wash"), token("##ing"), token("[SEP]")]]
    assert chunks.labels == [[IGNORE, 3, IGNORE, IGNORE]]
