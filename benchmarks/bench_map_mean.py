"""Several trained runs' maps averaged on one test set, against each run alone: one final JSON line.

    python benchmarks/bench_map_mean.py RUN_96 RUN_128            # combined maps, magnetic tile
    python benchmarks/bench_map_mean.py RUN_A RUN_B --map head --size 128

Every run's maps are resized to one grid (``--size``; default: the largest run's input size) and
scored there, alone and averaged (``fractalad.evaluate.test_map_mean``), so the deltas compare
like with like. Writes nothing into the runs. Default data:
../shared/data/magnetic_tile/magnetic_tile (MVTec layout).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "magnetic_tile",
                                             "magnetic_tile"))
HEADLINE = ("image_AUROC", "image_AUROC_mean", "pixel_AUROC", "AUPRO")


def _rounded(metrics: dict) -> dict:
    return {t: {k: round(v, 4) for k, v in m.items()} for t, m in metrics.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders made by fractalad fit")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--map", default="combined", choices=["combined", "head"],
                    help="which map of each run to average")
    ap.add_argument("--size", type=int, default=None,
                    help="the common grid (default: the largest run's input size)")
    ap.add_argument("--pixel-resolution", default="model", choices=["model", "original"],
                    help="score pixels on the grid or at each image's own size")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    import torch

    from fractalad.evaluate import test_map_mean

    t = time.perf_counter()
    try:
        report = test_map_mean(args.runs, args.data, args.device, args.batch_size, args.map,
                               args.pixel_resolution, args.size)
    except (ValueError, OSError) as e:  # RunError and ImageError are ValueErrors
        ap.error(str(e))
    members = report["members"]
    best = {k: max(m["metrics"]["all"][k] for m in members) for k in HEADLINE}
    result = {
        "data": os.path.basename(os.path.normpath(args.data)), "map": args.map,
        "grid": report["grid"], "pixel_resolution": args.pixel_resolution,
        "device": args.device, "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t, 1),
        "members": [{"run": m["run"], "size": m["size"],
                     "images_per_s": round(m["images_per_s"], 1),
                     "metrics": _rounded(m["metrics"])} for m in members],
        "metrics": _rounded(report["metrics"]),
        # above zero: the mean beats every run alone on that figure
        "mean_minus_best_member": {k: round(report["metrics"]["all"][k] - best[k], 4)
                                   for k in HEADLINE},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
