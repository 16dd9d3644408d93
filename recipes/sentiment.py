"""Fine-tune a BERT/DistilBERT sentence classifier with LoRA (sentiment by default).

    python recipes/sentiment.py demo        # offline: shipped sample + all-MiniLM-L6-v2
    python recipes/sentiment.py train       # glue/sst2 on distil_bert_base_en_uncased
    python recipes/sentiment.py train --data reviews.csv --text-column review \\
        --label-column stars --preset minilm --output-dir runs/reviews
    python recipes/sentiment.py predict --adapter runs/sentiment/adapter "a joyless film"
    python recipes/sentiment.py evaluate --adapter runs/sentiment/adapter --data test.tsv
    python recipes/sentiment.py export --adapter runs/sentiment/adapter --output hf-model

`train` writes to --output-dir: adapter/ (PEFT format, with the label map and a
model card), history.json, metrics.json, curves.png and per-epoch checkpoints.
Rerunning an interrupted command resumes after the last finished epoch.
`evaluate` scores an adapter on labelled data (default: the validation set it
was trained with): accuracy, per-class precision / recall / F1, macro-F1, and a
confusion-matrix PNG. `export` writes the merged model for `transformers` or
keras-hub, loadable without klora.
"""

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")  # the recipes train on JAX unless told otherwise

import keras

import klora
from klora.atomic import write_json
from klora.data import TokenBatches, load_labelled_set, load_text_classification, read_lines
from klora.distribution import configure_from_arguments, is_primary_process
from klora.speed import enable_compile_cache
from klora.metrics import classification_scores
from klora.presets import load_text_classifier, takes_segment_ids
from klora.speed.tcmalloc import relaunch_under_tcmalloc
from klora.training import (add_training_arguments, check_max_length, check_training_arguments,
                            exit_code, fine_tune, lora_config, lora_targets, plot_confusion,
                            quantize_backbone)
from klora.training.arguments import (add_adapter_arguments, add_evaluate_arguments,
                                      add_export_arguments, from_adapter, validation_record,
                                      with_command_line)

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
EXAMPLES = [
    "An absolute delight from start to finish.",
    "The battery died within a week and support never answered.",
    "Not bad at all, I would happily go back.",
    "I wanted to like it, but it was a slog.",
]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune on a data set (tutorial defaults)")
    add_training_arguments(train, data="glue/sst2", output_dir="runs/sentiment")
    demo = commands.add_parser("demo", help="offline: the shipped sample on all-MiniLM-L6-v2")
    add_training_arguments(
        demo, preset="minilm", data=os.path.join(SAMPLE, "sentiment_train.tsv"),
        validation_data=os.path.join(SAMPLE, "sentiment_valid.tsv"), learning_rate=1e-3,
        batch_size=16, epochs=8, patience=3, output_dir="runs/sentiment-demo")
    for sub in (train, demo):
        sub.add_argument("--text-column", default=None, help="default: 'text' (files)")
        sub.add_argument("--label-column", default=None, help="default: 'label' (files)")
    predict = commands.add_parser("predict", help="label sentences with a trained adapter")
    add_adapter_arguments(predict, "--labels")
    predict.add_argument("--file", default=None, help="a UTF-8 file, one sentence per line")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("texts", nargs="*", help="sentences to label")
    evaluate = commands.add_parser("evaluate", help="score an adapter on labelled data")
    add_evaluate_arguments(evaluate, "--labels")
    evaluate.add_argument("--text-column", default=None,
                          help="default: the one it was trained with, else 'text'")
    evaluate.add_argument("--label-column", default=None,
                          help="default: the one it was trained with, else 'label'")
    export = commands.add_parser("export", help="the merged model for transformers / keras-hub")
    add_export_arguments(export, "--labels")
    return with_command_line(parser.parse_args(argv), "recipes/sentiment.py", argv)


def train(args):
    check_training_arguments(args)
    configure_from_arguments(args)  # --distribution: before any model is built
    enable_compile_cache(args.compile_cache)  # reruns and resumes read compiled steps
    data = load_text_classification(args.data, args.validation_data, args.text_column,
                                    args.label_column, args.validation_fraction, args.seed)
    print(f"data: {len(data.train_texts)} training and {len(data.val_texts)} validation "
          f"examples; labels {data.labels}")
    keras.utils.set_random_seed(args.seed)
    classifier, tokenizer = load_text_classifier(args.preset, num_classes=len(data.labels))
    check_max_length(args, classifier.backbone)
    quantize_backbone(classifier, args.quantize)  # --quantize int8/int4: a QLoRA-style base

    # LoRA adapters on the backbone; its weights are frozen, the classifier's head trains.
    klora.apply(classifier, config=lora_config(args), targets=lora_targets(args))
    klora.summary(classifier)
    if args.remat:
        klora.enable_remat(classifier)

    segments = takes_segment_ids(classifier.backbone)
    train_batches = TokenBatches(data.train_texts, data.train_ids, tokenizer, args.max_length,
                                 args.batch_size, segments)
    val_batches = TokenBatches(data.val_texts, data.val_ids, tokenizer, args.max_length,
                               args.batch_size, segments)

    def evaluate(model):
        return classification_scores(val_batches.predict(model), data.val_ids, data.labels)

    results = fine_tune(
        classifier, train_batches, args,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), evaluate=evaluate,
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        monitor="val_accuracy", title=f"LoRA r={args.rank}, {os.path.basename(args.preset)}")
    scores = evaluate(classifier)
    results.update(validation=scores, validation_accuracy=scores["accuracy"],
                   validation_loss=scores["loss"], train_examples=len(data.train_texts),
                   validation_examples=len(data.val_texts))
    if not is_primary_process():  # multi-host: process 0 writes the outputs
        return classifier, tokenizer, data.labels
    write_json(os.path.join(args.output_dir, "metrics.json"), results)
    klora.save_adapter(classifier, os.path.join(args.output_dir, "adapter"), metadata={
        "task": "sentiment", "labels": data.labels, "base_model": args.preset,
        "max_length": args.max_length, "command": args.command_line,
        "metrics": {k: v for k, v in scores.items() if isinstance(v, float)},
        "validation": validation_record(args, text_column=args.text_column,
                                        label_column=args.label_column)})
    print(f"validation accuracy {scores['accuracy']:.4f} (best epoch {results['best_epoch']}); "
          f"outputs in {args.output_dir}")
    return classifier, tokenizer, data.labels


