"""Fine-tune a BERT/DistilBERT extractive question-answering model with LoRA (SQuAD).

    python recipes/qa.py train                      # tfds squad (needs it prepared)
    python recipes/qa.py train --preset minilm --data squad.json --output-dir runs/qa
    python recipes/qa.py predict --adapter runs/qa/adapter \\
        --question "Where is the Eiffel Tower?" --context "The Eiffel Tower is in Paris."
    python recipes/qa.py evaluate --adapter runs/qa/adapter --data dev.json
    python recipes/qa.py export --adapter runs/qa/adapter --output hf-reader

Data: a tfds name (`squad`, `squad/v2.0`) or SQuAD v1.1 / v2.0 JSON (with
--validation-data, or a held-out --validation-fraction of the articles). Each question is packed with its
context as `[CLS] question [SEP] context [SEP]`; a context longer than
--max-length is cut into overlapping windows that start --doc-stride
sub-tokens apart. Answer character spans map to token spans through each
sub-token's character offsets; a window without the whole answer is labelled
with the `[CLS]` position. Decoding takes the --n-best start and end logits of
each window, keeps spans of at most --max-answer-length tokens, picks the
best span over all windows and maps it back to the context text.

The metric is SQuAD exact match and F1 (official normalization, maximum over
the reference answers), reported every epoch (`val_f1` drives early stopping).

SQuAD 2.0 mode follows the data (questions with `is_impossible`): unanswerable
questions and windows without the answer are labelled with the `[CLS]` position,
a question's answer is empty when its null score beats its best span by more than
a threshold tuned for F1 on the validation set every epoch and saved with the
adapter (`predict` and `evaluate` use it), and the metrics are the official v2 ones
(exact match and F1 overall, for `HasAns` and for `NoAns` questions).
`train` writes to --output-dir: adapter/ (PEFT format, head included),
history.json, metrics.json, curves.png and per-epoch checkpoints; rerunning
resumes.
"""

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")  # the recipes train on JAX unless told otherwise

import klora
from klora.atomic import write_json
from klora.data import TokenBatches
from klora.data.squad import (QAExample, is_squad_v2, load_qa_set, load_qa_splits,
                              make_windows, span_answers)
from klora.data.word_alignment import WordPieces
from klora.metrics import (best_null_threshold, span_cross_entropy, squad_scores,
                           squad_v2_scores)
from klora.distribution import configure_from_arguments, is_primary_process
from klora.speed import enable_compile_cache
from klora.presets import load_backbone, takes_segment_ids
from klora.speed.tcmalloc import relaunch_under_tcmalloc
from klora.tasks import SpanExtractor, SpanLoss
from klora.training import (add_training_arguments, check_training_arguments, exit_code,
                            fine_tune, load_task_model, lora_config, lora_targets)
from klora.training.arguments import (add_evaluate_arguments, add_export_arguments,
                                      from_adapter, validation_record, with_command_line)

# LoRA on every linear layer with rank 16 and a higher learning rate than full
# fine-tuning: span extraction needs more than query/value adaptation.
DEFAULTS = dict(data="squad", output_dir="runs/qa", targets="all-linear", rank=16, alpha=32.0,
                learning_rate=1e-3, epochs=1, batch_size=32, max_length=384)


def add_decoding_arguments(parser, doc_stride=128):
    parser.add_argument("--doc-stride", type=int, default=doc_stride,
                        help="sub-tokens between the starts of a context's windows"
                             + (" (default: as in training)" if doc_stride is None else ""))
    parser.add_argument("--max-answer-length", type=int, default=30, help="in sub-tokens")
    parser.add_argument("--n-best", type=int, default=20,
                        help="start and end candidates searched per window")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune on SQuAD-style data")
    add_training_arguments(train, **DEFAULTS)
    add_decoding_arguments(train)
    predict = commands.add_parser("predict", help="answer a question about a context")
    predict.add_argument("--adapter", required=True, help="adapter folder written by train")
    predict.add_argument("--preset", default=None, help="base model (default: the adapter's)")
    predict.add_argument("--question", required=True)
    predict.add_argument("--context", default=None, help="the text to search")
    predict.add_argument("--context-file", default=None, help="a UTF-8 file holding the context")
    predict.add_argument("--max-length", type=int, default=None,
                         help="default: the length it was trained with")
    add_decoding_arguments(predict, doc_stride=None)
    evaluate = commands.add_parser("evaluate", help="score an adapter on SQuAD-style data")
    add_evaluate_arguments(evaluate)
    add_decoding_arguments(evaluate, doc_stride=None)
    export = commands.add_parser("export", help="the merged reader for transformers")
    add_export_arguments(export)
    return with_command_line(parser.parse_args(argv), "recipes/qa.py", argv)


