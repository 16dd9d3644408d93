"""`adapter_config.json`: PEFT's `LoraConfig` as klora writes it and reads it.

Reading is strict: a PEFT feature klora does not implement switched on, or a
field klora does not know holding a value, is refused with a `ValueError`
rather than loaded with different outputs. A field from a newer PEFT that is
off (`null`, `false`, empty) is accepted: PEFT adds each feature as a new field
that defaults to off. `rank_pattern` / `alpha_pattern` keys are regular
expressions matched as PEFT matches them (`(.*\\.)?(key)$`), each match bounded
in time, so a pathological pattern cannot hang a load.

>>> config = read_config("adapter/adapter_config.json")
>>> module_config(config, "encoder.layer.0.attention.self.query", "adapter_config.json")
LoraConfig(rank=8, alpha=16, ...)
"""

import collections
import json

import regex

from klora.config import LoraConfig

PATTERN_SECONDS = 0.1
# PEFT `LoraConfig` fields (up to peft 0.22) that do not change what a loaded
# plain LoRA adapter computes: any value is accepted (`init_lora_weights` is
# checked below).
FREE_FIELDS = {
    "alpha_pattern", "astra_config", "auto_mapping", "base_model_name_or_path", "corda_config",
    "ensure_weight_tying", "eva_config", "exclude_modules", "inference_mode",
    "init_lora_weights", "layers_pattern", "layers_to_transform", "loftq_config",
    "lora_alpha", "lora_dropout", "lora_ga_config", "megatron_core", "modules_to_save",
    "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern", "revision",
    "runtime_config", "target_modules", "task_type", "use_dora", "use_rslora",
}
# Fields of PEFT features klora does not implement: they must be off.
OFF_FIELDS = {
    "alora_invocation_tokens": None, "arrow_config": None, "bias": "none",
    "fan_in_fan_out": False, "kasa_config": None, "layer_replication": None,
    "lora_bias": False, "megatron_config": None, "monteclora_config": None,
    "target_parameters": None, "trainable_token_indices": None, "use_bdlora": None,
    "use_qalora": False, "velora_config": None,
}
# `init_lora_weights` values that leave the base weights as they were: the
# adapter applies to the original model. PiSSA, OLoRA, CorDA, ASTRA, LoftQ and
# LoRA-GA change the base weights; MiCA trains only A (a PEFT variant).
BASE_KEEPING_INITS = (True, False, "gaussian", "eva", "orthogonal", "nora")
OFF_VALUES = (None, False, {}, [])


def _is_off(value):
    """Whether an unknown field's value is a newer PEFT's default-off (`null`, `false`,
    `{}`, `[]`); a number, even 0, is a setting klora cannot interpret."""
    return value is None or value is False or (type(value) in (dict, list) and not value)


def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def peft_config(configs, heads, task_type=None, auto_mapping=None):
    """PEFT's `LoraConfig` as a dict for `{module name: LoraConfig}`.

    The most common rank and alpha become `r` and `lora_alpha`; the others go
    into `rank_pattern` / `alpha_pattern` keyed by module name.
    """
    ranks = {m: c.rank for m, c in configs.items()}
    alphas = {m: c.rank if c.alpha is None else c.alpha for m, c in configs.items()}
    rank, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    shared = {field: {getattr(c, field) for c in configs.values()}
              for field in ("use_rslora", "use_dora", "dropout")}
    for field in ("use_rslora", "use_dora"):
        if len(shared[field]) > 1:
            raise ValueError(f"PEFT's format has one `{field}` for the whole adapter, but the "
                             f"adapter's layers mix {field}=True and False.")
    first = next(iter(configs.values()))
    return {
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
        "auto_mapping": auto_mapping,
        "base_model_name_or_path": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": "gaussian" if first.init == "gaussian" else True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": max(shared["dropout"]),
        "modules_to_save": heads or None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
        "revision": None,
        "target_modules": sorted(configs),
        "task_type": task_type,
        "use_dora": shared["use_dora"].pop(),
        "use_rslora": shared["use_rslora"].pop(),
    }


