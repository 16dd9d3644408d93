"""Run a training script under tcmalloc, so XLA CPU steps stop page-faulting.

XLA's CPU runtime allocates the temporary buffers of each step in one block
(1.7 GB for an all-MiniLM-L6-v2 training step at batch 32 x 128) and frees it
when the step ends. glibc's malloc serves a block that large with a fresh
`mmap` and returns it with `munmap`, so every step the kernel maps and
zero-fills ~440,000 pages again: on this project's 2-core CPU that was a
quarter of the step's CPU time. tcmalloc keeps freed blocks for reuse (the
same step then takes no page faults, and resident memory stays flat), which is
why TensorFlow and PyTorch recommend it for CPU training. Inside a running
process, `klora.speed.keep_freed_memory()` gets glibc to reuse the block (one
arena, no `mmap`, freed memory kept), at a cost in resident memory: the heap
fragments and keeps a second step's worth of buffers. tcmalloc can do that too: when
something else was placed in the freed block before the next step asks for it,
the process keeps a second block from then on (seen in some processes at batch
32 x 384: peak RSS 17 instead of 9.3 GiB; `bench/results/remat.md`).

A memory allocator has to be chosen before the process starts (`LD_PRELOAD`),
so the recipes and benchmarks call `relaunch_under_tcmalloc()` first thing: if
tcmalloc is installed (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`)
and not yet loaded, the script restarts itself with it preloaded. Set
`KLORA_TCMALLOC=0` to stay on the system allocator, or to the path of a
tcmalloc library to use that one. For your own scripts:

    LD_PRELOAD=libtcmalloc_minimal.so.4 python train.py

>>> from klora import tcmalloc
>>> tcmalloc.relaunch_under_tcmalloc()   # at the top of a script's main
"""

import ctypes.util
import os
import platform
import sys

ENV_SWITCH = "KLORA_TCMALLOC"
LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
# tcmalloc reports every allocation over 1 GB to stderr by default; an XLA step's
# temporary block is one.
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**62)}


def library():
    """The tcmalloc library to preload (a path or a soname), or `None`."""
    choice = os.environ.get(ENV_SWITCH, "")
    if choice == "0" or platform.system() != "Linux":
        return None
    if choice:
        return choice
    return next(filter(None, map(ctypes.util.find_library, LIBRARIES)), None)


def is_loaded():
    """Whether this process allocates with tcmalloc."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libtcmalloc" in line for line in maps)
    except OSError:
        return False


def allocator():
    """`"tcmalloc"` or `"system malloc"`: what this process allocates with (for reports)."""
    return "tcmalloc" if is_loaded() else "system malloc"


def preload_environment(environ=None):
    """`environ` (default: this process's) with tcmalloc added to `LD_PRELOAD`,
    for starting child processes; unchanged when there is no tcmalloc."""
    environ = dict(os.environ if environ is None else environ)
    path = library()
    if path is None:
        return environ
    preload = environ.get("LD_PRELOAD", "")
    if "libtcmalloc" not in preload:
        environ["LD_PRELOAD"] = f"{path} {preload}".strip()
    return {**QUIET, **environ}


def relaunch_under_tcmalloc():
    """Restarts the running script under tcmalloc when it is installed and not loaded.

    Call it at the start of a script, before it does any work: the process is
    replaced (`os.execve`) by the same command line with tcmalloc preloaded.
    Returns (doing nothing) when tcmalloc is loaded already, not installed,
    disabled with `KLORA_TCMALLOC=0`, or failed to load in a relaunched process.
    """
    if is_loaded() or library() is None or os.environ.get("KLORA_TCMALLOC_RELAUNCHED"):
        return
    environ = {**preload_environment(), "KLORA_TCMALLOC_RELAUNCHED": "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)
