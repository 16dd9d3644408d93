"""NER and extractive-QA accuracy: LoRA with the recipe defaults vs full fine-tuning.

Not a test. Trains the offline all-MiniLM-L6-v2 (`--preset minilm`) on the
real data in ../shared/data (never copied into the repository; subsets are
written to a temporary folder):

- NER: CoNLL-2003 train.txt, evaluated on valid.txt (entity F1, seqeval style).
- QA: the SQuAD v1.1 articles file, split by article into train / validation
  (SQuAD exact match and F1).

Each method gets the same data, epochs, batch size and length:

- `lora`: the recipe's defaults (targets, rank, alpha, learning rate);
- `full`: full fine-tuning at --full-learning-rate;
- `qv8`: plain LoRA on query/value, r=8, alpha 16, lr 5e-4 (the common
  PEFT starting point the recipe defaults are meant to beat).

    python bench/ner_qa_accuracy.py                          # full budget (slow on CPU)
    python bench/ner_qa_accuracy.py --ner-sentences 2000 --ner-valid 500 \\
        --qa-questions 300 --qa-valid 100 --epochs 1         # a reduced run
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "recipes"))
DATA = os.environ.get("KLORA_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))

import ner  # noqa: E402  (recipes/ner.py)
import qa  # noqa: E402  (recipes/qa.py)

import klora  # noqa: E402

from klora.data.squad import read_squad, split_by_article  # noqa: E402


def write_conll(path, source, limit, seed):
    from klora.data.conll import read_tagged_sentences

    sentences, tags = read_tagged_sentences(source)
    order = np.random.default_rng(seed).permutation(len(sentences))
    order = order[:limit] if limit else order
    with open(path, "w", encoding="utf-8") as f:
        for i in sorted(order):
            f.writelines(f"{w} {t}\n" for w, t in zip(sentences[i], tags[i]))
            f.write("\n")
    return len(order)


def write_squad(path, examples):
    data = [{"title": e.title, "paragraphs": [{"context": e.context, "qas": [
        {"id": e.id, "question": e.question,
         "answers": [{"text": t, "answer_start": s} for t, s in e.answers]}]}]}
        for e in examples]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"version": "1.1", "data": data}, f)


def trainable(model):
    return int(sum(np.prod(v.shape) for v in model.trainable_variables))


class FullFineTuning:
    """Stands in for the `klora` module inside a recipe: `apply` adds no adapters (every
    weight trains) and `save_adapter` writes nothing; the rest is klora's."""

    def __getattr__(self, name):
        return getattr(klora, name)

    @staticmethod
    def apply(model, **settings):
        return model

    @staticmethod
    def save_adapter(model, path, metadata=None):
        return None


def run(recipe, argv, lora):
    """Runs `recipe.train`; with `lora=False` as full fine-tuning (see `FullFineTuning`)."""
    args = recipe.parse_args(argv)
    start = time.time()
    recipe.klora = klora if lora else FullFineTuning()
    try:
        outputs = recipe.train(args)
    finally:
        recipe.klora = klora
    return outputs[0], outputs[-1], time.time() - start, args


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="ner,qa")
    parser.add_argument("--methods", default="lora,full,qv8")
    parser.add_argument("--preset", default="minilm")
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--full-learning-rate", type=float, default=1e-4)
    parser.add_argument("--ner-sentences", type=int, default=0, help="0: all 14,041")
    parser.add_argument("--ner-valid", type=int, default=0, help="0: all 3,250")
    parser.add_argument("--qa-questions", type=int, default=0, help="0: every training question")
    parser.add_argument("--qa-valid", type=int, default=0, help="0: every validation question")
    parser.add_argument("--qa-max-length", type=int, default=256)
    parser.add_argument("--qa-doc-stride", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="default: a temporary folder")
    options = parser.parse_args()
    work = options.output_dir or tempfile.mkdtemp(prefix="klora-bench-")
    os.makedirs(work, exist_ok=True)
    common = ["--preset", options.preset, "--seed", str(options.seed)]
    if options.epochs:
        common += ["--epochs", str(options.epochs)]
    rows = []
    for task in options.tasks.split(","):
        if task == "ner":
            train, valid = os.path.join(work, "ner_train.txt"), os.path.join(work, "ner_valid.txt")
            n = write_conll(train, os.path.join(DATA, "conll2003", "train.txt"),
                            options.ner_sentences, options.seed)
            m = write_conll(valid, os.path.join(DATA, "conll2003", "valid.txt"),
                            options.ner_valid, options.seed)
            argv = ["train", "--data", train, "--validation-data", valid, *common]
            recipe, data = ner, f"CoNLL {n} train / {m} valid sentences"
        else:
            examples = read_squad(os.path.join(DATA, "squad", "squad-v1.1-dev-articles-00-37.json"))
            train_ex, val_ex = split_by_article(examples, 0.2, options.seed)
            rng = np.random.default_rng(options.seed)
            if options.qa_questions:
                train_ex = [train_ex[i] for i in sorted(rng.permutation(len(train_ex))[:options.qa_questions])]
            if options.qa_valid:
                val_ex = [val_ex[i] for i in sorted(rng.permutation(len(val_ex))[:options.qa_valid])]
            train, valid = os.path.join(work, "qa_train.json"), os.path.join(work, "qa_valid.json")
            write_squad(train, train_ex)
            write_squad(valid, val_ex)
            argv = ["train", "--data", train, "--validation-data", valid, "--max-length",
                    str(options.qa_max_length), "--doc-stride", str(options.qa_doc_stride), *common]
            recipe = qa
            data = f"SQuAD {len(train_ex)} train / {len(val_ex)} valid questions (by article)"
        for method in options.methods.split(","):
            lora = method != "full"
            extra = {"lora": [], "full": ["--learning-rate", str(options.full_learning_rate)],
                     "qv8": ["--targets", "query,value", "--rank", "8", "--alpha", "16",
                             "--learning-rate", "5e-4"]}[method]
            out = ["--output-dir", os.path.join(work, f"{task}-{method}")]
            model, scores, seconds, args = run(recipe, argv + extra + out, lora)
            score = (f"F1 {100 * scores['f1']:.1f} (P {100 * scores['precision']:.1f} "
                     f"R {100 * scores['recall']:.1f})" if task == "ner" else
                     f"F1 {scores['f1']:.1f} EM {scores['exact_match']:.1f}")
            setting = (f"LoRA {args.targets} r={args.rank} a={args.alpha:g}" if lora
                       else "full fine-tuning")
            rows.append((task, setting, f"{trainable(model):,}", f"{args.learning_rate:g}",
                         str(args.epochs), score, f"{seconds / 60:.1f} min", data))
            print("\t".join(rows[-1]), flush=True)
    header = ("task", "method", "trainable", "lr", "epochs", "validation score", "wall", "data")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print()
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print(f"\noutputs in {work}")


if __name__ == "__main__":
    from klora.speed.tcmalloc import relaunch_under_tcmalloc

    relaunch_under_tcmalloc()  # XLA CPU steps without page faults; see klora.speed.tcmalloc
    main()
