"""Test on MVTec-layout folders, predict on any images, and draw heatmap overlays.

Layout: ``DATA/test/<type>/<image>`` ('good' = normal) and
``DATA/ground_truth/<type>/<stem>_mask.png``. Types without a ground-truth folder are scored
at image level only. Pixel metrics are computed at the model's input size (masks are resized
with nearest neighbour), as anomalib does.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch

from fractalsynth.images import (ImageError, canvas_boxes, is_image_name, list_images, load_ground_truth,
                                 load_image, piece_boxes, prepare_normal, resize)

from .choices import IMAGE_SCORES, MAP_KINDS, NORMALS_QUANTILE
from .metrics import PixelSplit, detection_metrics, split_pixels
from .model import FractalAD
from .train import (HOLDOUT_FILE, RUN_SCHEMA, RUN_VERSION, hold_freed_memory, pick_device, write_json,
                    write_whole)


class RunError(ValueError):
    """A run folder that cannot be used; the message says why and what to do."""


def averaged(meta: dict) -> bool:
    """Whether a run's model.pt is a moving average of its weights (``fit --ema``)."""
    return meta["fit"].get("ema", 0.0) > 0


def load_run(run_dir: str, device: str | torch.device = "auto", trained: bool = False,
             hold_memory: bool = True, fold: bool = True):
    """(model in eval mode on ``device``, run metadata) from a ``fractalad fit`` folder.

    An ``--ema`` run's model is the moving average of its weights; ``trained`` loads the
    weights training reached instead (for any other run both are the same). With ``fold``
    its batch norms are folded into the convs (``FractalAD.fold_batchnorm``): the same maps,
    faster, but the model can not train; ``fold=False`` keeps them. On the CPU the
    process keeps freed memory for reuse (``hold_freed_memory``), as ``fit`` does: a setting
    for the whole process, which ``hold_memory=False`` leaves alone (a service that also
    does other work, say; 256 px maps then run about a third as fast).
    """
    path = os.path.join(run_dir, "model.pt")
    if not os.path.isfile(path):
        raise RunError(f"{path}: missing; is {run_dir} a finished 'fractalad fit' run?")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        meta = state["meta"]
    except Exception as e:
        raise RunError(f"{path}: unreadable ({type(e).__name__}); re-run 'fractalad fit'") from None
    if meta.get("schema") != RUN_SCHEMA or int(meta.get("version", 0)) != RUN_VERSION:
        raise RunError(f"{path}: run format {meta.get('schema')} v{meta.get('version')} is not "
                       f"this fractalad's ({RUN_SCHEMA} v{RUN_VERSION}); re-train with this version")
    fit = meta["fit"]
    device = pick_device(device) if isinstance(device, str) else device
    model = FractalAD(fit["backbone"], fit["kd"], pretrained=False, head_width=fit.get("head_width"),
                      input_blur=fit.get("input_blur", 0.0))
    weights = state["model"]
    if trained and averaged(meta):
        if "trained" not in state:
            raise RunError(f"{path}: holds only the moving average (saved by an older fractalad); "
                           "drop --trained, or re-run 'fractalad fit'")
        weights = {**weights, **state["trained"]}
    model.load_state_dict(weights)
    model = (model.fold_batchnorm() if fold else model).to(device).eval()
    # oneDNN's channels-last kernels: 1.1-1.5x the maps per second (benchmarks/bench_layout.py);
    # not measured for GPU inference, which keeps the default layout
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
        if hold_memory:  # a 256 px batch of maps: 2.9x the images/s (bench_cpu_heap --stage maps)
            hold_freed_memory()
    return model, meta


@dataclass
class TestSet:
    """Images of an MVTec-layout test folder with labels, types and optional masks."""

    paths: list
    types: list
    labels: np.ndarray
    mask_paths: list  # None where the type has no ground truth (or the image is good)


def read_test_set(root: str) -> TestSet:
    """Parse DATA/test and DATA/ground_truth; clear errors for missing or orphan files."""
    test_dir = os.path.join(root, "test")
    gt_dir = os.path.join(root, "ground_truth")
    if not os.path.isdir(test_dir):
        raise ImageError(f"{test_dir}: missing; --data must be an MVTec-layout folder with "
                         "test/<type>/ (and ground_truth/<type>/ for masks)")
    types = sorted(d for d in os.listdir(test_dir)
                   if not d.startswith(".") and os.path.isdir(os.path.join(test_dir, d)))
    if not types:
        raise ImageError(f"{test_dir}: no defect-type folders inside")
    paths, tlist, labels, masks = [], [], [], []
    for t in types:
        imgs = list_images(os.path.join(test_dir, t), recursive=False)
        tgt = os.path.join(gt_dir, t)
        found = _masks_by_stem(tgt, imgs, t) if t != "good" and os.path.isdir(tgt) else None
        for p in imgs:
            stem = os.path.splitext(os.path.basename(p))[0]
            mp = None
            if found is not None:
                mp = found.get(stem)
                if mp is None:
                    raise ImageError(f"{os.path.join(tgt, stem + '_mask.png')}: missing mask for {p}; "
                                     "add it or remove the image")
            paths.append(p)
            tlist.append(t)
            labels.append(0 if t == "good" else 1)
            masks.append(mp)
    labels = np.array(labels)
    if labels.min() == labels.max():
        raise ImageError(f"{test_dir}: needs both 'good' and defect images to score detection")
    return TestSet(paths, tlist, labels, masks)


