"""`klora.speed.keep_freed_memory`: a freed large block is reused without page faults."""

import os
import platform
import subprocess
import sys

import pytest

# Page faults of the second of two 256 MiB malloc / fill / free rounds (from any thread).
PROGRAM = """
import ctypes, ctypes.util, resource, sys, threading
from klora.speed import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
size, faults = 256 * 2 ** 20, []
def round_trip():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(ctypes.c_void_p(block))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
for _ in range(2):  # on a worker thread, as XLA's steps run
    worker = threading.Thread(target=round_trip)
    worker.start()
    worker.join()
print(faults[-1])
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt")
def test_second_large_block_reuses_pages():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True,
                             text=True, check=True, env={**os.environ, "LD_PRELOAD": ""},
                             cwd=os.path.dirname(os.path.dirname(__file__)))
        return int(out.stdout.split()[-1])

    pages = 256 * 2 ** 20 // os.sysconf("SC_PAGE_SIZE")
    assert faults("system") > pages // 2  # glibc maps the block afresh every time
    assert faults("keep") < pages // 100
