import hashlib
import os

import numpy as np
import pytest
from click.testing import CliRunner

from fractalsynth.anomaly import AnomalyConfig, FractalAnomaly
from fractalsynth.cli import main
from fractalsynth.generate import generate, index_dataset
from fractalsynth.images import list_images, load_image
from fractalsynth.shards import ShardDataset, ShardError, shard_name, verify_dataset

CFG = AnomalyConfig(size=48)


def _digest(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".h5"):
            with open(os.path.join(folder, name), "rb") as fh:
                h.update(name.encode() + fh.read())
    return h.hexdigest()


def test_workers_give_identical_shards(normals_dir, tmp_path):
    generate(normals_dir, str(tmp_path / "a"), 300, CFG, seed=1, shard_size=128, workers=1)
    generate(normals_dir, str(tmp_path / "b"), 300, CFG, seed=1, shard_size=128, workers=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert verify_dataset(str(tmp_path / "a")) == []


def test_reader_matches_fractal_anomaly(normals_dir, tmp_path):
    out = str(tmp_path / "ds")
    generate(normals_dir, out, 40, CFG, seed=3, shard_size=16)
    ds = ShardDataset(out)
    assert len(ds) == 40
    paths = list_images(normals_dir)
    perm = np.random.default_rng([3, 3]).permutation(len(paths))
    gen = FractalAnomaly(config=CFG, size=48, seed=3)
    seen = set()
    for k, s, e in ds.blocks(8):
        rb = ds.records(k, s, e)
        batch = ds.compose_batch(rb)
        for j in range(len(rb)):
            i = int(rb.sample_index[j])
            seen.add(i)
            want = gen(load_image(paths[perm[i % len(paths)]]), i)
            for got, w in zip((batch[0][j], batch[1][j], batch[2][j]), want):
                assert np.array_equal(got, w)
    assert seen == set(range(40))
    n, a, m = ds[5]
    assert m.any() and n.shape == (48, 48, 3)
    got = [b for b in ds.iter_batches(7, seed=0)]
    assert sum(len(b[0]) for b in got) == 40


def test_kill_and_resume_is_byte_identical(normals_dir, tmp_path):
    full = str(tmp_path / "full")
    generate(normals_dir, full, 200, CFG, seed=0, shard_size=64)
    part = str(tmp_path / "part")
    generate(normals_dir, part, 200, CFG, seed=0, shard_size=64, shard_range=(0, 2))
    assert not os.path.exists(os.path.join(part, "manifest.json"))
    # a shard being written when the job died
    with open(os.path.join(part, shard_name(2) + ".partial"), "wb") as fh:
        fh.write(b"\x89HDF half written")
    generate(normals_dir, part, 200, CFG, seed=0, shard_size=64)
    assert _digest(full) == _digest(part)
    assert not any(n.endswith(".partial") for n in os.listdir(part))


def test_shard_range_jobs_then_index(normals_dir, tmp_path):
    out = str(tmp_path / "ds")
    generate(normals_dir, out, 150, CFG, seed=0, shard_size=50, shard_range=(2, 3))
    with pytest.raises(ShardError, match="missing"):
        index_dataset(out)
    generate(normals_dir, out, 150, CFG, seed=0, shard_size=50, shard_range=(0, 2))
    assert os.path.exists(os.path.join(out, "manifest.json"))
    os.remove(os.path.join(out, "manifest.json"))
    index_dataset(out)
    assert len(ShardDataset(out)) == 150


def test_mismatched_rerun_refused(normals_dir, tmp_path):
    out = str(tmp_path / "ds")
    generate(normals_dir, out, 30, CFG, seed=0, shard_size=16)
    with pytest.raises(ShardError, match="seed"):
        generate(normals_dir, out, 30, CFG, seed=1, shard_size=16)
    with pytest.raises(ShardError, match="config"):
        generate(normals_dir, out, 30, AnomalyConfig(size=48, placement="auto"), seed=0,
                 shard_size=16)


def test_changed_normals_refused_on_resume_and_flagged_by_verify(normals_dir, tmp_path):
    # same names, other pixels (an edited file, or another machine's image decoder): the
    # dataset's normals file holds the old pixels, so new shards would paste onto wrong images
    import shutil

    import cv2
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    generate(normals_dir, full, 60, CFG, seed=0, shard_size=20)
    generate(normals_dir, part, 60, CFG, seed=0, shard_size=20, shard_range=(0, 1))
    before = _digest(part)
    path = os.path.join(normals_dir, "n0.png")
    cv2.imwrite(path, 255 - cv2.imread(path))
    with pytest.raises(ShardError, match="other pixels"):
        generate(normals_dir, part, 60, CFG, seed=0, shard_size=20)
    assert _digest(part) == before  # nothing written
    res = CliRunner().invoke(main, ["generate", "--normals", normals_dir, "--out", part, "--n", "60",
                                    "--size", "48", "--shard-size", "20"])
    assert res.exit_code == 2 and "other pixels" in res.output and part in res.output
    # a shard made from the changed normals (say by a job on another machine) dropped in
    other = str(tmp_path / "other")
    generate(normals_dir, other, 60, CFG, seed=0, shard_size=20)
    shutil.copy(os.path.join(other, shard_name(1)), os.path.join(full, shard_name(1)))
    assert any(shard_name(1) in p and "other normal images" in p for p in verify_dataset(full))
    with pytest.raises(ShardError, match=shard_name(1)):
        index_dataset(full)


def test_verify_detects_truncated_corrupt_and_foreign(normals_dir, tmp_path):
    out = str(tmp_path / "ds")
    generate(normals_dir, out, 60, CFG, seed=0, shard_size=20)
    s0, s1 = os.path.join(out, shard_name(0)), os.path.join(out, shard_name(1))
    with open(s0, "r+b") as fh:  # truncate
        fh.truncate(os.path.getsize(s0) // 2)
    import h5py
    with h5py.File(s1, "r+") as f:  # flip pixels in place
        px = f["pixels"][()]
        px[:50] ^= 0xFF
        f["pixels"][...] = px
    with open(os.path.join(out, "stray.h5"), "wb") as fh:
        fh.write(b"not hdf5")
    problems = verify_dataset(out)
    text = "\n".join(problems)
    assert shard_name(0) in text and shard_name(1) in text and "stray.h5" in text
    assert "checksum" in text
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "typo")])
    assert res.exit_code == 2 and "no such dataset folder" in res.output
    res = CliRunner().invoke(main, ["verify", out])
    assert res.exit_code == 1
    with pytest.raises(ShardError, match=shard_name(0)):
        ShardDataset(out)[0]


