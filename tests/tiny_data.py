"""Tiny datasets the tests build on disk."""
import os

import cv2
import numpy as np


def make_mvtec(root, n=3, size=48):
    """An MVTec-layout folder: n blurred-noise tiles in train/good and test/good, and as many
    with a bright spot in test/spot, each with its ground_truth mask."""
    rng = np.random.default_rng(0)
    for t in ("good", "spot"):
        os.makedirs(root / "test" / t, exist_ok=True)
    os.makedirs(root / "ground_truth" / "spot", exist_ok=True)
    os.makedirs(root / "train" / "good", exist_ok=True)
    for i in range(n):
        base = cv2.GaussianBlur(rng.integers(80, 180, (size, size)).astype(np.uint8), (0, 0), 1)
        cv2.imwrite(str(root / "train" / "good" / f"{i}.png"), base)
        cv2.imwrite(str(root / "test" / "good" / f"{i}.png"), base)
        m = np.zeros((size, size), np.uint8)
        cv2.circle(m, (20, 20), 5, 255, -1)
        cv2.imwrite(str(root / "test" / "spot" / f"{i}.png"), np.where(m > 0, 250, base).astype(np.uint8))
        cv2.imwrite(str(root / "ground_truth" / "spot" / f"{i}_mask.png"), m)
