"""Where an anomaly is cut and pasted: uniform in the central region, or inside the foreground.

The rough foreground of an object on a plain background follows the method: grey, blur,
threshold against the corners' brightness, largest contour, its minimum-area rectangle.

``auto`` rule (per image): use the foreground when the four corners agree (their mean
brightness spread <= ``CORNER_SPREAD`` grey levels, i.e. a plain background) and the largest
contour covers between ``MIN_AREA`` and ``MAX_AREA`` of the image; else uniform.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# MVTec AD categories whose objects sit on a plain background: the method places their
# anomalies inside the rough foreground (``--preset`` in the CLIs).
PLAIN_BACKGROUND = ("capsule", "pill", "screw", "toothbrush", "zipper")
MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                    "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
CORNER_SPREAD = 20.0
MIN_AREA = 0.03
MAX_AREA = 0.90
PLACEMENTS = ("uniform", "foreground", "auto")


@dataclass
class Foreground:
    """A rough foreground: its mask, the min-area rectangle's shorter side, and whether it is clear."""

    mask: np.ndarray  # uint8 HxW, 1 = foreground
    short_side: float
    clear: bool


def preset_placement(category: str) -> str:
    """The method's placement for an MVTec AD category."""
    if category not in MVTEC_CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose one of {', '.join(MVTEC_CATEGORIES)}")
    return "foreground" if category in PLAIN_BACKGROUND else "uniform"


def find_foreground(image: np.ndarray) -> Foreground | None:
    """The largest object against the corner brightness, or None when nothing stands out."""
    grey = image[:, :, 0] if image.shape[2] == 1 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    grey = cv2.GaussianBlur(grey, (5, 5), 0)
    k = max(2, min(h, w) // 16)
    corners = np.array([grey[:k, :k].mean(), grey[:k, -k:].mean(),
                        grey[-k:, :k].mean(), grey[-k:, -k:].mean()])
    background = float(np.median(corners))
    diff = cv2.absdiff(grey, np.full_like(grey, int(round(background))))
    thr = max(20.0, 3.0 * float(np.std(grey[:k, :k])))
    binary = (diff > thr).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    area = cv2.contourArea(largest)
    if area < 4:
        return None
    mask = np.zeros((h, w), np.uint8)
    cv2.drawContours(mask, [largest], -1, 1, thickness=-1)
    (_, _), (rw, rh), _ = cv2.minAreaRect(largest)
    frac = area / float(h * w)
    clear = (corners.max() - corners.min()) <= CORNER_SPREAD and MIN_AREA <= frac <= MAX_AREA
    return Foreground(mask, float(min(rw, rh)), bool(clear))


def _uniform_corner(rng, h, w, c, lo=0.1, hi=0.9):
    """Top-left of a c x c square inside the central lo..hi band (the whole image if too small)."""
    y0, y1 = int(lo * h), int(hi * h) - c
    x0, x1 = int(lo * w), int(hi * w) - c
    if y1 < y0:
        y0, y1 = 0, h - c
    if x1 < x0:
        x0, x1 = 0, w - c
    return int(rng.integers(y0, y1 + 1)), int(rng.integers(x0, x1 + 1))


def _foreground_corner(rng, fg: Foreground, c):
    """Top-left of a c x c square centred on a random foreground pixel, kept inside the image."""
    h, w = fg.mask.shape
    ys, xs = np.nonzero(fg.mask)
    j = int(rng.integers(ys.size))
    y = min(max(int(ys[j]) - c // 2, 0), h - c)
    x = min(max(int(xs[j]) - c // 2, 0), w - c)
    return y, x


def choose_locations(rng: np.random.Generator, shape, placement: str, fg: Foreground | None,
                     cut_scale=(0.1, 0.5), fg_cut_scale=(0.05, 1.5), region=(0.1, 0.9)):
    """(cut size c, source top-left, paste top-left) for one anomaly in an image of ``shape``."""
    h, w = shape[:2]
    short = min(h, w)
    use_fg = fg is not None and (placement == "foreground" or (placement == "auto" and fg.clear))
    if use_fg:
        c = int(round(rng.uniform(*fg_cut_scale) * fg.short_side))
        c = min(max(c, 2), short)
        return c, _foreground_corner(rng, fg, c), _foreground_corner(rng, fg, c)
    c = min(max(int(round(rng.uniform(*cut_scale) * short)), 2), short)
    return c, _uniform_corner(rng, h, w, c, *region), _uniform_corner(rng, h, w, c, *region)
