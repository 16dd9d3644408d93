"""`klora.speed.compile_cache`: compiled programs kept on disk and read by the next process."""

import os
import subprocess
import sys

import keras
import pytest

from klora.speed import CompileTime, enable_compile_cache

# Runs in a fresh process: JAX decides at its first compilation whether the cache is used.
PROGRAM = """
import os, sys
os.environ["KERAS_BACKEND"] = "jax"
import jax, jax.numpy as jnp
from klora.speed import CompileTime, enable_compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None)
assert enable_compile_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
with CompileTime() as compiling:
    jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64))).block_until_ready()
print(len(hits), compiling.seconds > 0)
"""


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's persistent cache")
def test_second_process_reads_the_compiled_program(tmp_path):
    cache = tmp_path / "cache"

    def run():
        out = subprocess.run([sys.executable, "-c", PROGRAM, str(cache)], capture_output=True,
                             text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        return out.stdout.split()

    hits, timed = run()
    assert hits == "0" and timed == "True" and any(cache.iterdir())
    hits, timed = run()
    assert int(hits) >= 1 and timed == "True"


def test_off_switch_and_other_backends(tmp_path):
    assert not enable_compile_cache("none")
    if keras.backend.backend() != "jax":
        assert not enable_compile_cache(str(tmp_path / "c")) and not (tmp_path / "c").exists()
        with CompileTime() as compiling:
            keras.ops.convert_to_numpy(keras.ops.ones((2,)) * 2)
        assert compiling.seconds == 0.0
