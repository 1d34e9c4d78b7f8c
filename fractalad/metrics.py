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
        s = np.asarray(scores, dtype=np.float32).ravel()
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


def region_weights(masks):
    """(1 / region size on each ground-truth region's pixels, number of regions)."""
    masks = np.asarray(masks).astype(bool)
    weights = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    for i in range(len(masks)):
        lab, n = label(masks[i], connectivity=2, return_num=True)
        if n == 0:
            continue
        w = np.zeros(n + 1)
        w[1:] = 1.0 / np.bincount(lab.ravel())[1:]
        weights[i] = w[lab]
        n_regions += n
    return weights, n_regions


def aupro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Normalised area under PRO(FPR) for FPR in [0, fpr_limit]; nan without any region."""
    weights, n_regions = region_weights(masks)
    return RankedScores(maps, np.asarray(masks).astype(bool), weights).aupro(n_regions, fpr_limit)


def pixel_metrics(maps, masks, fpr_limit: float = 0.3) -> dict:
    """pixel_AUROC, pixel_F1Max (and its threshold) and AUPRO from one sort."""
    weights, n_regions = region_weights(masks)
    r = RankedScores(maps, np.asarray(masks).astype(bool), weights)
    f1, thr = r.f1_max()
    return {"pixel_AUROC": r.auroc(), "pixel_F1Max": f1, "AUPRO": r.aupro(n_regions, fpr_limit),
            "pixel_threshold": thr}


def detection_metrics(image_scores_max, image_scores_mean, image_labels, maps=None, masks=None):
    """anomalib-named metrics: image level for both scores; pixel level where masks exist."""
    img = RankedScores(image_scores_max, image_labels)
    f1, thr = img.f1_max()
    out = {
        "image_AUROC": img.auroc(), "image_F1Max": f1, "image_threshold": thr,
        "image_AUROC_mean": auroc(image_scores_mean, image_labels),
        "image_F1Max_mean": f1_max(image_scores_mean, image_labels)[0],
    }
    if maps is not None and masks is not None and len(maps):
        out.update(pixel_metrics(maps, masks))
    return out
