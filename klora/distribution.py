"""Choosing and configuring a `keras.distribution` for klora models (JAX backend).

klora scales through Keras' own distribution API, nothing home-made:

- `"data"`: `keras.distribution.DataParallel` over every device; each device
  holds a copy of the weights and a slice of the batch.
- `"model"`: `keras.distribution.ModelParallel` on a `(batch, model)` device
  mesh with `layout_map()`, which shards BERT/DistilBERT embeddings, attention
  and feed-forward kernels on the `model` axis (Megatron style: column-parallel
  query/key/value and intermediate, row-parallel attention output and
  feed-forward output) and shards each LoRA `A`/`B` consistently with its
  base kernel.

The distribution must be set before the model is created, since variables are
laid out when they are made (LoRA variables made later by `klora.apply` are
laid out then, by the same rules)::

    klora.distribution.configure_distribution("model", model_parallel=2)
    classifier = keras_hub.models.BertTextClassifier.from_preset(...)
    klora.apply(classifier.backbone, rank=8)
    classifier.fit(...)

Multi-host (TPU pod slices, several GPU hosts): `configure_distribution` first
calls `initialize_multi_host()`, which runs `jax.distributed.initialize()` (via
`keras.distribution.initialize`) when it detects several hosts. Every host runs
the same program; each reads only its own rows of every global batch (see
`shard_batches`), and only process 0 writes outputs (`is_primary_process`).
"""

import os
import re

import keras

KINDS = ("none", "data", "model")
BATCH_AXIS, MODEL_AXIS = "batch", "model"

# Anything above a keras-hub BERT/DistilBERT variable path: nothing for a
# backbone or a Task (`transformer_layer_0/...`), an outer model's prefix else.
# Every pattern ends in an explicit variable name and `$`, so a `.../kernel$`
# rule can never match `.../lora_a` (keras issue 19496: older Keras matched
# LayoutMap keys with `re.search`, so `.*query.*kernel` also caught unrelated
# paths). Keras 3.15 uses `re.fullmatch`; these patterns are correct under both.
_PREFIX = r"(?:^|.*/)"
_BLOCK = _PREFIX + r"transformer_layer_\d+/"
_ATTENTION = _BLOCK + r"self_attention_layer/"

M = MODEL_AXIS
# (pattern, axes, what it matches). `None` axes are replicated.
LAYOUT_RULES = (
    # Embeddings (vocab|positions|segments, hidden): shard the hidden axis.
    (_PREFIX + r"(?:token|position|segment)_embedding/embeddings$", (None, M),
     "token/position/segment embedding tables (rows, hidden): hidden columns sharded"),
    # Column-parallel attention projections: kernel (hidden, heads, head_dim),
    # bias (heads, head_dim): each device holds whole heads.
    (_ATTENTION + r"(?:query|key|value)/kernel$", (None, M, None),
     "query/key/value kernels (hidden, heads, head_dim): heads sharded"),
    (_ATTENTION + r"(?:query|key|value)/bias$", (M, None),
     "query/key/value biases (heads, head_dim): heads sharded"),
    # LoRA of a column-parallel kernel: B's output columns (heads * head_dim,
    # heads-major, so whole heads per shard as in the kernel) sharded, A replicated.
    (_ATTENTION + r"(?:query|key|value)/lora_a$", (None, None),
     "query/key/value LoRA A (hidden, r): replicated"),
    (_ATTENTION + r"(?:query|key|value)/lora_b$", (None, M),
     "query/key/value LoRA B (r, heads*head_dim): output columns sharded like the kernel"),
    # Row-parallel attention output: kernel (heads, head_dim, hidden).
    (_ATTENTION + r"attention_output/kernel$", (M, None, None),
     "attention output kernel (heads, head_dim, hidden): heads (input rows) sharded"),
    (_ATTENTION + r"attention_output/bias$", (None,),
     "attention output bias (hidden): replicated"),
    (_ATTENTION + r"attention_output/lora_a$", (M, None),
     "attention output LoRA A (heads*head_dim, r): input rows sharded like the kernel"),
    (_ATTENTION + r"attention_output/lora_b$", (None, None),
     "attention output LoRA B (r, hidden): replicated"),
    # Column-parallel feed-forward intermediate: kernel (hidden, intermediate).
    (_BLOCK + r"feedforward_intermediate_dense/kernel$", (None, M),
     "feed-forward intermediate kernel (hidden, intermediate): columns sharded"),
    (_BLOCK + r"feedforward_intermediate_dense/bias$", (M,),
     "feed-forward intermediate bias (intermediate): sharded like the columns"),
    (_BLOCK + r"feedforward_intermediate_dense/lora_a$", (None, None),
     "feed-forward intermediate LoRA A (hidden, r): replicated"),
    (_BLOCK + r"feedforward_intermediate_dense/lora_b$", (None, M),
     "feed-forward intermediate LoRA B (r, intermediate): columns sharded like the kernel"),
    # Row-parallel feed-forward output: kernel (intermediate, hidden).
    (_BLOCK + r"feedforward_output_dense/kernel$", (M, None),
     "feed-forward output kernel (intermediate, hidden): rows sharded"),
    (_BLOCK + r"feedforward_output_dense/bias$", (None,),
     "feed-forward output bias (hidden): replicated"),
    (_BLOCK + r"feedforward_output_dense/lora_a$", (M, None),
     "feed-forward output LoRA A (intermediate, r): rows sharded like the kernel"),
    (_BLOCK + r"feedforward_output_dense/lora_b$", (None, None),
     "feed-forward output LoRA B (r, hidden): replicated"),
    # Pooler and classifier heads are small: explicitly replicated, so every
    # kernel of a text classifier has exactly one rule.
    (_PREFIX + r"(?:pooled_dense|logits)/(?:kernel|bias)$", None,
     "pooler and classification head kernels and biases (small): replicated"),
    (_PREFIX + r"(?:pooled_dense|logits)/lora_(?:a|b)$", None,
     "pooler and classification head LoRA A and B: replicated like their kernels"),
)


