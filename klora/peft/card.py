"""The model card (`README.md`) `save_adapter` writes beside an adapter, like PEFT's.

It tells a reader what the adapter is for and how it was made: base model, task,
labels, the validation metrics at save time, the klora version and the training
command, from the `metadata` the adapter is saved with (the recipes record all of
them), and the LoRA settings from its config.

>>> model_card(config, {"base_model": "minilm", "task": "sentiment", "labels": [...]})
"""

import json

from klora.version import __version__

TASKS = {"SEQ_CLS": "text classification", "TOKEN_CLS": "token classification",
         "QUESTION_ANS": "extractive question answering"}


def _scores(metrics):
    rows = [(k, v) for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    return [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows]


def model_card(config, metadata, adapter_name):
    """The Markdown text of the card (with PEFT's YAML header)."""
    base = metadata.get("base_model") or config.get("base_model_name_or_path") or "unknown"
    task = metadata.get("task") or TASKS.get(config.get("task_type"), "feature extraction")
    labels = metadata.get("labels") or metadata.get("tags")
    lines = ["---", "library_name: peft", f"base_model: {json.dumps(str(base))}",
             f"tags: [klora, lora{', dora' if config.get('use_dora') else ''}]", "---", "",
             f"# {adapter_name}: a LoRA adapter of {base} for {task}", "",
             f"Trained with klora {__version__}"
             + (f": `{metadata['command']}`." if metadata.get("command") else "."), "",
             "| setting | value |", "|---|---|",
             f"| rank (`r`) | {config['r']} |", f"| alpha (`lora_alpha`) | {config['lora_alpha']} |",
             f"| dropout | {config.get('lora_dropout', 0.0)} |",
             f"| DoRA | {bool(config.get('use_dora'))} |",
             f"| rsLoRA | {bool(config.get('use_rslora'))} |",
             f"| target modules | {len(config['target_modules'])} "
             f"(e.g. `{config['target_modules'][0]}`) |",
             f"| trained heads (`modules_to_save`) | {config.get('modules_to_save') or 'none'} |"]
    if config.get("rank_pattern"):
        lines.append(f"| per-module ranks | {len(config['rank_pattern'])} differ |")
    if labels:
        lines += ["", "## Labels", "", ", ".join(f"`{label}`" for label in labels)]
    metrics = metadata.get("metrics") or {}
    if _scores(metrics):
        lines += ["", "## Validation metrics at save time", "", "| metric | value |", "|---|---|",
                  *_scores(metrics)]
    lines += ["", "## Use", "", "```python",
              "klora.load_adapter(model, path)        # klora, on the base model's keras-hub model",
              "peft.PeftModel.from_pretrained(model, path)   # PEFT, on its transformers model",
              "```", ""]
    return "\n".join(lines)
