"""Words to WordPiece sub-tokens, with labels and character offsets.

Text is tokenized word by word, so every sub-token knows its word and its
character span in the original text (keras-hub's tokenizer returns no
offsets). Word labels go on a word's first sub-token; its other sub-tokens
get `IGNORE` (-100), which loss and metrics skip. Sentences longer than the
model's window are cut into consecutive chunks of whole words, so every word
is labelled and evaluated exactly once.

>>> pieces = WordPieces(tokenizer)
>>> pieces.words("Zürich, 1990s")       # [("Zürich", 0, 6), (",", 6, 7), ("1990s", 8, 13)]
>>> chunks = align_words(sentences, tag_ids, pieces, max_length=128)
"""

import dataclasses
import re
import unicodedata

import numpy as np

from klora.data.token_batches import token_lists

IGNORE = -100
# BERT's basic tokenizer splits on whitespace and around every punctuation mark.
_WORD = re.compile(r"[^\W_]+|[^\w\s]|_", re.UNICODE)


def split_words(text):
    """`[(word, start, end)]`: runs of letters/digits and single punctuation marks."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


class WordPieces:
    """Cached WordPiece ids and character offsets of single words.

    Uncased vocabularies are matched the way BERT's uncased tokenizer does it:
    lower-cased and accent-stripped (keras-hub's converted uncased tokenizers
    lower-case but keep accents, which turns "Zürich" into `[UNK]`).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lowercase = bool(getattr(tokenizer, "lowercase", False))
        self.strip_accents = self.lowercase or bool(getattr(tokenizer, "strip_accents", False))
        self.unk_id = tokenizer.token_to_id("[UNK]")
        self._ids = {}

    def normalize(self, word):
        """`(normalized word, original index of each normalized character)`."""
        chars, origin = [], []
        for i, c in enumerate(word):
            n = c.lower() if self.lowercase else c
            if self.strip_accents:
                n = "".join(x for x in unicodedata.normalize("NFD", n)
                            if unicodedata.category(x) != "Mn")
            chars.append(n)
            origin.extend([i] * len(n))
        return "".join(chars), origin

    def ids(self, words):
        """Sub-token ids of each word (`[UNK]` for a word the tokenizer drops)."""
        new = sorted({w for w in words if w not in self._ids})
        for start in range(0, len(new), 8192):
            batch = new[start:start + 8192]
            normalized = [self.normalize(w)[0] for w in batch]
            for word, ids in zip(batch, token_lists(self.tokenizer, normalized)):
                self._ids[word] = ids or [self.unk_id]
        return [self._ids[w] for w in words]

    def offsets(self, word, ids):
        """Character span `(start, end)` inside `word` of each of its sub-tokens.

        A sub-token that cannot be matched (e.g. `[UNK]`) spans the rest of the word.
        """
        normalized, origin = self.normalize(word)
        spans, position = [], 0
        for k, token_id in enumerate(ids):
            piece = self.tokenizer.id_to_token(token_id)
            piece = piece[2:] if piece.startswith("##") else piece
            if (token_id == self.unk_id or not piece
                    or normalized[position:position + len(piece)] != piece):
                spans.extend([(origin[position] if position < len(origin) else len(word),
                               len(word))] * (len(ids) - k))
                return spans
            end = position + len(piece)
            # Up to the next piece's first character: dropped accents stay with their letter.
            spans.append((origin[position], origin[end] if end < len(origin) else len(word)))
            position = end
        return spans


@dataclasses.dataclass
class AlignedChunks:
    """Framed token sequences of word chunks and how they map back to words.

    `sequences[k]` is `[CLS] pieces... [SEP]` of chunk `k`, `labels[k]` its
    per-token labels (`IGNORE` except on first sub-tokens), `sentence[k]` the
    sentence it comes from and `first_word[k]` the index of its first word;
    `word_starts[k]` are the token positions of its words' first sub-tokens.
    """

    sequences: list
    labels: list
    sentence: list
    first_word: list
    word_starts: list


def align_words(sentences, tag_ids, pieces, max_length):
    """Aligns word-level tags to sub-tokens; splits long sentences into chunks of words.

    Args:
        sentences: Lists of words.
        tag_ids: Lists of tag ids, one per word, or None (prediction).
        pieces: A `WordPieces`.
        max_length: Longest sequence, `[CLS]` and `[SEP]` included. A single
            word longer than that keeps only its first sub-tokens.
    """
    tokenizer = pieces.tokenizer
    room = max_length - 2
    chunks = AlignedChunks([], [], [], [], [])
    for s, words in enumerate(sentences):
        word_ids = [ids[:room] for ids in pieces.ids(words)]
        tags = None if tag_ids is None else tag_ids[s]
        start = 0
        while start < len(words):
            end, used = start, 0
            while end < len(words) and used + len(word_ids[end]) <= room:
                used += len(word_ids[end])
                end += 1
            sequence, labels, starts = [tokenizer.cls_token_id], [IGNORE], []
            for w in range(start, end):
                starts.append(len(sequence))
                sequence.extend(word_ids[w])
                labels.extend([IGNORE if tags is None else tags[w]]
                              + [IGNORE] * (len(word_ids[w]) - 1))
            sequence.append(tokenizer.sep_token_id)
            labels.append(IGNORE)
            chunks.sequences.append(sequence)
            chunks.labels.append(labels)
            chunks.sentence.append(s)
            chunks.first_word.append(start)
            chunks.word_starts.append(starts)
            start = end
    return chunks


def word_predictions(chunks, logits, num_sentences):
    """Per-sentence word tag ids from per-chunk token `logits` (first sub-token of each word)."""
    predicted = [[] for _ in range(num_sentences)]
    for k in np.argsort(np.array(chunks.first_word), kind="stable"):
        best = np.asarray(logits[k]).argmax(-1)
        predicted[chunks.sentence[k]].extend(int(best[p]) for p in chunks.word_starts[k])
    return predicted
