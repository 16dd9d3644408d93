"""`LoraConfig`: the settings of one LoRA adapter, validated once.

Every place that creates, stores or reads an adapter (`klora.apply`, the LoRA
layers and their Keras configs, `.keras` files, PEFT adapter files, the
recipes' flags) passes one `LoraConfig`. Its fields map onto Hugging Face
PEFT's `LoraConfig`:

| klora       | PEFT                                             |
|-------------|--------------------------------------------------|
| `rank`      | `r`                                              |
| `alpha`     | `lora_alpha` (`None` here means `alpha = rank`)  |
| `dropout`   | `lora_dropout`                                   |
| `use_rslora`| `use_rslora`                                     |
| `init`      | `init_lora_weights` (`"kaiming"` is PEFT's `True`)|
| `use_dora`  | `use_dora`                                       |
| `seed`      | none: PEFT draws from torch's global generator    |

>>> config = LoraConfig(rank=16, alpha=32, dropout=0.1)
>>> config.scale
2.0
"""

import dataclasses
import hashlib
import math
import re

# `init` values: random `A` (B = 0), or `A`, `B` from the base kernel, which then
# keeps the residual (PiSSA: its top singular vectors, `pissa_niter_N` with N
# iterations of a randomized SVD; OLoRA: its QR decomposition).
INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_N", "olora")
RANDOMIZED_PISSA = re.compile(r"pissa_niter_([1-9][0-9]*)")
FIXED_INITS = ("kaiming", "gaussian", "pissa", "olora")
DEFAULT_ADAPTER = "default"
# The name older klora versions (and PEFT) give the dropout rate.
LEGACY_NAMES = {"lora_dropout": "dropout"}


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def derive_seed(seed, *names):
    """A reproducible 31-bit seed for the stream `names` under `seed` (`None` stays `None`).

    Distinct layers, adapters and purposes get independent seeds from one
    user seed, so that no two layers draw the same `A` or dropout masks.

    >>> derive_seed(42, "default", "transformer_layer_0/self_attention_layer/query")
    """
    if seed is None:
        return None
    digest = hashlib.sha256("\x1f".join(map(str, (seed, *names))).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The settings of one LoRA adapter; invalid values raise a `ValueError` on creation.

    Args:
        rank: Rank `r` of the update, an integer >= 1 (at most the layer's
            input and output widths).
        alpha: Scaling numerator: the update is scaled by `alpha / rank`
            (`alpha / sqrt(rank)` with `use_rslora`). `None` means `rank`.
        dropout: Dropout rate on the adapter's input during training, in [0, 1).
        use_rslora: Rank-stabilized scaling, `alpha / sqrt(rank)`.
        init: `"kaiming"` (uniform `A`, PEFT's default) or `"gaussian"` (normal
            `A` with standard deviation `1 / rank`), with `B` at zero, so a new
            adapter changes nothing; or `"pissa"` (`A`, `B` from the top `rank`
            singular vectors of the base kernel, which keeps the rest; SVD),
            `"pissa_niter_N"` (the same by a randomized SVD with N power
            iterations, fast for large kernels) or `"olora"` (from its QR
            decomposition). Those three change the base kernel, so the layer
            must hold no other adapter.
        use_dora: Weight-decomposed LoRA (DoRA): a trained magnitude per output
            unit rescales the adapted kernel's direction.
        seed: Optional integer seed. `klora.apply` derives an independent seed
            for every layer and adapter from it (see `derive_seed`).

    Example:

    >>> config = klora.LoraConfig(rank=16, alpha=32, dropout=0.1)
    >>> klora.apply(backbone, config=config, targets="all-linear")
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    seed: int | None = None
    use_dora: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"`rank` must be an integer >= 1. Received: rank={self.rank!r}")
        if self.alpha is not None and not (_is_number(self.alpha) and
                                           math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError("`alpha` must be a positive number, or None for alpha = rank. "
                             f"Received: alpha={self.alpha!r}")
        if not (_is_number(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"`dropout` must be a number in [0, 1). "
                             f"Received: dropout={self.dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"`use_rslora` must be True or False. "
                             f"Received: use_rslora={self.use_rslora!r}")
        if not isinstance(self.init, str) or (self.init not in FIXED_INITS and
                                              not RANDOMIZED_PISSA.fullmatch(self.init)):
            raise ValueError(f"`init` must be one of {INITS} (N a positive integer). "
                             f"Received: init={self.init!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"`use_dora` must be True or False. "
                             f"Received: use_dora={self.use_dora!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or
                                      not isinstance(self.seed, int)):
            raise ValueError(f"`seed` must be an integer or None. Received: seed={self.seed!r}")
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def changes_base(self):
        """Whether `init` decomposes the base kernel (PiSSA, OLoRA): the kernel keeps a
        residual, and the initial `A`, `B` are kept to convert the adapter on save."""
        return self.init in ("pissa", "olora") or bool(RANDOMIZED_PISSA.fullmatch(self.init))

    @property
    def scale(self):
        """The factor applied to `B(A(x))`."""
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        """The fields as a JSON-ready dict (what layer configs and `.keras` files hold)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields, source="the config"):
        """A `LoraConfig` from `to_dict()` output; also reads files of klora 0.1.

        Raises a `ValueError` naming `source` for unknown fields or bad values.
        """
        fields = {LEGACY_NAMES.get(k, k): v for k, v in dict(fields).items()}
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"Unknown LoRA setting(s) {unknown} in {source}; known: "
                             f"{[f.name for f in dataclasses.fields(cls)]}.")
        try:
            return cls(**fields)
        except ValueError as e:
            raise ValueError(f"Invalid LoRA settings in {source}: {e}") from None
