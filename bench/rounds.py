"""Alternating rounds of benchmark processes, and their medians and spreads.

A throughput benchmark runs each method (klora, PEFT, ...) in a fresh process,
alternating them round after round, so machine drift hits every side alike;
each round's klora / peer ratio pairs runs that ran back to back.

>>> rounds = alternate(["klora", "peft"], 3, lambda method: run_one(method))
>>> figures = summarize(rounds, ["examples_per_s"], pair=("klora", "peft"))
>>> print(table(figures, [("examples/s", "examples_per_s", "{:.1f}")]))
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile


def spread(values):
    """`(median, min, max)` of the numbers in `values` (`None` if there are none)."""
    values = [v for v in values if v is not None]
    return (statistics.median(values), min(values), max(values)) if values else None


def alternate(methods, rounds, run):
    """`{method: [result of run(method) per round]}`, the first of each round swapping."""
    results = {m: [] for m in methods}
    for i in range(rounds):
        for method in methods if i % 2 == 0 else methods[::-1]:
            results[method].append(run(method))
    return results


def run_script(script, args):
    """The JSON that `python script *args --json FILE` writes, run in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="klora-bench-round-") as folder:
        out = os.path.join(folder, "result.json")
        subprocess.run([sys.executable, os.path.abspath(script), *args, "--json", out],
                       check=True)
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def summarize(rounds, keys, pair=("klora", "peft"), ratio_keys=()):
    """Per method and key the `spread` over rounds; with both methods of `pair`, a
    `"klora / PEFT"` entry holding the spread of each round's ratio for `ratio_keys`."""
    figures = {m: {key: spread([r.get(key) for r in runs]) for key in keys}
               for m, runs in rounds.items()}
    if set(pair) <= set(rounds):
        mine, peer = (rounds[m] for m in pair)
        figures["klora / PEFT"] = {
            key: spread([a[key] / b[key] for a, b in zip(mine, peer) if a.get(key) and b.get(key)])
            for key in ratio_keys}
    return figures


def table(figures, rows):
    """A Markdown table: a row per `(label, key, format)`, a column per method, cells
    `median (min-max)`; ratios in bold."""
    methods = list(figures)
    lines = ["| | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for label, key, form in rows:
        cells = []
        for method in methods:
            value = figures[method].get(key)
            ratio = method == "klora / PEFT"
            if value is None:
                cells.append("")
                continue
            median, low, high = (("{:.2f}" if ratio else form).format(v) for v in value)
            cell = median if low == high else f"{median} ({low}-{high})"
            cells.append(f"**{cell}**" if ratio else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_name():
    """The CPU model, as /proc/cpuinfo names it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def versions(names=("keras", "keras-hub", "jax", "tensorflow", "torch", "transformers", "peft",
                    "accelerate")):
    """`{package: version}` of the installed ones among `names`."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
