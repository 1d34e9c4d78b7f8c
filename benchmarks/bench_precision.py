"""The training step in bf16 autocast against float32: speed, and whether the losses agree.

    python benchmarks/bench_precision.py --size 128 --device cpu

Two trainers start from the same weights (the Lite0 teacher's ImageNet checkpoint, the student
and head from the seed) and take the same --steps device-resident batches of real shards, one
as ``fit --precision fp32`` trains and one as ``fit --precision bf16`` does (bf16 autocast
where the device computes it natively: CUDA, CPUs with AVX512-BF16 or AMX). The modes
alternate for --rounds rounds, so a machine that slows down part-way slows both. Prints one
final JSON line: samples/s of each, their ratio, and each mode's mean loss over the last round.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from benchmarks.bench_fit import DEFAULT_NORMALS  # noqa: E402
from benchmarks.bench_loader import remove_temporary, sync_device, temporary_shards  # noqa: E402
from fractalad.choices import PRECISIONS  # noqa: E402
from fractalad.train import FitConfig, Trainer, native_bf16  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per mode and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=4, help="distinct resident batches, cycled")
    ap.add_argument("--kd", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--normals", default=DEFAULT_NORMALS)
    args = ap.parse_args(argv)

    shards, tmp, _ = temporary_shards(args.normals, args.batch_size * args.batches, args.size,
                                      "bench_precision_")
    # pretrained only where the weights ship offline (the default teacher)
    pretrained = args.backbone == "efficientnet_lite0"
    trainers = {}
    for mode, precision in (("float32", "fp32"), ("bf16", "bf16")):
        cfg = FitConfig(backbone=args.backbone, pretrained=pretrained, kd=args.kd,
                        batch_size=args.batch_size, device=args.device, workers=0,
                        **PRECISIONS[precision], steps=args.rounds * args.steps + 2)
        trainers[mode] = Trainer(shards, cfg)
    tr = trainers["float32"]
    dev = tr.device
    resident = [tr.to_inputs(b) for b in tr.batches_from(0, args.batches, 0)]
    seconds = {mode: 0.0 for mode in trainers}
    losses = {mode: [] for mode in trainers}
    for mode, t in trainers.items():  # warm-up: kernels chosen, allocator primed
        t._step_fn(*resident[0])
    sync_device(dev)
    for _ in range(args.rounds):
        for mode, t in trainers.items():
            losses[mode] = []
            start = time.perf_counter()
            for i in range(args.steps):
                losses[mode].append(t._step_fn(*resident[i % args.batches])[0])
            sync_device(dev)
            seconds[mode] += time.perf_counter() - start
    sps = {mode: args.rounds * args.steps * args.batch_size / s for mode, s in seconds.items()}
    mean_loss = {mode: float(torch.stack(v).float().mean()) for mode, v in losses.items()}
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "backbone": args.backbone, "pretrained": pretrained, "kd": args.kd, "size": args.size,
        "batch_size": args.batch_size, "native_bf16": native_bf16(dev),
        "bf16_autocast": trainers["bf16"].bf16, "steps": args.rounds * args.steps,
        "float32_samples_per_s": round(sps["float32"], 1), "bf16_samples_per_s": round(sps["bf16"], 1),
        "speedup": round(sps["bf16"] / sps["float32"], 3),
        "float32_last_round_loss": round(mean_loss["float32"], 4),
        "bf16_last_round_loss": round(mean_loss["bf16"], 4),
    }
    remove_temporary(tmp)
    print(json.dumps(result))  # the benchmark's one final JSON line
    return result


if __name__ == "__main__":
    main()