def _load_json(raw, filename):
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"'{filename}' is not valid JSON ({type(e).__name__}).") from None
    except ValueError as e:
        raise ValueError(f"'{filename}' is not valid JSON: {e}") from None


def _check_patterns(config, filename):
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"'{field}' in '{filename}' must be an object.")
        for key, value in pattern.items():
            try:
                regex.compile(rf"(.*\.)?({key})$")
            except regex.error as e:
                raise ValueError(f"'{field}' in '{filename}' has the key {key!r}, which is "
                                 f"not a valid regular expression ({e}).") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"'{field}' in '{filename}' maps {key!r} to {value!r}; "
                                 "values are numbers.")


def read_config(filename):
    """`(config, raw bytes)` of an `adapter_config.json`, checked (see the module docstring)."""
    try:
        with open(filename, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"Cannot read '{filename}': {e.strerror or e}.") from None
    config = _load_json(raw, filename)
    if not isinstance(config, dict):
        raise ValueError(f"'{filename}' must hold a JSON object.")
    unknown = {k: config[k] for k in sorted(set(config) - FREE_FIELDS - set(OFF_FIELDS))
               if not _is_off(config[k])}
    if unknown:
        raise ValueError(f"Unknown field(s) switched on in '{filename}': {unknown}. klora reads "
                         "PEFT LoRA configs (peft <= 0.22) and will not guess what they mean.")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"'{filename}' is a {config['peft_type']!r} adapter; klora loads LORA.")
    on = {k: config[k] for k, off in OFF_FIELDS.items()
          if k in config and config[k] != off and config[k] not in OFF_VALUES}
    if on:
        raise ValueError(f"'{filename}' uses PEFT features klora does not implement: {on}.")
    init = config.get("init_lora_weights", True)
    if not any(init is v if isinstance(v, bool) else init == v for v in BASE_KEEPING_INITS):
        raise ValueError(f"'{filename}' has init_lora_weights={init!r}, which klora does not "
                         "load: PiSSA, OLoRA, CorDA, ASTRA, LoftQ and LoRA-GA change the base "
                         "weights, so such an adapter only applies to the base model it was "
                         "trained on (convert it to a plain LoRA adapter in PEFT with "
                         "save_pretrained(..., path_initial_model_for_weight_conversion=...)); "
                         "MiCA is a PEFT variant that trains only A.")
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise ValueError(f"'{filename}' lacks the field '{field}'.")
    heads = config.get("modules_to_save") or []
    if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads):
        raise ValueError(f"'modules_to_save' in '{filename}' must be a list of names.")
    _check_patterns(config, filename)
    module_config(config, "", filename)  # the shared settings are valid
    return config, raw


def _pattern_value(config, field, module, default, filename):
    """PEFT's `rank_pattern` / `alpha_pattern` lookup for one module."""
    for key, value in (config.get(field) or {}).items():
        try:
            if regex.match(rf"(.*\.)?({key})$", module, timeout=PATTERN_SECONDS):
                return value
        except TimeoutError:
            raise ValueError(f"'{field}' in '{filename}': matching the key {key!r} against "
                             f"'{module}' takes too long (a pathological pattern?).") from None
    return default


def module_config(config, module, filename):
    """The `LoraConfig` PEFT's `config` gives `module` (patterns applied)."""
    init = "gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming"
    settings = dict(
        rank=_pattern_value(config, "rank_pattern", module, config["r"], filename),
        alpha=_pattern_value(config, "alpha_pattern", module, config["lora_alpha"], filename),
        dropout=config.get("lora_dropout", 0.0), use_rslora=config.get("use_rslora", False),
        use_dora=config.get("use_dora") or False, init=init)
    where = f"'{filename}'" + (f" for '{module}'" if module else "")
    if settings["dropout"] is None:
        settings["dropout"] = 0.0
    try:
        return LoraConfig(**settings)
    except ValueError as e:
        raise ValueError(f"Invalid LoRA settings in {where}: {e}") from None