def test_bad_inputs(tmp_path, normals_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner()
    res = r.invoke(main, ["generate", "--normals", str(empty), "--n", "10", "--out",
                          str(tmp_path / "o")])
    assert res.exit_code == 2 and "no images found" in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output  # no progress bar before it
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG garbage")
    import shutil
    shutil.copy(os.path.join(normals_dir, "n0.png"), bad / "ok.png")
    res = r.invoke(main, ["generate", "--normals", str(bad), "--n", "10", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "broken.png" in res.output and "--skip-bad" in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    res = r.invoke(main, ["generate", "--normals", str(bad), "--n", "10", "--size", "32",
                          "--skip-bad", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    # the message is printed before any sample is made: no empty progress bar above it
    first = res.output.splitlines()[0]
    assert first.startswith("skipped: ") and "broken.png" in first and "--skip-bad" not in first, first
    res = r.invoke(main, ["generate", "--normals", str(bad), "--n", "10", "--shard-range", "3:9",
                          "--out", str(tmp_path / "o3")])
    assert res.exit_code == 2 and "shard-range" in res.output
    res = r.invoke(main, ["info", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no such dataset" in res.output
    assert not os.path.exists(tmp_path / "o")  # the refused runs above left no empty folder
    one = os.path.join(normals_dir, "n0.png")
    res = r.invoke(main, ["generate", "--normals", one, "--n", "10", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and f"{one}: a file, not a folder; pass the folder" in res.output
    res = r.invoke(main, ["generate", "--normals", normals_dir, "--n", "10", "--out", one])
    assert res.exit_code == 2 and "'--out'" in res.output and "is a file" in res.output
    with pytest.raises(ValueError, match=f"{one}: a file, not a folder; --out takes a folder"):
        generate(normals_dir, one, 10)


def test_normals_that_would_not_fit_in_memory_are_refused(normals_dir, tmp_path, monkeypatch):
    from fractalsynth.images import ImageError
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 16}  # a 64 KiB machine: 6 normals at 64 px need 72 KiB
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    with pytest.raises(ImageError, match=r"6 normals at 64 px take .* lower --size"):
        generate(normals_dir, str(tmp_path / "o"), 4, AnomalyConfig(size=64, channels="rgb"))
    assert not os.path.exists(tmp_path / "o" / "normals.h5")
    pages["SC_PHYS_PAGES"] = 64  # 256 KiB: they fit in half of it
    generate(normals_dir, str(tmp_path / "o"), 4, AnomalyConfig(size=64, channels="rgb"))


def test_cli_info_preview_export(normals_dir, tmp_path):
    out = str(tmp_path / "ds")
    r = CliRunner()
    res = r.invoke(main, ["generate", "--normals", normals_dir, "--n", "20", "--size", "32",
                          "--out", out, "--workers", "1", "--dilate", "1"])
    assert res.exit_code == 0, res.output
    res = r.invoke(main, ["info", out])
    assert res.exit_code == 0 and '"samples": 20' in res.output
    assert '"dilate_iterations": 1' in res.output
    res = r.invoke(main, ["preview", out, "--n", "4", "--out", str(tmp_path / "p.png")])
    assert res.exit_code == 0 and os.path.getsize(tmp_path / "p.png") > 0
    res = r.invoke(main, ["preview", "--normals", normals_dir, "--n", "3", "--size", "32",
                          "--out", str(tmp_path / "q.png")])
    assert res.exit_code == 0, res.output
    res = r.invoke(main, ["export", out, "--out", str(tmp_path / "png"), "--limit", "5"])
    assert res.exit_code == 0, res.output
    for sub in ("image", "mask", "normal"):
        assert len(os.listdir(tmp_path / "png" / sub)) == 5


def test_preset_sets_the_method_placement(normals_dir, tmp_path):
    import json
    out = str(tmp_path / "ds")
    res = CliRunner().invoke(main, ["generate", "--normals", normals_dir, "--n", "8", "--size", "32",
                                    "--preset", "screw", "--out", out, "--workers", "1"])
    assert res.exit_code == 0, res.output
    params = json.load(open(os.path.join(out, "dataset.json")))["params"]
    assert params["config"]["placement"] == "foreground"
    from fractalad.choices import PRESETS
    assert PRESETS["carpet"] == {"kd": False, "placement": "uniform"}
    assert PRESETS["pill"] == {"kd": True, "placement": "foreground"}


def test_holdout_keeps_normals_out_of_every_sample(normals_dir, tmp_path):
    from fractalsynth.generate import holdout_indices
    from fractalsynth.images import prepare_normal
    from fractalsynth.shards import load_holdout
    paths = list_images(normals_dir)
    held_idx = holdout_indices(len(paths), 0.34, seed=4)
    assert len(held_idx) == 2 and list(held_idx) == list(holdout_indices(len(paths), 0.34, seed=4))
    assert list(held_idx) != list(holdout_indices(len(paths), 0.34, seed=5))  # seeded
    out = str(tmp_path / "ds")
    generate(normals_dir, out, 40, CFG, seed=4, shard_size=16, holdout=0.34)
    images, names, layout = load_holdout(out)
    assert layout is None  # whole images
    rel = [os.path.relpath(paths[i], normals_dir) for i in held_idx]
    assert names == rel
    for img, i in zip(images, held_idx):
        assert np.array_equal(img, prepare_normal(load_image(paths[i]), 48, 3))
    ds = ShardDataset(out)
    assert len(ds.normals) == len(paths) - 2 and ds.params["holdout"] == 0.34
    kept = [load_image(p) for i, p in enumerate(paths) if i not in held_idx]
    for img in images:  # no sample was built on a held-out normal
        assert not any(np.array_equal(img, n) for n in ds.normals)
    assert {np.array_equal(ds.normals[j], prepare_normal(k, 48, 3)) for j, k in enumerate(kept)} == {True}
    plain = str(tmp_path / "plain")
    generate(normals_dir, plain, 8, CFG, seed=4, shard_size=8)
    assert "holdout" not in ShardDataset(plain).params  # datasets made before the option resume
    assert len(load_holdout(plain)[0]) == 0
    with pytest.raises(ValueError, match="leaves none"):
        holdout_indices(2, 0.9, 0)
    res = CliRunner().invoke(main, ["generate", "--normals", normals_dir, "--n", "8", "--out",
                                    str(tmp_path / "x"), "--holdout", "1"])
    assert res.exit_code == 2 and "--holdout" in res.output


def test_pieces_cut_every_normal_before_it_is_resized(tmp_path):
    import cv2
    from fractalsynth.generate import resolve_piece_aspect
    from fractalsynth.images import median_aspect, piece_boxes, prepare_normal
    folder = tmp_path / "normals"
    folder.mkdir()
    rng = np.random.default_rng(0)
    shapes = {"wide.png": (40, 130), "square.png": (50, 50), "tall.png": (90, 30)}
    for name, shape in shapes.items():
        cv2.imwrite(str(folder / name), rng.integers(0, 255, shape, dtype=np.uint8))
    assert median_aspect(shapes.values()) == pytest.approx(50 / 50)
    assert resolve_piece_aspect("auto", shapes.values()) == pytest.approx(1.0)
    assert resolve_piece_aspect("off", []) == 0.0 and resolve_piece_aspect("0.5", []) == 0.5
    for bad in ("wide", "-1", "0x", float("inf")):
        with pytest.raises(ValueError, match="pieces must be"):
            resolve_piece_aspect(bad, [])
    out = str(tmp_path / "ds")
    generate(str(folder), out, 12, AnomalyConfig(size=32), seed=2, shard_size=12, pieces="auto")
    ds = ShardDataset(out)
    assert ds.params["piece_aspect"] == pytest.approx(1.0)
    want = []
    for name in sorted(shapes):  # list_images' order
        img = load_image(str(folder / name))
        want += [prepare_normal(img[t:b, l:r], 32, 1)
                 for t, b, l, r in piece_boxes(*img.shape[:2], 1.0)]
    assert len(ds.normals) == len(want) == 3 + 1 + 3  # 130/40 -> 3 across, 90/30 -> 3 down
    assert all(np.array_equal(a, b) for a, b in zip(ds.normals, want))
    plain = str(tmp_path / "plain")
    generate(str(folder), plain, 12, AnomalyConfig(size=32), seed=2, shard_size=12)
    assert "piece_aspect" not in ShardDataset(plain).params and len(ShardDataset(plain).normals) == 3
    from fractalsynth.images import canvas_boxes
    from fractalsynth.shards import load_holdout
    held_out = str(tmp_path / "h")  # whole images are held out: all their pieces, none trained on
    generate(str(folder), held_out, 12, AnomalyConfig(size=32), seed=2, shard_size=12,
             holdout=0.3, pieces="auto")
    held = load_holdout(held_out)
    (name,) = {n.split("#")[0] for n in held.names}
    img = load_image(str(folder / name))
    cuts = piece_boxes(*img.shape[:2], 1.0)
    assert len(held.images) == len(cuts) == 3  # wide.png
    assert all(np.array_equal(a, prepare_normal(img[t:b, l:r], 32, 1))
               for a, (t, b, l, r) in zip(held.images, cuts))
    assert held.layout[:, 1:].tolist() == [list(c) for c in canvas_boxes(cuts, img.shape[:2], 32)]
    kept = ShardDataset(held_out).normals
    assert len(kept) == 7 - len(cuts) and not any(np.array_equal(a, k) for a in held.images for k in kept)
    from fractalsynth.anomaly import FractalAnomaly
    from fractalsynth.preview import preview_from_normals, triple_grid
    gen = FractalAnomaly(config=AnomalyConfig(size=32), size=32, seed=0)
    cut = [(f"{name}#{k}", load_image(str(folder / name))[t:b, l:r]) for name in sorted(shapes)
           for k, (t, b, l, r) in enumerate(piece_boxes(*shapes[name], 1.0))]
    labels = [f"{i}: {n.replace('square.png#0', 'square.png')}" for i, (n, _) in enumerate(cut)]
    want = triple_grid(*zip(*[gen(img, index=i) for i, (_, img) in enumerate(cut)]), columns=2,
                       labels=labels)
    assert np.array_equal(preview_from_normals(str(folder), 7, config=AnomalyConfig(size=32),
                                               pieces="auto"), want)
    res = CliRunner().invoke(main, ["preview", "--normals", str(folder), "--n", "2", "--size", "32",
                                    "--pieces", "auto", "--out", str(tmp_path / "p.png")])
    assert res.exit_code == 0 and os.path.getsize(tmp_path / "p.png") > 0, res.output
    res = CliRunner().invoke(main, ["generate", "--normals", str(folder), "--n", "8", "--out",
                                    str(tmp_path / "x"), "--pieces", "wide"])
    assert res.exit_code != 0 and "pieces must be 'auto', 'off' or a width / height" in res.output
    assert not os.path.exists(tmp_path / "x" / "dataset.json")
