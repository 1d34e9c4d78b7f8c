import numba
import numpy as np
import pytest

from fractalsynth import ifs
from fractalsynth.maskbank import load_mask_params, load_masks, mask_bank_info, write_mask_bank


def test_every_map_strictly_contractive_and_sigma_constraint():
    cfg = ifs.IFSConfig(n_maps_min=2, n_maps_max=5)
    for i in range(300):
        maps = ifs.sample_ifs(3, i, cfg)
        n = len(maps)
        assert 2 <= n <= 5
        svals = np.array([np.linalg.svd(m[:4].reshape(2, 2), compute_uv=False) for m in maps])
        assert svals.max() < 1.0
        alpha = (svals[:, 0] + 2 * svals[:, 1]).sum()
        assert (5 + n) / 2 - 1e-6 <= alpha <= (6 + n) / 2 + 1e-6
        assert np.all(np.abs(maps[:, 4:6]) <= 1.0)


def test_probabilities_det_and_uniform():
    for i in range(50):
        maps = ifs.sample_ifs(0, i)
        dets = np.abs(maps[:, 0] * maps[:, 3] - maps[:, 1] * maps[:, 2])
        np.testing.assert_allclose(maps[:, 6], dets / dets.sum(), rtol=1e-5)
    uni = ifs.sample_ifs(0, 1, ifs.IFSConfig(n_maps_min=3, n_maps_max=3, probabilities="uniform"))
    np.testing.assert_allclose(uni[:, 6], 1 / 3)


def test_masks_deterministic_across_threads_and_batches():
    numba.set_num_threads(1)
    a = ifs.make_masks(7, range(24), 64)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    b = ifs.make_masks(7, range(24), 64)
    c = ifs.make_masks(7, range(12, 24), 64)
    assert np.array_equal(a.masks, b.masks)
    assert np.array_equal(a.masks[12:], c.masks)
    d = ifs.make_masks(8, range(24), 64)
    assert not np.array_equal(a.masks, d.masks)


def test_quality_control_rejects_weak_fractals():
    strict = ifs.IFSConfig(min_fill=0.3, min_axis_ratio=0.2)
    b = ifs.make_masks(1, range(200), 64, config=strict)
    ok = b.attempts < strict.max_attempts
    assert (b.fill[ok] >= 0.3).all() and (b.axis_ratio[ok] >= 0.2).all()
    assert b.attempts.max() > 1  # some draws were rejected and redrawn
    loose = ifs.make_masks(1, range(200), 64, config=ifs.IFSConfig(min_fill=0, min_axis_ratio=0))
    assert (loose.attempts == 1).all()
    assert (loose.fill < 0.3).any()


def test_weak_fraction_below_one_percent():
    b = ifs.make_masks(0, range(1000), 128)
    weak = (b.fill < 0.05) | (b.axis_ratio < 0.05)
    assert weak.mean() < 0.01
    assert all((m > 0).any() for m in b.masks)


def test_framing_fits_canvas_and_is_size_independent():
    b = ifs.make_masks(2, range(20), 96, 64)
    for m in b.masks:
        ys, xs = np.nonzero(m)
        # stretched framing: the attractor spans (nearly) the whole canvas, one-pixel margin
        assert ys.min() <= 3 and ys.max() >= 92 and xs.min() <= 3 and xs.max() >= 60
    keep = ifs.make_masks(2, range(20), 96, 64, ifs.IFSConfig(keep_aspect=True))
    small = ifs.make_masks(2, range(20), 48, 32, ifs.IFSConfig(keep_aspect=True))
    for k, s in zip(keep.masks, small.masks):
        ys, xs = np.nonzero(k)
        ys2, xs2 = np.nonzero(s)
        r1 = (ys.max() - ys.min() + 1) / (xs.max() - xs.min() + 1)
        r2 = (ys2.max() - ys2.min() + 1) / (xs2.max() - xs2.min() + 1)
        assert abs(np.log(r1 / r2)) < 0.35  # same shape at half the size


def test_stamp_thickens_and_is_never_empty():
    cfg_no = ifs.IFSConfig(stamp=False, min_fill=0, min_axis_ratio=0)
    cfg_st = ifs.IFSConfig(stamp=True, min_fill=0, min_axis_ratio=0)
    a = ifs.make_masks(5, range(30), 64, config=cfg_no)
    b = ifs.make_masks(5, range(30), 64, config=cfg_st)
    assert ((b.masks > 0).sum(axis=(1, 2)) >= (a.masks > 0).sum(axis=(1, 2)) * 0.8).all()
    for i in range(50):
        st = ifs._stamp_bits(np.uint64(i * 977 + 1))
        assert st[4] == 1 and st.sum() >= 1


def test_render_modes_and_rerender():
    b = ifs.make_masks(0, [3], 64)
    p, k = b.params[0, :b.n_maps[0]], int(b.keys[0])
    m = ifs.render(p, k, 64)
    assert np.array_equal(m, b.masks[0])
    big = ifs.render(p, k, 128)
    assert big.shape == (128, 128) and set(np.unique(big)) <= {0, 255}
    d = ifs.render(p, k, 64, mode="density")
    assert d.dtype == np.uint8 and d.max() == 255 and (d[m == 0] == 0).mean() > 0.5
    c = ifs.render(p, k, 64, mode="color")
    assert c.shape == (64, 64, 3) and c.max() > 0
    t = ifs.render_texture(0, 3, 32, mode="density")
    assert t.shape == (32, 32)


@pytest.mark.parametrize("bad", [
    dict(n_maps_min=0), dict(n_maps_min=3, n_maps_max=2), dict(probabilities="softmax"),
    dict(max_singular=1.0), dict(min_fill=1.5), dict(max_attempts=0),
])
def test_bad_config_rejected(bad):
    with pytest.raises(ValueError):
        ifs.IFSConfig(**bad)


def test_bad_sizes_and_modes():
    with pytest.raises(ValueError, match="at least 8x8"):
        ifs.make_masks(0, [0], 4)
    with pytest.raises(ValueError, match="at most 16384 pixels a side, got 64x100000"):
        ifs.make_masks(0, [0], 64, 100000)  # refused before anything is allocated
    with pytest.raises(ValueError, match="mode"):
        ifs.render(ifs.sample_ifs(0, 0), 1, 32, mode="plasma")


def test_mask_bank_roundtrip(tmp_path):
    out = tmp_path / "bank.h5"
    info = write_mask_bank(str(out), 40, 48, seed=3)
    assert info.count == 40
    masks = load_masks(str(out))
    direct = ifs.make_masks(3, range(40), 48)
    assert np.array_equal(masks, direct.masks)
    params, n_maps, keys = load_mask_params(str(out), 5, 6)
    again = ifs.render(params[0, :n_maps[0]], int(keys[0]), 48)
    assert np.array_equal(again, masks[5])
    assert mask_bank_info(str(out)).height == 48
    with pytest.raises(ValueError, match="n must be > 0"):
        write_mask_bank(str(tmp_path / "x.h5"), 0, 48)
