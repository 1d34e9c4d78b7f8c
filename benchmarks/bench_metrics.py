"""Pixel metrics on a large test set: time and peak memory, ours against a one-sort baseline.

    python benchmarks/bench_metrics.py [--images 495] [--size 320] [--defect-share 0.5]

The test set is synthetic: ``--images`` maps of about ``--size`` x ``--size`` pixels (sizes
vary by +-25 %, as Magnetic Tile's do; its 495 test tiles hold 51 M pixels at the original
resolution), float32 scores with continuous values, and rectangular defect masks on
``--defect-share`` of the images. Baseline: what ``fractalad.metrics`` did before, and what an
exact ROC implementation usually does: concatenate every pixel, argsort the scores once, and
take cumulative true- and false-positive counts (with region weights for PRO) over the sorted
order. Ours: ``fractalad.metrics.pixel_metrics``. Both give the same pixel_AUROC, pixel_F1Max
and AUPRO (checked here); peak memory is traced numpy memory (``tracemalloc``) beyond the maps
and masks themselves, in bytes per pixel. Prints one final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc

import numpy as np
from skimage.measure import label

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fractalad.metrics import pixel_metrics  # noqa: E402


def baseline_pixel_metrics(maps, masks, fpr_limit=0.3) -> dict:
    """Exact metrics from one descending argsort of every pixel (the former implementation)."""
    s = np.concatenate([m.ravel() for m in maps]).astype(np.float32)
    y = np.concatenate([g.ravel() for g in masks]).astype(bool)
    weights, n_regions = [], 0
    for g in masks:
        lab, n = label(g, connectivity=2, return_num=True)
        w = np.zeros(n + 1)
        if n:
            w[1:] = 1.0 / np.bincount(lab.ravel())[1:]
        weights.append(w[lab].ravel())
        n_regions += n
    order = np.argsort(-s)
    s_sorted, y_sorted = s[order], y[order]
    ends = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp, fp = np.cumsum(y_sorted)[ends], np.cumsum(~y_sorted)[ends]
    pro_w = np.cumsum(np.concatenate(weights)[order])[ends]
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    fpr, tpr = np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) * 0.5))
    f1 = (2 * tp / (tp + fp + n_pos)).max()
    pro = np.r_[0.0, pro_w / n_regions]
    j = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, yy = fpr[:j], pro[:j]
    if j < len(fpr) and x[-1] < fpr_limit:
        t = (fpr_limit - fpr[j - 1]) / max(fpr[j] - fpr[j - 1], 1e-12)
        x, yy = np.r_[x, fpr_limit], np.r_[yy, pro[j - 1] + t * (pro[j] - pro[j - 1])]
    return {"pixel_AUROC": auc, "pixel_F1Max": float(f1),
            "AUPRO": float(np.sum(np.diff(x) * (yy[1:] + yy[:-1]) * 0.5)) / fpr_limit}


def synthetic_test_set(n: int, size: int, defect_share: float, seed: int):
    """Maps and masks of varying sizes; defect pixels score higher on average."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(n):
        h, w = (int(size * f) for f in rng.uniform(0.75, 1.25, 2))
        g = np.zeros((h, w), bool)
        if rng.random() < defect_share:
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, h), rng.integers(0, w)
                g[y:y + rng.integers(2, h // 4), x:x + rng.integers(2, w // 4)] = True
        m = rng.random((h, w), dtype=np.float32) * 0.8
        m[g] += rng.random(int(g.sum()), dtype=np.float32) * 0.5
        maps.append(m)
        masks.append(g)
    return maps, masks


def measure(fn, maps, masks, repeats: int):
    """(result, best seconds, peak traced bytes)."""
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn(maps, masks)
        seconds.append(time.perf_counter() - t0)
    tracemalloc.start()
    fn(maps, masks)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, min(seconds), peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=495)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--defect-share", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    maps, masks = synthetic_test_set(args.images, args.size, args.defect_share, args.seed)
    pixels = sum(m.size for m in maps)
    ours, t_ours, mem_ours = measure(pixel_metrics, maps, masks, args.repeats)
    base, t_base, mem_base = measure(baseline_pixel_metrics, maps, masks, args.repeats)
    diff = max(abs(ours[k] - base[k]) for k in base)
    print(f"{pixels / 1e6:.1f} M pixels: ours {t_ours:.2f} s, {mem_ours / pixels:.1f} B/px; "
          f"baseline {t_base:.2f} s, {mem_base / pixels:.1f} B/px; largest metric difference {diff:.1e}",
          file=sys.stderr)
    print(json.dumps({
        "pixels": pixels, "images": args.images,
        "seconds": round(t_ours, 3), "baseline_seconds": round(t_base, 3),
        "speedup": round(t_base / t_ours, 2),
        "peak_bytes_per_pixel": round(mem_ours / pixels, 2),
        "baseline_peak_bytes_per_pixel": round(mem_base / pixels, 2),
        "memory_ratio": round(mem_base / mem_ours, 2),
        "max_metric_difference": diff,
        "metrics": {k: round(v, 6) for k, v in ours.items()},
    }))


if __name__ == "__main__":
    main()
