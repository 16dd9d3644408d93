"""Fine-tune a BERT/DistilBERT named-entity tagger with LoRA (CoNLL-2003 by default).

    python recipes/ner.py train                     # tfds conll2003 (needs it prepared)
    python recipes/ner.py train --preset minilm --data train.txt --validation-data valid.txt
    python recipes/ner.py predict --adapter runs/ner/adapter "Angela Merkel visited Paris."
    python recipes/ner.py evaluate --adapter runs/ner/adapter --data test.txt
    python recipes/ner.py export --adapter runs/ner/adapter --output hf-tagger

Data: a tfds name, CoNLL column files (`token ... TAG` per line, blank line
between sentences, `-DOCSTART-` lines skipped) or JSONL (`{"tokens": [...],
"tags": [...]}`), IOB2/IOBES tags. Words are split into WordPiece sub-tokens;
a word's tag goes on its first sub-token, the others are ignored by the loss
and the metric. Sentences longer than --max-length are cut into chunks of
whole words, so every word is tagged and scored.

The metric is entity-level precision / recall / F1 (CoNLL style, as seqeval),
overall and per entity type, reported every epoch (`val_f1` drives early
stopping and checkpoints). `train` writes to --output-dir: adapter/ (PEFT
format, head included, with the tag list), history.json, metrics.json,
curves.png and per-epoch checkpoints; rerunning resumes. `predict` prints one
JSON line per text with each entity's type, character span and text.
`evaluate` scores an adapter on tagged data (default: its validation set);
`export` writes the merged tagger as a `transformers` `*ForTokenClassification`.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")  # the recipes train on JAX unless told otherwise

import numpy as np

import klora
from klora.atomic import write_json
from klora.data import TokenBatches, read_lines
from klora.data.conll import encode_tags, load_tagged_set, load_tagged_splits
from klora.data.word_alignment import (IGNORE, WordPieces, align_words, split_words,
                                       word_predictions)
from klora.metrics import cross_entropy, entities, entity_scores
from klora.distribution import configure_from_arguments, is_primary_process
from klora.speed import enable_compile_cache
from klora.presets import load_backbone, takes_segment_ids
from klora.speed.tcmalloc import relaunch_under_tcmalloc
from klora.tasks import MaskedTokenCrossentropy, TokenClassifier
from klora.training import (add_training_arguments, check_training_arguments, exit_code,
                            fine_tune, load_task_model, lora_config, lora_targets)
from klora.training.arguments import (add_adapter_arguments, add_evaluate_arguments,
                                      add_export_arguments, from_adapter, validation_record,
                                      with_command_line)

# LoRA on every linear layer with rank 16 and a higher learning rate than full
# fine-tuning: token tagging needs more than query/value adaptation.
DEFAULTS = dict(data="conll2003", output_dir="runs/ner", targets="all-linear", rank=16,
                alpha=32.0, learning_rate=1e-3, epochs=2, batch_size=32, max_length=128)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune on tagged sentences")
    add_training_arguments(train, **DEFAULTS)
    predict = commands.add_parser("predict", help="tag raw text with a trained adapter")
    add_adapter_arguments(predict, "--tags", "tags in the head's order")
    predict.add_argument("--file", default=None, help="a UTF-8 file, one text per line")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("texts", nargs="*", help="texts to tag")
    evaluate = commands.add_parser("evaluate", help="score an adapter on tagged sentences")
    add_evaluate_arguments(evaluate, "--tags", "tags in the head's order")
    export = commands.add_parser("export", help="the merged tagger for transformers")
    add_export_arguments(export, "--tags", "tags in the head's order")
    return with_command_line(parser.parse_args(argv), "recipes/ner.py", argv)


def tag_batches(sentences, tag_ids, tokenizer, backbone, max_length, batch_size):
    """`(chunks, batches)`: word-aligned chunks of `sentences` and their token batches."""
    chunks = align_words(sentences, tag_ids, WordPieces(tokenizer), max_length)
    batches = TokenBatches.from_sequences(
        chunks.sequences, None if tag_ids is None else chunks.labels, tokenizer.pad_token_id,
        max_length, batch_size, takes_segment_ids(backbone), token_labels=True)
    return chunks, batches


def predict_tags(model, chunks, batches, num_sentences, tag_list, progress=False):
    """`(tags, logits)`: each sentence's predicted tags and each chunk's token logits."""
    logits = batches.predict(model, per_token=True, progress=progress)
    predicted = word_predictions(chunks, logits, num_sentences)
    return [[tag_list[i] for i in s] for s in predicted], logits


def tagging_scores(chunks, logits, gold_tags, predicted_tags):
    """Entity P/R/F1 (overall and per type) and the token cross-entropy of the logits."""
    labels = np.concatenate(chunks.labels)
    scored = labels != IGNORE
    loss = cross_entropy(np.concatenate(logits)[scored], labels[scored])
    return {**entity_scores(gold_tags, predicted_tags), "loss": loss}


def train(args):
    check_training_arguments(args)
    configure_from_arguments(args)  # --distribution: before any model is built
    enable_compile_cache(args.compile_cache)  # reruns and resumes read compiled steps
    sentences, tags, val_sentences, val_tags, tag_list = load_tagged_splits(
        args.data, args.validation_data, args.validation_fraction, args.seed)
    print(f"data: {len(sentences)} training and {len(val_sentences)} validation sentences; "
          f"tags {tag_list}")
    model, tokenizer = load_task_model(
        args, lambda backbone: TokenClassifier(backbone, len(tag_list)))

    # LoRA adapters on the backbone; its weights are frozen, the tagging head trains.
    klora.apply(model, config=lora_config(args), targets=lora_targets(args))
    klora.summary(model)
    if args.remat:
        klora.enable_remat(model)

    _, train_batches = tag_batches(sentences, encode_tags(tags, tag_list), tokenizer,
                                   model.backbone, args.max_length, args.batch_size)
    val_chunks, val_batches = tag_batches(val_sentences, encode_tags(val_tags, tag_list),
                                          tokenizer, model.backbone, args.max_length,
                                          args.batch_size)

    def evaluate(model):
        predicted, logits = predict_tags(model, val_chunks, val_batches, len(val_sentences),
                                         tag_list)
        return tagging_scores(val_chunks, logits, val_tags, predicted)

    results = fine_tune(model, train_batches, args, loss=MaskedTokenCrossentropy(),
                        evaluate=evaluate, monitor="val_f1",
                        title=f"NER, LoRA r={args.rank}, {os.path.basename(args.preset)}")
    scores = evaluate(model)
    results.update(validation=scores, train_sentences=len(sentences),
                   validation_sentences=len(val_sentences), tags=tag_list)
    if not is_primary_process():  # multi-host: process 0 writes the outputs
        return model, tokenizer, tag_list, scores
    write_json(os.path.join(args.output_dir, "metrics.json"), results)
    klora.save_adapter(model, os.path.join(args.output_dir, "adapter"), metadata={
        "task": "ner", "tags": tag_list, "base_model": args.preset,
        "max_length": args.max_length, "command": args.command_line,
        "metrics": {k: v for k, v in scores.items() if isinstance(v, float)},
        "validation": validation_record(args)})
    print(f"validation entity F1 {scores['f1']:.4f} (best epoch {results['best_epoch']})")
    report(scores)
    print(f"outputs in {args.output_dir}")
    return model, tokenizer, tag_list, scores


def report(scores):
    """Prints entity precision / recall / F1, overall and per entity type."""
    print(f"entities: F1 {scores['f1']:.4f}  P {scores['precision']:.4f}  "
          f"R {scores['recall']:.4f}")
    for type_, s in scores["per_type"].items():
        print(f"  {type_:<8} F1 {s['f1']:.4f}  P {s['precision']:.4f}  R {s['recall']:.4f}  "
              f"support {s['support']}")


def tag_texts(model, tokenizer, texts, tag_list, max_length, batch_size=32):
    """`[[{"type", "start", "end", "text"}]]`: entities of each raw text, with character spans."""
    words = [split_words(text) for text in texts]
    chunks, batches = tag_batches([[w for w, _, _ in ws] for ws in words], None, tokenizer,
                                  model.backbone, max_length, batch_size)
    out = []
    predicted, _ = predict_tags(model, chunks, batches, len(texts), tag_list)
    for text, ws, tags in zip(texts, words, predicted):
        found = []
        for type_, first, last in entities(tags):
            start, end = ws[first][1], ws[last][2]
            found.append({"type": type_, "start": start, "end": end, "text": text[start:end]})
        out.append(found)
    return out


def load_trained(args):
    """`(model, tokenizer, saved)`: the adapter's base model and tagging head with the
    adapter loaded, and what the adapter records."""
    metadata = klora.read_adapter_metadata(args.adapter)
    saved = {**metadata, **from_adapter(args, metadata, {
        "base_model": ("--preset", str), "tags": ("--tags", lambda v: v.split(",")),
        "max_length": ("--max-length", int)})}
    backbone, tokenizer = load_backbone(saved["base_model"])
    model = TokenClassifier(backbone, len(saved["tags"]))
    klora.load_adapter(model, args.adapter)
    return model, tokenizer, saved


def predict(args):
    texts = list(args.texts) + (read_lines(args.file) if args.file else [])
    if not texts:
        raise ValueError("Give texts to tag as arguments or with --file.")
    model, tokenizer, saved = load_trained(args)
    found = tag_texts(model, tokenizer, texts, saved["tags"], saved["max_length"],
                      args.batch_size)
    for text, spans in zip(texts, found):
        print(json.dumps({"text": text, "entities": spans}, ensure_ascii=False))


def evaluate(args):
    model, tokenizer, saved = load_trained(args)
    if args.data:
        sentences, tags = load_tagged_set(args.data, args.split)
    elif saved.get("validation"):
        record = saved["validation"]
        *_, sentences, tags, _ = load_tagged_splits(record["data"], record["validation_data"],
                                                     record["validation_fraction"],
                                                     record["seed"])
    else:
        raise ValueError("The adapter does not record its validation set: pass --data.")
    chunks, batches = tag_batches(sentences, encode_tags(tags, saved["tags"], args.data or
                                                         "the validation set"),
                                  tokenizer, model.backbone, saved["max_length"],
                                  args.batch_size)
    predicted, logits = predict_tags(model, chunks, batches, len(sentences), saved["tags"],
                                     progress=len(sentences) > 1000)
    scores = tagging_scores(chunks, logits, tags, predicted)
    print(f"{len(sentences)} sentences")
    report(scores)
    write_json(args.output, {**scores, "sentences": len(sentences), "adapter": args.adapter,
                             "data": args.data or "the adapter's validation set"})
    print(f"scores in {args.output}")
    return scores


def export(args):
    model, tokenizer, saved = load_trained(args)
    klora.export(model, args.output, format=args.format, tokenizer=tokenizer,
                 labels=saved["tags"], sequence_length=saved["max_length"])
    print(f"{args.format} model in {args.output}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    commands = {"train": train, "predict": predict, "evaluate": evaluate, "export": export}
    return exit_code(commands[args.command], args)


if __name__ == "__main__":
    relaunch_under_tcmalloc()  # faster CPU steps; see klora.speed.tcmalloc
    sys.exit(main())
