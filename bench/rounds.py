"""Alternating rounds of benchmark processes, and their medians and spreads.

A throughput benchmark runs each method (klora, PEFT, ...) in a fresh process,
alternating them round after round, so machine drift hits every side alike;
each round's klora / peer ratio pairs runs that ran back to back.

>>> rounds = measure(__file__, ["klora", "peft"], 3, ["--seed", "1"], run_here)
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


def check_methods(methods, rounds, known=("klora", "peft")):
    """Exits with a message when `methods` names an unknown one or `rounds` < 1."""
    unknown = set(methods) - set(known)
    if unknown or rounds < 1:
        sys.exit(f"unknown method(s) {sorted(unknown)}; use {' and/or '.join(known)}" if unknown
                 else "--rounds must be at least 1")


def measure(script, methods, rounds, common, run_here):
    """`{method: [result per round]}`: `run_here(method)` in this process when one round of
    one method is asked for, else `script --methods M --rounds 1 *common` in fresh processes,
    alternating (`alternate`)."""
    if rounds == 1 and len(methods) == 1:
        run = run_here(methods[0])
        print(f"{methods[0]}: {json.dumps(run)}", flush=True)
        return {methods[0]: [run]}
    return alternate(methods, rounds, lambda method: run_script(
        script, ["--methods", method, "--rounds", "1", *common])["rounds"][method][0])


def machine_record():
    """What ran the benchmark, for its JSON: CPUs, load average, machine, allocator, versions.
    Warns when the load average says other processes share the cores."""
    from klora.speed.tcmalloc import allocator

    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs; other processes skew "
              "the timings (torch's OpenMP threads slow down many-fold on busy cores)")
    return {"cpus": os.cpu_count(), "load_average_at_start": load,
            "machine": platform.platform(), "processor": cpu_name(), "allocator": allocator(),
            "versions": versions()}


def write_json(path, record):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    print(f"\nwritten to {path}")


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
