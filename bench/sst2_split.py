"""An honest validation split of SST-2's training file: held-out whole sentences, and no
training row that is a piece of one.

GLUE's SST-2 training rows are the phrases of the Stanford Sentiment Treebank's parse
trees: a sentence and many of its sub-phrases, each labelled. A validation split
carved at random from those rows leaks, because a held-out phrase usually has its
parent sentence, or its siblings, in training. Here:

1. the whole sentences are the rows that are no contiguous token span of another row
   (6,885 in `../shared/data/sst2/train.tsv`);
2. `--held-out` of them (seeded) become the validation set;
3. every training row that is a contiguous token span of a held-out sentence (the
   sentence itself, any of its phrases) is removed from training.

    python bench/sst2_split.py --output-dir /tmp/sst2-honest     # train.tsv, valid.tsv
"""

import argparse
import os

import numpy as np

DATA = os.environ.get("KLORA_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..",
                                                        "..", "shared", "data"))
DEFAULT = os.path.join(DATA, "sst2", "train.tsv")


def read_rows(path):
    """`[(text, label)]` of an SST-2 TSV (`sentence<TAB>label`, with a header)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()[1:]
    return [(text.strip(), label) for text, label in (line.split("\t") for line in lines)]


def spans(tokens, proper=False):
    """Every contiguous token span of `tokens` as text (`proper`: shorter than all of it)."""
    n = len(tokens)
    return {" ".join(tokens[i:j]) for i in range(n) for j in range(i + 1, n + 1)
            if not proper or j - i < n}


def honest_split(rows, held_out=1000, seed=0):
    """`(train, valid, stats)`: rows as `(text, label)`; see the module docstring."""
    texts = sorted({text for text, _ in rows})
    pieces = set()
    for text in texts:
        pieces |= spans(text.split(), proper=True)
    sentences = [t for t in texts if t not in pieces]
    chosen = set(np.random.default_rng(seed).choice(sentences, held_out, replace=False))
    inside = set()
    for sentence in chosen:
        inside |= spans(sentence.split())
    labels = dict(rows)
    valid = [(t, labels[t]) for t in sorted(chosen)]
    train = [(t, l) for t, l in rows if t not in inside]
    return train, valid, {"rows": len(rows), "sentences": len(sentences),
                          "held_out": len(valid), "train": len(train),
                          "removed": len(rows) - len(train)}


def write_rows(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n")
        f.writelines(f"{text}\t{label}\n" for text, label in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DEFAULT)
    parser.add_argument("--held-out", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args()
    train, valid, stats = honest_split(read_rows(args.data), args.held_out, args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    write_rows(os.path.join(args.output_dir, "train.tsv"), train)
    write_rows(os.path.join(args.output_dir, "valid.tsv"), valid)
    print(f"{stats['rows']} rows, {stats['sentences']} whole sentences; held out "
          f"{stats['held_out']}; removed {stats['removed']} training rows inside them; "
          f"{stats['train']} training rows left -> {args.output_dir}")


if __name__ == "__main__":
    main()
