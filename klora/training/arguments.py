"""Command-line flags every klora recipe shares, with one validation pass.

>>> parser = argparse.ArgumentParser()
>>> add_training_arguments(parser, output_dir="runs/ner", learning_rate=5e-4)
>>> args = parser.parse_args([...]); check_training_arguments(args)
"""

import os
import shlex
import sys

import keras

from klora.config import LoraConfig
from klora.distribution import add_distribution_arguments
from klora.speed.compile_cache import default_directory
from klora.training.optimizer import SCHEDULES

# Flags that may change when a run resumes: they do not change what is trained.
RESUMABLE_CHANGES = {"output_dir", "patience", "distribution", "model_parallel",
                     "coordinator_address", "remat", "restart", "command", "tensorboard",
                     "command_line", "compile_cache"}


def add_training_arguments(parser, **defaults):
    """Adds the model, data, LoRA and optimisation flags; `defaults` override values."""
    values = dict(preset="distil_bert_base_en_uncased", data=None, validation_data=None,
                  validation_fraction=0.1, rank=8, alpha=16.0, dropout=0.1,
                  targets="query,value", learning_rate=5e-4, batch_size=32, epochs=3,
                  max_length=128, patience=2, seed=42, output_dir="runs/out")
    values.update(defaults)
    add = parser.add_argument
    add("--preset", default=values["preset"],
        help="keras-hub preset name, local model folder (keras-hub or Hugging Face layout), "
             "or 'minilm' for the offline all-MiniLM-L6-v2 package")
    add("--data", default=values["data"], help="tensorflow-datasets name or a local file")
    add("--validation-data", default=values["validation_data"],
        help="validation file, or split name of a tfds set (default: its 'validation' "
             "split, else a held-out --validation-fraction)")
    add("--validation-fraction", type=float, default=values["validation_fraction"])
    add("--rank", type=int, default=values["rank"], help="LoRA rank (PEFT: r)")
    add("--alpha", type=float, default=values["alpha"],
        help="LoRA scale numerator: updates are scaled by alpha / rank (PEFT: lora_alpha)")
    add("--dropout", type=float, default=values["dropout"],
        help="dropout on the adapters' inputs (PEFT: lora_dropout)")
    add("--targets", default=values["targets"],
        help="comma-separated layer names or path regexes, or 'all-linear'")
    add("--use-dora", action="store_true", help="weight-decomposed LoRA (DoRA)")
    add("--init", default="kaiming",
        help="kaiming, gaussian (random A), pissa, pissa_niter_N or olora (from the kernel)")
    add("--quantize", choices=("int8", "int4"), default=None,
        help="quantize the backbone's linear layers (weight-only) before adding adapters")
    add("--loraplus-ratio", type=float, default=values.get("loraplus_ratio"),
        help="LoRA+: the B matrices learn this many times faster than the rest")
    add("--learning-rate", type=float, default=values["learning_rate"])
    add("--schedule", choices=SCHEDULES, default="cosine",
        help="decay after the 10%% warm-up (transformers' Trainer: linear)")
    add("--weight-decay", type=float, default=0.01, help="AdamW's decoupled weight decay")
    add("--clip-norm", type=float, default=1.0,
        help="clip the gradients' global norm to this (0: off; as transformers' Trainer)")
    add("--batching", choices=("by-length", "random"), default="by-length",
        help="by-length: each batch holds texts of one length bucket (least padding); "
             "random: freely shuffled batches padded to their longest text's bucket")
    add("--batch-size", type=int, default=values["batch_size"])
    add("--epochs", type=int, default=values["epochs"])
    add("--max-length", type=int, default=values["max_length"],
        help="longest token sequence, special tokens included")
    add("--patience", type=int, default=values["patience"],
        help="stop after this many epochs without a better validation score")
    add("--remat", action="store_true",
        help="rematerialize transformer-block activations (JAX): less memory at a few "
             "percent of step time (see bench/results/remat.md)")
    add("--seed", type=int, default=values["seed"],
        help="seeds data order, head and adapters (every layer gets its own stream)")
    add("--output-dir", default=values["output_dir"],
        help="rerunning the same command resumes from its checkpoints")
    add("--restart", action="store_true",
        help="delete the output folder's checkpoints and train from the start")
    add("--tensorboard", action="store_true",
        help="write per-step loss and learning rate and per-epoch validation scores to "
             "OUTPUT_DIR/tensorboard")
    add("--compile-cache", default=default_directory(),
        help="keep compiled XLA programs here so reruns and resumes skip compiling "
             "(JAX; default $KLORA_COMPILE_CACHE or ~/.cache/klora/jax; 'none': off)")
    add_distribution_arguments(parser)
    return parser


