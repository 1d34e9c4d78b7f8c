"""Fractal masks per second: this engine vs a faithful baseline of the reference algorithm.

    python benchmarks/bench_ifs.py [--n 2000] [--size 256]

Baseline (what the FractalAD authors' IFS library does, restated with its cost structure): a
sigma-factor system sampled in numpy, a float64 chaos game in Numba with Numba's own
``np.random`` storing all 100k points (linear map search, the map's row unpacked and the point
checked for finiteness at every step), then a bounding-box render that paints the set cells of
a random 3x3 stamp around every point. Ours: ``ifs.make_masks``.
Both render the same number of masks at the same size, on one core and on all cores.

Weak masks, measured the same way on both outputs: set pixels < 5 % of their bounding box, or
line-like (sqrt of the minor/major eigenvalue ratio of the set pixels' coordinates < 0.05).
Coverage: share of the pixels a 2M-point render of the same system sets that the mask sets.
Prints one final JSON line.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import replace

import numpy as np
from numba import njit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numba  # noqa: E402

from fractalsynth import ifs  # noqa: E402

BASELINE_POINTS = 100_000


def baseline_sample(rng: np.random.Generator, n: int = 2) -> np.ndarray:
    """The reference's sigma-factor sampler, per system in numpy."""
    alpha = rng.uniform((5 + n) / 2, (6 + n) / 2)
    budget = alpha
    maps = np.zeros((n, 7))
    for i in range(n):
        left = n - i - 1
        c = budget if left == 0 else rng.uniform(max(0, budget - 3 * left), min(3, budget))
        budget -= c
        s1 = rng.uniform(max(c / 3, c - 2), min(1, c))
        s2 = (c - s1) / 2
        th, ph = rng.uniform(0, 2 * np.pi, 2)
        r1 = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        r2 = np.array([[np.cos(ph), -np.sin(ph)], [np.sin(ph), np.cos(ph)]])
        d = np.diag(rng.choice([-1, 1], 2))
        a = r1 @ np.diag([s1, s2]) @ r2 @ d
        maps[i, :4] = a.ravel()
        maps[i, 4:6] = rng.uniform(-1, 1, 2)
        maps[i, 6] = abs(np.linalg.det(a))
    maps[:, 6] /= maps[:, 6].sum()
    return maps


@njit(cache=True)
def baseline_seed(seed):
    np.random.seed(seed)  # seeding Numba's generator must happen inside jitted code


@njit(cache=True)
def baseline_chaos(maps, npts):
    """float64 chaos game storing every point, as the reference writes it: Numba's np.random,
    a linear search over cumulative probabilities, the chosen map's row unpacked per point and a
    finiteness check per point."""
    n = maps.shape[0]
    cum = np.cumsum(maps[:, 6])
    pts = np.empty((npts, 2))
    x, y = 0.0, 0.0
    for k in range(npts):
        r = np.random.random()
        i = 0
        for j in range(n):
            i = j
            if r < cum[j]:
                break
        a, b, c, d, e, f = maps[i, :6]
        xt = x
        x = a * xt + b * y + e
        y = c * xt + d * y + f
        pts[k] = x, y
        if not np.isfinite(x) or not np.isfinite(y):
            break
    return pts


@njit(cache=True)
def baseline_render(pts, size, offsets, x0, x1, y0, y1):
    """Scale points into the canvas by the box (x0..x1, y0..y1); paint the stamp's set offsets
    (a list of (dy, dx), as the reference stores its patch) around every point."""
    img = np.zeros((size, size), np.uint8)
    sx = (size - 1) / max(x1 - x0, 1e-12)
    sy = (size - 1) / max(y1 - y0, 1e-12)
    for k in range(pts.shape[0]):
        py = int((pts[k, 1] - y0) * sy)
        px = int((pts[k, 0] - x0) * sx)
        for j in range(offsets.shape[0]):
            yy = py + offsets[j, 0] - 1
            xx = px + offsets[j, 1] - 1
            if 0 <= yy < size and 0 <= xx < size:
                img[yy, xx] = 255
    return img


def baseline_mask(index: int, size: int, npts: int = BASELINE_POINTS, box=None):
    """One reference-style mask; returns (mask, maps, box) so a denser render can reuse the box."""
    rng = np.random.default_rng(index)
    maps = baseline_sample(rng)
    stamp = rng.random(9) < 0.5
    stamp[4] = True  # never an empty stamp (the reference can draw one)
    offsets = np.stack(np.divmod(np.flatnonzero(stamp), 3), 1)
    baseline_seed(index)
    pts = baseline_chaos(maps, npts)
    if box is None:
        box = (pts[:, 0].min(), pts[:, 0].max(), pts[:, 1].min(), pts[:, 1].max())
    return baseline_render(pts, size, offsets, *box), maps, box


