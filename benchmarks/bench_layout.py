"""Channels-last against NCHW: the training step and the inference maps, in one run.

    python benchmarks/bench_layout.py --backbone efficientnet_lite0 --size 128 --batch-size 16

Random weights, random images (timing only); the two layouts share the same weights, and the
run reports how far their maps differ. Rounds alternate the layouts (this machine's speed
drifts); each figure is the median over rounds. Prints one final JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from benchmarks.bench_loader import sync_device  # noqa: E402
from fractalad.model import FractalAD  # noqa: E402
from fractalad.train import pick_device  # noqa: E402

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _timed(fn, steps, device) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls (after one untimed call)."""
    fn()
    sync_device(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync_device(device)
    return (time.perf_counter() - t) / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--kd", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5, help="timed calls per round and layout")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(0)
    base = FractalAD(args.backbone, args.kd, pretrained=False).to(device)
    b, s = args.batch_size, args.size
    normal, anomalous = torch.rand(2, b, 3, s, s, device=device)
    mask = (torch.rand(b, 1, s, s, device=device) > 0.95).float()
    models, steps, infers = {}, {}, {}
    for name, fmt in LAYOUTS.items():
        model = copy.deepcopy(base).to(memory_format=fmt).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        x_n, x_a = normal.contiguous(memory_format=fmt), anomalous.contiguous(memory_format=fmt)

        def step(model=model, opt=opt, x_n=x_n, x_a=x_a):
            opt.zero_grad(set_to_none=True)
            model(x_a, x_n, mask)[0].backward()
            opt.step()

        def infer(model=model, x_a=x_a):
            with torch.no_grad():
                return model.anomaly_map(x_a)

        models[name], steps[name], infers[name] = model, step, infer
    train_s = {name: [] for name in LAYOUTS}
    infer_s = {name: [] for name in LAYOUTS}
    for _ in range(args.rounds):
        for name in LAYOUTS:
            train_s[name].append(_timed(steps[name], args.steps, device))
            models[name].eval()
            infer_s[name].append(_timed(infers[name], args.steps, device))
            models[name].train()
    # the same weights in both layouts give the same maps up to rounding
    check = copy.deepcopy(base).eval()
    with torch.no_grad():
        ref = check.anomaly_map(anomalous)
        other = check.to(memory_format=torch.channels_last).anomaly_map(
            anomalous.contiguous(memory_format=torch.channels_last))
    per_s = {f"{kind}_samples_per_s": {name: round(b / statistics.median(t[name]), 2) for name in LAYOUTS}
             for kind, t in (("train", train_s), ("infer", infer_s))}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "backbone": args.backbone, "size": s, "batch_size": b, "kd": args.kd, "rounds": args.rounds,
        **per_s,
        "train_speedup": round(per_s["train_samples_per_s"]["channels_last"] / per_s["train_samples_per_s"]["nchw"], 3),
        "infer_speedup": round(per_s["infer_samples_per_s"]["channels_last"] / per_s["infer_samples_per_s"]["nchw"], 3),
        "map_max_abs_diff": float((ref - other).abs().max()),
    }
    print(json.dumps(result))  # the benchmark's one final JSON line
    return result


if __name__ == "__main__":
    main()