def print_predictions(classifier, tokenizer, texts, labels, max_length, batch_size=32):
    """Prints `label<TAB>probability<TAB>text` for each text."""
    batches = TokenBatches(texts, None, tokenizer, max_length, batch_size,
                           takes_segment_ids(classifier.backbone))
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(batches.predict(classifier)))
    for text, p in zip(texts, probabilities):
        print(f"{labels[int(p.argmax())]}\t{p.max():.3f}\t{text}")


def load_trained(args):
    """`(classifier, tokenizer, saved)`: the adapter's base model with the adapter loaded,
    and what the adapter records (base model, labels, length, validation set)."""
    metadata = klora.read_adapter_metadata(args.adapter)
    saved = {**metadata, **from_adapter(args, metadata, {
        "base_model": ("--preset", str), "labels": ("--labels", lambda v: v.split(",")),
        "max_length": ("--max-length", int)})}
    classifier, tokenizer = load_text_classifier(saved["base_model"],
                                                 num_classes=len(saved["labels"]))
    klora.load_adapter(classifier, args.adapter)
    return classifier, tokenizer, saved


def predict(args):
    texts = list(args.texts) + (read_lines(args.file) if args.file else [])
    if not texts:
        raise ValueError("Give sentences to label as arguments or with --file.")
    classifier, tokenizer, saved = load_trained(args)
    print_predictions(classifier, tokenizer, texts, saved["labels"], saved["max_length"],
                      args.batch_size)


def evaluation_data(args, saved):
    """`(texts, label_ids)`: `--data`, or the validation set the adapter was trained with."""
    record = saved.get("validation")
    columns = {"text_column": args.text_column or (record or {}).get("text_column"),
               "label_column": args.label_column or (record or {}).get("label_column")}
    if args.data:
        return load_labelled_set(args.data, args.split, labels=saved["labels"], **columns)
    if not record:
        raise ValueError("The adapter does not record its validation set: pass --data.")
    data = load_text_classification(record["data"], record["validation_data"],
                                    validation_fraction=record["validation_fraction"],
                                    seed=record["seed"], **columns)
    if data.labels != saved["labels"]:
        raise ValueError(f"The recorded data now has the labels {data.labels}; the adapter "
                         f"was trained with {saved['labels']}.")
    return data.val_texts, data.val_ids


def evaluate(args):
    classifier, tokenizer, saved = load_trained(args)
    texts, ids = evaluation_data(args, saved)
    batches = TokenBatches(texts, ids, tokenizer, saved["max_length"], args.batch_size,
                           takes_segment_ids(classifier.backbone))
    scores = classification_scores(batches.predict(classifier, progress=len(texts) > 1000),
                                   ids, saved["labels"])
    print(f"{len(texts)} examples: accuracy {scores['accuracy']:.4f}, macro-F1 "
          f"{scores['macro_f1']:.4f}, loss {scores['loss']:.4f}")
    for label, s in scores["per_class"].items():
        print(f"  {label:<12} P {s['precision']:.4f}  R {s['recall']:.4f}  F1 {s['f1']:.4f}  "
              f"support {s['support']}")
    write_json(args.output, {**scores, "examples": len(texts), "adapter": args.adapter,
                             "data": args.data or "the adapter's validation set"})
    figure = os.path.splitext(args.output)[0] + "_confusion.png"
    plot_confusion(scores["confusion"], saved["labels"], figure)
    print(f"scores in {args.output}, confusion matrix in {figure}")
    return scores


def export(args):
    classifier, tokenizer, saved = load_trained(args)
    klora.export(classifier, args.output, format=args.format, tokenizer=tokenizer,
                 labels=saved["labels"], sequence_length=saved["max_length"])
    print(f"{args.format} model in {args.output}")


def demo(args):
    classifier, tokenizer, labels = train(args)
    print("\npredictions for sentences the model has not seen:")
    print_predictions(classifier, tokenizer, EXAMPLES, labels, args.max_length)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    commands = {"train": train, "demo": demo, "predict": predict, "evaluate": evaluate,
                "export": export}
    return exit_code(commands[args.command], args)


if __name__ == "__main__":
    relaunch_under_tcmalloc()  # faster CPU steps; see klora.speed.tcmalloc
    sys.exit(main())
