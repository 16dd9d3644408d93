"""Run the test suite once per Keras backend and print each backend's result.

Backends cannot be switched inside one process, so each gets its own pytest run,
under tcmalloc when it is installed (see klora.speed.tcmalloc: faster XLA CPU steps).

    python tests/run_backends.py                 # jax, tensorflow, torch
    python tests/run_backends.py -k apply        # extra arguments go to pytest
    KLORA_BACKENDS=jax python tests/run_backends.py
"""

import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from klora.speed.tcmalloc import preload_environment  # noqa: E402

BACKENDS = os.environ.get("KLORA_BACKENDS", "jax tensorflow torch").split()
COUNTED = ("passed", "failed", "errors", "skipped")


def run(backend, pytest_args):
    print(f"===== KERAS_BACKEND={backend} =====", flush=True)
    env = {**preload_environment(), "KERAS_BACKEND": backend}
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", *pytest_args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    last = ""
    for line in process.stdout:
        print(line, end="", flush=True)
        if line.strip():
            last = line
    counts = {k: 0 for k in COUNTED}
    for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", last):
        counts["errors" if word.startswith("error") else word] += int(number)
    return process.wait(), counts


def main():
    results = {backend: run(backend, sys.argv[1:]) for backend in BACKENDS}
    print("===== summary =====")
    total = {k: 0 for k in COUNTED}
    for backend, (code, counts) in results.items():
        print(f"{backend:>10}: " + ", ".join(f"{counts[k]} {k}" for k in COUNTED)
              + ("" if code == 0 else f"  (pytest exit {code})"))
        for k in COUNTED:
            total[k] += counts[k]
    failed = total["failed"] + total["errors"]
    print(f"total: {total['passed']} passed, {failed} failed, {total['skipped']} skipped")
    return 0 if all(code == 0 for code, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