def _require_jax(kind):
    if keras.backend.backend() != "jax":
        raise ValueError(
            f"--distribution {kind} uses keras.distribution, which needs the JAX backend "
            f"(this process runs Keras on '{keras.backend.backend()}'): set "
            "KERAS_BACKEND=jax, or use --distribution none."
        )


def layout_rule(path):
    """The `(pattern, axes, description)` rules of `LAYOUT_RULES` matching variable `path`.

    Uses `re.fullmatch`, as Keras' `LayoutMap` does; the patterns are anchored,
    so `re.search` (older Keras) gives the same answer.
    """
    return [rule for rule in LAYOUT_RULES if re.fullmatch(rule[0], path)]


def layout_map(mesh, model=None):
    """A `keras.distribution.LayoutMap` for BERT/DistilBERT (keras-hub) on `mesh`.

    `mesh` is a `keras.distribution.DeviceMesh` with a `"model"` axis (see
    `device_mesh`). The rules are `LAYOUT_RULES`; variables no rule matches
    (layer norms, ...) are replicated. With `model` (a built keras-hub
    BERT/DistilBERT backbone or text classifier), also checks that every
    kernel of its `Dense`/`EinsumDense` layers matches exactly one rule and
    that each sharded axis divides by the size of the `"model"` axis.
    """
    if MODEL_AXIS not in mesh.axis_names:
        raise ValueError(f"The mesh needs a '{MODEL_AXIS}' axis; it has {mesh.axis_names}.")
    layouts = keras.distribution.LayoutMap(mesh)
    for pattern, axes, _ in LAYOUT_RULES:
        # `None` (replicated, any rank) is Keras' default for unmatched paths;
        # those rules exist so that every kernel is accounted for.
        if axes is not None:
            layouts[pattern] = axes
    if model is not None:
        check_layouts(model, mesh.shape[mesh.axis_names.index(MODEL_AXIS)])
    return layouts