def add_adapter_arguments(parser, names_flag=None, names_help="class names"):
    """`--adapter`, and the flags that supply what an adapter made by PEFT does not record:
    `--preset`, `--max-length` and (`names_flag`, e.g. `--labels`) its label names."""
    parser.add_argument("--adapter", required=True, help="adapter folder written by train")
    parser.add_argument("--preset", default=None, help="base model (default: the adapter's)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="longest token sequence (default: the adapter's)")
    if names_flag:
        parser.add_argument(names_flag, default=None,
                            help=f"comma-separated {names_help} (default: the adapter's)")
    return parser


def add_evaluate_arguments(parser, names_flag=None, names_help="class names"):
    """The flags of a recipe's `evaluate`: the adapter, the labelled data, the output."""
    add_adapter_arguments(parser, names_flag, names_help)
    parser.add_argument("--data", default=None,
                        help="labelled file or tensorflow-datasets name (default: the "
                             "validation set the adapter was trained with)")
    parser.add_argument("--split", default="validation",
                        help="split of a tensorflow-datasets --data (default: validation)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", default="evaluation.json",
                        help="where the scores go as JSON; figures go beside it")
    return parser


def add_export_arguments(parser, names_flag=None, names_help="class names"):
    """The flags of a recipe's `export`: the adapter, the format, the output folder."""
    add_adapter_arguments(parser, names_flag, names_help)
    parser.add_argument("--format", choices=("transformers", "keras-hub"), default="transformers")
    parser.add_argument("--output", required=True, help="a new (or empty) folder")
    return parser


def with_command_line(args, script, argv):
    """`args` with `command_line`: the command that ran, for the adapter's model card."""
    args.command_line = shlex.join(["python", script, *argv])
    return args


def validation_record(args, **columns):
    """How `train` got its validation set (files absolute), for `evaluate` to rebuild it."""
    absolute = lambda p: os.path.abspath(p) if p and os.path.exists(p) else p
    return {"data": absolute(args.data), "validation_data": absolute(args.validation_data),
            "validation_fraction": args.validation_fraction, "seed": args.seed, **columns}


def check_training_arguments(args):
    """Raises one `ValueError` listing every out-of-range flag."""
    problems = []
    if args.rank < 1:
        problems.append(f"--rank must be >= 1 (got {args.rank})")
    if not 0 <= args.dropout < 1:
        problems.append(f"--dropout must be in [0, 1) (got {args.dropout})")
    for flag in ("learning_rate", "alpha"):
        if getattr(args, flag) <= 0:
            problems.append(f"--{flag.replace('_', '-')} must be > 0 (got {getattr(args, flag)})")
    for flag in ("batch_size", "epochs", "patience"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    if args.loraplus_ratio is not None and args.loraplus_ratio <= 0:
        problems.append(f"--loraplus-ratio must be > 0 (got {args.loraplus_ratio})")
    if args.weight_decay < 0:
        problems.append(f"--weight-decay must be >= 0 (got {args.weight_decay})")
    if args.clip_norm < 0:
        problems.append(f"--clip-norm must be >= 0 (0: off; got {args.clip_norm})")
    if not problems:  # then the adapter settings are valid but perhaps --init
        try:
            lora_config(args)
        except ValueError as e:
            problems.append(f"--init: {e}")
    if args.max_length < 8:
        problems.append(f"--max-length must be >= 8 (got {args.max_length})")
    if not 0 < args.validation_fraction < 1:
        problems.append(f"--validation-fraction must be in (0, 1) (got {args.validation_fraction})")
    if args.model_parallel < 1:
        problems.append(f"--model-parallel must be >= 1 (got {args.model_parallel})")
    backend = keras.backend.backend()
    if args.remat and backend != "jax":
        problems.append(f"--remat uses jax.checkpoint, which needs the JAX backend "
                        f"(KERAS_BACKEND={backend}): set KERAS_BACKEND=jax or drop --remat")
    if args.distribution != "none" and backend != "jax":
        problems.append(f"--distribution {args.distribution} uses keras.distribution, which "
                        f"needs the JAX backend (KERAS_BACKEND={backend}): "
                        "set KERAS_BACKEND=jax or use --distribution none")
    if problems:
        raise ValueError("; ".join(problems))


def lora_targets(args):
    """The `targets` argument of `klora.apply` from `--targets`."""
    if args.targets == "all-linear":
        return "all-linear"
    return tuple(t.strip() for t in args.targets.split(",") if t.strip())


def lora_config(args):
    """The `klora.LoraConfig` of `--rank`, `--alpha`, `--dropout`, `--init`, `--use-dora`
    and `--seed`."""
    return LoraConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, init=args.init,
                      use_dora=args.use_dora, seed=args.seed)


def from_adapter(args, metadata, flags):
    """Settings a saved adapter's `metadata` holds, or the flags that override them.

    `flags` maps metadata keys to `(flag, parse)`; a value comes from the flag
    when given, else from `metadata`. An adapter made by PEFT has no klora
    metadata: a `ValueError` names every flag that must then supply a value.

    >>> from_adapter(args, metadata, {"base_model": ("--preset", str)})
    {'base_model': 'minilm'}
    """
    values, missing = {}, []
    for key, (flag, parse) in flags.items():
        given = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if given is not None:
            values[key] = parse(given)
        elif metadata.get(key) is not None:
            values[key] = metadata[key]
        else:
            missing.append(flag)
    if missing:
        raise ValueError(f"The adapter does not record {', '.join(k for k in flags if k not in values)} "
                         f"(an adapter made by PEFT, or by another tool): pass "
                         f"{', '.join(missing)}.")
    return values


def run_settings(args):
    """The flags that decide what a run trains (a resumed run must keep them)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RESUMABLE_CHANGES}


def exit_code(command, args):
    """Runs `command(args)` for a recipe's `main`: 0, or 2 after printing a `ValueError`.

    >>> sys.exit(exit_code(train, parse_args(sys.argv[1:])))
    """
    try:
        command(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