def _masks_by_stem(folder: str, images: list, kind: str) -> dict:
    """Each test image's mask in ``folder``, by the image's stem: ``<stem>_mask.<ext>`` (MVTec) or
    ``<stem>.<ext>`` (BTAD, VisA), any image format; orphans and doubles are errors."""
    stems = {os.path.splitext(os.path.basename(p))[0] for p in images}
    found = {}
    for name in sorted(os.listdir(folder)):
        if not is_image_name(name):
            continue  # .DS_Store, Thumbs.db, notes: not masks
        base = os.path.splitext(name)[0]
        mvtec = base[:-len("_mask")] if base.endswith("_mask") else None
        stem = mvtec if mvtec in stems else base
        path = os.path.join(folder, name)
        if stem not in stems:
            raise ImageError(f"{path}: mask without a test image (expected test/{kind}/"
                             f"{mvtec or base}.*); remove it")
        if stem in found:
            raise ImageError(f"{path}: a second mask for test/{kind}/{stem}.* beside {found[stem]}; "
                             "keep one")
        found[stem] = path
    return found


def preprocess(paths, size: int, channels: int, sizes: list | None = None,
               skipped: list | None = None, aspect: float = 0.0,
               boxes: list | None = None) -> np.ndarray:
    """uint8 [N, C, S, S] images prepared like the training normals (original sizes to ``sizes``;
    with a ``skipped`` list, unreadable images are left out and their errors appended to it).

    ``aspect`` > 0 (a run trained on ``generate --pieces``): each image is cut like the normals
    were, the pieces are returned instead, and ``boxes`` gets each image's ``canvas_boxes``.
    """
    out = []
    for p in paths:
        try:
            img = load_image(p)
            if aspect:
                cuts = piece_boxes(img.shape[0], img.shape[1], aspect)
                pieces = [prepare_normal(img[t:b, l:r], size, channels) for t, b, l, r in cuts]
            else:
                pieces = [prepare_normal(img, size, channels)]
        except ImageError as e:
            error = e if e.path else ImageError(f"{p}: {e}", p)
            if skipped is None:
                raise error from None
            skipped.append(error)
            continue
        out += pieces
        if sizes is not None:
            sizes.append(img.shape[:2])
        if aspect and boxes is not None:
            boxes.append(canvas_boxes(cuts, img.shape[:2], size))
    if not out:
        return np.zeros((0, channels, size, size), np.uint8)
    return np.stack(out).transpose(0, 3, 1, 2)


def stitch(pieces: np.ndarray, boxes: list, size: int) -> np.ndarray:
    """Per image, its pieces (maps [P, S, S] or images [P, C, S, S]) resized into their
    ``canvas_boxes`` of one S x S canvas: [N, ..., S, S], as if the image had been stretched."""
    channels_first = pieces.ndim == 4
    hwc = pieces.transpose(0, 2, 3, 1) if channels_first else pieces
    out = np.empty((len(boxes), size, size, *hwc.shape[3:]), pieces.dtype)
    k = 0
    for n, image_boxes in enumerate(boxes):
        for t, b, l, r in image_boxes:
            out[n, t:b, l:r] = resize(hwc[k], b - t, r - l)
            k += 1
    if k != len(pieces):
        raise ValueError(f"{len(pieces)} pieces, but the boxes place {k}")
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)) if channels_first else out


FLIPS = ((), (-1,), (-2,), (-2, -1))  # identity, horizontal, vertical, both
NORM_QUANTILES = (0.9, 0.995)
CALIBRATION_IMAGES = 200
THRESHOLDS_FILE = "thresholds.json"
TEST_SCORES_FILE = "scores.csv"  # test's per-image scores, beside metrics.json
TEST_SCORES_HEADER = ["path", "type", "label", "score_max", "score_mean"]


def flip_averaged_map(map_fn, x: torch.Tensor) -> torch.Tensor:
    """Mean of ``map_fn`` on ``x`` and on its horizontal, vertical and double flips, flipped back."""
    total = map_fn(x)
    for dims in FLIPS[1:]:
        total = total + map_fn(x.flip(dims)).flip(dims)
    return total / len(FLIPS)


@dataclass(frozen=True)
class MapNorm:
    """The 0.9 and 0.995 quantiles of normal images' head and student-teacher maps.

    ``combine`` puts both maps on one scale (0 at the 0.9 quantile, 0.5 at the 0.995 one) and
    averages them, as EfficientAD merges its two maps; see docs/magnetic_tile.md for why.
    """

    head: tuple
    student: tuple

    @classmethod
    def from_normals(cls, pairs: np.ndarray) -> "MapNorm":
        """The quantiles of map pairs [N, 2, S, S] of normal images."""
        return cls(*(tuple(float(q) for q in np.quantile(pairs[:, i], NORM_QUANTILES)) for i in (0, 1)))

    def offsets_and_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """Per map (head, student-teacher): its 0.9 quantile and the gap up to its 0.995 one,
        each float32 [1, 2, 1, 1]; ``combine`` is 0.25 * sum((pair - offset) / span)."""
        lo = np.array([self.head[0], self.student[0]], np.float32)
        span = np.maximum(np.array([self.head[1], self.student[1]], np.float32) - lo, 1e-12)
        return lo.reshape(1, 2, 1, 1), span.reshape(1, 2, 1, 1)

    def combine(self, pairs: np.ndarray) -> np.ndarray:
        """Map pairs [N, 2, S, S] -> combined maps [N, S, S] (float32)."""
        lo, span = self.offsets_and_spans()
        return (0.25 * ((pairs - lo) / span).sum(1)).astype(np.float32)


@torch.no_grad()
def _batched_maps(model: FractalAD, images_u8: np.ndarray, batch_size: int, tta: bool, pair: bool):
    """(maps float32 [N, C, S, S], images/s): C = 2 (head, student-teacher) with ``pair``, else 1."""
    device = next(model.parameters()).device
    base = model.map_pair if pair else model.anomaly_map
    map_fn = (lambda x: flip_averaged_map(base, x)) if tta else base
    out = []
    map_fn(torch.from_numpy(images_u8[:1]).to(device).float() / 255)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for s in range(0, len(images_u8), batch_size):
        x = torch.from_numpy(images_u8[s:s + batch_size]).to(device).float() / 255
        out.append(map_fn(x).cpu().numpy())
    dt = time.perf_counter() - t
    return np.concatenate(out), len(images_u8) / max(dt, 1e-9)


