"""klora.speed.tcmalloc: finding tcmalloc, preloading it for child processes, relaunching a script."""

import os
import subprocess
import sys
import textwrap

import keras
import pytest

from klora.speed import tcmalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The module does not depend on the Keras backend: run the process tests once.
once = pytest.mark.skipif(keras.backend.backend() != "jax", reason="backend-independent")
installed = pytest.mark.skipif(
    tcmalloc.library() is None or os.environ.get(tcmalloc.ENV_SWITCH) == "0",
    reason="tcmalloc not installed (apt-get install libtcmalloc-minimal4)")

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from klora.speed import tcmalloc
    tcmalloc.relaunch_under_tcmalloc()
    print("loaded" if tcmalloc.is_loaded() else "not loaded", sys.argv[1:])
""")


def run_script(tmp_path, **env):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(root=ROOT))
    environ = {k: v for k, v in os.environ.items()
               if k not in ("LD_PRELOAD", "KLORA_TCMALLOC_RELAUNCHED", tcmalloc.ENV_SWITCH)}
    process = subprocess.run([sys.executable, str(script), "a", "b c"], capture_output=True,
                             text=True, env={**environ, **env}, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    return process.stdout.strip().splitlines()[-1]


def test_switch_off_and_explicit_path(monkeypatch):
    monkeypatch.setenv(tcmalloc.ENV_SWITCH, "0")
    assert tcmalloc.library() is None
    environ = {"LD_PRELOAD": "libother.so"}
    assert tcmalloc.preload_environment(environ) == environ
    monkeypatch.setenv(tcmalloc.ENV_SWITCH, "/opt/libtcmalloc.so")
    assert tcmalloc.library() == "/opt/libtcmalloc.so"
    preloaded = tcmalloc.preload_environment(environ)
    assert preloaded["LD_PRELOAD"] == "/opt/libtcmalloc.so libother.so"
    assert tcmalloc.preload_environment(preloaded)["LD_PRELOAD"] == preloaded["LD_PRELOAD"]


def test_is_loaded_reads_this_process_maps():
    with open("/proc/self/maps") as maps:
        assert tcmalloc.is_loaded() == ("libtcmalloc" in maps.read())


@once
@installed
def test_relaunch_restarts_the_script_under_tcmalloc_with_its_arguments(tmp_path):
    assert run_script(tmp_path) == "loaded ['a', 'b c']"


@once
def test_relaunch_can_be_switched_off(tmp_path):
    assert run_script(tmp_path, KLORA_TCMALLOC="0") == "not loaded ['a', 'b c']"


@once
def test_a_library_that_fails_to_load_is_tried_once(tmp_path):
    # The loader ignores a missing LD_PRELOAD entry; the script must not relaunch again.
    missing = str(tmp_path / "libtcmalloc_missing.so")
    assert run_script(tmp_path, KLORA_TCMALLOC=missing) == "not loaded ['a', 'b c']"