def check_layouts(model, model_parallel):
    """Raises a `ValueError` if `model`'s kernels do not fit `LAYOUT_RULES` on `model_parallel`.

    Every `Dense`/`EinsumDense` kernel must match exactly one rule, and each
    axis a rule shards must divide by `model_parallel`.
    """
    problems = []
    layers = [l for l in model._flatten_layers(include_self=False)
              if isinstance(l, (keras.layers.Dense, keras.layers.EinsumDense))]
    for layer in layers:
        for variable in layer.weights:
            rules = layout_rule(variable.path)
            if variable.path.endswith("/kernel") and len(rules) != 1:
                problems.append(f"{variable.path} matches {len(rules)} layout rules")
            for _, axes, _ in rules:
                for size, axis in zip(variable.shape, axes or ()):
                    if axis == MODEL_AXIS and size % model_parallel:
                        problems.append(
                            f"{variable.path} {tuple(variable.shape)}: axis of size {size} "
                            f"does not divide by --model-parallel {model_parallel}")
    if problems:
        raise ValueError("The model does not fit klora's BERT/DistilBERT layout: "
                         + "; ".join(problems))


def device_mesh(model_parallel, devices=None):
    """A `(batch, model)` `DeviceMesh` with `model_parallel` devices on the model axis.

    Consecutive devices (those of one host first) form the model axis, so a
    model axis no larger than a host's device count never crosses hosts.
    """
    devices = keras.distribution.list_devices() if devices is None else devices
    if model_parallel < 1 or len(devices) % model_parallel:
        raise ValueError(
            f"--model-parallel {model_parallel} must divide the device count "
            f"{len(devices)}: use one of {_divisors(len(devices))}.")
    return keras.distribution.DeviceMesh(
        (len(devices) // model_parallel, model_parallel), (BATCH_AXIS, MODEL_AXIS), devices)


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _multi_host_requested(coordinator_address=None):
    """Why this process should join a multi-host run, or None."""
    if coordinator_address:
        return "coordinator address given"
    for name in ("JAX_COORDINATOR_ADDRESS", "KERAS_DISTRIBUTION_JOB_ADDRESSES"):
        if os.environ.get(name):
            return f"{name} is set"
    if os.environ.get("KLORA_MULTI_HOST", "").lower() in ("1", "true", "yes"):
        return "KLORA_MULTI_HOST is set"
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = [h for h in os.environ.get(name, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return f"{name} lists {len(hosts)} hosts"
    return None


def initialize_multi_host(coordinator_address=None, num_processes=None, process_id=None):
    """Joins a multi-host JAX run when one is detected; returns whether it did.

    Detection, in order: an explicit `coordinator_address`; the environment
    variables `JAX_COORDINATOR_ADDRESS` or `KERAS_DISTRIBUTION_JOB_ADDRESSES`
    (GPU hosts: also set `KERAS_DISTRIBUTION_NUM_PROCESSES` and
    `KERAS_DISTRIBUTION_PROCESS_ID`, or pass them); `KLORA_MULTI_HOST=1` (what
    `tpu/run.sh` sets on a multi-host slice, where JAX finds the workers from
    the TPU metadata); or `TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES`
    listing more than one host. Otherwise (one host) it does nothing. It must
    run before anything touches a JAX device, and at most once.
    """
    reason = _multi_host_requested(coordinator_address)
    if reason is None or keras.backend.backend() != "jax":
        return False
    import jax

    if jax.distributed.is_initialized():
        return True
    print(f"klora: joining a multi-host run ({reason})")
    keras.distribution.initialize(coordinator_address, num_processes, process_id)
    return True


def process_count():
    """Number of processes (hosts) in this run; 1 without JAX multi-host."""
    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.process_count()


def process_index():
    """This process's index in `[0, process_count())`."""
    if keras.backend.backend() != "jax":
        return 0
    import jax

    return jax.process_index()


def is_primary_process():
    """Whether this process writes outputs (process 0 of a multi-host run, or the only one)."""
    return process_index() == 0


def check_global_batch(batch_size, device_count, what="device count"):
    """Raises a `ValueError` unless `batch_size` divides by `device_count`, naming valid sizes.

    >>> check_global_batch(30, 8)
    ValueError: The global batch size 30 must be divisible by the device count 8 ...: use 24 or 32.
    """
    if batch_size < 1 or device_count < 1:
        raise ValueError(f"Batch size ({batch_size}) and {what} ({device_count}) must be >= 1.")
    if batch_size % device_count:
        below = batch_size // device_count * device_count
        above = below + device_count
        nearest = f"{below} or {above}" if below else f"{above}"
        raise ValueError(
            f"The global batch size {batch_size} must be divisible by the {what} "
            f"{device_count} (each of those devices takes an equal slice of every batch): "
            f"use --batch-size {nearest}.")


def data_parallel_size(distribution=None):
    """How many slices each global batch is split into (the mesh's batch axis)."""
    distribution = distribution or keras.distribution.distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    return mesh.shape[mesh.axis_names.index(distribution.batch_dim_name)]


def configure_distribution(kind, model_parallel=2, batch_size=None, coordinator_address=None):
    """Sets the global `keras.distribution` for `kind`; call before creating the model.

    Args:
        kind: `"none"` (leaves the distribution unset), `"data"`
            (`DataParallel` over all devices) or `"model"` (`ModelParallel`
            on a `(batch, model)` mesh with `layout_map`).
        model_parallel: Size of the `"model"` mesh axis for `"model"`; it must
            divide the device count (and, on several hosts, each host's
            device count, so that a model shard never spans hosts).
        batch_size: Optional global batch size to check against the number of
            data-parallel slices (see `check_global_batch`).
        coordinator_address: Optional `host:port` of process 0 for multi-host
            runs outside Cloud TPU (see `initialize_multi_host`).

    Returns:
        The distribution set, or `None` for `"none"`.

    Datasets are not auto-sharded by Keras (`auto_shard_dataset=False`):
    klora's `TokenBatches` have per-step bucket lengths and no static batch
    size, which Keras' `rebatch`/`shard` cannot handle; `shard_batches` gives
    each host its rows of every global batch instead, which is what Keras'
    auto-sharding would do.
    """
    if kind not in KINDS:
        raise ValueError(f"--distribution must be one of {KINDS}. Received: {kind!r}")
    if kind == "none":
        return None
    _require_jax(kind)
    initialize_multi_host(coordinator_address)
    devices = keras.distribution.list_devices()
    if kind == "data":
        distribution = keras.distribution.DataParallel(devices=devices,
                                                       auto_shard_dataset=False)
        what = "device count"
    else:
        if process_count() > 1:
            import jax

            local = jax.local_device_count()
            if local % model_parallel:
                raise ValueError(
                    f"--model-parallel {model_parallel} must divide the {local} devices of "
                    f"each host (a model shard must not span hosts): use one of "
                    f"{_divisors(local)}.")
        mesh = device_mesh(model_parallel, devices)
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map(mesh), batch_dim_name=BATCH_AXIS, auto_shard_dataset=False)
        what = f"batch axis size ({len(devices)} devices / --model-parallel {model_parallel})"
    if batch_size is not None:
        check_global_batch(batch_size, data_parallel_size(distribution), what)
    keras.distribution.set_distribution(distribution)
    return distribution


def shard_batches(batches):
    """`batches` (a `TokenBatches`) as this host's shard under the current distribution.

    Without a distribution, `batches` itself. With one, every step must carry
    a full global batch (a partial last batch cannot be split evenly over the
    devices), so partial batches are dropped; on several hosts each host
    yields only its rows of every global batch, like Keras' own
    `distribute_dataset` (`rebatch` then `shard` by `data_shard_id`).
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return batches
    replicas = data_parallel_size(distribution)
    count = min(process_count(), replicas)
    index = distribution.data_shard_id if count > 1 else 0
    return batches.shard(index, count, drop_remainder=True)


def add_distribution_arguments(parser):
    """Adds `--distribution`, `--model-parallel` and `--coordinator-address` to `parser`."""
    parser.add_argument(
        "--distribution", choices=KINDS, default="none",
        help="spread training over all devices with keras.distribution (JAX backend): "
             "'data' = DataParallel, 'model' = ModelParallel sharding BERT kernels and LoRA "
             "A/B on a (batch, model) mesh")
    parser.add_argument("--model-parallel", type=int, default=2,
                        help="size of the model axis for --distribution model (default 2)")
    parser.add_argument(
        "--coordinator-address", default=None,
        help="host:port of process 0 for a multi-host run outside Cloud TPU "
             "(default: $JAX_COORDINATOR_ADDRESS; TPU pods are detected automatically)")
    return parser


def configure_from_arguments(args):
    """`configure_distribution` from the flags of `add_distribution_arguments`."""
    return configure_distribution(args.distribution, args.model_parallel, args.batch_size,
                                  args.coordinator_address)
