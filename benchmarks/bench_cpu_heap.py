"""CPU training steps or test-time maps with glibc's default malloc against ``hold_freed_memory``.

    python benchmarks/bench_cpu_heap.py --size 256 --batch-size 32 [--stage fit|maps]

glibc returns every freed block over 32 MB to the kernel, so a step whose activations are that
large page-faults them in again each time. ``fractalad.train.hold_freed_memory`` (what ``fit``
and, through ``load_run``, ``test`` / ``predict`` / ``calibrate`` do on the CPU) makes it keep
them. ``--stage fit`` times training steps; ``--stage maps`` times ``anomaly_maps`` (what
``test`` spends its time in) on the shards' normal images. Each mode runs in its own process
(the setting can not be undone), the modes alternating for --rounds rounds on the same real
shards, seed and weights. Prints one final JSON line: samples/s, minor page faults per step
and peak resident memory of each mode, the speed-up, and each mode's last loss or map sum
(they must agree).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.bench_fit import DEFAULT_NORMALS  # noqa: E402
from benchmarks.bench_loader import remove_temporary, temporary_shards  # noqa: E402

MODES = ("default", "held")


def timed(work) -> tuple[float, int, float]:
    """(seconds, minor page faults, result) of ``work()``."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, result


def time_maps(args) -> tuple[float, int, float]:
    """``timed`` ``args.steps`` batches of test-time maps (result: the maps' sum) in this process."""
    import numpy as np
    import torch

    from fractalad.evaluate import anomaly_maps
    from fractalad.model import FractalAD
    from fractalsynth.shards import load_normals
    torch.manual_seed(0)
    model = FractalAD("efficientnet_lite0", args.kd).eval().to(memory_format=torch.channels_last)
    normals = load_normals(args.shards)[0].transpose(0, 3, 1, 2)
    images = np.ascontiguousarray(np.resize(normals, (args.steps * args.batch_size, *normals.shape[1:])))
    anomaly_maps(model, images[:args.batch_size], args.batch_size)  # warm-up, as for fit
    return timed(lambda: float(anomaly_maps(model, images, args.batch_size)[0].astype(np.float64).sum()))


def time_steps(args) -> tuple[float, int, float]:
    """``timed`` ``args.steps`` training steps (result: the last loss) in this process."""
    from fractalad.train import FitConfig, Trainer
    cfg = FitConfig(kd=args.kd, batch_size=args.batch_size, device="cpu", workers=0,
                    bf16=False, hold_memory=False, steps=args.steps + 2)
    tr = Trainer(args.shards, cfg)
    resident = [tr.to_inputs(b) for b in tr.batches_from(0, args.batches, 0)]
    tr._step_fn(*resident[0])  # warm-up: kernels chosen, the heap grown to its peak

    def steps():
        loss = None
        for i in range(args.steps):
            loss = tr._step_fn(*resident[i % args.batches])[0]
        return float(loss)
    return timed(steps)


def run_child(args) -> dict:
    """Time ``args.stage`` in this process, in ``args.child`` mode."""
    import torch

    from fractalad.train import hold_freed_memory
    held = hold_freed_memory() if args.child == "held" else False
    seconds, faults, result = (time_maps if args.stage == "maps" else time_steps)(args)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"held": held, "seconds": seconds, "faults": faults, "peak_rss_mb": peak_mb,
            "result": result, "threads": torch.get_num_threads()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--stage", choices=("fit", "maps"), default="fit")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (batches) per mode and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batches", type=int, default=2, help="distinct resident batches, cycled")
    ap.add_argument("--kd", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--normals", default=DEFAULT_NORMALS)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return None

    shards, tmp, _ = temporary_shards(args.normals, args.batch_size * args.batches, args.size,
                                      "bench_cpu_heap_")
    # the default mode must be glibc's own: no MALLOC_* tunables from the caller's shell
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    child = [sys.executable, os.path.abspath(__file__), "--child", "", "--shards", shards,
             "--batch-size", str(args.batch_size), "--steps", str(args.steps),
             "--batches", str(args.batches), "--stage", args.stage, "--kd" if args.kd else "--no-kd"]
    runs = {mode: [] for mode in MODES}
    try:
        for _ in range(args.rounds):
            for mode in MODES:
                child[3] = mode
                out = subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout
                runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    finally:
        remove_temporary(tmp)
    steps = args.rounds * args.steps
    sps = {m: steps * args.batch_size / sum(r["seconds"] for r in rs) for m, rs in runs.items()}
    result = {"stage": args.stage, "device": f"cpu x{runs['default'][0]['threads']}", "size": args.size,
              "batch_size": args.batch_size, "kd": args.kd, "steps": steps,
              "held": runs["held"][0]["held"], "speedup": round(sps["held"] / sps["default"], 3)}
    for mode, rs in runs.items():
        result[f"{mode}_samples_per_s"] = round(sps[mode], 2)
        result[f"{mode}_faults_per_step"] = round(sum(r["faults"] for r in rs) / steps)
        result[f"{mode}_peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in rs))
        result[f"{mode}_{'map_sum' if args.stage == 'maps' else 'last_loss'}"] = round(rs[-1]["result"], 4)
    print(json.dumps(result))  # the benchmark's one final JSON line
    return result


if __name__ == "__main__":
    main()
