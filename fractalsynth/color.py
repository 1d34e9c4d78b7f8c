"""Colour jitter as one affine colour transform per image: ``out = clip(M @ x + o)``.

Brightness ``b``, contrast ``c`` (about the image's mean luma ``mu``), saturation ``s`` (blend
with luma) and hue ``h`` (a rotation by ``2 pi h`` of the YIQ chroma plane) are all linear, so
their product is one 3x3 matrix and an offset. Unlike torchvision's ColorJitter the
intermediate results are not clipped; the factors follow its conventions
(``b, c, s ~ U(1-j, 1+j)``, ``h ~ U(-j, j)``). The same matrices run on the CPU (OpenCV) and on
the GPU (fractalad), which is what lets the shared mild jitter move to the GPU.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)
_RGB2YIQ = np.array([[0.299, 0.587, 0.114],
                     [0.596, -0.274, -0.322],
                     [0.211, -0.523, 0.312]], dtype=np.float64)
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)


# M = c b (P_LUMA + s cos(2 pi h) P_CHROMA + s sin(2 pi h) P_ROT): YIQ with the chroma plane
# scaled by s and rotated by 2 pi h, written as three constant matrices so a batch is cheap.
P_LUMA = _YIQ2RGB[:, :1] @ _RGB2YIQ[:1, :]
P_CHROMA = _YIQ2RGB[:, 1:] @ _RGB2YIQ[1:, :]
P_ROT = _YIQ2RGB[:, 1:] @ np.array([[0.0, -1.0], [1.0, 0.0]]) @ _RGB2YIQ[1:, :]


def jitter_matrices(params: np.ndarray, means: np.ndarray, channels: int):
    """Matrices [B, C, C] and offsets [B] for jitter rows (b, c, s, h) and mean lumas ``means``."""
    p = np.asarray(params, dtype=np.float64).reshape(-1, 4)
    mu = np.asarray(means, dtype=np.float64).reshape(-1)
    cb = p[:, 1] * p[:, 0]
    offset = (1.0 - p[:, 1]) * p[:, 0] * mu
    if channels == 1:
        return cb.reshape(-1, 1, 1), offset
    ang = 2.0 * np.pi * p[:, 3]
    sc = (p[:, 2] * np.cos(ang))[:, None, None]
    ss = (p[:, 2] * np.sin(ang))[:, None, None]
    return cb[:, None, None] * (P_LUMA + sc * P_CHROMA + ss * P_ROT), offset


def jitter_matrix(b: float, c: float, s: float, h: float, mean: float, channels: int):
    """``jitter_matrices`` for one image with plain floats (no per-call array overhead)."""
    cb = c * b
    offset = (1.0 - c) * b * mean
    if channels == 1:
        return np.array([[cb]]), offset
    ang = 2.0 * math.pi * h
    return cb * (P_LUMA + (s * math.cos(ang)) * P_CHROMA + (s * math.sin(ang)) * P_ROT), offset


def mean_luma(image: np.ndarray) -> float:
    """Mean luma (0..255) of an HxWxC uint8 image."""
    mean = cv2.mean(image)[: image.shape[2]]
    return float(mean[0]) if image.shape[2] == 1 else float(np.dot(LUMA, mean))


def apply_color_transform(image: np.ndarray, matrix: np.ndarray, offset: float,
                          out: np.ndarray | None = None) -> np.ndarray:
    """``clip(matrix @ pixel + offset)`` on an HxWxC uint8 image, rounded to uint8 (into ``out``)."""
    h, w, ch = image.shape
    if out is None:
        out = np.empty_like(image)
    if ch == 1:
        a, b = float(matrix[0, 0]), float(offset)
        if a >= 0 and b >= 0:  # convertScaleAbs rounds and saturates; abs is a no-op here
            cv2.convertScaleAbs(image.reshape(h, w), dst=out.reshape(h, w), alpha=a, beta=b)
        else:
            out[...] = np.clip(image.astype(np.float32) * a + b + 0.5, 0, 255).astype(np.uint8)
        return out
    m = np.concatenate([matrix, np.full((3, 1), offset)], axis=1).astype(np.float32)
    cv2.transform(image, m, dst=out)
    return out


def jitter(image: np.ndarray, params, mean: float | None = None) -> np.ndarray:
    """Apply the jitter row (b, c, s, h) to an HxWxC uint8 image (mean luma from the image)."""
    mean = mean_luma(image) if mean is None else mean
    m, o = jitter_matrix(*(float(v) for v in params), mean, image.shape[2])
    return apply_color_transform(image, m, o)
