"""XLA compilations that outlive the process, and how long a run spent compiling.

Each bucket shape of a run compiles a training and a prediction step before its first
useful step (15-17 s of a 3,000-row SST-2 run on 2 CPU cores). `enable_compile_cache`
turns on JAX's persistent compilation cache, so a rerun, a resume or the next run with
the same shapes reads the compiled programs from disk instead (7.6 s in all); what
remains is tracing the Python step. `CompileTime` adds up what JAX reports for tracing,
lowering and compiling (or reading from the cache) while it is open. Both do nothing on the
TensorFlow and torch backends.

>>> enable_compile_cache()          # ~/.cache/klora/jax, or $KLORA_COMPILE_CACHE
>>> with CompileTime() as compiling:
...     model.fit(...)
>>> compiling.seconds
"""

import os

import keras

DEFAULT_DIRECTORY = os.path.join("~", ".cache", "klora", "jax")
# What JAX reports for each compilation (jax._src.dispatch): tracing the Python
# function, lowering it to StableHLO, and XLA's compile or a persistent-cache read.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_total = {"seconds": 0.0, "listening": False}


def default_directory():
    """`$KLORA_COMPILE_CACHE`, else `~/.cache/klora/jax`."""
    return os.path.expanduser(os.environ.get("KLORA_COMPILE_CACHE", DEFAULT_DIRECTORY))


def enable_compile_cache(directory=None):
    """Keeps compiled XLA programs in `directory` (JAX only; returns whether it is on).

    Call it before building a model: JAX decides once per process, at its first
    compilation, whether the cache is used. `directory=None` is `default_directory()`;
    `"none"` leaves the cache off. Programs that took at least half a second to compile are kept; the cache key
    covers the program, the JAX and XLA versions, the flags and the device, so a
    changed model or environment compiles afresh.
    """
    if keras.backend.backend() != "jax" or directory == "none":
        return False
    import jax

    directory = os.path.expanduser(directory or default_directory())
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return True


def _listen(event, seconds, **kwargs):
    if event in _COMPILE_EVENTS:
        _total["seconds"] += seconds


class CompileTime:
    """Seconds JAX spent tracing and compiling while the context was open."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        if keras.backend.backend() == "jax" and not _total["listening"]:
            import jax

            jax.monitoring.register_event_duration_secs_listener(_listen)
            _total["listening"] = True
        self._start = _total["seconds"]
        return self

    def __exit__(self, *exc):
        self.seconds = _total["seconds"] - self._start
        return False
