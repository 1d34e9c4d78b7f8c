"""Detection metrics with anomalib's names, in numpy / scikit-image (no torch needed).

- ``auroc``: area under the ROC curve (ties count one half).
- ``f1_max``: the best F1 over all thresholds, and that threshold.
- ``aupro``: area under the per-region-overlap curve up to a false-positive rate of 0.3,
  divided by 0.3 (MVTec's PRO; regions are 8-connected components of each ground-truth mask).
"""
from __future__ import annotations

import numpy as np
from skimage.measure import label


def auroc(scores, labels) -> float:
    """ROC AUC by the rank-sum statistic; nan when only one class is present."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def f1_max(scores, labels):
    """(best F1, its threshold): predict anomalous where score >= threshold."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if y.sum() == 0:
        return float("nan"), float("nan")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # end of each tie group
    tp, fp, thr = tp[last], fp[last], s_sorted[last]
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    k = int(np.argmax(f1))
    return float(f1[k]), float(thr[k])


def aupro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Normalised area under PRO(FPR) for FPR in [0, fpr_limit]; nan without any region."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    weights = np.zeros(maps.shape, dtype=np.float64)
    n_regions = 0
    for i in range(len(masks)):
        lab, n = label(masks[i], connectivity=2, return_num=True)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        w = np.zeros(n + 1)
        w[1:] = 1.0 / sizes[1:]
        weights[i] = w[lab]
        n_regions += n
    negatives = ~masks
    if n_regions == 0 or negatives.sum() == 0:
        return float("nan")
    s = maps.ravel()
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    pro = np.cumsum(weights.ravel()[order]) / n_regions
    fpr = np.cumsum(negatives.ravel()[order]) / negatives.sum()
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    fpr, pro = np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:  # interpolate the curve at the limit
        j = int(np.searchsorted(fpr, fpr_limit))
        if j < len(fpr):
            t = (fpr_limit - fpr[j - 1]) / max(fpr[j] - fpr[j - 1], 1e-12)
            x = np.r_[x, fpr_limit]
            y = np.r_[y, pro[j - 1] + t * (pro[j] - pro[j - 1])]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) * 0.5))
    return area / fpr_limit


def detection_metrics(image_scores_max, image_scores_mean, image_labels, maps=None, masks=None):
    """anomalib-named metrics: image level for both scores; pixel level where masks exist."""
    out = {
        "image_AUROC": auroc(image_scores_max, image_labels),
        "image_F1Max": f1_max(image_scores_max, image_labels)[0],
        "image_AUROC_mean": auroc(image_scores_mean, image_labels),
        "image_F1Max_mean": f1_max(image_scores_mean, image_labels)[0],
    }
    if maps is not None and masks is not None and len(maps):
        out["pixel_AUROC"] = auroc(maps, masks)
        out["pixel_F1Max"] = f1_max(maps, masks)[0]
        out["AUPRO"] = aupro(maps, masks)
    return out
