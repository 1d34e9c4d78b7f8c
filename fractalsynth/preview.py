"""Labelled preview grids of (normal, anomalous, mask) triples."""
from __future__ import annotations

import os

import cv2
import numpy as np

from .anomaly import AnomalyConfig, FractalAnomaly
from .images import ImageError, list_images, load_image


def _rgb(img: np.ndarray) -> np.ndarray:
    img = img if img.ndim == 3 else img[:, :, None]
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def triple_grid(normals, anomalous, masks, columns: int = 4, labels=None) -> np.ndarray:
    """An RGB grid; each cell shows normal | anomalous | mask outline, with a label above."""
    cells = []
    for j, (n, a, m) in enumerate(zip(normals, anomalous, masks)):
        n, a = _rgb(n), _rgb(a)
        outline = a.copy()
        contours, _ = cv2.findContours((m > 0).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(outline, contours, -1, (255, 40, 40), 1)
        row = np.concatenate([n, a, outline, _rgb(m)], axis=1)
        band = np.full((18, row.shape[1], 3), 255, np.uint8)
        text = labels[j] if labels else f"#{j}"
        cv2.putText(band, f"{text}  (normal | anomalous | outline | mask)", (4, 13),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cells.append(np.concatenate([band, row], axis=0))
    rows = []
    for r in range(0, len(cells), columns):
        group = cells[r:r + columns]
        group += [np.full_like(cells[0], 255)] * (columns - len(group))
        rows.append(np.concatenate([np.pad(c, ((2, 2), (2, 2), (0, 0)), constant_values=255)
                                    for c in group], axis=1))
    return np.concatenate(rows, axis=0)


def preview_from_normals(folder: str, n: int, seed: int = 0, columns: int = 2,
                         config: AnomalyConfig | None = None, textures=None,
                         pieces=None) -> np.ndarray:
    """A grid of ``n`` fresh samples from the images in ``folder`` (sample i uses image i mod N;
    with ``pieces``, as for ``generate``, piece i mod P of the images cut into P pieces)."""
    from .generate import check_pieces, cut_into_pieces, resolve_piece_aspect
    paths = list_images(folder)
    names = [os.path.basename(p) for p in paths]
    config = config or AnomalyConfig()
    gen = FractalAnomaly(config=config, size=config.size, seed=seed, textures=textures)
    images = None  # without pieces, only the images shown are read
    if check_pieces(pieces):  # every image is read: 'auto' needs all their shapes
        images = [load_image(p) for p in paths]
        aspect = resolve_piece_aspect(pieces, [im.shape for im in images])
        images, names, _ = cut_into_pieces(images, names, aspect, config.size)
    triples, labels = [], []
    for i in range(n):
        k = i % len(names)
        triples.append(gen(load_image(paths[k]) if images is None else images[k], index=i))
        labels.append(f"{i}: {names[k]}")
    return triple_grid(*zip(*triples), columns=columns, labels=labels)


def preview_from_dataset(root: str, n: int, columns: int = 2) -> np.ndarray:
    """A grid of the first ``n`` samples of a shard dataset."""
    from .shards import ShardDataset
    ds = ShardDataset(root)
    if len(ds) == 0:
        raise ImageError(f"{root}: empty dataset")
    picks = [ds[i] for i in range(min(n, len(ds)))]
    return triple_grid(*zip(*picks), columns=columns, labels=[f"sample {i}" for i in range(len(picks))])


def save_rgb(path: str, image: np.ndarray) -> None:
    """Write an RGB uint8 image (PNG or JPEG by extension); clear error if it cannot."""
    if not cv2.imwrite(path, image[:, :, ::-1]):
        raise ValueError(f"cannot write {path}; check the folder exists and the extension is .png/.jpg")
