"""XLA CPU steps without page faults on the system allocator: `keep_freed_memory()`.

Each XLA CPU step allocates its temporaries as one block (1.8 GB for all-MiniLM-L6-v2
at batch 32 x 128) and frees it when the step ends. glibc's `malloc` serves a block
that large from a fresh `mmap` and unmaps it on `free`, so every step touches every
page anew: about half a million page faults per step, a quarter of a 2-core step.
tcmalloc keeps freed memory, but only reaches a process through `LD_PRELOAD` at its
start. `keep_freed_memory()` gets the same reuse from glibc in the running process
(`mallopt`): every thread allocates from the main heap, large blocks come from it
too, and up to 2 GiB of freed memory stays at its top, so the next step's block
lands on pages that are already there.

Call it first thing in a script, before JAX starts its threads (before the first
array is made): threads that have allocated keep their own heaps. The cost is
memory: what the process freed (up to 2 GiB at the heap's top) stays resident, so
peak RSS rises (MiniLM, batch 32 x 128: 3.2 -> 4.8 GiB); blocks above 2 GiB (e.g. batch
32 x 384) still go back to the system. It does nothing where the C library is not glibc.

>>> import klora
>>> klora.speed.keep_freed_memory()   # then build and train as usual
"""

import ctypes
import ctypes.util
import platform

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
KEEP_BYTES = 2 ** 31 - 1  # mallopt takes an int: the most freed memory it can keep


def keep_freed_memory():
    """Makes glibc keep and reuse freed memory; returns whether it applied (glibc only)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_BYTES))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
