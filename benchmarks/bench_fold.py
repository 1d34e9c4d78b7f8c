"""Test-time maps with batch norms folded into their convs against the model as trained.

    python benchmarks/bench_fold.py --size 256 --batch-size 32 [--map head|combined]

``load_run`` (so ``test``, ``predict``, ``calibrate`` and ``export``) folds every eval-mode
batch norm into the conv before it (``FractalAD.fold_batchnorm``). Both models here share one
set of weights: the ImageNet Lite0 teacher, and a random student and head whose batch-norm
statistics were gathered on the normal images (so each fold moves real numbers). Both run
``anomaly_maps`` on the same real normal images, prepared as ``test`` prepares them, with
memory held as ``load_run`` holds it; rounds alternate the two (this machine's speed drifts),
and each figure is the median over rounds. Prints one final JSON line: images/s of each, the
speed-up and how far their maps differ.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_fit import DEFAULT_NORMALS  # noqa: E402
from fractalad.evaluate import anomaly_maps, fit_map_norm, preprocess  # noqa: E402
from fractalad.model import FractalAD  # noqa: E402
from fractalad.train import hold_freed_memory, pick_device  # noqa: E402
from fractalsynth.images import list_images  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=96, help="normal images mapped per round and model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--map", choices=("head", "combined"), default="head")
    ap.add_argument("--kd", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--normals", default=DEFAULT_NORMALS)
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cpu":
        hold_freed_memory()  # as load_run does
    paths = list_images(args.normals)
    images = preprocess(paths[:args.images], args.size, 1)
    images = np.ascontiguousarray(np.resize(images, (args.images, *images.shape[1:])))
    torch.manual_seed(0)
    model = FractalAD("efficientnet_lite0", args.kd)
    with torch.no_grad():  # batch-norm statistics of the normals, as training would leave them
        model.train()
        for b in range(0, len(images), args.batch_size):
            model(torch.from_numpy(images[b:b + args.batch_size]).float() / 255)
    model = model.eval().to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)  # as load_run does
    models = {"batchnorm": model, "folded": copy.deepcopy(model).fold_batchnorm()}
    norms = {name: fit_map_norm(m, images, args.batch_size) if args.map == "combined" else None
             for name, m in models.items()}
    maps, seconds = {}, {name: [] for name in models}
    for name, m in models.items():  # warm-up: kernels chosen, the heap grown to its peak
        anomaly_maps(m, images[:args.batch_size], args.batch_size, norm=norms[name])
    for _ in range(args.rounds):
        for name, m in models.items():
            start = time.perf_counter()
            maps[name] = anomaly_maps(m, images, args.batch_size, norm=norms[name])[0]
            seconds[name].append(time.perf_counter() - start)
    ips = {name: round(args.images / statistics.median(s), 2) for name, s in seconds.items()}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "size": args.size, "batch_size": args.batch_size, "images": args.images, "kd": args.kd,
        "map": args.map, "rounds": args.rounds, "images_per_s": ips,
        "speedup": round(ips["folded"] / ips["batchnorm"], 3),
        "map_max_abs_diff": float(np.abs(maps["folded"] - maps["batchnorm"]).max()),
    }
    print(json.dumps(result))  # the benchmark's one final JSON line
    return result


if __name__ == "__main__":
    main()