def _baseline_chunk(args):
    lo, hi, size = args
    for i in range(lo, hi):
        baseline_mask(i, size)
    return hi - lo


def mask_is_weak(mask: np.ndarray) -> bool:
    """Fill of its box < 0.05, or line-like set pixels (axis ratio < 0.05)."""
    ys, xs = np.nonzero(mask)
    if ys.size < 3:
        return True
    if ifs.box_fill(mask) < 0.05:
        return True
    cov = np.cov(np.stack([xs, ys]).astype(np.float64))
    ev = np.linalg.eigvalsh(cov)
    return bool(np.sqrt(max(ev[0], 0) / max(ev[1], 1e-12)) < 0.05)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="masks per timing (baseline: n / 4)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--coverage-n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    size, n = args.size, args.n

    ifs.make_masks(args.seed, range(4), size)  # compile / load the cache
    baseline_mask(0, size)
    nb = max(1, n // 4)  # the baseline is slower: fewer masks per timing, same per-mask rate

    def rate(fn, count):
        t = time.perf_counter()
        fn()
        return count / (time.perf_counter() - t)

    # interleaved repeats, medians: this machine's speed drifts by tens of percent
    o1, b1, oa, ba = [], [], [], []
    ours = None
    with mp.get_context("fork").Pool(cores) as pool:
        pool.map(_baseline_chunk, [(0, 2, size)] * cores)  # warm the workers' Numba cache
        for r in range(args.repeats):
            numba.set_num_threads(1)
            t = time.perf_counter()
            batch = ifs.make_masks(args.seed, range(r * n, (r + 1) * n), size)
            o1.append(n / (time.perf_counter() - t))
            ours = ours or batch
            b1.append(rate(lambda: [baseline_mask(i, size) for i in range(r * nb, (r + 1) * nb)], nb))
            numba.set_num_threads(cores)
            oa.append(rate(lambda: ifs.make_masks(args.seed, range(r * n, (r + 1) * n), size), n))
            chunks = [(lo, min(lo + 32, (r + 1) * nb * cores), size)
                      for lo in range(r * nb * cores, (r + 1) * nb * cores, 32)]
            ba.append(rate(lambda: pool.map(_baseline_chunk, chunks), nb * cores))
    ours_1, base_1, ours_all, base_all = (float(np.median(v)) for v in (o1, b1, oa, ba))
    base = [baseline_mask(i, size)[0] for i in range(min(n, 1000))]

    weak = float(np.mean([mask_is_weak(m) for m in ours.masks]))
    base_weak = float(np.mean([mask_is_weak(m) for m in base]))
    base_fill10 = float(np.mean([ifs.box_fill(m) < 0.10 for m in base]))

    dense_cfg = replace(ifs.IFSConfig(), points_per_pixel=2_000_000 / (size * size))
    cov_ours, cov_base = [], []
    for i in range(args.coverage_n):
        m = ours.masks[i] > 0
        dense = ifs.render(ours.params[i, :ours.n_maps[i]], int(ours.keys[i]), size, config=dense_cfg) > 0
        cov_ours.append((m & dense).sum() / max(dense.sum(), 1))
        bm, _, box = baseline_mask(i, size)
        bd, _, _ = baseline_mask(i, size, 2_000_000, box)
        cov_base.append(((bm > 0) & (bd > 0)).sum() / max((bd > 0).sum(), 1))

    result = {
        "size": size, "n": n, "repeats": args.repeats, "cores": cores,
        "masks_per_s": round(ours_all, 1), "masks_per_s_per_core": round(ours_1, 1),
        "baseline_masks_per_s": round(base_all, 1), "baseline_masks_per_s_per_core": round(base_1, 1),
        "speedup_per_core": round(ours_1 / base_1, 2), "speedup_all_cores": round(ours_all / base_all, 2),
        "weak_fraction": weak, "baseline_weak_fraction": base_weak,
        "baseline_fill_below_0.10": base_fill10,
        "rejected_draws_per_mask": round(float(ours.attempts.mean() - 1), 4),
        "coverage_vs_2M_points": round(float(np.mean(cov_ours)), 4),
        "baseline_coverage_vs_2M_points": round(float(np.mean(cov_base)), 4),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
