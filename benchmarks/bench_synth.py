"""Anomaly synthesis per core: ``FractalAnomaly`` vs the published per-sample pipeline in PIL.

    python benchmarks/bench_synth.py [--n 300] [--normals DIR]

The baseline restates the FractalAD authors' per-sample procedure with its cost structure (PIL
images): synthesise at the source resolution (cut, ImageEnhance colour jitter with an HSV hue
shift, flips, rotate without expanding, a reference-style fractal mask from bench_ifs' baseline,
masked paste), resize image and anomalous image to 256 with Lanczos and the mask with nearest,
dilate the mask, grey-level Gaussian noise drawn for the whole image and kept inside the mask,
a jitter seed drawn with np.random.choice over range(100000), then one mild jitter on both
images. Not included: the reference's final conversion to float tensors. Ours: ``FractalAnomaly(size=256)(image, i)``
returning the same three arrays. One core each (OpenCV and Numba limited to one thread), from
900 px and from 256 px RGB sources cut from the Magnetic Tile normals. One final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import cv2
import numpy as np
from PIL import Image, ImageEnhance

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from bench_ifs import baseline_mask  # noqa: E402

from fractalsynth.anomaly import FractalAnomaly  # noqa: E402
from fractalsynth.images import list_images, load_image  # noqa: E402

DEFAULT_NORMALS = os.path.join(HERE, "..", "..", "shared", "data", "magnetic_tile", "magnetic_tile",
                               "train", "good")


def _color_jitter(img: Image.Image, rng, b, c, s, h) -> Image.Image:
    """torchvision-style ColorJitter with PIL: factors drawn around 1, hue shift through HSV."""
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(max(0, 1 - b), 1 + b))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(max(0, 1 - c), 1 + c))
    if s:
        img = ImageEnhance.Color(img).enhance(rng.uniform(max(0, 1 - s), 1 + s))
    if h:
        hsv = np.array(img.convert("HSV"))
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.uniform(-h, h) * 255)) % 256
        img = Image.fromarray(hsv, "HSV").convert("RGB")
    return img


def baseline_sample(src: Image.Image, rng, index: int, size: int = 256):
    """One (normal, anomalous, mask) triple, the reference way."""
    w, h = src.size
    c = int(rng.uniform(0.1, 0.5) * min(w, h))
    sx, sy = rng.integers(int(0.1 * w), int(0.9 * w) - c), rng.integers(int(0.1 * h), int(0.9 * h) - c)
    dx, dy = rng.integers(int(0.1 * w), int(0.9 * w) - c), rng.integers(int(0.1 * h), int(0.9 * h) - c)
    patch = src.crop((sx, sy, sx + c, sy + c))
    v = rng.integers(3)
    if v == 0:
        patch = _color_jitter(patch, rng, 0.2, 0.2, 0.2, 0.2)
    elif v == 1:
        patch = _color_jitter(patch, rng, 1.0, 1.0, 0, 0)
    else:
        arr = np.array(patch).astype(np.float32)
        for ch in rng.choice(3, 2, replace=False):
            arr[..., ch] *= rng.uniform(0, 2)
        patch = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        patch = patch.transpose(Image.FLIP_TOP_BOTTOM)
    patch = patch.convert("RGBA").rotate(rng.uniform(15, 75), expand=False)
    fractal = baseline_mask(index, c)[0]
    alpha = np.array(patch)[..., 3] * (fractal > 0)
    patch.putalpha(Image.fromarray(alpha.astype(np.uint8)))
    anomalous = src.copy()
    anomalous.paste(patch, (int(dx), int(dy)), patch)
    mask = Image.new("L", src.size, 0)
    mask.paste(Image.fromarray(alpha.astype(np.uint8)), (int(dx), int(dy)))
    mask = mask.resize((size, size), Image.NEAREST)
    normal = src.resize((size, size), Image.LANCZOS)  # the reference resizes with ANTIALIAS
    anomalous = anomalous.resize((size, size), Image.LANCZOS)
    mask = Image.fromarray(cv2.dilate(np.array(mask), np.ones((3, 3), np.uint8), iterations=3))
    if rng.random() < 0.5:  # grey-level noise drawn for the whole image, kept inside the mask
        arr = np.array(anomalous).astype(np.float64)
        noisy = np.clip(arr + np.repeat(10 * rng.normal(0, 1, (size, size, 1)), 3, axis=2), 0, 255)
        inside = np.repeat((np.array(mask) > 0)[:, :, None], 3, axis=2)
        anomalous = Image.fromarray(np.where(inside, noisy, arr).astype(np.uint8))
    seed = int(rng.choice(range(100000), 1)[0])  # the reference draws its jitter seed this way
    normal = _color_jitter(normal, np.random.default_rng(seed), 0.05, 0.05, 0.05, 0.05)
    anomalous = _color_jitter(anomalous, np.random.default_rng(seed), 0.05, 0.05, 0.05, 0.05)
    return np.array(normal), np.array(anomalous), np.array(mask)


def _rates(fns, items, counts, repeats):
    """Median calls/s of each function, timed in interleaved rounds (this machine drifts)."""
    for fn in fns:
        fn(items[0], 0)
    rates = [[] for _ in fns]
    for _ in range(repeats):
        for k, (fn, n) in enumerate(zip(fns, counts)):
            t = time.perf_counter()
            for i in range(n):
                fn(items[i % len(items)], i)
            rates[k].append(n / (time.perf_counter() - t))
    return [float(np.median(r)) for r in rates]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="samples per timing (ours: 5x as many)")
    ap.add_argument("--normals", default=DEFAULT_NORMALS)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    import numba
    numba.set_num_threads(1)
    paths = list_images(args.normals)[:32]
    greys = [load_image(p) for p in paths]
    result = {"output_size": 256}
    for src_size in (900, 256):
        rgb = [cv2.resize(cv2.cvtColor(g, cv2.COLOR_GRAY2RGB), (src_size, src_size),
                          interpolation=cv2.INTER_LINEAR) for g in greys]
        pil = [Image.fromarray(im) for im in rgb]
        gen = FractalAnomaly(size=256, seed=0)
        rng = np.random.default_rng(0)
        ours, base = _rates([lambda im, i: gen(rgb[i % len(rgb)], i),
                             lambda im, i: baseline_sample(pil[i % len(pil)], rng, i)],
                            rgb, [5 * args.n, args.n], args.repeats)
        result[f"from_{src_size}"] = {
            "samples_per_s_per_core": round(ours, 1),
            "baseline_samples_per_s_per_core": round(base, 1),
            "speedup_per_core": round(ours / base, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
