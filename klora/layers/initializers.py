"""How an adapter starts: random `A` and zero `B`, or `A` and `B` taken from the base
kernel (PiSSA, OLoRA), which then keeps the residual.

Matrices are in klora's layout: the flattened kernel `W` is `(fan_in, fan_out)`,
`A` is `(fan_in, r)`, `B` is `(r, fan_out)`; PEFT's are their transposes, so each
decomposition below is PEFT's (`peft.tuners.lora.layer`) transposed.

>>> a, b, residual = decompose(kernel, LoraConfig(rank=8, init="pissa"))
"""

import keras
import numpy as np

from klora.config import RANDOMIZED_PISSA, derive_seed


def a_initializer(config):
    """The initializer of a random `A`: PEFT's kaiming-uniform or gaussian."""
    seed = derive_seed(config.seed, "init")
    if config.init == "gaussian":
        return keras.initializers.RandomNormal(stddev=1.0 / config.rank, seed=seed)
    # PEFT's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform", seed)


def _randomized_svd(matrix, rank, iterations, seed):
    """Top-`rank` singular triplets by a randomized range finder with power iterations
    (Halko et al. 2011; what `torch.svd_lowrank` computes)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(matrix @ rng.standard_normal((matrix.shape[1], rank)))
    for _ in range(iterations):
        basis, _ = np.linalg.qr(matrix.T @ basis)
        basis, _ = np.linalg.qr(matrix @ basis)
    u, s, vt = np.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ u, s, vt


def decompose(kernel, config):
    """`(A, B, residual)` with `residual + scale * A @ B == kernel` for a kernel-based init.

    PiSSA: `A`, `B` span the top `rank` singular directions of `W^T` (PEFT's weight),
    split as `sqrt(S / scale)` on each side. OLoRA: `W^T = QR`, `B^T = Q[:, :r]`,
    `A^T = R[:r]`. Computed in float64 on the host, once.
    """
    weight = np.asarray(kernel, "float64").T  # PEFT's (out, in)
    rank, scale = config.rank, config.scale
    if config.init == "olora":
        q, r = np.linalg.qr(weight)
        a, b = r[:rank], q[:, :rank]  # PEFT's lora_A (r, in), lora_B (out, r)
    else:
        randomized = RANDOMIZED_PISSA.fullmatch(config.init)
        if randomized:
            u, s, vt = _randomized_svd(weight, rank, int(randomized.group(1)),
                                       derive_seed(config.seed or 0, "pissa"))
        else:
            u, s, vt = np.linalg.svd(weight, full_matrices=False)
        root = np.sqrt(s[:rank] / scale)
        a, b = root[:, None] * vt[:rank], u[:, :rank] * root[None, :]
    residual = weight - scale * b @ a
    return a.T.astype("float32"), b.T.astype("float32"), residual.T.astype("float32")