def anomaly_maps(model: FractalAD, images_u8: np.ndarray, batch_size: int = 32, tta: bool = False,
                 norm: MapNorm | None = None):
    """(maps float32 [N, S, S], images/s) for uint8 [N, C, S, S] images; float32 throughout,
    since bf16 maps tie many pixel scores and bias the pixel metrics. ``tta``: flip-averaged;
    ``norm``: the combined head + student-teacher map instead of the head's."""
    maps, ips = _batched_maps(model, images_u8, batch_size, tta, pair=norm is not None)
    return (norm.combine(maps) if norm is not None else maps[:, 0]), ips


def image_maps(model: FractalAD, inputs: np.ndarray, boxes: list, size: int, batch_size: int = 32,
               tta: bool = False, norm: MapNorm | None = None):
    """(maps [N, S, S], images [N, C, S, S], images/s) of ``preprocess``'s output: with
    ``boxes`` (a pieces run), each image's pieces and their maps are stitched together."""
    maps, ips = anomaly_maps(model, inputs, batch_size, tta, norm)
    if not boxes:
        return maps, inputs, ips
    return stitch(maps, boxes, size), stitch(inputs, boxes, size), ips * len(boxes) / len(inputs)


def fit_map_norm(model: FractalAD, normals_u8: np.ndarray, batch_size: int = 32,
                 tta: bool = False) -> MapNorm:
    """The MapNorm of uint8 normal images [N, C, S, S] (distillation runs only)."""
    return _normals_maps(model, normals_u8, batch_size, tta, "combined")[0]


def _normals_maps(model: FractalAD, normals_u8: np.ndarray, batch_size: int, tta: bool,
                  map_kind: str) -> tuple[MapNorm | None, np.ndarray]:
    """(scales or None, maps [N, S, S]) of normal images; a combined map takes its scales from
    the same pass, so the normals go through the model once."""
    if map_kind != "combined":
        return None, anomaly_maps(model, normals_u8, batch_size, tta)[0]
    pairs = _batched_maps(model, normals_u8, batch_size, tta, pair=True)[0]
    norm = MapNorm.from_normals(pairs)
    return norm, norm.combine(pairs)


def _image_count(images: np.ndarray, boxes: list | None) -> int:
    """How many images ``preprocess``'s output holds: a pieces run's boxes have one entry each."""
    return len(boxes) if boxes else len(images)


def calibration_images(data: str, size: int, channels: int, limit: int = CALIBRATION_IMAGES,
                       aspect: float = 0.0, boxes: list | None = None):
    """Up to ``limit`` images of DATA/train/good, evenly spaced in name order, prepared (cut
    into pieces with ``aspect``, as ``preprocess``)."""
    folder = os.path.join(data, "train", "good")
    if not os.path.isdir(folder):
        raise ImageError(f"{folder}: missing; --map combined calibrates on the normal training "
                         "images of an MVTec-layout folder")
    paths = sorted(list_images(folder, recursive=False))
    if not paths:
        raise ImageError(f"{folder}: no images inside; --map combined needs normal images there")
    pick = np.unique(np.linspace(0, len(paths) - 1, min(limit, len(paths))).round().astype(int))
    return preprocess([paths[i] for i in pick], size, channels, aspect=aspect, boxes=boxes)


def _load_run_for_map(run_dir: str, device: str, map_kind: str, trained: bool = False):
    """load_run, after checking that the run can draw ``map_kind`` maps."""
    if map_kind not in MAP_KINDS:
        raise ValueError(f"map_kind must be one of {MAP_KINDS}, got {map_kind!r}")
    model, meta = load_run(run_dir, device, trained)
    if map_kind == "combined" and not model.kd:
        raise RunError(f"{run_dir}: trained without distillation, so it has no student-teacher map; "
                       "use --map head")
    return model, meta


