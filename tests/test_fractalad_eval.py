import csv
import dataclasses
import json
import os
import shutil
import sys

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from skimage.measure import label

from fractalad.cli import main
from fractalsynth.images import ImageError, list_images
from fractalad.metrics import (aupro, auroc, detection_metrics, f1_max, merge_splits, pixel_metrics,
                               pixel_scores, split_metrics, split_pixels)
from compare import assert_apart, assert_close
from heap_probe import refault_count
from tiny_data import make_mvtec


def _brute_auroc(s, y):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def _brute_f1(s, y):
    best = 0
    for t in np.unique(s):
        pred = s >= t
        tp = (pred & (y == 1)).sum()
        prec = tp / max(pred.sum(), 1)
        rec = tp / (y == 1).sum()
        best = max(best, 2 * prec * rec / (prec + rec) if prec + rec else 0)
    return best


def _f1_at(s, y, t):
    pred = s >= t
    tp = (pred & (y == 1)).sum()
    return 2 * tp / (pred.sum() + (y == 1).sum())


def _brute_aupro(maps, masks, limit=0.3):
    """maps, masks: lists (or arrays) of 2-D images, pairwise the same shape."""
    fprs, pros = [0.0], [0.0]
    n_normal = sum((~m).sum() for m in masks)
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        preds = [m >= t for m in maps]
        fprs.append(sum((p & ~m).sum() for p, m in zip(preds, masks)) / n_normal)
        ov = []
        for pred, m in zip(preds, masks):
            lab, n = label(m, connectivity=2, return_num=True)
            ov += [pred[lab == r].mean() for r in range(1, n + 1)]
        pros.append(np.mean(ov))
    fprs, pros = np.array(fprs), np.array(pros)
    x = np.linspace(0, limit, 2001)
    return np.trapezoid(np.interp(x, fprs, pros), x) / limit


@pytest.mark.parametrize("seed", range(4))
def test_metrics_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    s = np.round(rng.random(60), 1)  # ties on purpose
    y = (rng.random(60) < 0.4).astype(int)
    assert auroc(s, y) == pytest.approx(_brute_auroc(s, y), abs=1e-12)
    assert f1_max(s, y)[0] == pytest.approx(_brute_f1(s, y), abs=1e-12)
    s_mean = np.round(rng.random(60), 2)
    det = detection_metrics(s, s_mean, y)
    assert det["image_F1Max_mean"] == pytest.approx(_brute_f1(s_mean, y), abs=1e-12)
    assert _f1_at(s_mean, y, det["image_threshold_mean"]) == pytest.approx(_brute_f1(s_mean, y), abs=1e-12)
    assert _f1_at(s, y, det["image_threshold"]) == pytest.approx(_brute_f1(s, y), abs=1e-12)
    masks = np.zeros((3, 12, 12), bool)
    masks[0, 2:5, 2:6] = True
    masks[0, 8:11, 7:9] = True
    masks[1, 4:9, 4:9] = True
    maps = np.round(rng.random(masks.shape) * 0.6 + masks * rng.random(masks.shape) * 0.5, 2)
    assert aupro(maps, masks) == pytest.approx(_brute_aupro(maps, masks), abs=2e-3)
    px = pixel_metrics(maps, masks)
    assert px["pixel_AUROC"] == pytest.approx(_brute_auroc(maps.ravel(), masks.ravel()), abs=1e-12)
    # images of different sizes (pixel metrics at the original resolutions)
    crops = [np.s_[:, :], np.s_[:9, 2:], np.s_[:5, :7]]
    maps_l, masks_l = [maps[i][c] for i, c in enumerate(crops)], [masks[i][c] for i, c in enumerate(crops)]
    flat_maps = np.concatenate([m.ravel() for m in maps_l])
    flat_masks = np.concatenate([m.ravel() for m in masks_l])
    px = pixel_metrics(maps_l, masks_l)
    assert px["AUPRO"] == pytest.approx(_brute_aupro(maps_l, masks_l), abs=2e-3)
    assert px["pixel_AUROC"] == pytest.approx(_brute_auroc(flat_maps, flat_masks), abs=1e-12)
    assert px["pixel_F1Max"] == pytest.approx(_brute_f1(flat_maps, flat_masks), abs=1e-12)
    with pytest.raises(ValueError, match="differ in size"):
        pixel_metrics(maps_l, [masks[0], masks[1], masks[2]])
    assert auroc([1, 2], [1, 1]) != auroc([1, 2], [1, 1])  # nan with one class
    with pytest.raises(ValueError, match="differ in length"):
        auroc([0.1, 0.2, 0.3], [0, 1])


@pytest.mark.parametrize("decimals", [1, 2, None])  # heavy ties, some, none
def test_pro_curve_in_blocks_equals_one_pass(decimals):
    """AUPRO walks the normal scores in blocks (to bound memory): any block size, one answer."""
    rng = np.random.default_rng(7)
    masks = rng.random((4, 30, 30)) < 0.08
    masks[1, 5:15, 5:12] = True
    maps = (rng.random(masks.shape) * 0.7 + masks * rng.random(masks.shape) * 0.4).astype(np.float32)
    if decimals is not None:
        maps = np.round(maps, decimals)
    scores, n_regions = pixel_scores(maps, masks)
    whole = scores.aupro(n_regions, block=1 << 20)
    assert whole == pytest.approx(_brute_aupro(maps, masks), abs=2e-3)
    for block in (1, 2, 7, 100):
        assert scores.aupro(n_regions, block=block) == pytest.approx(whole, abs=1e-12)
    # the caller's maps are left as they were: only the copy of the normal pixels is sorted
    assert not np.all(np.diff(maps[~masks]) >= 0)


def test_maps_split_one_at_a_time_give_the_same_metrics():
    """test splits each map by its mask as it is made; merged, any selection scores as the maps do."""
    rng = np.random.default_rng(3)
    shapes = [(20, 30), (16, 16), (25, 12), (18, 22)]
    masks = [rng.random(sh) < 0.1 for sh in shapes]
    masks[1][:] = False
    masks[1][3:9, 4:12] = True  # one region
    masks[2][:] = False  # a good image: normal pixels only
    maps = [np.round(rng.random(sh) * 0.7 + g * 0.3, 2).astype(np.float32) for sh, g in zip(shapes, masks)]
    splits = [split_pixels(m, g) for m, g in zip(maps, masks)]
    for pick in ([0, 1, 2, 3], [1, 2], [2, 3]):
        want = pixel_metrics([maps[i] for i in pick], [masks[i] for i in pick])
        assert split_metrics(*merge_splits([splits[i] for i in pick])) == want
    assert all(s is not None for s in splits)  # merged without consume: kept
    y = np.array([1, 1, 0, 1])
    got = detection_metrics(y * 0.5, y * 0.5, y, pixels=splits)
    assert splits == [None] * 4  # consumed: each image's pixels freed as they were copied
    flat_maps = np.concatenate([m.ravel() for m in maps])
    flat_masks = np.concatenate([g.ravel() for g in masks])
    assert got["pixel_AUROC"] == pytest.approx(_brute_auroc(flat_maps, flat_masks), abs=1e-12)
    assert got["pixel_F1Max"] == pytest.approx(_brute_f1(flat_maps, flat_masks), abs=1e-12)
    assert got["AUPRO"] == pytest.approx(_brute_aupro(maps, masks), abs=2e-3)
    with pytest.raises(ValueError, match="differ in size"):
        split_pixels(np.zeros((3, 3)), np.zeros((3, 4), bool))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from fractalsynth.anomaly import AnomalyConfig
    from fractalsynth.generate import generate
    from fractalad.train import FitConfig, fit
    root = tmp_path_factory.mktemp("ev")
    data = root / "data"
    make_mvtec(data)
    generate(str(data / "train" / "good"), str(root / "shards"), 16, AnomalyConfig(size=32), shard_size=16)
    # enough steps that the maps differ between images (after 2 they were equal to ~1e-6, so
    # every check at a threshold was a near tie) and the spots score above the good tiles
    cfg = FitConfig(backbone="efficientnet_lite0", kd=True, steps=120, batch_size=4, workers=0,
                    device="cpu")
    fit(str(root / "shards"), str(root / "run"), cfg, progress=False)
    return root


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc only")
def test_loading_a_run_on_the_cpu_holds_freed_memory(tiny_run):
    # a 256 px batch of maps frees and reallocates blocks over 32 MB: held, 2.9x the images/s
    assert refault_count("default") > 10_000
    assert refault_count("load_run", str(tiny_run / "run")) < 1_000
    assert refault_count("load_run_unheld", str(tiny_run / "run")) > 10_000  # the opt-out