def check_decoding_arguments(args):
    for flag in ("doc_stride", "max_answer_length", "n_best"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")


def qa_batches(examples, tokenizer, backbone, args, with_labels=True):
    """`(windows, batches)` of question + context windows."""
    windows = make_windows(examples, WordPieces(tokenizer), args.max_length, args.doc_stride,
                           with_labels=with_labels)
    batches = TokenBatches.from_sequences(
        windows.sequences, windows.labels if with_labels else None, tokenizer.pad_token_id,
        args.max_length, args.batch_size, takes_segment_ids(backbone), segments=windows.segments)
    return windows, batches


def answer(model, examples, windows, batches, args, progress=False):
    """`(texts, margins, logits)`: each question's best span and null margin, and each
    window's logits."""
    logits = batches.predict(model, per_token=True, progress=progress)
    return (*span_answers(examples, windows, logits, args.n_best, args.max_answer_length),
            logits)


def score_answers(examples, windows, texts, margins, logits, null_threshold=None):
    """`(answers, scores)`: SQuAD 1.1 scores of the best spans, or for SQuAD 2.0 data the
    official v2 scores of the answers at `null_threshold` (None: tuned on `examples`)."""
    references = {e.id: [text for text, _ in e.answers] for e in examples}
    loss = span_cross_entropy(logits, windows.labels)
    if not is_squad_v2(examples):
        return texts, {**squad_scores(texts, references), "loss": loss}
    if null_threshold is None:
        null_threshold, _ = best_null_threshold(texts, margins, references)
    answers = {q: "" if margins[q] > null_threshold else t for q, t in texts.items()}
    return answers, {**squad_v2_scores(answers, references), "null_threshold": null_threshold,
                     "loss": loss}


def describe(scores):
    """`exact match .., F1 ..` (SQuAD 2.0: with the HasAns / NoAns F1 and the threshold)."""
    text = f"exact match {scores['exact_match']:.2f}, F1 {scores['f1']:.2f}"
    if "null_threshold" in scores:
        parts = [f"{kind} F1 {scores[kind + '_f1']:.2f}" for kind in ("HasAns", "NoAns")
                 if kind + "_f1" in scores]
        text += f" ({', '.join(parts)}, null threshold {scores['null_threshold']:.3f})"
    return text


def train(args):
    check_training_arguments(args)
    configure_from_arguments(args)  # --distribution: before any model is built
    enable_compile_cache(args.compile_cache)  # reruns and resumes read compiled steps
    check_decoding_arguments(args)
    examples, val_examples = load_qa_splits(args.data, args.validation_data,
                                            args.validation_fraction, args.seed)
    print(f"data: {len(examples)} training and {len(val_examples)} validation questions")
    model, tokenizer = load_task_model(args, SpanExtractor)

    # LoRA adapters on the backbone; its weights are frozen, the span head trains.
    klora.apply(model, config=lora_config(args), targets=lora_targets(args))
    klora.summary(model)
    if args.remat:
        klora.enable_remat(model)

    windows, train_batches = qa_batches(examples, tokenizer, model.backbone, args)
    val_windows, val_batches = qa_batches(val_examples, tokenizer, model.backbone, args)
    print(f"windows: {len(windows.sequences)} training, {len(val_windows.sequences)} validation")
    squad_v2 = is_squad_v2(examples + val_examples)
    if squad_v2:
        print("SQuAD 2.0 data: unanswerable questions predict the null span")

    def evaluate(model):
        texts, margins, logits = answer(model, val_examples, val_windows, val_batches, args)
        return score_answers(val_examples, val_windows, texts, margins, logits)[1]

    results = fine_tune(model, train_batches, args, loss=SpanLoss(), evaluate=evaluate,
                        monitor="val_f1",
                        title=f"QA, LoRA r={args.rank}, {os.path.basename(args.preset)}")
    scores = evaluate(model)
    results.update(validation=scores, train_questions=len(examples),
                   validation_questions=len(val_examples))
    if not is_primary_process():  # multi-host: process 0 writes the outputs
        return model, tokenizer, scores
    write_json(os.path.join(args.output_dir, "metrics.json"), results)
    klora.save_adapter(model, os.path.join(args.output_dir, "adapter"), metadata={
        "task": "qa", "base_model": args.preset, "max_length": args.max_length,
        "doc_stride": args.doc_stride, "command": args.command_line, "squad_v2": squad_v2,
        **({"null_threshold": scores["null_threshold"]} if squad_v2 else {}),
        "metrics": {k: v for k, v in scores.items() if isinstance(v, float)},
        "validation": validation_record(args)})
    print(f"validation {describe(scores)} (best epoch {results['best_epoch']}); outputs in "
          f"{args.output_dir}")
    return model, tokenizer, scores


def load_trained(args):
    """`(model, tokenizer, saved)`: the adapter's base model and span head with the adapter
    loaded, what the adapter records, and `args` completed with its length and stride."""
    metadata = klora.read_adapter_metadata(args.adapter)
    saved = {**metadata, **from_adapter(args, metadata, {"base_model": ("--preset", str),
                                                         "max_length": ("--max-length", int)})}
    args.max_length = saved["max_length"]
    if "doc_stride" in args:
        args.doc_stride = args.doc_stride or min(metadata.get("doc_stride", 128),
                                                 args.max_length // 2)
        check_decoding_arguments(args)
    backbone, tokenizer = load_backbone(saved["base_model"])
    model = SpanExtractor(backbone)
    klora.load_adapter(model, args.adapter)
    return model, tokenizer, saved


def predict(args):
    if (args.context is None) == (args.context_file is None):
        raise ValueError("Give the context with --context or --context-file (one of them).")
    context = args.context
    if args.context_file:
        if not os.path.isfile(args.context_file):
            raise ValueError(f"File not found: {args.context_file}")
        with open(args.context_file, encoding="utf-8") as f:
            context = f.read()
    if not context.strip() or not args.question.strip():
        raise ValueError("The question and the context must not be empty.")
    model, tokenizer, saved = load_trained(args)
    args.batch_size = 32
    example = QAExample("q", "", context, args.question.strip(), [])
    windows, batches = qa_batches([example], tokenizer, model.backbone, args, with_labels=False)
    texts, margins, _ = answer(model, [example], windows, batches, args)
    threshold = saved.get("null_threshold")
    print("(no answer)" if threshold is not None and margins["q"] > threshold else texts["q"])


def evaluate(args):
    model, tokenizer, saved = load_trained(args)
    if args.data:
        examples = load_qa_set(args.data, args.split)
    elif saved.get("validation"):
        record = saved["validation"]
        _, examples = load_qa_splits(record["data"], record["validation_data"],
                                     record["validation_fraction"], record["seed"])
    else:
        raise ValueError("The adapter does not record its validation set: pass --data.")
    windows, batches = qa_batches(examples, tokenizer, model.backbone, args)
    texts, margins, logits = answer(model, examples, windows, batches, args,
                                    progress=len(windows.sequences) > 1000)
    answers, scores = score_answers(examples, windows, texts, margins, logits,
                                    saved.get("null_threshold", 0.0))
    print(f"{len(examples)} questions ({len(windows.sequences)} windows): {describe(scores)}")
    predictions = os.path.splitext(args.output)[0] + "_predictions.json"
    write_json(predictions, {e.id: {"question": e.question, "answer": answers.get(e.id, ""),
                                    "references": [t for t, _ in e.answers]}
                             for e in examples})
    write_json(args.output, {**scores, "questions": len(examples), "adapter": args.adapter,
                             "data": args.data or "the adapter's validation set"})
    print(f"scores in {args.output}, each question's answer in {predictions}")
    return scores


def export(args):
    model, tokenizer, saved = load_trained(args)
    klora.export(model, args.output, format=args.format, tokenizer=tokenizer,
                 sequence_length=saved["max_length"])
    print(f"{args.format} model in {args.output}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    commands = {"train": train, "predict": predict, "evaluate": evaluate, "export": export}
    return exit_code(commands[args.command], args)


if __name__ == "__main__":
    relaunch_under_tcmalloc()  # faster CPU steps; see klora.speed.tcmalloc
    sys.exit(main())
