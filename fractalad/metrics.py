"""Detection metrics with anomalib's names, in numpy / scikit-image (no torch needed).

- ``auroc``: area under the ROC curve (tied scores count one half).
- ``f1_max``: the best F1 over all thresholds, and that threshold.
- ``aupro``: area under the per-region-overlap curve up to a false-positive rate of 0.3,
  divided by 0.3 (MVTec's PRO; regions are 8-connected components of each ground-truth mask).

All three come from one descending sort of the scores (``RankedScores``): pixel metrics of a
test set sort tens of millions of values, so ``pixel_metrics`` sorts once for all three.
"""
from __future__ import annotations

import numpy as np
from skimage.measure import label


class RankedScores:
    """Scores sorted once (descending), with cumulative counts at the end of each tie group."""

    def __init__(self, scores, labels, weights=None):
        s = np.asarray(scores).ravel()
        # keep float64 scores exact, so that a threshold returned is one of the scores given
        s = s if s.dtype in (np.float32, np.float64) else s.astype(np.float64)
        y = np.asarray(labels).ravel().astype(bool)
        order = np.argsort(-s)
        s_sorted = s[order]
        y_sorted = y[order]
        self.ends = np.r_[s_sorted[1:] != s_sorted[:-1], True]
        self.thresholds = s_sorted[self.ends]
        self.tp = np.cumsum(y_sorted)[self.ends]
        self.fp = np.cumsum(~y_sorted)[self.ends]
        self.n_pos = int(y.sum())
        self.n_neg = int(y.size - self.n_pos)
        self.weight = None if weights is None else np.cumsum(np.asarray(weights).ravel()[order])[self.ends]

    def auroc(self) -> float:
        if self.n_pos == 0 or self.n_neg == 0:
            return float("nan")
        return _trapezoid(np.r_[0.0, self.fp / self.n_neg], np.r_[0.0, self.tp / self.n_pos])

    def f1_max(self):
        if self.n_pos == 0:
            return float("nan"), float("nan")
        precision = self.tp / (self.tp + self.fp)
        recall = self.tp / self.n_pos
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        k = int(np.argmax(f1))
        return float(f1[k]), float(self.thresholds[k])

    def aupro(self, n_regions: int, fpr_limit: float = 0.3) -> float:
        """Needs ``weights`` = 1 / (region size) on region pixels; labels = region pixels."""
        if n_regions == 0 or self.n_neg == 0:
            return float("nan")
        fpr = np.r_[0.0, self.fp / self.n_neg]
        pro = np.r_[0.0, self.weight / n_regions]
        j = int(np.searchsorted(fpr, fpr_limit, side="right"))
        x, y = fpr[:j], pro[:j]
        if j < len(fpr) and x[-1] < fpr_limit:  # interpolate the curve at the limit
            t = (fpr_limit - fpr[j - 1]) / max(fpr[j] - fpr[j - 1], 1e-12)
            x = np.r_[x, fpr_limit]
            y = np.r_[y, pro[j - 1] + t * (pro[j] - pro[j - 1])]
        return _trapezoid(x, y) / fpr_limit


def _trapezoid(x, y) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) * 0.5))


def auroc(scores, labels) -> float:
    """ROC AUC; nan when only one class is present."""
    return RankedScores(scores, labels).auroc()


def f1_max(scores, labels):
    """(best F1, its threshold): predict anomalous where score >= threshold."""
    return RankedScores(scores, labels).f1_max()


def _flat(arrays, dtype=None) -> np.ndarray:
    """One flat array from an array [N, ...] or a list of arrays of any shapes."""
    if isinstance(arrays, np.ndarray):
        return arrays.ravel() if dtype is None else arrays.astype(dtype, copy=False).ravel()
    return np.concatenate([np.asarray(a, dtype=dtype).ravel() for a in arrays])


def region_weights(masks):
    """(1 / region size on each ground-truth region's pixels, flat; number of regions).

    ``masks``: an array [N, H, W] or a list of 2-D masks of any sizes (original resolutions).
    """
    parts, n_regions = [], 0
    for m in masks:
        lab, n = label(np.asarray(m).astype(bool), connectivity=2, return_num=True)
        w = np.zeros(n + 1)
        if n:
            w[1:] = 1.0 / np.bincount(lab.ravel())[1:]
        parts.append(w[lab].ravel())
        n_regions += n
    return (np.concatenate(parts) if parts else np.zeros(0)), n_regions


def aupro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Normalised area under PRO(FPR) for FPR in [0, fpr_limit]; nan without any region."""
    return pixel_metrics(maps, masks, fpr_limit)["AUPRO"]


def pixel_metrics(maps, masks, fpr_limit: float = 0.3) -> dict:
    """pixel_AUROC, pixel_F1Max (and its threshold) and AUPRO from one sort.

    ``maps`` and ``masks``: arrays [N, H, W], or lists of 2-D arrays (pairwise the same shape).
    """
    scores, truth = _flat(maps, np.float32), _flat(masks, bool)
    if scores.size != truth.size:
        raise ValueError(f"maps and masks differ in size ({scores.size} vs {truth.size} pixels)")
    weights, n_regions = region_weights(masks)
    r = RankedScores(scores, truth, weights)
    f1, thr = r.f1_max()
    return {"pixel_AUROC": r.auroc(), "pixel_F1Max": f1, "AUPRO": r.aupro(n_regions, fpr_limit),
            "pixel_threshold": thr}


def detection_metrics(image_scores_max, image_scores_mean, image_labels, maps=None, masks=None):
    """anomalib-named metrics: image level for both scores; pixel level where masks exist."""
    img, img_mean = RankedScores(image_scores_max, image_labels), RankedScores(image_scores_mean, image_labels)
    (f1, thr), (f1_mean, thr_mean) = img.f1_max(), img_mean.f1_max()
    out = {
        "image_AUROC": img.auroc(), "image_F1Max": f1, "image_threshold": thr,
        "image_AUROC_mean": img_mean.auroc(), "image_F1Max_mean": f1_mean,
        "image_threshold_mean": thr_mean,
    }
    if maps is not None and masks is not None and len(maps):
        out.update(pixel_metrics(maps, masks))
    return out