def test_test_predict_export_end_to_end(tiny_run, tmp_path):
    r = CliRunner()
    run, data = str(tiny_run / "run"), str(tiny_run / "data")
    res = r.invoke(main, ["test", run, "--data", data, "--device", "cpu", "--overlays", "2"])
    assert res.exit_code == 0, res.output
    assert "pixel_AUROC" in res.output and "spot" in res.output
    report = json.load(open(os.path.join(run, "test", "metrics.json")))
    assert set(report["metrics"]) == {"spot", "all"}
    assert 0 <= report["metrics"]["all"]["AUPRO"] <= 1
    assert any(f.startswith("worst_good") for f in os.listdir(os.path.join(run, "test")))
    with open(os.path.join(run, "test", "scores.csv")) as fh:
        scored = list(csv.DictReader(fh))
    assert len(scored) == report["n_images"] and {r["type"] for r in scored} == {"good", "spot"}
    labels = np.array([int(r["label"]) for r in scored])
    assert (labels == np.array([r["type"] != "good" for r in scored])).all()
    # the per-image scores are the ones the metrics were computed from
    assert auroc(np.array([float(r["score_max"]) for r in scored]), labels) == pytest.approx(
        report["metrics"]["all"]["image_AUROC"], abs=1e-4)
    assert auroc(np.array([float(r["score_mean"]) for r in scored]), labels) == pytest.approx(
        report["metrics"]["all"]["image_AUROC_mean"], abs=1e-4)
    out = str(tmp_path / "pred")
    res = r.invoke(main, ["predict", run, os.path.join(data, "test", "spot"), "--out", out,
                          "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = open(os.path.join(out, "scores.csv")).read().strip().splitlines()
    assert len(rows) == 4 and len(os.listdir(os.path.join(out, "mask"))) == 3
    from fractalad.evaluate import load_run
    model, meta = load_run(run, "cpu")
    x = torch.rand(2, meta["channels"], meta["size"], meta["size"])
    with torch.no_grad():
        ref = model.anomaly_map(x).numpy()
    unfolded, _ = load_run(run, "cpu", fold=False)  # what test and predict used to run
    assert model.folded and not unfolded.folded
    with torch.no_grad():
        assert_close(unfolded.anomaly_map(x).numpy(), ref, atol=1e-6)
    _assert_exports_match(run, x, ref, tmp_path)


def _assert_exports_match(run, x, ref, tmp_path):
    """TorchScript, .pt2 and ONNX exports of ``run`` give the map ``ref`` on ``x``, any batch."""
    r = CliRunner()
    ts = str(tmp_path / "m.pt")
    assert r.invoke(main, ["export", run, "--format", "torchscript", "--out", ts]).exit_code == 0
    with torch.no_grad():
        assert_close(torch.jit.load(ts)(x).numpy(), ref, atol=1e-5)
    pt2 = str(tmp_path / "m.pt2")
    res = r.invoke(main, ["export", run, "--format", "pt2", "--out", pt2])
    assert res.exit_code == 0, res.output
    program = torch.export.load(pt2).module()
    with torch.no_grad():
        assert_close(program(x).numpy(), ref, atol=1e-5)
        assert_close(program(x[:1]).numpy(), ref[:1], atol=1e-5)
    onnx_path = str(tmp_path / "m.onnx")
    res = r.invoke(main, ["export", run, "--format", "onnx", "--out", onnx_path])
    assert res.exit_code == 0, res.output
    import onnxruntime as ort
    sess = ort.InferenceSession(onnx_path)
    assert_close(sess.run(None, {"images": x.numpy()})[0], ref, atol=1e-4)
    assert_close(sess.run(None, {"images": x[1:].numpy()})[0], ref[1:], atol=1e-4)
    size = x.shape[-1]
    assert sess.get_modelmeta().custom_metadata_map["input_size"] == str(size)
    # the README's onnxruntime floor (1.18) holds only up to IR version 10 and opset 20
    import onnx
    proto = onnx.load(onnx_path, load_external_data=False)
    assert proto.ir_version <= 10 and max(o.version for o in proto.opset_import if not o.domain) <= 20
    # traced at the run's size: any other size is refused, not answered with a wrong map
    bigger = torch.rand(1, x.shape[1], 2 * size, 2 * size)
    with pytest.raises(Exception, match=rf"takes images \[B, {x.shape[1]}, {size}, {size}\].*"
                                        rf"resize them to {size} x {size}"):
        torch.jit.load(ts)(bigger)
    with pytest.raises(Exception, match=rf"images.size\(\)\[2\] == {size}"):
        program(bigger)
    with pytest.raises(Exception, match="images"):
        sess.run(None, {"images": bigger.numpy()})


def test_pixel_metrics_at_the_original_resolution(tiny_run, tmp_path):
    from fractalad.evaluate import anomaly_maps, load_run, preprocess, read_test_set, test_run
    run, data = str(tiny_run / "run"), str(tiny_run / "data")
    report = test_run(run, data, str(tmp_path / "t"), "cpu", 0, pixel_resolution="original")
    model, meta = load_run(run, "cpu")
    ts = read_test_set(data)
    maps, _ = anomaly_maps(model, preprocess(ts.paths, meta["size"], meta["channels"]))
    assert maps.shape[1:] == (32, 32)  # the model's size; the images are 48 x 48
    up = [cv2.resize(m, (48, 48), interpolation=cv2.INTER_LINEAR) for m in maps]
    gts = [np.zeros((48, 48), bool) if p is None else cv2.imread(p, 0) > 127 for p in ts.mask_paths]
    want = pixel_metrics(up, gts)
    got = report["metrics"]["all"]
    assert report["pixel_resolution"] == "original"
    for k in ("pixel_AUROC", "pixel_F1Max", "AUPRO"):
        assert got[k] == pytest.approx(want[k], abs=1e-9)
    with pytest.raises(ValueError, match="pixel_resolution"):
        test_run(run, data, str(tmp_path / "t"), "cpu", 0, pixel_resolution="native")


def test_masks_saved_as_labels_score_as_masks_of_255(tiny_run, tmp_path):
    from fractalad.evaluate import test_run
    run, data = str(tiny_run / "run"), tiny_run / "data"
    want = test_run(run, str(data), str(tmp_path / "t"), "cpu", 0)["metrics"]
    relabelled = tmp_path / "relabelled"
    shutil.copytree(data, relabelled)
    gt = relabelled / "ground_truth" / "spot"
    masks = {name: cv2.imread(str(gt / name), 0) > 0 for name in ("0_mask.png", "1_mask.png", "2_mask.png")}
    cv2.imwrite(str(gt / "0_mask.png"), masks["0_mask.png"].astype(np.uint8))  # 0/1 labels
    cv2.imwrite(str(gt / "1_mask.png"), masks["1_mask.png"].astype(np.uint16) * 1000)
    red = np.zeros((*masks["2_mask.png"].shape, 3), np.uint8)
    red[masks["2_mask.png"], 2] = 200
    cv2.imwrite(str(gt / "2_mask.png"), red)
    got = test_run(run, str(relabelled), str(tmp_path / "t2"), "cpu", 0)["metrics"]
    for kind in want:
        for k in ("pixel_AUROC", "pixel_F1Max", "AUPRO"):
            assert got[kind][k] == pytest.approx(want[kind][k], abs=1e-12), (kind, k)


def test_test_sets_with_btad_mask_names_and_hidden_files_read_alike(tmp_path):
    from fractalad.evaluate import read_test_set
    make_mvtec(tmp_path / "mvtec")
    want = read_test_set(str(tmp_path / "mvtec"))
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "mvtec", other)
    gt = other / "ground_truth" / "spot"
    for i in range(3):  # BTAD and VisA name a mask as its image, in any format
        cv2.imwrite(str(gt / f"{i}.bmp"), cv2.imread(str(gt / f"{i}_mask.png"), 0))
        os.remove(gt / f"{i}_mask.png")
    # what a Mac, Windows or Jupyter leave behind: never images, masks or defect types
    for junk in (gt / ".DS_Store", gt / "Thumbs.db", other / "test" / "spot" / "._0.png"):
        junk.write_bytes(b"\0\1")
    for folder in (other / "test" / ".ipynb_checkpoints", other / "test" / "spot" / ".ipynb_checkpoints"):
        folder.mkdir()
        cv2.imwrite(str(folder / "0-checkpoint.png"), np.zeros((8, 8), np.uint8))
    got = read_test_set(str(other))
    assert [os.path.relpath(p, other) for p in got.paths] == [os.path.relpath(p, tmp_path / "mvtec")
                                                            for p in want.paths]
    assert got.types == want.types and np.array_equal(got.labels, want.labels)
    for g, w in zip(got.mask_paths, want.mask_paths):
        assert (g is None) == (w is None)
        if g is not None:
            assert np.array_equal(cv2.imread(g, 0), cv2.imread(w, 0))
    cv2.imwrite(str(gt / "0_mask.png"), np.zeros((48, 48), np.uint8))
    with pytest.raises(ImageError, match=r"0_mask.png: a second mask for test/spot/0\.\* beside .*0.bmp; keep one"):
        read_test_set(str(other))
    os.remove(gt / "0_mask.png")
    cv2.imwrite(str(gt / "7_mask.png"), np.zeros((48, 48), np.uint8))
    with pytest.raises(ImageError, match=r"7_mask.png: mask without a test image \(expected test/spot/7\.\*\)"):
        read_test_set(str(other))


def test_flip_averaged_maps_and_the_thresholds_that_remember_them(tiny_run, tmp_path):
    import shutil
    from fractalad.evaluate import (RunError, anomaly_maps, flip_averaged_map, load_run, predict,
                                    preprocess, read_test_set, test_run)
    run, data = str(tmp_path / "run"), str(tiny_run / "data")
    shutil.copytree(tiny_run / "run", run)
    model, meta = load_run(run, "cpu")
    x = torch.rand(3, meta["channels"], meta["size"], meta["size"])
    with torch.no_grad():
        plain, avg = model.anomaly_map(x), flip_averaged_map(model.anomaly_map, x)
        for dims in ((-1,), (-2,)):  # the averaged map follows a flip exactly; the plain one does not
            assert_apart(model.anomaly_map(x.flip(dims)), plain.flip(dims), atol=1e-4, rtol=1e-5)
            assert_close(flip_averaged_map(model.anomaly_map, x.flip(dims)), avg.flip(dims), rtol=1e-5, atol=1e-6)
    report = test_run(run, data, str(tmp_path / "t"), "cpu", 0, tta=True)
    assert report["tta"] is True
    assert json.load(open(os.path.join(run, "thresholds.json")))["tta"] is True
    spot = os.path.join(data, "test", "spot")
    paths = read_test_set(data).paths
    paths = [p for p in paths if os.path.dirname(p) == spot]
    imgs = preprocess(paths, meta["size"], meta["channels"])
    want = {tta: anomaly_maps(model, imgs, tta=tta)[0].reshape(len(paths), -1).max(1) for tta in (0, 1)}
    for flag, expect in ((None, want[1]), (False, want[0])):  # default: as 'test' did
        out = str(tmp_path / f"pred_{flag}")
        # the saved thresholds hold for flip-averaged maps only, so plain maps need their own
        with open(predict(run, paths, out, tta=flag, threshold=None if flag is None else 0.5)) as fh:
            got = np.array([float(row.split(",")[1]) for row in fh.read().splitlines()[1:]])
        assert_close(got, expect, atol=1e-6)
    assert_apart(want[0], want[1], atol=1e-6, rtol=1e-5)
    with pytest.raises(RunError, match="thresholds are for --tta, not --no-tta"):
        predict(run, paths, str(tmp_path / "refused"), tta=False)
    assert not os.path.exists(tmp_path / "refused")


def test_smoothed_maps_and_the_thresholds_that_remember_them(tiny_run, tmp_path):
    import shutil
    from fractalad.evaluate import anomaly_maps, load_run, preprocess, read_test_set, smooth_maps, test_run
    impulse = np.zeros((1, 33, 33), np.float32)
    impulse[0, 16, 16] = 1.0
    blurred = smooth_maps(impulse, 2.0)[0]
    assert smooth_maps(impulse, 0.0) is impulse
    assert abs(blurred.sum() - 1.0) < 1e-3 and blurred.argmax() == 16 * 33 + 16
    assert 0.03 < blurred.max() < 0.05  # 1 / (2 pi sigma^2) = 0.0398
    assert_close(blurred, blurred.T, atol=1e-7)
    run, data = str(tmp_path / "run"), str(tiny_run / "data")
    shutil.copytree(tiny_run / "run", run)
    report = test_run(run, data, str(tmp_path / "t"), "cpu", 0, smooth=1.5)
    assert report["smooth"] == 1.5
    assert json.load(open(os.path.join(run, "thresholds.json")))["smooth"] == 1.5
    model, meta = load_run(run, "cpu")
    paths = read_test_set(data).paths[:6]
    maps = anomaly_maps(model, preprocess(paths, meta["size"], meta["channels"]))[0]
    want = {sigma: smooth_maps(maps, sigma).reshape(len(paths), -1).max(1) for sigma in (0.0, 1.5)}
    plain = ["--smooth", "0", "--threshold", "0.5"]  # the saved thresholds are the smoothed maps'
    for flag, expect in ((None, want[1.5]), (0.0, want[0.0])):  # default: as 'test' did
        res = CliRunner().invoke(main, ["predict", run, *paths, "--out", str(tmp_path / f"p{flag}"),
                                        "--device", "cpu"] + ([] if flag is None else plain))
        assert res.exit_code == 0, res.output
        with open(tmp_path / f"p{flag}" / "scores.csv") as fh:
            got = np.array([float(row.split(",")[1]) for row in fh.read().splitlines()[1:]])
        assert_close(got, expect, atol=1e-6)
    assert np.abs(want[0.0] - want[1.5]).min() > 1e-5  # the check above can tell them apart
    res = CliRunner().invoke(main, ["predict", run, *paths, "--out", str(tmp_path / "refused"),
                                    "--device", "cpu", "--smooth", "0"])
    assert res.exit_code == 2 and "thresholds are for --smooth 1.5, not --smooth 0;" in res.output
    assert not os.path.exists(tmp_path / "refused")


def test_combined_maps_scale_head_and_student_teacher_maps_on_normals(tiny_run, tmp_path):
    from fractalad.evaluate import (MapNorm, anomaly_maps, calibration_images, fit_map_norm, load_run,
                                    preprocess, read_test_set, test_run)
    from fractalad.model import FractalAD, student_teacher_map
    t = [torch.randn(2, 5, 4, 4), torch.randn(2, 7, 2, 2)]
    assert student_teacher_map(t, [f * 3 for f in t], (8, 8)).abs().max() < 1e-5  # same direction
    torch.testing.assert_close(student_teacher_map(t, [-f for f in t], (8, 8)), torch.full((2, 1, 8, 8), 2.0))
    torch.testing.assert_close(student_teacher_map(t, [t[0], -t[1]], (8, 8)), torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match="distillation"):
        FractalAD(kd=False, pretrained=False).map_pair(torch.rand(1, 3, 32, 32))
    pairs = np.random.default_rng(0).random((6, 2, 8, 8)) * np.array([1.0, 5.0])[None, :, None, None]
    norm = MapNorm.from_normals(pairs)
    assert norm.student[1] > 4 > 1 > norm.head[1] > norm.head[0]
    at = lambda q: np.array([norm.head[q], norm.student[q]])[None, :, None, None] * np.ones((1, 2, 3, 3))
    assert_close(norm.combine(at(0)), 0.0, atol=1e-6)  # both at their 0.9 quantile
    assert_close(norm.combine(at(1)), 0.5, atol=1e-6)  # both at their 0.995 quantile

    run, data = str(tmp_path / "run"), str(tiny_run / "data")
    shutil.copytree(tiny_run / "run", run)
    report = test_run(run, data, str(tmp_path / "t"), "cpu", 0, map_kind="combined")
    saved = json.load(open(os.path.join(run, "thresholds.json")))
    assert report["map"] == saved["map"] == "combined"
    # the saturated spots are plain to the student-teacher half, even in this tiny model
    assert report["metrics"]["all"]["image_AUROC"] == 1.0
    assert report["metrics"]["all"]["pixel_AUROC"] > 0.9
    model, meta = load_run(run, "cpu")
    size, ch = meta["size"], meta["channels"]
    expect_norm = fit_map_norm(model, calibration_images(data, size, ch))
    assert MapNorm(**{k: tuple(v) for k, v in saved["map_norm"].items()}) == expect_norm
    paths = read_test_set(data).paths[:6]
    imgs = preprocess(paths, size, ch)
    want = {"combined": anomaly_maps(model, imgs, norm=expect_norm)[0].reshape(6, -1).max(1),
            "head": anomaly_maps(model, imgs)[0].reshape(6, -1).max(1)}
    assert np.abs(want["combined"] - want["head"]).min() > 1e-5
    head = ["--map", "head", "--threshold", "0.5"]  # the saved thresholds are the combined map's
    for flag, expect in ((None, want["combined"]), ("head", want["head"])):  # default: as 'test' did
        res = CliRunner().invoke(main, ["predict", run, *paths, "--out", str(tmp_path / f"p{flag}"),
                                        "--device", "cpu"] + ([] if flag is None else head))
        assert res.exit_code == 0, res.output
        with open(tmp_path / f"p{flag}" / "scores.csv") as fh:
            rows = [row.split(",") for row in fh.read().splitlines()[1:]]
        assert_close([float(row[1]) for row in rows], expect, atol=1e-5)
        thr = saved["image"] if flag is None else 0.5
        assert [int(row[3]) for row in rows] == [int(v >= thr) for v in np.array(expect, np.float32)]
    res = CliRunner().invoke(main, ["predict", run, *paths, "--out", str(tmp_path / "p_refused"),
                                    "--device", "cpu", "--map", "head"])
    assert res.exit_code == 2 and "--map combined, not --map head;" in res.output
    assert not os.path.exists(tmp_path / "p_refused")
    x = torch.from_numpy(imgs).float() / 255
    combined = anomaly_maps(model, imgs, norm=expect_norm)[0]
    ts = str(tmp_path / "combined.pt")
    res = CliRunner().invoke(main, ["export", run, "--format", "torchscript", "--out", ts, "--map", "combined"])
    assert res.exit_code == 0, res.output
    with torch.no_grad():
        assert_close(torch.jit.load(ts)(x)[:, 0].numpy(), combined, rtol=1e-5, atol=1e-4)
    os.remove(os.path.join(run, "thresholds.json"))
    for cmd in (["predict", run, *paths, "--out", str(tmp_path / "p")], ["export", run, "--format", "onnx",
                                                                         "--out", str(tmp_path / "m.onnx")]):
        res = CliRunner().invoke(main, cmd + ["--map", "combined"])
        assert res.exit_code == 2 and "--map combined' first" in res.output
    no_train = tmp_path / "no_train"
    shutil.copytree(data, no_train, ignore=shutil.ignore_patterns("train"))
    res = CliRunner().invoke(main, ["test", run, "--data", str(no_train), "--map", "combined", "--device", "cpu"])
    assert res.exit_code == 2 and "train/good: missing" in res.output.replace(os.sep, "/")


def test_the_mean_of_several_runs_maps(tiny_run, tmp_path):
    """Maps of runs of other sizes averaged on one grid: the metrics of the mean match a brute
    force, and a run averaged with itself scores as 'test' scores it alone."""
    from fractalsynth.anomaly import AnomalyConfig
    from fractalsynth.generate import generate
    from fractalad.evaluate import (RunError, anomaly_maps, load_run, preprocess, read_test_set,
                                    test_map_mean, test_run)
    from fractalad.train import FitConfig, fit
    run, data = str(tmp_path / "run"), str(tiny_run / "data")
    shutil.copytree(tiny_run / "run", run)  # test_run writes the run's thresholds
    for kind in ("head", "combined"):
        alone = test_run(run, data, str(tmp_path / f"t_{kind}"), "cpu", 0, map_kind=kind)
        twice = test_map_mean([run, run], data, "cpu", map_kind=kind)
        assert twice["grid"] == 32 and twice["map"] == kind
        assert twice["metrics"] == twice["members"][0]["metrics"] == alone["metrics"]

    run40 = str(tmp_path / "run40")
    generate(os.path.join(data, "train", "good"), str(tmp_path / "s40"), 8, AnomalyConfig(size=40),
             shard_size=8, seed=1)
    fit(str(tmp_path / "s40"), run40, FitConfig(steps=3, batch_size=4, workers=0, device="cpu"),
        progress=False)
    mixed = test_map_mean([run, run40], data, "cpu", map_kind="head")
    assert mixed["grid"] == 40 and [m["size"] for m in mixed["members"]] == [32, 40]
    ts = read_test_set(data)
    maps = []
    for r in (run, run40):
        model, meta = load_run(r, "cpu")
        m = anomaly_maps(model, preprocess(ts.paths, meta["size"], meta["channels"]))[0]
        maps.append(np.stack([cv2.resize(x, (40, 40), interpolation=cv2.INTER_LINEAR) for x in m]))
    mean = (maps[0] + maps[1]) / 2
    masks = np.stack([cv2.resize(cv2.imread(p, 0), (40, 40), interpolation=cv2.INTER_NEAREST) > 0
                      if p else np.zeros((40, 40), bool) for p in ts.mask_paths])
    got = mixed["metrics"]["all"]
    assert got["image_AUROC"] == pytest.approx(_brute_auroc(mean.reshape(len(mean), -1).max(1),
                                                            ts.labels), abs=1e-9)
    want = pixel_metrics(mean.astype(np.float32), masks)  # itself checked against brute force above
    assert got["pixel_AUROC"] == pytest.approx(want["pixel_AUROC"], abs=1e-9)
    assert got["AUPRO"] == pytest.approx(want["AUPRO"], abs=1e-9)
    for i, r in enumerate((run, run40)):  # each member is scored on the grid too
        alone = mixed["members"][i]["metrics"]["all"]
        assert alone["image_AUROC"] == pytest.approx(
            _brute_auroc(maps[i].reshape(len(mean), -1).max(1), ts.labels), abs=1e-9)
    assert test_map_mean([run, run40], data, "cpu", map_kind="head", size=32)["grid"] == 32
    with pytest.raises(ValueError, match="at least one run"):
        test_map_mean([], data, "cpu")
    no_kd = str(tmp_path / "no_kd")
    fit(str(tmp_path / "s40"), no_kd, FitConfig(kd=False, steps=1, batch_size=4, workers=0,
                                                device="cpu"), progress=False)
    with pytest.raises(RunError, match="no student-teacher map"):
        test_map_mean([run, no_kd], data, "cpu", map_kind="combined")


def test_bad_inputs_to_test_and_predict(tiny_run, tmp_path, monkeypatch):
    r = CliRunner()
    run, data = str(tiny_run / "run"), tiny_run / "data"
    res = r.invoke(main, ["test", run, "--data", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "MVTec-layout" in res.output
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    cv2.imwrite(str(bad / "ground_truth" / "spot" / "orphan_mask.png"), np.zeros((8, 8), np.uint8))
    res = r.invoke(main, ["test", run, "--data", str(bad), "--device", "cpu"])
    assert res.exit_code == 2 and "orphan_mask.png" in res.output and "without a test image" in res.output
    os.remove(bad / "ground_truth" / "spot" / "orphan_mask.png")
    os.remove(bad / "ground_truth" / "spot" / "0_mask.png")
    res = r.invoke(main, ["test", run, "--data", str(bad), "--device", "cpu"])
    assert res.exit_code == 2 and "0_mask.png" in res.output and "missing mask" in res.output
    cv2.imwrite(str(bad / "ground_truth" / "spot" / "0_mask.png"), np.zeros((8, 8), np.uint8))
    res = r.invoke(main, ["test", run, "--data", str(bad), "--device", "cpu"])
    assert res.exit_code == 2 and "0_mask.png: the mask is 8x8 but its image is 48x48" in res.output
    (bad / "test" / "spot" / "junk.png").write_bytes(b"nope")
    res = r.invoke(main, ["predict", run, str(bad / "test" / "spot" / "junk.png"), "--out",
                          str(tmp_path / "p"), "--device", "cpu"])
    assert res.exit_code == 2 and "junk.png" in res.output and "replace or remove it" in res.output
    assert "--skip-bad" in res.output
    # --skip-bad: the readable images are predicted, the unreadable one is named and left out
    res = r.invoke(main, ["predict", run, str(bad / "test" / "spot"), "--out", str(tmp_path / "p2"),
                          "--device", "cpu", "--skip-bad"])
    assert res.exit_code == 0, res.output
    assert "skipped: " in res.output and "junk.png" in res.output and "1 unreadable image left out" in res.output
    rows = (tmp_path / "p2" / "scores.csv").read_text().strip().splitlines()[1:]
    assert sorted(os.path.basename(row.split(",")[0]) for row in rows) == ["0.png", "1.png", "2.png"]
    assert sorted(os.listdir(tmp_path / "p2" / "mask")) == ["0.png", "1.png", "2.png"]
    from fractalad.evaluate import predict
    notes = []  # one image a batch: a batch of the unreadable image alone
    csv_path = predict(run, [str(bad / "test" / "spot")], str(tmp_path / "p3"), device="cpu",
                       batch_size=1, skip_bad=True, log=notes.append)
    assert len(notes) == 1 and "junk.png" in notes[0]
    one_by_one = [row.split(",") for row in open(csv_path).read().splitlines()[1:]]
    together = [row.split(",") for row in rows]
    assert [r[0] for r in one_by_one] == [r[0] for r in together]
    assert_close([float(r[1]) for r in one_by_one], [float(r[1]) for r in together], atol=1e-5)
    res = r.invoke(main, ["predict", run, str(tmp_path / "none.png"), "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "no such file" in res.output
    res = r.invoke(main, ["predict", run, str(data / "test" / "spot"), "--out", str(tmp_path / "p4"),
                          "--threshold", "nan"])
    assert res.exit_code == 2 and "'nan' is not a finite number" in res.output
    assert not os.path.exists(tmp_path / "p4")
    res = r.invoke(main, ["export", run, "--format", "torchscript", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "is a folder; --out takes a file name such as model.pt" in res.output
    with monkeypatch.context() as m:
        m.setitem(__import__("sys").modules, "onnxscript", None)  # as if it were not installed
        res = r.invoke(main, ["export", run, "--format", "onnx", "--out", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "needs the onnxscript package: pip install" in res.output
    assert not os.path.exists(tmp_path / "x.onnx")
    old = tmp_path / "oldrun"
    old.mkdir()
    state = torch.load(os.path.join(run, "model.pt"), weights_only=False)
    state["meta"]["version"] = 99
    torch.save(state, old / "model.pt")
    res = r.invoke(main, ["test", str(old), "--data", str(data)])
    assert res.exit_code == 2 and "re-train" in res.output
    res = r.invoke(main, ["test", str(tmp_path), "--data", str(data)])
    assert res.exit_code == 2 and "model.pt" in res.output


def test_demo_dataset_has_masks_for_every_defect(tmp_path):
    from fractalad.demo import make_dataset
    from fractalad.evaluate import read_test_set
    root = make_dataset(str(tmp_path / "demo"), n_train=3, n_test=2)
    ts = read_test_set(root)
    assert set(ts.types) == {"good", "foreign_blob", "scratch", "hole"}
    for mp, lab in zip(ts.mask_paths, ts.labels):
        assert (mp is not None) == (lab == 1)
        if mp:
            assert cv2.imread(mp, cv2.IMREAD_GRAYSCALE).max() == 255


def test_calibrate_sets_thresholds_from_normals_alone(tiny_run, tmp_path):
    from fractalsynth.anomaly import AnomalyConfig
    from fractalsynth.generate import generate
    from fractalad.evaluate import anomaly_maps, load_run, preprocess, read_test_set, test_run
    from fractalad.train import FitConfig, fit
    r = CliRunner()
    run, data = str(tmp_path / "run"), tiny_run / "data"
    shutil.copytree(tiny_run / "run", run)
    res = r.invoke(main, ["calibrate", run, "--device", "cpu"])
    assert res.exit_code == 2 and "--normals DIR" in res.output  # no held-out normals in this run
    good = str(data / "train" / "good")
    # 0.4: between two normals' scores, so no decision rests on a tie with the threshold
    res = r.invoke(main, ["calibrate", run, "--normals", good, "--quantile", "0.4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    model, meta = load_run(run, "cpu")
    normals = preprocess(list_images(good), meta["size"], meta["channels"])
    scores = anomaly_maps(model, normals)[0].reshape(len(normals), -1).max(1)
    saved = json.load(open(os.path.join(run, "thresholds.json")))
    assert saved["image"] == saved["pixel"] == pytest.approx(np.quantile(scores, 0.4), abs=1e-6)
    assert "quantile 0.4" in saved["source"] and saved["map"] == "head"
    out = tmp_path / "pred"
    res = r.invoke(main, ["predict", run, good, "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = [line.split(",") for line in open(out / "scores.csv").read().splitlines()[1:]]
    # compared with the unrounded scores: this tiny model's normals differ by about 1e-6
    assert [int(row[3]) for row in rows] == [int(v >= saved["image"]) for v in scores]
    assert sum(int(row[3]) for row in rows) == 2  # 3 normals, threshold between the lower two

    # a run on shards with a held-out normal calibrates on it, for 'calibrate' and '--map combined'
    shards, held_run = str(tmp_path / "shards"), str(tmp_path / "held_run")
    generate(good, shards, 8, AnomalyConfig(size=32), shard_size=8, holdout=0.34)
    fit(shards, held_run, FitConfig(steps=1, batch_size=4, workers=0, device="cpu"), progress=False)
    res = r.invoke(main, ["calibrate", held_run, "--device", "cpu", "--map", "combined"])
    assert res.exit_code == 0 and "1 held-out normals" in res.output, res.output
    from fractalsynth.shards import load_holdout
    (held_name,) = load_holdout(shards)[1]
    model, _ = load_run(held_run, "cpu")
    saved = json.load(open(os.path.join(held_run, "thresholds.json")))
    from fractalad.evaluate import fit_map_norm
    held = preprocess([os.path.join(good, held_name)], 32, 1)
    norm = fit_map_norm(model, held)
    assert saved["image"] == pytest.approx(anomaly_maps(model, held, norm=norm)[0].max(), abs=1e-5)
    report = test_run(held_run, str(data), str(tmp_path / "t"), "cpu", 0, map_kind="combined")
    assert report["calibration"].startswith("1 held-out normals")
    assert report["map_norm"] == dataclasses.asdict(norm)
    # the test report judges calibrate's threshold on the test set
    op = report["held_out_operating_point"]
    assert op["n_normals"] == 1 and op["quantile"] == 0.99
    assert op["threshold"] == pytest.approx(saved["image"], abs=1e-6)
    ts = read_test_set(str(data))
    scores = anomaly_maps(model, preprocess(ts.paths, 32, 1), norm=norm)[0].reshape(len(ts.paths), -1).max(1)
    types = np.array(ts.types)
    assert op["flagged"] == pytest.approx({"good": np.mean(scores[types == "good"] >= op["threshold"]),
                                           "spot": np.mean(scores[types == "spot"] >= op["threshold"]),
                                           "all_defects": np.mean(scores[types == "spot"] >= op["threshold"])})
    assert 0 < op["flagged"]["good"] + op["flagged"]["spot"] < 2  # the check above can fail
    res = r.invoke(main, ["test", held_run, "--data", str(data), "--device", "cpu", "--overlays", "0"])
    assert res.exit_code == 0 and "held-out normals ('calibrate')" in res.output, res.output
    assert test_run(run, str(data), str(tmp_path / "t2"), "cpu", 0)["held_out_operating_point"] is None
    from fractalad.evaluate import display_scale
    assert display_scale("combined", 4.0) == 0.125 and display_scale("head", 4.0) == 1.0


def test_held_out_operating_point_counts_what_a_normals_quantile_flags():
    from fractalad.evaluate import held_out_operating_point
    op = held_out_operating_point(np.arange(101.0), np.array([50, 99, 100, 98.9, 3]),
                                  ["good", "good", "crack", "crack", "hole"])
    assert op["threshold"] == 99.0 and op["n_normals"] == 101  # flagged: score >= threshold
    assert op["flagged"] == {"crack": 0.5, "good": 0.5, "hole": 0.0, "all_defects": 1 / 3}
    assert "all_defects" not in held_out_operating_point(np.ones(3), np.ones(2), ["good"] * 2)["flagged"]


def test_the_mean_image_score_through_test_calibrate_and_predict(tiny_run, tmp_path):
    from fractalad.evaluate import anomaly_maps, load_run, preprocess, read_test_set
    r = CliRunner()
    run, data = str(tmp_path / "run"), str(tiny_run / "data")
    shutil.copytree(tiny_run / "run", run)
    model, meta = load_run(run, "cpu")
    ts = read_test_set(data)
    maps = anomaly_maps(model, preprocess(ts.paths, meta["size"], meta["channels"]))[0]
    smax, smean = maps.reshape(len(maps), -1).max(1), maps.reshape(len(maps), -1).mean(1)
    res = r.invoke(main, ["test", run, "--data", data, "--device", "cpu", "--overlays", "0",
                          "--image-score", "mean"])
    assert res.exit_code == 0, res.output
    saved = json.load(open(os.path.join(run, "thresholds.json")))
    assert saved["image_score"] == "mean"
    assert _f1_at(smean, ts.labels, saved["image"]) == pytest.approx(_brute_f1(smean, ts.labels), abs=1e-9)
    assert saved["image"] <= smean.max() and saved["image"] < smax.min()  # a mean's threshold
    good = str(tiny_run / "data" / "train" / "good")

    def decisions(out, *extra):
        res = r.invoke(main, ["predict", run, *ts.paths, "--out", str(tmp_path / out), "--device", "cpu", *extra])
        assert res.exit_code == 0, res.output
        rows = [line.split(",") for line in open(tmp_path / out / "scores.csv").read().splitlines()[1:]]
        return np.array([int(row[3]) for row in rows]), {row[6] for row in rows}, float(rows[0][4])

    flagged, kinds, thr = decisions("p_mean")  # default: the score the thresholds are for
    assert kinds == {"mean"} and thr == pytest.approx(saved["image"], abs=1e-6)
    np.testing.assert_array_equal(flagged, (smean >= saved["image"]).astype(int))
    res = r.invoke(main, ["predict", run, *ts.paths, "--out", str(tmp_path / "p_max"), "--device", "cpu",
                          "--image-score", "max"])
    assert res.exit_code != 0 and "--image-score max" in res.output and "thresholds.json" in res.output
    flagged, kinds, _ = decisions("p_max", "--image-score", "max", "--threshold", str(np.median(smax)))
    assert kinds == {"max"}
    np.testing.assert_array_equal(flagged, (smax >= float(str(np.median(smax)))).astype(int))

    # calibrate: the image threshold on the mean, the masks' on the max
    # 0.4: between two normals' scores, so no decision rests on a tie with the threshold
    res = r.invoke(main, ["calibrate", run, "--normals", good, "--quantile", "0.4", "--device", "cpu",
                          "--image-score", "mean"])
    assert res.exit_code == 0, res.output
    normals = preprocess(list_images(good), meta["size"], meta["channels"])
    nmaps = anomaly_maps(model, normals)[0].reshape(len(normals), -1)
    saved = json.load(open(os.path.join(run, "thresholds.json")))
    assert saved["image_score"] == "mean" and "mean of the map" in saved["source"]
    assert saved["image"] == pytest.approx(np.quantile(nmaps.mean(1), 0.4), abs=1e-6)
    assert saved["pixel"] == pytest.approx(np.quantile(nmaps.max(1), 0.4), abs=1e-6)
    res = r.invoke(main, ["predict", run, good, "--out", str(tmp_path / "p_cal"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = [line.split(",") for line in open(tmp_path / "p_cal" / "scores.csv").read().splitlines()[1:]]
    # compared with the unrounded means: this tiny model's normals differ by about 1e-6
    assert [int(row[3]) for row in rows] == [int(v >= saved["image"]) for v in nmaps.mean(1)]
    assert sum(int(row[3]) for row in rows) == 2  # 3 normals, threshold between the lower two
    assert r.invoke(main, ["calibrate", run, "--image-score", "median"]).exit_code == 2


def test_predict_resume_keeps_finished_rows(tiny_run, tmp_path):
    from fractalad.evaluate import RunError, predict
    from fractalsynth.images import ImageError
    run, src = str(tiny_run / "run"), tmp_path / "imgs"
    shutil.copytree(tiny_run / "data" / "test" / "spot", src)
    (src / "1a.png").write_bytes(b"nope")  # sorts between 1.png and 2.png
    out = str(tmp_path / "p")
    with pytest.raises(ImageError, match="--resume keeps the rows"):
        predict(run, [str(src)], out, device="cpu", batch_size=1, threshold=0.5)
    csv_path = os.path.join(out, "scores.csv")
    rows = [r.split(",") for r in open(csv_path).read().splitlines()[1:]]
    assert [os.path.basename(r[0]) for r in rows] == ["0.png", "1.png"]  # finished batches kept
    shutil.copy(src / "2.png", src / "1a.png")
    # a kept row is not predicted again: mark it, and cut the file short mid-row as a kill would
    lines = open(csv_path).read().splitlines()
    lines[1] = lines[1].replace(rows[0][1], "9.999999")
    open(csv_path, "w").write("\n".join(lines) + "\n" + str(src / "1a.png") + ",0.1")
    with pytest.raises(RunError, match="image_threshold, pixel_threshold"):
        predict(run, [str(src)], out, device="cpu", threshold=0.4, resume=True)
    notes = []
    predict(run, [str(src)], out, device="cpu", threshold=0.5, resume=True, log=notes.append)
    assert notes == [f"resuming: 2 of 4 images already in {csv_path}"]
    resumed = [r.split(",") for r in open(csv_path).read().splitlines()[1:]]
    assert [os.path.basename(r[0]) for r in resumed] == ["0.png", "1.png", "1a.png", "2.png"]
    assert resumed[0][1] == "9.999999" and resumed[1] == rows[1]
    whole = predict(run, [str(src)], str(tmp_path / "whole"), device="cpu", threshold=0.5)
    fresh = [r.split(",")[1:] for r in open(whole).read().splitlines()[1:]]
    assert [r[1:] for r in resumed[1:]] == fresh[1:]
    assert sorted(os.listdir(os.path.join(out, "heatmap"))) == ["0.png", "1.png", "1a.png", "2.png"]
    # without --resume the folder starts afresh; the CLI flag reaches the same code
    res = CliRunner().invoke(main, ["predict", run, str(src), "--out", out, "--device", "cpu",
                                    "--threshold", "0.5", "--resume"])
    assert res.exit_code == 0 and "resuming: 4 of 4 images" in res.output, res.output
    predict(run, [str(src)], out, device="cpu", threshold=0.5)
    assert open(csv_path).read().splitlines()[1:] == open(whole).read().splitlines()[1:]
    os.remove(os.path.join(out, "predict.json"))
    res = CliRunner().invoke(main, ["predict", run, str(src), "--out", out, "--device", "cpu",
                                    "--threshold", "0.5", "--resume"])
    assert res.exit_code == 2 and "predict.json: missing or unreadable" in res.output


def test_predict_keeps_sub_folders_apart(tiny_run, tmp_path):
    run, spot = str(tiny_run / "run"), tiny_run / "data" / "test" / "spot"
    src = tmp_path / "in"
    for sub in ("a", "b"):
        shutil.copytree(spot, src / sub)
    for args, out in (([src], "p"), ([src / "a", src / "b"], "q"), ([src / "a" / "0.png", src / "b"], "r")):
        res = CliRunner().invoke(main, ["predict", run, *map(str, args), "--out", str(tmp_path / out),
                                        "--device", "cpu"])
        assert res.exit_code == 0, res.output
        for kind in ("heatmap", "mask"):
            assert sorted(os.listdir(tmp_path / out / kind / "b")) == ["0.png", "1.png", "2.png"]
    assert os.listdir(tmp_path / "r" / "mask" / "a") == ["0.png"]
    shutil.copy(src / "a" / "1.png", src / "a" / "0.jpg")
    res = CliRunner().invoke(main, ["predict", run, str(src / "a"), "--out", str(tmp_path / "s"),
                                    "--device", "cpu"])
    assert res.exit_code == 2 and "would overwrite" in res.output and not os.path.exists(tmp_path / "s")


def test_exports_keep_the_input_blur(tiny_run, tmp_path):
    import shutil
    from fractalad.evaluate import load_run
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run / "run", run)
    state = torch.load(os.path.join(run, "model.pt"), weights_only=False)
    state["meta"]["fit"]["input_blur"] = 0.8  # as a run trained with --input-blur 0.8 saves it
    torch.save(state, os.path.join(run, "model.pt"))
    model, meta = load_run(run, "cpu")
    plain, _ = load_run(str(tiny_run / "run"), "cpu")
    x = torch.rand(2, meta["channels"], meta["size"], meta["size"])
    with torch.no_grad():
        ref = model.anomaly_map(x).numpy()
        # the tiny run's head map is nearly flat; its student-teacher map shows the blur
        assert_apart(plain.map_pair(x)[:, 1], model.map_pair(x)[:, 1], atol=1e-3, rtol=1e-5)
    _assert_exports_match(run, x, ref, tmp_path)


def test_an_ema_run_tests_predicts_and_exports_either_weights(tiny_run, tmp_path):
    import shutil
    from fractalad.evaluate import RunError, anomaly_maps, load_run, predict, preprocess, read_test_set
    run, data = str(tmp_path / "run"), str(tiny_run / "data")
    shutil.copytree(tiny_run / "run", run, ignore=shutil.ignore_patterns("test*", "thresholds.json"))
    state = torch.load(os.path.join(run, "model.pt"), weights_only=False)
    trained = {k: v for k, v in state["model"].items() if not k.startswith("teacher.")}
    gen = torch.Generator().manual_seed(0)
    # as 'fit --ema' saves it: the average as the model, the trained weights beside it (batch-norm
    # statistics kept: noise could make a running variance negative, and the maps NaN)
    state["model"] = {k: v + 0.05 * torch.randn(v.shape, generator=gen)
                      if k in trained and v.is_floating_point() and "running_" not in k
                      else v for k, v in state["model"].items()}
    state["trained"] = trained
    state["meta"]["fit"]["ema"] = 0.9
    torch.save(state, os.path.join(run, "model.pt"))
    # unfolded, to compare state dicts key by key
    average, _ = load_run(run, "cpu", fold=False)
    plain, meta = load_run(str(tiny_run / "run"), "cpu", fold=False)
    model, _ = load_run(run, "cpu", trained=True, fold=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.state_dict().items())
    assert all(torch.equal(average.state_dict()[k], v) for k, v in state["model"].items())
    paths = [p for p in read_test_set(data).paths if "spot" in p]
    imgs = preprocess(paths, meta["size"], meta["channels"])
    want = {t: anomaly_maps(m, imgs)[0].reshape(len(paths), -1).max(1) for t, m in ((1, plain), (0, average))}
    assert_apart(want[0], want[1], atol=1e-4, rtol=1e-5)
    r = CliRunner()
    res = r.invoke(main, ["test", run, "--data", data, "--device", "cpu", "--overlays", "0", "--trained"])
    assert res.exit_code == 0, res.output
    assert res.output.rstrip().endswith(os.path.abspath(os.path.join(run, "test-trained")))
    assert json.load(open(os.path.join(run, "test-trained", "metrics.json")))["trained"] is True
    assert not os.path.exists(os.path.join(run, "test"))  # the average's default folder is apart
    for flag, expect in ((None, want[1]), (False, want[0])):  # default: the weights 'test' used
        out = str(tmp_path / f"pred_{flag}")
        with open(predict(run, paths, out, trained=flag, threshold=None if flag is None else 0.5)) as fh:
            got = np.array([float(row.split(",")[1]) for row in fh.read().splitlines()[1:]])
        assert_close(got, expect, atol=1e-6)
    with pytest.raises(RunError, match="thresholds are for --trained, not --no-trained"):
        predict(run, paths, str(tmp_path / "refused"), trained=False)
    x = torch.rand(2, meta["channels"], meta["size"], meta["size"])
    with torch.no_grad():
        ref = plain.anomaly_map(x).numpy()
    ts = str(tmp_path / "m.pt")
    assert r.invoke(main, ["export", run, "--format", "torchscript", "--out", ts, "--trained"]).exit_code == 0
    with torch.no_grad():
        assert_close(torch.jit.load(ts)(x).numpy(), ref, atol=1e-5)
    del state["trained"]  # a model.pt from before both were kept
    torch.save(state, os.path.join(run, "model.pt"))
    res = r.invoke(main, ["test", run, "--data", data, "--device", "cpu", "--trained"])
    assert res.exit_code == 2 and "holds only the moving average" in res.output
    assert load_run(run, "cpu")[0] is not None  # the average still loads


def test_default_test_dir_names_the_settings():
    from fractalad.evaluate import default_test_dir
    assert default_test_dir("r") == os.path.join("r", "test")
    assert default_test_dir("r", "original", True, 2.0, "combined", True) == \
        os.path.join("r", "test-combined-trained-tta-smooth2-original")
    assert default_test_dir("r", smooth=0.5) == os.path.join("r", "test-smooth0.5")


def test_stitch_places_each_piece_in_its_canvas_box():
    from fractalad.evaluate import stitch
    from fractalsynth.images import canvas_boxes, piece_boxes
    cuts = piece_boxes(40, 130, 1.0)  # 3 across
    boxes = [canvas_boxes(cuts, (40, 130), 16), [(0, 16, 0, 16)]]
    assert boxes[0] == [(0, 16, 0, 5), (0, 16, 5, 11), (0, 16, 11, 16)]
    maps = np.stack([np.full((16, 16), k, np.float32) for k in range(4)])
    out = stitch(maps, boxes, 16)
    assert out.shape == (2, 16, 16) and out.dtype == np.float32
    assert (out[0, :, :5] == 0).all() and (out[0, :, 5:11] == 1).all() and (out[0, :, 11:] == 2).all()
    assert (out[1] == 3).all()
    images = np.random.default_rng(0).integers(0, 255, (4, 3, 16, 16), dtype=np.uint8)
    stitched = stitch(images, boxes, 16)
    assert stitched.shape == (2, 3, 16, 16) and np.array_equal(stitched[1], images[3])
    with pytest.raises(ValueError, match="4 pieces, but the boxes place 3"):
        stitch(maps, boxes[:1], 16)


def test_a_pieces_run_tests_and_predicts_whole_images(tmp_path):
    """Trained on normals cut into pieces, a run cuts each test image alike and scores the
    image by its pieces' maps stitched on one canvas."""
    from fractalsynth.anomaly import AnomalyConfig
    from fractalsynth.generate import generate
    from fractalsynth.images import load_image, piece_boxes, prepare_normal
    from fractalad.evaluate import load_run, read_test_set, test_run
    from fractalad.train import FitConfig, fit
    data = tmp_path / "data"
    make_mvtec(data, size=48)
    for p in list_images(str(data)):  # twice as wide: two 48 x 48 pieces each
        img = cv2.imread(p, cv2.IMREAD_UNCHANGED)
        cv2.imwrite(p, np.concatenate([img, img[:, ::-1]], axis=1))
    generate(str(data / "train" / "good"), str(tmp_path / "shards"), 16, AnomalyConfig(size=32),
             shard_size=16, pieces="1")
    cfg = FitConfig(backbone="efficientnet_lite0", kd=True, steps=4, batch_size=4, workers=0,
                    device="cpu")
    run = str(tmp_path / "run")
    fit(str(tmp_path / "shards"), run, cfg, progress=False)
    model, meta = load_run(run, "cpu")
    assert meta["piece_aspect"] == 1.0
    report = test_run(run, str(data), str(tmp_path / "t"), "cpu", 1)
    ts = read_test_set(str(data))

    def stitched_map(model, img):  # brute force: each piece through the model, its map into its half
        halves = []
        for t, b, l, r in piece_boxes(*img.shape[:2], 1.0):
            x = torch.from_numpy(prepare_normal(img[t:b, l:r], 32, 1).transpose(2, 0, 1)[None].copy())
            with torch.no_grad():
                m = model.anomaly_map(x.float() / 255)[0, 0].numpy()
            halves.append(cv2.resize(m, (16, 32), interpolation=cv2.INTER_AREA))
        return np.concatenate(halves, axis=1)

    canvases = [stitched_map(model, load_image(p)) for p in ts.paths]
    want_max, want_mean = [c.max() for c in canvases], [c.mean() for c in canvases]
    with open(os.path.join(tmp_path / "t", "scores.csv")) as fh:
        scored = list(csv.DictReader(fh))
    assert_close(np.array([float(r["score_max"]) for r in scored]), np.array(want_max), atol=2e-6)
    assert_close(np.array([float(r["score_mean"]) for r in scored]), np.array(want_mean), atol=2e-6)
    assert report["metrics"]["all"]["image_AUROC"] == pytest.approx(
        auroc(np.array(want_max), ts.labels), abs=1e-9)
    # calibration counts images, not pieces: each image's score comes from its stitched map
    combined = test_run(run, str(data), str(tmp_path / "c"), "cpu", 0, map_kind="combined")
    assert combined["calibration"].startswith("3 images of DATA/train/good")
    from fractalad.evaluate import calibrate_run
    saved = calibrate_run(run, str(data / "test" / "good"), quantile=1.0, device="cpu")
    assert saved["normal_scores"]["n"] == 3 and saved["image"] == pytest.approx(
        max(s for s, lab in zip(want_max, ts.labels) if lab == 0), abs=2e-6)
    out = str(tmp_path / "pred")
    res = CliRunner().invoke(main, ["predict", run, os.path.join(data, "test", "spot"), "--out",
                                    out, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    mask = cv2.imread(os.path.join(out, "mask", "0.png"), 0)
    assert mask.shape == (48, 96)  # the image's own size, not a piece's
    from fractalad.export import export_run
    import onnx
    onnx_path = export_run(run, "onnx", str(tmp_path / "m.onnx"))
    props = {p.key: p.value for p in onnx.load(onnx_path).metadata_props}
    assert props["piece_aspect"] == "1.0"  # a caller needs it to cut images as the run did
    files = {"piece_aspect": ""}
    torch.jit.load(export_run(run, "torchscript", str(tmp_path / "m.pt")), _extra_files=files)
    assert files["piece_aspect"] == b"1.0"
    files = {"piece_aspect": "", "map": ""}
    torch.export.load(export_run(run, "pt2", str(tmp_path / "m.pt2")), extra_files=files)
    assert (files["piece_aspect"], files["map"], files["input_size"]) == ("1.0", "head", "32")
    with open(os.path.join(out, "scores.csv")) as fh:
        assert float(next(csv.DictReader(fh))["score_max"]) == pytest.approx(
            want_max[ts.paths.index(os.path.join(data, "test", "spot", "0.png"))], abs=2e-6)

    # held out whole, with both its pieces, a normal calibrates by its stitched map
    from fractalsynth.shards import load_holdout
    shards, held_run = str(tmp_path / "held_shards"), str(tmp_path / "held_run")
    generate(str(data / "train" / "good"), shards, 8, AnomalyConfig(size=32), shard_size=8,
             pieces="1", holdout=0.34)
    held = load_holdout(shards)
    assert len(held.names) == 2 and held.names[0].endswith("#0") and held.names[1].endswith("#1")
    assert held.layout.tolist() == [[0, 0, 32, 0, 16], [0, 0, 32, 16, 32]]
    fit(shards, held_run, FitConfig(steps=1, batch_size=4, workers=0, device="cpu"), progress=False)
    held_model, _ = load_run(held_run, "cpu")
    saved = calibrate_run(held_run, quantile=1.0, device="cpu")
    want = stitched_map(held_model, load_image(str(data / "train" / "good" / held.names[0][:-2])))
    assert saved["source"].endswith("of 1 held-out normals (holdout_normals.npz)")
    assert saved["normal_scores"]["n"] == 1 and saved["image"] == pytest.approx(want.max(), abs=2e-6)
    op = test_run(held_run, str(data), str(tmp_path / "hh"), "cpu", 0)["held_out_operating_point"]
    assert op["n_normals"] == 1 and op["threshold"] == pytest.approx(want.max(), abs=2e-6)
    saved = calibrate_run(held_run, device="cpu", map_kind="combined")
    report = test_run(held_run, str(data), str(tmp_path / "ht"), "cpu", 0, map_kind="combined")
    assert report["calibration"].startswith("1 held-out normals")
    op = report["held_out_operating_point"]
    assert op["n_normals"] == 1 and op["threshold"] == pytest.approx(saved["image"], abs=1e-6)
