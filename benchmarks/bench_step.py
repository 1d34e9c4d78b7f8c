"""Distillation step: the student's anomalous pass without a graph vs one joint pass with backward.

    python benchmarks/bench_step.py --backbone efficientnet_lite0 --size 256 --batch-size 32 --device cuda

FractalAD's ``training_losses`` runs the student on the normal images with gradients and on
the anomalous ones under ``no_grad`` (CSAM detaches them anyway). The baseline, restated here,
is the earlier joint pass: the student on normal + anomalous concatenated, backward over both
halves. Both time forward, backward and AdamW on one resident random batch (random weights),
in interleaved rounds; the median round counts. Prints one final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from fractalad.model import FractalAD, distillation_loss, segmentation_loss  # noqa: E402
from fractalad.train import pick_device  # noqa: E402


def joint_losses(model: FractalAD, normal, anomalous, mask):
    """The baseline: one student pass over both halves, so backward also runs over both."""
    b = normal.shape[0]
    both = torch.cat([normal, anomalous], dim=0)
    with torch.no_grad():
        t = model.teacher(both)
    s = model.student(both)
    kd = distillation_loss([f[:b] for f in t], [f[:b] for f in s])
    feats = model.head_features([f[b:] for f in t], [f[b:] for f in s])
    logits = model.head(feats, anomalous.shape[-2:])
    return kd + segmentation_loss(logits.float(), mask)


def split_losses(model: FractalAD, normal, anomalous, mask):
    return model.training_losses(normal, anomalous, mask)[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=10, help="steps per round and variant")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    args = ap.parse_args(argv)

    dev = pick_device(args.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    model = FractalAD(args.backbone, kd=True, pretrained=False).to(dev).train()
    if cuda:
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                            fused=cuda or None)
    shape = (args.batch_size, 3, args.size, args.size)
    normal, anomalous = torch.rand(shape, device=dev), torch.rand(shape, device=dev)
    if cuda:
        normal = normal.contiguous(memory_format=torch.channels_last)
        anomalous = anomalous.contiguous(memory_format=torch.channels_last)
    mask = (torch.rand(args.batch_size, 1, args.size, args.size, device=dev) > 0.9).float()

    def run(losses, steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda and not args.fp32):
                loss = losses(model, normal, anomalous, mask)
            loss.backward()
            opt.step()
        if cuda:
            torch.cuda.synchronize()
        return args.batch_size * steps / (time.perf_counter() - t)

    variants = {"split": split_losses, "joint": joint_losses}
    for f in variants.values():  # warm-up (cuDNN autotuning, allocator)
        run(f, 2)
    speeds = {k: [] for k in variants}
    for r in range(args.rounds):
        for k in (("split", "joint") if r % 2 == 0 else ("joint", "split")):
            speeds[k].append(run(variants[k], args.steps))
    split, joint = (statistics.median(speeds[k]) for k in ("split", "joint"))
    result = {
        "device": torch.cuda.get_device_name(dev) if cuda else f"cpu x{torch.get_num_threads()}",
        "backbone": args.backbone, "size": args.size, "batch_size": args.batch_size,
        "bf16": cuda and not args.fp32, "steps": args.steps, "rounds": args.rounds,
        "split_samples_per_s": round(split, 1), "joint_samples_per_s": round(joint, 1),
        "speedup": round(split / joint, 3),
    }
    print(json.dumps(result))  # the benchmark's one final JSON line
    return result


if __name__ == "__main__":
    main()
