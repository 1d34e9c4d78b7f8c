"""Detection metrics with anomalib's names, in numpy / scikit-image (no torch needed).

- ``auroc``: area under the ROC curve (tied scores count one half).
- ``f1_max``: the best F1 over all thresholds, and that threshold.
- ``aupro``: area under the per-region-overlap curve up to a false-positive rate of 0.3,
  divided by 0.3 (MVTec's PRO; regions are 8-connected components of each ground-truth mask).

All three are exact and come from the scores split by class, each class sorted once
(``ClassScores``); every count on the curves is then a binary search. Pixel metrics at the
original resolution sort tens of millions of values, so the normal pixels are held once, as
float32, and never paired with an index array: about 10 bytes per pixel at the peak, counting
the caller's maps and masks. A caller that splits each map as it is made (``split_pixels``)
holds no maps: each pixel once as a float32 score, plus the copy that ``merge_splits`` sorts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.measure import label

# distinct normal scores handled at once on the PRO curve: bounds the working memory
_PRO_BLOCK = 1 << 18


def _as_scores(a) -> np.ndarray:
    a = np.asarray(a).ravel()
    # keep float scores exact, so that a threshold returned is one of the scores given
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


class ClassScores:
    """Scores of normal and anomalous samples, each sorted ascending (anomalous ones with weights)."""

    def __init__(self, normal, anomalous, anomalous_weights=None, *, copy: bool = True):
        self.neg = _as_scores(normal)
        if copy:
            self.neg = np.sort(self.neg)
        else:  # sorts a float ``normal`` in place: the caller gives up an array it built
            self.neg.sort()
        pos = _as_scores(anomalous)
        order = np.argsort(pos, kind="stable")
        self.pos = pos[order]
        self.n_pos, self.n_neg = self.pos.size, self.neg.size
        self.weight_below = None  # weight_below[i]: sum of the weights of pos[:i]
        if anomalous_weights is not None:
            w = np.asarray(anomalous_weights, dtype=np.float64).ravel()[order]
            self.weight_below = np.r_[0.0, np.cumsum(w)]

    @classmethod
    def from_labels(cls, scores, labels):
        """Split one score array by its 0/1 labels."""
        s, y = _as_scores(scores), np.asarray(labels).ravel().astype(bool)
        if s.size != y.size:
            raise ValueError(f"scores and labels differ in length ({s.size} vs {y.size})")
        return cls(s[~y], s[y])

    def auroc(self) -> float:
        if self.n_pos == 0 or self.n_neg == 0:
            return float("nan")
        below = np.searchsorted(self.neg, self.pos, side="left").sum(dtype=np.int64)
        at_or_below = np.searchsorted(self.neg, self.pos, side="right").sum(dtype=np.int64)
        # Mann-Whitney: a tie between a normal and an anomalous score counts one half
        return float((below + at_or_below) / (2.0 * self.n_pos * self.n_neg))

    def f1_max(self):
        if self.n_pos == 0:
            return float("nan"), float("nan")
        # F1 only rises when the threshold drops onto an anomalous score, so try those alone
        first = np.flatnonzero(np.r_[True, self.pos[1:] != self.pos[:-1]])[::-1]
        thresholds = self.pos[first]
        tp = self.n_pos - first
        fp = self.n_neg - np.searchsorted(self.neg, thresholds, side="left")
        f1 = 2.0 * tp / (tp + fp + self.n_pos)
        k = int(np.argmax(f1))  # the highest threshold among equals
        return float(f1[k]), float(thresholds[k])

    def _weight_at_or_above(self, t, side: str) -> np.ndarray:
        return self.weight_below[-1] - self.weight_below[np.searchsorted(self.pos, t, side=side)]

    def aupro(self, n_regions: int, fpr_limit: float = 0.3, block: int = _PRO_BLOCK) -> float:
        """Needs ``anomalous_weights`` = 1 / (region size) on each region pixel."""
        if n_regions == 0 or self.n_neg == 0:
            return float("nan")
        # the curve moves right only where the threshold passes a normal score; the top
        # floor(limit * N) + 1 normal scores reach past the limit
        top = self.neg[::-1][: min(self.n_neg, int(fpr_limit * self.n_neg) + 1)]
        area, fpr_before = 0.0, 0.0
        for a in range(0, top.size, block):
            chunk = top[a:a + block]
            # each distinct score once, descending; a tie group cut by the block's edge gives
            # one more point at the same false-positive rate, a segment of zero width
            t = chunk[np.r_[True, chunk[1:] != chunk[:-1]]]
            fpr = (self.n_neg - np.searchsorted(self.neg, t, side="left")) / self.n_neg
            x0 = np.r_[fpr_before, fpr[:-1]]
            y0 = self._weight_at_or_above(t, "right") / n_regions  # just above t
            y1 = self._weight_at_or_above(t, "left") / n_regions  # at t
            past = np.flatnonzero(fpr > fpr_limit)
            if past.size:  # the segment that crosses the limit: cut it there
                k = int(past[0])
                share = (fpr_limit - x0[k]) / max(fpr[k] - x0[k], 1e-12)
                y_cut = y0[k] + share * (y1[k] - y0[k])
                area += float(np.sum((fpr[:k] - x0[:k]) * (y0[:k] + y1[:k]))) * 0.5
                area += (fpr_limit - x0[k]) * (y0[k] + y_cut) * 0.5
                return area / fpr_limit
            area += float(np.sum((fpr - x0) * (y0 + y1))) * 0.5
            fpr_before = float(fpr[-1])
        return area / fpr_limit


def auroc(scores, labels) -> float:
    """ROC AUC; nan when only one class is present."""
    return ClassScores.from_labels(scores, labels).auroc()


def f1_max(scores, labels):
    """(best F1, its threshold): predict anomalous where score >= threshold."""
    return ClassScores.from_labels(scores, labels).f1_max()


def region_weights(mask):
    """(1 / region size on each ground-truth pixel of ``mask``, in row-major order; number of regions)."""
    lab, n = label(mask, connectivity=2, return_num=True)
    if n == 0:
        return np.zeros(0), 0
    inverse_size = np.r_[0.0, 1.0 / np.bincount(lab.ravel())[1:]]
    return inverse_size[lab[mask]], n


@dataclass(frozen=True)
class PixelSplit:
    """One map's pixel scores split by its ground-truth mask (float32), with each anomalous
    pixel's PRO weight (1 / its region's size) and the mask's number of regions."""

    normal: np.ndarray
    anomalous: np.ndarray
    weights: np.ndarray
    n_regions: int


