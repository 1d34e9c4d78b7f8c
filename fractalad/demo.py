"""``fractalad demo``: the whole pipeline on a small texture defect set made from scikit-image.

Normal images are crops of scikit-image's bundled brick texture (top 60 % of the photo for
training, the rest for testing). Test defects come from mechanisms unlike the fractal training
anomalies: blobs of a foreign texture (gravel), dark or bright scratches, and holes, each with
its mask. Then: shards -> fit (texture preset: no distillation, CPU-sized schedule) -> test ->
``report.md`` with the metrics table and ``report.png`` with heatmaps.
"""
from __future__ import annotations

import os
import time

import cv2
import numpy as np

SIZE = 128
CROP = 128


def _crops(img, rng, n, rows):
    y0, y1 = rows
    out = []
    for _ in range(n):
        y = int(rng.integers(y0, y1 - CROP))
        x = int(rng.integers(0, img.shape[1] - CROP))
        out.append(img[y:y + CROP, x:x + CROP].copy())
    return out


def _blob(img, rng, foreign):
    mask = np.zeros(img.shape, np.uint8)
    c = tuple(int(v) for v in rng.integers(24, CROP - 24, 2))
    axes = tuple(int(v) for v in rng.integers(6, 16, 2))
    cv2.ellipse(mask, c, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    y, x = (int(v) for v in rng.integers(0, foreign.shape[0] - CROP, 2))
    patch = foreign[y:y + CROP, x:x + CROP]
    out = np.where(mask > 0, patch, img)
    return out, mask


def _scratch(img, rng):
    mask = np.zeros(img.shape, np.uint8)
    pts = [rng.integers(10, CROP - 10, 2)]
    for _ in range(int(rng.integers(2, 4))):
        pts.append(np.clip(pts[-1] + rng.integers(-40, 41, 2), 4, CROP - 5))
    cv2.polylines(mask, [np.array(pts, np.int32)], False, 1, int(rng.integers(2, 4)))
    shift = float(rng.choice([-1, 1]) * rng.uniform(60, 100))
    out = np.clip(img.astype(np.float32) + shift * mask, 0, 255).astype(np.uint8)
    return out, mask


def _hole(img, rng):
    mask = np.zeros(img.shape, np.uint8)
    c = tuple(int(v) for v in rng.integers(16, CROP - 16, 2))
    cv2.circle(mask, c, int(rng.integers(4, 10)), 1, -1)
    dark = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.5)
    out = np.clip(img * (1 - 0.85 * dark), 0, 255).astype(np.uint8)
    return out, mask


def make_dataset(root: str, seed: int = 0, n_train: int = 80, n_test: int = 24) -> str:
    """Write an MVTec-layout texture defect set under ``root``; returns its path."""
    from skimage import data
    rng = np.random.default_rng(seed)
    brick, gravel = data.brick(), data.gravel()
    split = int(0.6 * brick.shape[0])
    folders = {"train/good": _crops(brick, rng, n_train, (0, split)),
               "test/good": _crops(brick, rng, n_test, (split, brick.shape[0]))}
    makers = {"foreign_blob": lambda im: _blob(im, rng, gravel), "scratch": lambda im: _scratch(im, rng),
              "hole": lambda im: _hole(im, rng)}
    for kind, make in makers.items():
        imgs, masks = zip(*[make(im) for im in _crops(brick, rng, n_test, (split, brick.shape[0]))])
        folders[f"test/{kind}"] = list(imgs)
        folders[f"ground_truth/{kind}"] = [m * 255 for m in masks]
    for sub, imgs in folders.items():
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        for i, im in enumerate(imgs):
            name = f"{i:03d}_mask.png" if sub.startswith("ground_truth") else f"{i:03d}.png"
            cv2.imwrite(os.path.join(root, sub, name), im)
    return root


def _figure(test_dir: str, out: str) -> None:
    tiles = [cv2.imread(os.path.join(test_dir, f)) for f in sorted(os.listdir(test_dir))
             if f.startswith(("best_defect", "worst_defect")) and f.endswith(".png")][:8]
    if tiles:
        w = max(t.shape[1] for t in tiles)
        tiles = [cv2.copyMakeBorder(t, 2, 2, 0, w - t.shape[1], cv2.BORDER_CONSTANT, value=(255,) * 3)
                 for t in tiles]
        cv2.imwrite(out, np.concatenate(tiles, axis=0))


def run_demo(out: str, steps: int = 300, device: str = "auto", seed: int = 0, log=print) -> dict:
    """Dataset -> shards -> fit -> test -> report; returns the test report plus timings."""
    import torch

    from fractalsynth.anomaly import AnomalyConfig
    from fractalsynth.generate import generate

    from .evaluate import format_table, test_run
    from .train import FitConfig, fit

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t = {"start": time.perf_counter()}
    data = make_dataset(os.path.join(out, "data"), seed)
    log(f"[1/4] defect set written to {data}")
    batch = 16
    shards = os.path.join(out, "shards")
    generate(os.path.join(data, "train", "good"), shards, steps * batch, AnomalyConfig(size=SIZE),
             seed=seed, shard_size=steps * batch, workers=os.cpu_count() or 1, log=log)
    t["generate"] = time.perf_counter()
    log(f"[2/4] {steps * batch} synthetic anomalies in {shards}")
    run = os.path.join(out, "run")
    cfg = FitConfig(kd=False, steps=steps, batch_size=batch, seed=seed, device=device, workers=0,
                    checkpoint_every=max(steps // 2, 1), log_every=10)
    fit(shards, run, cfg, resume=os.path.isfile(os.path.join(run, "checkpoint.pt"))
        and not os.path.isfile(os.path.join(run, "model.pt")))
    t["fit"] = time.perf_counter()
    log(f"[3/4] trained {steps} steps into {run}")
    report = test_run(run, data, os.path.join(run, "test"), device, n_overlays=4)
    t["test"] = time.perf_counter()
    fig = os.path.join(out, "report.png")
    _figure(os.path.join(run, "test"), fig)
    seconds = {"generate": t["generate"] - t["start"], "fit": t["fit"] - t["generate"],
               "test": t["test"] - t["fit"]}
    md = os.path.join(out, "report.md")
    with open(md, "w") as fh:
        fh.write("# fractalad demo\n\nBrick texture, defects unlike the training anomalies "
                 "(foreign blobs, scratches, holes); EfficientNet-Lite0 teacher, texture mode "
                 f"(no distillation), {SIZE} px, {steps} steps of {batch} on {report['device']}.\n\n")
        fh.write("```\n" + format_table(report["metrics"]) + "\n```\n\n")
        fh.write("Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "\n\n")
        fh.write("![heatmaps](report.png)\n")
    log(f"[4/4] report written to {md}")
    log(format_table(report["metrics"]))
    report.update(report=md, stage_seconds=seconds)
    return report
