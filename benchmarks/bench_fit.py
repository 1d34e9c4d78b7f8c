"""Training throughput: the step fed from shards vs the identical step on a device-resident batch.

    python benchmarks/bench_fit.py --backbone resnet18 --batch-size 32 --device cuda

Random weights (timing only). Without --shards, a dataset of --samples samples is generated
from --normals first. Prints one final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from benchmarks.bench_loader import remove_temporary, sync_device, temporary_shards  # noqa: E402
from fractalad.choices import COMPILE_MODES  # noqa: E402
from fractalad.train import FitConfig, Trainer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_NORMALS = os.path.join(HERE, "..", "..", "shared", "data", "magnetic_tile", "magnetic_tile",
                               "train", "good")


def _write_profile(tr, resident, dev, path):
    """Where a resident step spends its time: the profiler's table of the 10 steps' top ops."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(10):
            tr._step_fn(*resident)
        sync_device(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--shards", default=None)
    ap.add_argument("--normals", default=DEFAULT_NORMALS)
    ap.add_argument("--samples", type=int, default=None, help="default: enough for warm-up + steps")
    ap.add_argument("--kd", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                    help="torch.compile's mode (with --compile); reduce-overhead adds CUDA graphs")
    ap.add_argument("--cuda-graph", action="store_true", help="capture the step as a CUDA graph")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--fp32", action="store_true",
                    help="no bf16 autocast (default: on CUDA, as fit --precision auto)")
    ap.add_argument("--profile", metavar="PATH", default=None,
                    help="also write the top kernels of 10 resident steps (torch.profiler table) to PATH")
    args = ap.parse_args(argv)

    shards, tmp, gen_seconds = args.shards, None, None
    if shards is None:
        n = args.samples or args.batch_size * (args.steps + args.warmup + 8)
        shards, tmp, gen_seconds = temporary_shards(args.normals, n, args.size, "bench_fit_")
    cfg = FitConfig(backbone=args.backbone, pretrained=False, kd=args.kd, batch_size=args.batch_size,
                    device=args.device, workers=args.workers, compile=args.compile,
                    compile_mode=args.compile_mode,
                    cuda_graph=args.cuda_graph,
                    channels_last=not args.no_channels_last, bf16=not args.fp32,
                    steps=args.steps + args.warmup)
    tr = Trainer(shards, cfg)
    dev = tr.device
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    batches = tr.batches_from(0, args.warmup + args.steps, args.workers)
    first = None
    for _ in range(args.warmup):
        b = next(batches)
        first = first or b
        tr.step(b)
    sync_device(dev)
    t = time.perf_counter()
    packed_bytes = 0
    for b in batches:
        packed_bytes += b["packed"].numel()
        tr.step(b)
    sync_device(dev)
    shard_sps = args.steps * args.batch_size / (time.perf_counter() - t)

    resident = tr.to_inputs(first)
    for _ in range(3):
        tr._step_fn(*resident)
    sync_device(dev)
    t = time.perf_counter()
    for _ in range(args.steps):
        tr._step_fn(*resident)
    sync_device(dev)
    resident_sps = args.steps * args.batch_size / (time.perf_counter() - t)
    if args.profile:
        _write_profile(tr, resident, dev, args.profile)
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "backbone": args.backbone, "batch_size": args.batch_size, "size": args.size, "kd": args.kd,
        "bf16": tr.bf16, "channels_last": cfg.channels_last,
        "compile": args.compile and args.compile_mode, "cuda_graph": args.cuda_graph, "workers": args.workers, "steps": args.steps,
        "shard_samples_per_s": round(shard_sps, 1), "resident_samples_per_s": round(resident_sps, 1),
        "ratio": round(shard_sps / resident_sps, 3),
        "host_to_device_bytes_per_sample": round(packed_bytes / (args.steps * args.batch_size)),
        "generate_seconds": gen_seconds,
    }
    remove_temporary(tmp)
    print(json.dumps(result))  # the benchmark's one final JSON line
    return result


if __name__ == "__main__":
    main()