def split_pixels(amap, mask) -> PixelSplit:
    """Split one map by its mask (the same number of pixels, in row-major order)."""
    g = np.asarray(mask).astype(bool, copy=False)
    m = np.asarray(amap)
    if m.size != g.size:
        raise ValueError(f"a map and its mask differ in size ({m.size} vs {g.size} pixels)")
    m = m.reshape(g.shape)
    if not g.any():
        normal = m.reshape(-1).astype(np.float32, copy=False)
        return PixelSplit(normal, np.zeros(0, np.float32), np.zeros(0), 0)
    w, n = region_weights(g)
    return PixelSplit(m[~g].astype(np.float32, copy=False), m[g].astype(np.float32, copy=False),
                      w, n)


def merge_splits(splits: list, consume: bool = False) -> tuple[ClassScores, int]:
    """(the pixels of ``splits`` as one ClassScores, their number of regions).

    ``consume`` empties the list while its normal pixels are copied, so that a caller holding
    no other reference never holds them twice.
    """
    def taken():
        for i in range(len(splits)):
            s, splits[i] = splits[i], None
            yield s

    n_neg = sum(s.normal.size for s in splits)
    return _merged(taken() if consume else iter(splits), n_neg)


def _merged(splits, n_neg: int) -> tuple[ClassScores, int]:
    neg = np.empty(n_neg, np.float32)
    pos, weights, n_regions, at = [], [], 0, 0
    for s in splits:
        neg[at:at + s.normal.size] = s.normal
        at += s.normal.size
        if s.n_regions:
            pos.append(s.anomalous)
            weights.append(s.weights)
            n_regions += s.n_regions
    pos = np.concatenate(pos) if pos else np.zeros(0, np.float32)
    w = np.concatenate(weights) if weights else np.zeros(0)
    return ClassScores(neg, pos, w, copy=False), n_regions


def pixel_scores(maps, masks) -> tuple[ClassScores, int]:
    """Every pixel's score split by its mask, with PRO weights; and the number of regions."""
    maps, masks = list(maps), list(masks)
    n_all = sum(np.asarray(g).size for g in masks)
    n_map = sum(np.asarray(m).size for m in maps)
    if len(maps) != len(masks) or n_map != n_all:
        raise ValueError(f"maps and masks differ in size ({n_map} vs {n_all} pixels)")
    n_pos = sum(int(np.count_nonzero(g)) for g in masks)
    # one image split at a time, straight into the merged array: no pixel is held twice
    return _merged((split_pixels(m, g) for m, g in zip(maps, masks)), n_all - n_pos)


def aupro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Normalised area under PRO(FPR) for FPR in [0, fpr_limit]; nan without any region."""
    scores, n_regions = pixel_scores(maps, masks)
    return scores.aupro(n_regions, fpr_limit)


def pixel_metrics(maps, masks, fpr_limit: float = 0.3) -> dict:
    """pixel_AUROC, pixel_F1Max (and its threshold) and AUPRO from one split of the pixels.

    ``maps`` and ``masks``: arrays [N, H, W], or lists of 2-D arrays (pairwise the same shape).
    """
    return split_metrics(*pixel_scores(maps, masks), fpr_limit)


def split_metrics(scores: ClassScores, n_regions: int, fpr_limit: float = 0.3) -> dict:
    """pixel_AUROC, pixel_F1Max (and its threshold) and AUPRO of split pixels (``merge_splits``)."""
    f1, thr = scores.f1_max()
    return {"pixel_AUROC": scores.auroc(), "pixel_F1Max": f1,
            "AUPRO": scores.aupro(n_regions, fpr_limit), "pixel_threshold": thr}


def detection_metrics(image_scores_max, image_scores_mean, image_labels,
                      pixels: list | None = None):
    """anomalib-named metrics: image level for both scores; pixel level given ``pixels``, a list
    of ``PixelSplit`` (one per image with a mask; emptied as it is read)."""
    img = ClassScores.from_labels(image_scores_max, image_labels)
    img_mean = ClassScores.from_labels(image_scores_mean, image_labels)
    (f1, thr), (f1_mean, thr_mean) = img.f1_max(), img_mean.f1_max()
    out = {
        "image_AUROC": img.auroc(), "image_F1Max": f1, "image_threshold": thr,
        "image_AUROC_mean": img_mean.auroc(), "image_F1Max_mean": f1_mean,
        "image_threshold_mean": thr_mean,
    }
    if pixels:
        out.update(split_metrics(*merge_splits(pixels, consume=True)))
    return out