def held_out_normals(run_dir: str) -> tuple[np.ndarray, list] | None:
    """(uint8 [N, C, S, S], boxes) of the normals the run never trained on (``generate
    --holdout``), else None; for a pieces run the N images are pieces and ``boxes`` holds each
    held-out image's ``canvas_boxes`` (as ``preprocess`` fills it), else it is empty."""
    path = os.path.join(run_dir, HOLDOUT_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as z:
            images = z["images"].transpose(0, 3, 1, 2)
            layout = z["layout"] if "layout" in z.files else np.zeros((0, 5), np.int32)
    except (OSError, ValueError, KeyError):
        raise RunError(f"{path}: unreadable; delete it (the run then calibrates on "
                       "DATA/train/good) or re-run 'fractalad fit'") from None
    # the pieces of one image are stored one after another
    starts = np.flatnonzero(np.diff(layout[:, 0])) + 1
    boxes = [[tuple(int(v) for v in row[1:]) for row in group]
             for group in np.split(layout, starts)] if len(layout) else []
    return images, boxes


def calibration_normals(run_dir: str, data: str | None, size: int, channels: int,
                        aspect: float = 0.0, boxes: list | None = None) -> tuple[np.ndarray, str]:
    """(normals, where from): the run's held-out ones, else DATA/train/good (``data`` given;
    ``aspect`` and ``boxes`` as for ``preprocess``)."""
    held = held_out_normals(run_dir)
    if held is not None:
        images, held_boxes = held
        if boxes is not None:
            boxes.extend(held_boxes)
        return images, f"{_image_count(images, held_boxes)} held-out normals ({HOLDOUT_FILE})"
    if data is None:
        raise RunError(f"{run_dir}: no held-out normals; pass --normals DIR (good images not "
                       "used in training), or train on shards made with --holdout")
    images = calibration_images(data, size, channels, aspect=aspect, boxes=boxes)
    return images, f"{_image_count(images, boxes)} images of DATA/train/good (seen in training)"


def calibrate_run(run_dir: str, normals: str | None = None, quantile: float = NORMALS_QUANTILE,
                  device: str = "auto", batch_size: int = 32, tta: bool = False,
                  smooth: float = 0.0, map_kind: str = "head", image_score: str = "max",
                  trained: bool = False) -> dict:
    """Thresholds from normal images alone, for lines that have no defect photos.

    The pixel threshold is the ``quantile`` of the normals' max-of-map scores, so that share of
    normals gets an empty mask. The image threshold is the same quantile of their
    ``image_score`` ('max': the same number, so an image is flagged exactly when its mask is
    not empty; 'mean': the mean of the map). ``normals``: a folder of good images the run
    never trained on; default: the run's held-out normals (``fractalsynth generate
    --holdout``). ``trained``: an ``--ema`` run's trained weights, not their average. Saves
    thresholds.json for ``predict`` (the combined map's scales come from the same normals) and
    returns it.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    _check_image_score(image_score)
    model, meta = _load_run_for_map(run_dir, device, map_kind, trained)
    aspect, boxes = meta.get("piece_aspect", 0.0), []
    if normals is None:
        images, source = calibration_normals(run_dir, None, meta["size"], meta["channels"],
                                             aspect, boxes)
    else:
        images = preprocess(list_images(normals), meta["size"], meta["channels"], aspect=aspect,
                            boxes=boxes)
        source = f"{_image_count(images, boxes)} images of {os.path.abspath(normals)}"
    norm, maps = _normals_maps(model, images, batch_size, tta, map_kind)
    if boxes:  # the scales come from every piece, each image's scores from its pieces stitched
        maps = stitch(maps, boxes, meta["size"])
    maps = smooth_maps(maps, smooth)
    scores = image_scores(maps, image_score)
    threshold = float(np.quantile(scores, quantile))
    pixel = float(np.quantile(image_scores(maps, "max"), quantile))
    saved = {"image": threshold, "pixel": pixel, "image_score": image_score, "tta": tta,
             "smooth": smooth, "map": map_kind, "trained": trained and averaged(meta),
             "map_norm": None if norm is None else asdict(norm),
             "source": f"quantile {quantile} of the image scores ({image_score} of the map) of {source}",
             "normal_scores": {"median": float(np.median(scores)), "max": float(scores.max()),
                               "n": len(scores)}}
    write_json(os.path.join(run_dir, THRESHOLDS_FILE), saved)
    return saved


def _check_image_score(kind: str) -> None:
    if kind not in IMAGE_SCORES:
        raise ValueError(f"image_score must be one of {IMAGE_SCORES}, got {kind!r}")


def image_scores(maps: np.ndarray, kind: str = "max") -> np.ndarray:
    """One score per map [N, H, W]: its max (the paper's) or its mean."""
    _check_image_score(kind)
    flat = maps.reshape(len(maps), -1)
    return flat.max(1) if kind == "max" else flat.mean(1)


def held_out_operating_point(normal_scores: np.ndarray, scores: np.ndarray, types,
                             quantile: float = NORMALS_QUANTILE) -> dict:
    """What a threshold at the ``quantile`` of normals' image scores flags among test images of
    each type ('good' included): the decision ``calibrate`` would set, judged on the test set."""
    threshold = float(np.quantile(normal_scores, quantile))
    types = np.asarray(types)
    flagged = np.asarray(scores) >= threshold
    rates = {t: float(flagged[types == t].mean()) for t in sorted(set(types.tolist()))}
    if (types != "good").any():
        rates["all_defects"] = float(flagged[types != "good"].mean())
    return {"quantile": quantile, "threshold": threshold, "n_normals": len(normal_scores),
            "flagged": rates}


def smooth_maps(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-blurred float32 maps [N, S, S] (``sigma`` in map pixels; 0: the maps unchanged)."""
    if sigma <= 0:
        return maps
    return np.stack([cv2.GaussianBlur(m, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) for m in maps])


def display_scale(map_kind: str, threshold: float) -> float:
    """The factor that colours a map: head maps are probabilities (1); combined maps have no
    upper bound (defects reach 5-10), so their threshold is put at mid-scale instead."""
    return 0.5 / threshold if map_kind == "combined" and threshold > 0 else 1.0


def _heat_overlay(image: np.ndarray, amap: np.ndarray, scale: float = 1.0) -> np.ndarray:
    rgb = image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)
    heat = cv2.applyColorMap(np.clip(amap * scale * 255, 0, 255).astype(np.uint8),
                             cv2.COLORMAP_JET)[:, :, ::-1]
    return cv2.addWeighted(rgb, 0.55, heat, 0.45, 0)


def overlay(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, title: str,
            scale: float = 1.0) -> np.ndarray:
    """image | heatmap overlay (map x ``scale``) | ground truth, with a title band (RGB uint8)."""
    rgb = image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)
    gt = np.zeros_like(rgb) if mask is None else np.repeat((mask > 0).astype(np.uint8)[:, :, None] * 255, 3, 2)
    row = np.concatenate([rgb, _heat_overlay(image, amap, scale), gt], axis=1)
    band = np.full((18, row.shape[1], 3), 255, np.uint8)
    cv2.putText(band, title, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, row], axis=0)


def _write_rgb(path, img):
    _write_image(path, img[:, :, ::-1])


def _write_image(path, img):
    if not cv2.imwrite(path, img):
        raise OSError(f"cannot write {path}")


def format_table(metrics: dict) -> str:
    """Metrics as a plain-text table, one row per defect type plus 'all'."""
    cols = ["image_AUROC", "image_AUROC_mean", "image_F1Max", "pixel_AUROC", "pixel_F1Max", "AUPRO"]
    lines = [f"{'type':<12}" + "".join(f"{c:>18}" for c in cols)]
    for name, row in metrics.items():
        lines.append(f"{name:<12}" + "".join(
            f"{row.get(c, float('nan')):>18.4f}" for c in cols))
    return "\n".join(lines)


def _ground_truth(mask_path, shape, image_shape=None) -> np.ndarray:
    """The binary mask of one test image at ``shape`` (zeros without a mask file); with
    ``image_shape`` (its image's height and width) a mask of another size is refused."""
    if mask_path is None:
        return np.zeros(shape, np.uint8)
    try:
        m = load_ground_truth(mask_path)
    except ImageError as e:
        raise ImageError(f"{mask_path}: unreadable mask; replace it", mask_path) from e
    if image_shape is not None and m.shape != tuple(image_shape):
        # MVTec's masks are their images' size; another size is most likely another image's mask
        raise ImageError(f"{mask_path}: the mask is {m.shape[0]}x{m.shape[1]} but its image is "
                         f"{image_shape[0]}x{image_shape[1]}; a mask must be the size of its image")
    if m.shape != tuple(shape):
        m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return m


def _split_at(amap: np.ndarray, mask_path, image_hw, size: int, pixel_resolution: str) -> PixelSplit:
    """One test image's map split by its ground truth, at the model's size or the image's own."""
    if pixel_resolution == "model":
        return split_pixels(amap, _ground_truth(mask_path, (size, size), image_hw))
    h, w = image_hw
    return split_pixels(cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR),
                        _ground_truth(mask_path, image_hw, image_hw))


def default_test_dir(run_dir: str, pixel_resolution: str = "model", tta: bool = False,
                     smooth: float = 0.0, map_kind: str = "head", trained: bool = False) -> str:
    """RUN_DIR/test, suffixed by each setting that changes the metrics (e.g. test-combined-trained)."""
    parts = ["test"]
    parts += ["combined"] if map_kind == "combined" else []
    parts += ["trained"] if trained else []
    parts += ["tta"] if tta else []
    parts += [f"smooth{smooth:g}"] if smooth else []
    parts += ["original"] if pixel_resolution == "original" else []
    return os.path.join(run_dir, "-".join(parts))


@dataclass
class TestMaps:
    """One run's maps of a test set, before any smoothing or score."""

    maps: np.ndarray  # float32 [N, S, S]; a pieces run's are stitched on the S x S canvas
    images: np.ndarray  # uint8 [N, C, S, S], laid out as the maps are
    sizes: list  # each image's own (height, width)
    images_per_s: float
    norm: MapNorm | None  # the combined map's scales
    calibration: str | None  # where those scales came from
    held_maps: np.ndarray | None  # the held-out normals' maps, when the scales came from them


def test_set_maps(model: FractalAD, meta: dict, run_dir: str, data: str, ts: TestSet,
                  batch_size: int = 32, tta: bool = False, map_kind: str = "head") -> TestMaps:
    """The maps of every image of ``ts`` (``read_test_set(data)``) by a loaded run; a combined
    map first takes its scales from the run's held-out normals, else from DATA/train/good."""
    size, ch, aspect = meta["size"], meta["channels"], meta.get("piece_aspect", 0.0)
    norm, calibration, held_maps = None, None, None
    if map_kind == "combined":
        normal_boxes = []
        normals, calibration = calibration_normals(run_dir, data, size, ch, aspect, normal_boxes)
        norm, normal_maps = _normals_maps(model, normals, batch_size, tta, map_kind)
        if os.path.isfile(os.path.join(run_dir, HOLDOUT_FILE)):  # the held-out normals' maps are made
            held_maps = stitch(normal_maps, normal_boxes, size) if normal_boxes else normal_maps
    sizes, boxes = [], []
    inputs = preprocess(ts.paths, size, ch, sizes, aspect=aspect, boxes=boxes)
    maps, images, ips = image_maps(model, inputs, boxes, size, batch_size, tta, norm)
    return TestMaps(maps, images, sizes, ips, norm, calibration, held_maps)


def test_set_metrics(maps: np.ndarray, ts: TestSet, sizes: list,
                     pixel_resolution: str = "model") -> dict:
    """detection_metrics of a test set's maps [N, S, S]: per defect type (against the good
    images) and 'all'; pixels at S x S, or at each image's own size (``sizes``) with 'original'."""
    smax, smean = image_scores(maps, "max"), image_scores(maps, "mean")
    has_px = np.array([m is not None or lab == 0 for m, lab in zip(ts.mask_paths, ts.labels)])
    size = maps.shape[-1]
    # each map is split by its mask as soon as it is made (at the original resolution, upsampled
    # first): the pixels are held once, as float32, not as maps plus masks
    splits = [_split_at(maps[i], ts.mask_paths[i], sizes[i], size, pixel_resolution)
              if has_px[i] else None for i in range(len(maps))]
    types = np.array(ts.types)
    results = {}
    for t in sorted(set(ts.types) - {"good"}) + ["all"]:
        sel = (types == t) | (types == "good") if t != "all" else np.ones(len(types), bool)
        px = np.flatnonzero(sel & has_px)
        pixels = [splits[i] for i in px] if (ts.labels[px] == 1).any() else None
        if t == "all":
            splits = None  # the last use: merging frees each image's pixels as it copies them
        results[t] = detection_metrics(smax[sel], smean[sel], ts.labels[sel], pixels=pixels)
    return results


def _check_pixel_resolution(pixel_resolution: str) -> None:
    if pixel_resolution not in ("model", "original"):
        raise ValueError(f"pixel_resolution must be 'model' or 'original', got {pixel_resolution!r}")


def test_run(run_dir: str, data: str, out: str | None = None, device: str = "auto",
             n_overlays: int = 8, batch_size: int = 32, pixel_resolution: str = "model",
             tta: bool = False, smooth: float = 0.0, map_kind: str = "head",
             image_score: str = "max", trained: bool = False) -> dict:
    """Score the test set: metrics.json, per-image scores.csv, a table, thresholds, overlays.

    ``pixel_resolution``: 'model' scores pixels at the model's input size; 'original' upsamples
    each map to its image's own size (MVTec's convention; slower on large images). ``tta``:
    average each map with those of the image's flips (4x the inference). ``smooth``: Gaussian
    sigma (pixels at the model's input size) applied to each map before any score, as
    PatchCore-style methods do (sigma 4 at 256 px); the paper: 0. ``map_kind``: 'head' (the
    paper's map) or 'combined' (head and student-teacher maps averaged, each first scaled by its
    quantiles on the run's held-out normals, else on up to 200 images of DATA/train/good;
    distillation runs only). ``image_score``: which score ('max' or 'mean' of the map) gets the
    F1Max image threshold saved for ``predict`` and orders the overlays; metrics.json reports
    both. ``trained``: test an ``--ema`` run's trained weights, not their moving average. The
    saved thresholds remember all five. ``out`` defaults to ``default_test_dir``, so tests with
    other settings do not overwrite each other's metrics and overlays.
    """
    _check_pixel_resolution(pixel_resolution)
    _check_image_score(image_score)
    model, meta = _load_run_for_map(run_dir, device, map_kind, trained)
    trained = trained and averaged(meta)  # only an --ema run has two sets of weights
    ts = read_test_set(data)
    out = out or default_test_dir(run_dir, pixel_resolution, tta, smooth, map_kind, trained)
    os.makedirs(out, exist_ok=True)
    size = meta["size"]
    t0 = time.perf_counter()
    tm = test_set_maps(model, meta, run_dir, data, ts, batch_size, tta, map_kind)
    norm, held_maps, images = tm.norm, tm.held_maps, tm.images
    maps = smooth_maps(tm.maps, smooth)
    smax, smean = image_scores(maps, "max"), image_scores(maps, "mean")
    results = test_set_metrics(maps, ts, tm.sizes, pixel_resolution)
    types = np.array(ts.types)
    key = "image_threshold" if image_score == "max" else "image_threshold_mean"
    score = {"max": smax, "mean": smean}[image_score]
    operating_point = None
    held = held_out_normals(run_dir)
    if held is not None:  # the threshold 'calibrate' would set, without a defect photo
        if held_maps is None:
            held_maps = image_maps(model, held[0], held[1], size, batch_size, tta, norm)[0]
        held_scores = image_scores(smooth_maps(held_maps, smooth), image_score)
        operating_point = held_out_operating_point(held_scores, score, types)
    thresholds = {"image": results["all"][key], "image_score": image_score, "tta": tta,
                  "smooth": smooth, "map": map_kind, "trained": trained,
                  "map_norm": None if norm is None else asdict(norm),
                  "source": f"F1Max on {os.path.abspath(data)}"}
    # without masks the image-level max-of-map threshold is the best guess for the masks too
    thresholds["pixel"] = results["all"].get("pixel_threshold", results["all"]["image_threshold"])
    report = {"metrics": results, "thresholds": thresholds, "images_per_s": tm.images_per_s,
              "device": str(next(model.parameters()).device), "n_images": len(ts.paths),
              "seconds": time.perf_counter() - t0, "data": os.path.abspath(data),
              "out": os.path.abspath(out),
              "image_score": "max of the map (image_*_mean: mean of the map; thresholds.image_score: "
                             "the one thresholded)",
              "pixel_resolution": pixel_resolution, "tta": tta, "smooth": smooth,
              "map": map_kind, "trained": thresholds["trained"], "map_norm": thresholds["map_norm"],
              "calibration": tm.calibration,
              "held_out_operating_point": operating_point}
    write_json(os.path.join(out, "metrics.json"), report)
    rows = [[p, t, int(lab), f"{a:.6f}", f"{b:.6f}"]
            for p, t, lab, a, b in zip(ts.paths, ts.types, ts.labels, smax, smean)]
    write_whole(os.path.join(out, TEST_SCORES_FILE),
                lambda tmp: _write_rows(tmp, [TEST_SCORES_HEADER, *rows]))
    write_json(os.path.join(run_dir, THRESHOLDS_FILE), thresholds)
    imgs_hwc = images.transpose(0, 2, 3, 1)
    defect = np.flatnonzero(ts.labels == 1)
    good = np.flatnonzero(ts.labels == 0)
    scale = display_scale(map_kind, thresholds["pixel"])
    picks = {"worst_defect": defect[np.argsort(score[defect])[:n_overlays]],
             "worst_good": good[np.argsort(-score[good])[:n_overlays]],
             "best_defect": defect[np.argsort(-score[defect])[:n_overlays]]}
    for kind, idx in picks.items():
        for rank, i in enumerate(idx):
            title = f"{kind} #{rank}: {ts.types[i]}/{os.path.basename(ts.paths[i])} score {score[i]:.3f}"
            _write_rgb(os.path.join(out, f"{kind}_{rank:02d}.png"),
                       overlay(imgs_hwc[i], maps[i], _ground_truth(ts.mask_paths[i], (size, size))
                               if ts.mask_paths[i] else None, title, scale))
    return report


def resize_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """Maps [N, H, W] resized to [N, size, size] (area filter when shrinking, else bilinear)."""
    if maps.shape[1:] == (size, size):
        return maps
    return np.stack([resize(m, size, size) for m in maps])


def test_map_mean(run_dirs: list, data: str, device: str = "auto", batch_size: int = 32,
                  map_kind: str = "combined", pixel_resolution: str = "model",
                  size: int | None = None) -> dict:
    """Metrics of the mean of several runs' maps of DATA's test set, and of each run's maps alone.

    Every map is first resized to one S x S grid (``size``; default: the largest run's input
    size), so runs of other sizes or recipes (pieces or not) average pixel by pixel. Combined
    maps average as they are, each being on its own normals' scale. Writes nothing: a research
    tool to judge an ensemble before anyone trains one; ``test`` stays the per-run command.
    """
    if not run_dirs:
        raise ValueError("give at least one run folder")
    _check_pixel_resolution(pixel_resolution)
    ts = read_test_set(data)
    members, sizes = [], []
    for run_dir in run_dirs:
        model, meta = _load_run_for_map(run_dir, device, map_kind)
        tm = test_set_maps(model, meta, run_dir, data, ts, batch_size, map_kind=map_kind)
        members.append((run_dir, meta["size"], tm.maps, tm.images_per_s))
        sizes = tm.sizes  # each image's own size, the same for every run
        del model, tm  # one model and one run's images at a time
    grid = size or max(m[1] for m in members)
    total = np.zeros((len(ts.paths), grid, grid), np.float64)
    report = {"map": map_kind, "grid": grid, "pixel_resolution": pixel_resolution,
              "data": os.path.abspath(data), "members": []}
    for run_dir, run_size, maps, ips in members:
        maps = resize_maps(maps, grid)
        total += maps
        report["members"].append({"run": os.path.abspath(run_dir), "size": run_size,
                                  "images_per_s": ips,
                                  "metrics": test_set_metrics(maps, ts, sizes, pixel_resolution)})
    report["metrics"] = test_set_metrics((total / len(members)).astype(np.float32), ts, sizes,
                                         pixel_resolution)
    return report


def _saved_thresholds(run_dir: str) -> dict:
    """What the last ``test`` or ``calibrate`` saved in RUN_DIR/thresholds.json ({} before)."""
    path = os.path.join(run_dir, THRESHOLDS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as fh:
            return dict(json.load(fh))
    except (ValueError, TypeError):
        raise RunError(f"{path}: unreadable; delete it and re-run 'fractalad test'") from None


def saved_map_norm(run_dir: str) -> MapNorm:
    """The MapNorm ``test --map combined`` saved for the run (a RunError if there is none)."""
    saved = _saved_thresholds(run_dir).get("map_norm")
    if not saved:
        raise RunError(f"{run_dir}: no saved scales for the combined map; run 'fractalad test "
                       f"{run_dir} --data DIR --map combined' or 'fractalad calibrate {run_dir} "
                       "--map combined' first")
    return MapNorm(**{k: tuple(v) for k, v in saved.items()})


def _predict_inputs(inputs) -> list[tuple[str, str]]:
    """(image path, output name) per image of the files and folders given.

    Names are paths below the deepest folder holding every input, without the extension, so
    test/good/0.png and test/crack/0.png come out as good/0 and crack/0.
    """
    paths, roots = [], []
    for p in inputs:
        if os.path.isdir(p):
            paths += list_images(p)
            roots.append(os.path.abspath(p))
        elif os.path.isfile(p):
            paths.append(p)
            roots.append(os.path.dirname(os.path.abspath(p)))
        else:
            raise ImageError(f"{p}: no such file or folder")
    common = os.path.commonpath(roots)
    named, seen = [], {}
    for path in paths:
        name = os.path.splitext(os.path.relpath(os.path.abspath(path), common))[0]
        if name in seen:
            raise ImageError(f"{path}: its outputs would overwrite those of {seen[name]} (both "
                             f"{name}.png); rename one, or predict them into separate --out folders")
        seen[name] = path
        named.append((path, name))
    return named


SCORES_HEADER = ["path", "score_max", "score_mean", "anomalous", "image_threshold",
                 "pixel_threshold", "image_score"]
PREDICT_SETTINGS = "predict.json"  # what an --out folder's rows were made with, for --resume


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rows_done(out: str, settings: dict) -> list[list[str]]:
    """The complete rows an earlier ``predict`` left in ``out``, if it used these settings."""
    csv_path, settings_path = os.path.join(out, "scores.csv"), os.path.join(out, PREDICT_SETTINGS)
    if not os.path.isfile(csv_path):
        return []
    fix = "drop --resume to predict every image again, or choose another --out"
    try:
        with open(settings_path) as fh:
            before = json.load(fh)
    except (OSError, ValueError):
        raise RunError(f"{settings_path}: missing or unreadable, so the rows of {csv_path} "
                       f"can not be matched to these settings; {fix}") from None
    changed = sorted(k for k in settings if before.get(k) != settings[k])
    if changed:
        raise RunError(f"{csv_path} was written with other settings ({', '.join(changed)}); "
                       f"resume with the same ones, or {fix}")
    with open(csv_path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or rows[0] != SCORES_HEADER:
        raise RunError(f"{csv_path}: not a scores.csv of this version; {fix}")
    done = rows[1:]
    if done and len(done[-1]) != len(SCORES_HEADER):  # cut short by a kill mid-write
        done = done[:-1]
    if any(len(row) != len(SCORES_HEADER) for row in done):
        raise RunError(f"{csv_path}: damaged (a row of the wrong length); {fix}")
    return done


def _write_rows(path: str, rows) -> None:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def _setting(option: str, value) -> str:
    """How a predict option with ``value`` is written on the command line."""
    if option in ("--tta", "--trained"):
        return option if value else "--no-" + option[2:]
    return f"{option} {value:g}" if isinstance(value, float) else f"{option} {value}"


def predict(run_dir: str, inputs, out: str, threshold: float | None = None,
            device: str = "auto", batch_size: int = 32, tta: bool | None = None,
            smooth: float | None = None, map_kind: str | None = None,
            image_score: str | None = None, trained: bool | None = None,
            skip_bad: bool = False, resume: bool = False, log=print) -> str:
    """Heatmaps, binary masks and a scores.csv for images or folders; returns the CSV path.

    Thresholds: ``threshold`` for both decisions, else those ``test`` (F1Max) or ``calibrate``
    (normals only) saved last (image: on ``image_score``; pixel: the mask), else 0.5. ``tta``
    (flip-averaged maps), ``smooth`` (Gaussian sigma), ``map_kind``, ``image_score`` ('max'
    or 'mean' of the map) and ``trained`` (an ``--ema`` run's trained weights, not their
    average) default to what was used for the saved thresholds, since they only hold for such
    maps; 'combined' needs saved scales, and saved thresholds are refused for other settings.
    Outputs keep each image's path below the deepest folder holding all inputs, so equal file
    names in different folders do not collide. An unreadable image stops the run (the rows
    before it are kept), or with ``skip_bad`` is left out and named through ``log``. ``resume``
    keeps the rows an earlier call with the same settings wrote to ``out`` and predicts only
    the images they lack.
    """
    if map_kind is not None and map_kind not in MAP_KINDS:
        raise ValueError(f"map_kind must be one of {MAP_KINDS}, got {map_kind!r}")
    if threshold is not None and not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    saved = _saved_thresholds(run_dir)
    # what the saved thresholds were set on (older thresholds.json: max, average weights)
    was = {"--map": saved.get("map", "head"), "--image-score": saved.get("image_score", "max"),
           "--tta": bool(saved.get("tta", False)), "--smooth": float(saved.get("smooth", 0.0)),
           "--trained": bool(saved.get("trained", False))}
    trained = was["--trained"] if trained is None else bool(trained)
    model, meta = load_run(run_dir, device, trained)
    named = _predict_inputs(inputs)
    if threshold is not None:
        thresholds = {"image": threshold, "pixel": threshold}
    else:
        thresholds = {"image": 0.5, "pixel": 0.5, **saved}
        thresholds.setdefault("pixel", thresholds["image"])
    tta = was["--tta"] if tta is None else bool(tta)
    smooth = was["--smooth"] if smooth is None else float(smooth)
    map_kind = was["--map"] if map_kind is None else map_kind
    image_score = was["--image-score"] if image_score is None else image_score
    _check_image_score(image_score)
    if threshold is None and saved:
        # a threshold only holds for the maps it was set on: the combined map is not on the
        # head's 0-1 scale, a mean of the map sits far below its max, and flip-averaging or
        # smoothing lowers a map's peaks
        now = {"--map": map_kind, "--image-score": image_score, "--tta": tta, "--smooth": smooth,
               "--trained": trained and averaged(meta)}
        for option in was:
            if was[option] != now[option]:
                raise RunError(f"{os.path.join(run_dir, THRESHOLDS_FILE)}: its thresholds are for "
                               f"{_setting(option, was[option])}, not {_setting(option, now[option])}; "
                               f"re-run 'fractalad test' or 'calibrate' with "
                               f"{_setting(option, now[option])}, or pass --threshold")
    norm = saved_map_norm(run_dir) if map_kind == "combined" else None
    scale = display_scale(map_kind, thresholds["pixel"])
    size, ch, aspect = meta["size"], meta["channels"], meta.get("piece_aspect", 0.0)
    settings = {"run": os.path.abspath(run_dir), "model_sha256": _file_sha256(os.path.join(run_dir, "model.pt")),
                "map": map_kind, "image_score": image_score, "tta": tta, "smooth": smooth,
                "trained": trained, "image_threshold": float(thresholds["image"]),
                "pixel_threshold": float(thresholds["pixel"]),
                "map_scales": [list(norm.head), list(norm.student)] if norm else None}
    done = _rows_done(out, settings) if resume else []
    if done:
        finished = {os.path.abspath(row[0]) for row in done}
        todo = [(p, name) for p, name in named if os.path.abspath(p) not in finished]
        log(f"resuming: {len(named) - len(todo)} of {len(named)} images already in "
            f"{os.path.join(out, 'scores.csv')}")
        named = todo
    os.makedirs(os.path.join(out, "heatmap"), exist_ok=True)
    os.makedirs(os.path.join(out, "mask"), exist_ok=True)
    write_json(os.path.join(out, PREDICT_SETTINGS), settings)
    csv_path = os.path.join(out, "scores.csv")
    # rewritten whole first: a row cut short by a kill is dropped before new rows follow it
    write_whole(csv_path, lambda tmp: _write_rows(tmp, [SCORES_HEADER, *done]))
    with open(csv_path, "a", newline="") as fh:
        w = csv.writer(fh)
        for s in range(0, len(named), batch_size):
            chunk, sizes, bad, boxes = named[s:s + batch_size], [], [], []
            try:
                inputs = preprocess([p for p, _ in chunk], size, ch, sizes, bad if skip_bad else None,
                                    aspect, boxes)
            except ImageError as e:
                raise ImageError(f"{e} (--skip-bad leaves such files out; --resume keeps the "
                                 "rows written so far)") from None
            for e in bad:
                log(f"skipped: {e}")
            left_out = {e.path for e in bad}
            chunk = [(p, name) for p, name in chunk if p not in left_out]
            if not chunk:
                continue
            maps, imgs, _ = image_maps(model, inputs, boxes, size, batch_size, tta, norm)
            maps = smooth_maps(maps, smooth)
            decided = image_scores(maps, image_score)
            for (p, name), img, m, score, (h0, w0) in zip(chunk, imgs.transpose(0, 2, 3, 1), maps,
                                                          decided, sizes):
                full = cv2.resize(m, (w0, h0), interpolation=cv2.INTER_LINEAR)
                heat, mask = (os.path.join(out, kind, f"{name}.png") for kind in ("heatmap", "mask"))
                os.makedirs(os.path.dirname(heat), exist_ok=True)
                os.makedirs(os.path.dirname(mask), exist_ok=True)
                _write_rgb(heat, _heat_overlay(img, m, scale))
                _write_image(mask, ((full >= thresholds["pixel"]) * 255).astype(np.uint8))
                w.writerow([p, f"{m.max():.6f}", f"{m.mean():.6f}", int(score >= thresholds["image"]),
                            f"{thresholds['image']:.6f}", f"{thresholds['pixel']:.6f}", image_score])
            fh.flush()  # each finished batch is on disk for a later --resume
    return csv_path
