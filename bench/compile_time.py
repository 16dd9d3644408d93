"""Compile time of a sentiment run, first and again with JAX's persistent compilation cache.

Not a test. Runs `recipes/sentiment.py train` on all-MiniLM-L6-v2 three times in fresh
processes with one fresh `--compile-cache` folder: a first run (empty cache), the same
command with `--restart` (a rerun: every shape again, read from the cache), and the
same command with `--compile-cache none` (a rerun without the cache). Prints each
run's `compile_seconds_this_run` (JAX's tracing, lowering and compiling, or reading
the cache) and training time. Data: the first `--rows` rows of SST-2's training file
in ../shared/data (validation: the next `--rows // 5`), read in place.

    python bench/compile_time.py --rows 3000
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("KLORA_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="klora-compile-")
    with open(os.path.join(DATA, "sst2", "train.tsv"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    header, rows = lines[0], lines[1:]
    files = {"train": rows[:args.rows], "valid": rows[args.rows:args.rows + args.rows // 5]}
    for name, part in files.items():
        with open(os.path.join(work, f"{name}.tsv"), "w", encoding="utf-8") as f:
            f.write("\n".join([header, *part]) + "\n")
    command = [sys.executable, os.path.join(ROOT, "recipes", "sentiment.py"), "train",
               "--preset", "minilm", "--data", os.path.join(work, "train.tsv"),
               "--validation-data", os.path.join(work, "valid.tsv"), "--text-column",
               "sentence", "--label-column", "label", "--epochs", "1",
               "--output-dir", os.path.join(work, "run")]
    cache = os.path.join(work, "cache")
    results = {}
    for label, extra in (("first run, empty cache", ["--compile-cache", cache]),
                         ("rerun, cache", ["--compile-cache", cache, "--restart"]),
                         ("rerun, no cache", ["--compile-cache", "none", "--restart"])):
        process = subprocess.run(command + extra, capture_output=True, text=True,
                                 env={**os.environ, "CI": "1"})
        if process.returncode:
            sys.exit(f"{' '.join(command + extra)} failed:\n{process.stderr[-3000:]}")
        with open(os.path.join(work, "run", "metrics.json")) as f:
            metrics = json.load(f)
        results[label] = {"compile_s": metrics["compile_seconds_this_run"],
                          "train_s": metrics["train_seconds_this_run"]}
        print(f"{label}: compile {results[label]['compile_s']:.1f} s of "
              f"{results[label]['train_s']:.1f} s training", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": args.rows, "command": " ".join(command[1:]), "runs": results},
                      f, indent=1)


if __name__ == "__main__":
    main()
