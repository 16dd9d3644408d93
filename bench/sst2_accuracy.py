"""SST-2 accuracy and wall time: LoRA r=8 vs full fine-tuning on all-MiniLM-L6-v2.

Trains on `../shared/data/sst2/train.tsv` (or --data) minus a held-out
validation split carved from it, with the same pipeline and budget for both:

    python bench/sst2_accuracy.py                         # all 67k sentences, 1 epoch each
    python bench/sst2_accuracy.py --train-examples 20000 --epochs 1

Prints validation accuracy and training wall time per method (JAX backend).
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")  # before anything imports Keras
DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "sst2", "train.tsv")


def run(method, args, splits):
    import keras

    import klora
    from klora.data import TokenBatches
    from klora.presets import load_text_classifier, takes_segment_ids

    train_texts, train_ids, val_texts, val_ids = splits
    keras.utils.set_random_seed(args.seed)
    classifier, tokenizer = load_text_classifier("minilm", num_classes=2)
    if method == "lora":
        klora.apply(classifier.backbone, rank=8, alpha=16, dropout=0.1, seed=args.seed)
        learning_rate = args.lora_learning_rate
    else:
        learning_rate = args.full_learning_rate
    segments = takes_segment_ids(classifier.backbone)
    train = TokenBatches(train_texts, train_ids, tokenizer, args.max_length, args.batch_size, segments)
    val = TokenBatches(val_texts, val_ids, tokenizer, args.max_length, args.batch_size, segments)
    steps = len(train) * args.epochs
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(steps - steps // 10, 1), warmup_target=learning_rate, warmup_steps=steps // 10)
    classifier.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    start = time.time()
    classifier.fit(train.dataset(shuffle=True, seed=args.seed), epochs=args.epochs, verbose=2)
    seconds = time.time() - start
    _, accuracy = classifier.evaluate(val.dataset(), verbose=0)
    trainable = sum(int(keras.ops.size(v)) for v in classifier.trainable_weights)
    return {"method": method, "accuracy": accuracy, "train_seconds": seconds,
            "learning_rate": learning_rate, "trainable": trainable}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--train-examples", type=int, default=None, help="subsample the training split")
    parser.add_argument("--validation-examples", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lora-learning-rate", type=float, default=5e-4)
    parser.add_argument("--full-learning-rate", type=float, default=5e-5)
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not os.path.exists(args.data):
        sys.exit(f"SST-2 not found at {args.data}; pass --data path/to/train.tsv")
    import numpy as np

    from klora.data import encode_labels, read_labelled_text

    texts, labels = read_labelled_text(args.data, "sentence", "label")
    ids = encode_labels(labels, {0: 0, 1: 1}, args.data)
    order = np.random.default_rng(args.seed).permutation(len(texts))
    val, train = order[: args.validation_examples], order[args.validation_examples:]
    if args.train_examples:
        train = train[: args.train_examples]
    splits = ([texts[i] for i in train], [ids[i] for i in train],
              [texts[i] for i in val], [ids[i] for i in val])
    print(f"SST-2: {len(train)} training, {len(val)} held-out validation sentences")
    results = [run(m, args, splits) for m in args.methods.split(",")]
    print("\n| method | trainable | lr | epochs | validation accuracy | train time |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['trainable']:,} | {r['learning_rate']:g} | {args.epochs} | "
              f"{100 * r['accuracy']:.2f}% | {r['train_seconds'] / 60:.1f} min |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    from klora.speed.tcmalloc import relaunch_under_tcmalloc

    relaunch_under_tcmalloc()  # XLA CPU steps without page faults; see klora.speed.tcmalloc
    main()
