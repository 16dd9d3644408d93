"""BERT-base LoRA training on one NVIDIA GPU: klora on JAX against PEFT on torch.

Not a test. Random-weight BERT-base (the shapes of `bert_base_en_uncased`; no network
needed) as a 2-class text classifier, LoRA on query/value (r=8, alpha 16, dropout
0.1), AdamW, batch 256 x 128, bf16 compute:

- `klora`: `klora.apply` on a keras-hub `BertTextClassifier`, `mixed_bfloat16`,
  `compile(jit_compile=True)`, `train_on_batch`;
- `peft-eager`: transformers `BertForSequenceClassification` (its own config: exact
  GELU, SDPA attention) + `peft.get_peft_model`, `torch.autocast(bfloat16)`;
- `peft-compile`: the same under `torch.compile`.

Each side runs in its own process (so JAX's and torch's GPU allocators never share
the device) and reports the median step time with its min-max, examples/s, peak
device memory, and MFU: model FLOPs per step (XLA's cost analysis of klora's forward
and backward, the same math for every side) per second, against the GPU's dense
bf16 peak (from its name) and against a bf16 matmul rate the side measures itself.

A GPU machine may lack keras and keras-hub (and transformers / peft): fetch their
wheels here with `bash bench/gpu_wheels.sh` (into `bench/wheels/`, ignored by git,
about 40 MB) and pass `--wheels bench/wheels`; the script installs those missing
before it starts (`--no-index --no-deps`).

    python bench/gpu.py --wheels bench/wheels --json bench/results/gpu.json \\
        --markdown bench/results/gpu.md
    python bench/gpu.py --dry-run      # tiny config on the CPU, in a few seconds per side
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDES = ("klora", "peft-eager", "peft-compile")
BERT_BASE = dict(vocabulary_size=30522, num_layers=12, num_heads=12, hidden_dim=768,
                 intermediate_dim=3072, max_sequence_length=512)
TINY = dict(vocabulary_size=1000, num_layers=2, num_heads=2, hidden_dim=64,
            intermediate_dim=128, max_sequence_length=64)
RANK, ALPHA, DROPOUT, LEARNING_RATE = 8, 16, 0.1, 1e-4
# Dense bf16 tensor-core peaks (FLOP/s, without sparsity) from the vendor's data sheets.
BF16_PEAKS = [(r"H200", 989e12), (r"H100.*PCIe", 756e12), (r"H100", 989e12),
              (r"GH200", 989e12), (r"A100", 312e12), (r"L40S", 362e12), (r"L4\b", 121e12),
              (r"A10G", 70e12), (r"A10\b", 125e12), (r"RTX 4090", 165e12)]


def settings(dry_run):
    if dry_run:
        return dict(model=TINY, batch=8, length=32, warmup=1, steps=3, matmul=256)
    return dict(model=BERT_BASE, batch=256, length=128, warmup=3, steps=10, matmul=8192)


def bf16_peak(device_name):
    for pattern, peak in BF16_PEAKS:
        if re.search(pattern, device_name):
            return peak
    return None


def random_batch(config, batch, length):
    import numpy as np

    rng = np.random.default_rng(0)
    low = min(1000, config["vocabulary_size"] // 2)  # no padding id, no special tokens
    ids = rng.integers(low, config["vocabulary_size"], (batch, length)).astype("int32")
    return ids, rng.integers(0, 2, (batch,)).astype("int32")


def timed_steps(step, warmup, steps, sync=lambda: None):
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def klora_side(setup):
    os.environ["KERAS_BACKEND"] = "jax"
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import keras
    import keras_hub

    import klora

    device = jax.devices()[0]
    n = setup["matmul"]
    a = jnp.ones((n, n), jnp.bfloat16)
    matmul = jax.jit(lambda a: a @ a)
    matmul_times = timed_steps(lambda: matmul(a).block_until_ready(), 2, 5)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(**setup["model"])
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    klora.apply(model, rank=RANK, alpha=ALPHA, dropout=DROPOUT, seed=0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.AdamW(LEARNING_RATE), loss=loss, jit_compile=True)
    ids, labels = random_batch(setup["model"], setup["batch"], setup["length"])
    x = {"token_ids": ids, "padding_mask": ids > 0, "segment_ids": 0 * ids}

    def loss_of(trainable, non_trainable, x, y):
        logits, _ = model.stateless_call(trainable, non_trainable, x, training=True)
        return loss(y, logits)

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    cost = jax.jit(jax.grad(loss_of)).lower(trainable, non_trainable, x, labels).compile()
    cost = cost.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    start = time.perf_counter()
    model.train_on_batch(x, labels)  # compiles
    compile_s = time.perf_counter() - start
    times = timed_steps(lambda: model.train_on_batch(x, labels), setup["warmup"], setup["steps"])
    stats = device.memory_stats() or {}
    return {"device": device.device_kind, "platform": device.platform, "step_s": times,
            "flops_per_step": flops, "compile_s": compile_s,
            "matmul_flops_per_s": 2 * n ** 3 / statistics.median(matmul_times),
            "peak_memory_bytes": stats.get("peak_bytes_in_use", peak_rss())}


def peft_side(setup, compiled):
    import peft
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = setup["matmul"]
    a = torch.ones((n, n), dtype=torch.bfloat16, device=device)
    matmul_times = timed_steps(lambda: a @ a, 2, 5, sync)
    torch.manual_seed(0)
    m = setup["model"]
    config = transformers.BertConfig(
        vocab_size=m["vocabulary_size"], hidden_size=m["hidden_dim"],
        num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
        intermediate_size=m["intermediate_dim"], max_position_embeddings=m["max_sequence_length"],
        num_labels=2)
    model = transformers.BertForSequenceClassification(config).to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(
        task_type="SEQ_CLS", r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
        target_modules=["query", "value"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=LEARNING_RATE)
    forward = torch.compile(model) if compiled else model
    ids, labels = random_batch(m, setup["batch"], setup["length"])
    ids, labels = torch.from_numpy(ids).long().to(device), torch.from_numpy(labels).long().to(device)
    mask = torch.ones_like(ids)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = forward(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()
    sync()
    compile_s = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = timed_steps(step, setup["warmup"], setup["steps"], sync)
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "step_s": times,
            "compile_s": compile_s,
            "matmul_flops_per_s": 2 * n ** 3 / statistics.median(matmul_times),
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss()}


def peak_rss():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def install_missing(wheels):
    """Installs the wheels in `wheels` whose distribution this Python lacks; returns them."""
    from importlib.metadata import PackageNotFoundError, version

    missing = []
    for name in sorted(os.listdir(wheels)):
        if not name.endswith(".whl"):
            continue
        try:
            version(name.split("-")[0].replace("_", "-"))
        except PackageNotFoundError:
            missing.append(os.path.join(wheels, name))
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        *missing], check=True)
    return [os.path.basename(p) for p in missing]


def run_side(side, dry_run, timeout):
    command = [sys.executable, os.path.abspath(__file__), "--side", side]
    if dry_run:
        command.append("--dry-run")
    process = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if process.returncode:
        return {"error": process.stderr[-2000:]}
    return json.loads(process.stdout.strip().splitlines()[-1])


def summarize(results, setup):
    flops = results.get("klora", {}).get("flops_per_step")
    rows = {}
    for side, r in results.items():
        if "error" in r:
            rows[side] = {"error": r["error"]}
            continue
        step = statistics.median(r["step_s"])
        peak = bf16_peak(r["device"])
        row = {"step_s": step, "step_min_s": min(r["step_s"]), "step_max_s": max(r["step_s"]),
               "examples_per_s": setup["batch"] / step, "peak_memory_gib": r["peak_memory_bytes"] / 2 ** 30,
               "compile_s": r["compile_s"], "device": r["device"],
               "matmul_tflops_per_s": r["matmul_flops_per_s"] / 1e12}
        if flops:
            row["model_tflops_per_s"] = flops / step / 1e12
            row["mfu_vs_measured_matmul"] = flops / step / r["matmul_flops_per_s"]
            row["mfu_vs_spec"] = flops / step / peak if peak else None
        rows[side] = row
    compiled = rows.get("peft-compile", {}).get("step_s")
    if compiled and "step_s" in rows.get("klora", {}):
        rows["klora"]["step_vs_peft_compile"] = rows["klora"]["step_s"] / compiled
    return rows


def markdown(rows, setup, flops, installed):
    shapes = "BERT-base shapes" if setup["model"] is BERT_BASE else "tiny BERT (--dry-run)"
    lines = [f"{shapes}, random weights, batch {setup['batch']} x {setup['length']}, "
             f"q+v r={RANK}, dropout {DROPOUT}, bf16; model FLOPs per step (XLA cost analysis "
             f"of klora's forward + backward): {flops / 1e9 if flops else float('nan'):.1f} "
             f"GFLOP. Installed from wheels: {len(installed)}.", "",
             "| side | step (s), median (min-max) | examples/s | MFU vs spec | MFU vs measured "
             "bf16 matmul | peak memory (GiB) | first step (s) |", "|---|---|---|---|---|---|---|"]
    for side, r in rows.items():
        if "error" in r:
            lines.append(f"| {side} | failed: {r['error'].splitlines()[-1][:120]} | | | | | |")
            continue
        spec = "-" if r.get("mfu_vs_spec") is None else f"{100 * r['mfu_vs_spec']:.1f}%"
        measured = r.get("mfu_vs_measured_matmul")
        lines.append(f"| {side} | {r['step_s']:.4f} ({r['step_min_s']:.4f}-{r['step_max_s']:.4f}) "
                     f"| {r['examples_per_s']:.0f} | {spec} | "
                     f"{'-' if measured is None else f'{100 * measured:.1f}%'} "
                     f"| {r['peak_memory_gib']:.2f} | {r['compile_s']:.1f} |")
    if "step_vs_peft_compile" in rows.get("klora", {}):
        lines += ["", f"klora step / PEFT `torch.compile` step: "
                      f"{rows['klora']['step_vs_peft_compile']:.3f} (target <= 0.8); klora MFU "
                      "target >= 40%."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny config, any device")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--wheels", default=None, help="folder of wheels to install if missing")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per side")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup = settings(args.dry_run)
    if args.side:  # a worker: one side, its JSON on the last line
        result = klora_side(setup) if args.side == "klora" else peft_side(
            setup, compiled=args.side == "peft-compile")
        print(json.dumps(result))
        return
    start = time.perf_counter()
    installed = install_missing(args.wheels) if args.wheels else []
    results = {}
    for side in args.sides.split(","):
        if side not in SIDES:
            parser.error(f"--sides takes {', '.join(SIDES)} (got {side!r})")
        results[side] = run_side(side, args.dry_run, args.timeout)
        print(f"{side}: {'failed' if 'error' in results[side] else 'done'} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    rows = summarize(results, setup)
    flops = results.get("klora", {}).get("flops_per_step")
    text = markdown(rows, setup, flops, installed)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "installed": installed, "raw": results, "summary": rows,
                       "total_s": time.perf_counter() - start}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
