import cv2
import numpy as np
import pytest

from fractalsynth.anomaly import CONTENTS, AnomalyConfig, FractalAnomaly, compose, parse_mix
from fractalsynth.color import jitter
from fractalsynth.images import ImageError


def _image(h=80, w=96, ch=3, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(30, 220, (h, w, 3)).astype(np.uint8), (0, 0), 1.5)
    if ch == 1:
        img = img[:, :, 0]
    elif ch == 4:
        img = np.concatenate([img, np.full((h, w, 1), 255, np.uint8)], axis=2)
    if dtype == np.uint16:
        img = img.astype(np.uint16) * 257
    return img


def _check_invariants(gen, img, n):
    for i in range(n):
        rec = gen.record(img, i)
        normal, anomalous, mask = gen(img, i)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert mask.any(), "the mask is never empty"
        assert normal.shape == anomalous.shape and normal.shape[:2] == mask.shape
        # outside the mask only the shared mild jitter differs: identical pixels
        assert np.array_equal(normal[mask == 0], anomalous[mask == 0])
        # the shared jitter is the same on both images
        assert np.array_equal(jitter(gen.record(img, i).crop, rec.jitter, None).shape, rec.crop.shape)


@pytest.mark.parametrize("content", CONTENTS)
@pytest.mark.parametrize("placement", ["uniform", "foreground", "auto"])
def test_invariants_every_content_and_placement(content, placement):
    pool = [_image(seed=s) for s in range(3)]
    gen = FractalAnomaly(size=64, seed=1, placement=placement, content=((content, 1.0),),
                         pool=pool, textures=pool)
    _check_invariants(gen, _image(), 25)


@pytest.mark.parametrize("mask_source", ["fractal", "perlin", "rectangle"])
@pytest.mark.parametrize("blend", ["paste", "alpha"])
def test_invariants_mask_sources_and_blends(mask_source, blend):
    gen = FractalAnomaly(size=64, seed=2, mask_source=mask_source, blend=blend)
    _check_invariants(gen, _image(), 30)


def test_mask_source_mix_draws_both_shapes_and_single_sources_keep_their_bytes():
    img = _image(120, 100)

    def mean_area(source, seed=0):
        gen = FractalAnomaly(size=64, seed=seed, mask_source=source, dilate_iterations=0)
        return np.mean([gen.record(img, i).mask.sum() for i in range(200)])

    fractal, rectangle = mean_area("fractal"), mean_area("rectangle")
    mixed = mean_area("fractal=0.5,rectangle=0.5")
    # a square label covers about twice a fractal's area: half of each lands in between
    assert fractal + 0.25 * (rectangle - fractal) < mixed < rectangle - 0.25 * (rectangle - fractal)
    assert AnomalyConfig(mask_source="rectangle=1,perlin=0").mask_source == "rectangle"
    one = FractalAnomaly(size=64, seed=4, mask_source="rectangle=2")
    plain = FractalAnomaly(size=64, seed=4, mask_source="rectangle")
    assert all(np.array_equal(one.record(img, i).crop, plain.record(img, i).crop) for i in range(5))
    _check_invariants(FractalAnomaly(size=64, seed=1, mask_source="perlin=1,fractal=1"), img, 30)


def test_hundreds_of_samples_default():
    gen = FractalAnomaly(size=64, seed=0)
    _check_invariants(gen, _image(120, 100), 200)


def test_hundreds_of_samples_small_defects_anywhere():
    gen = FractalAnomaly(size=64, seed=0, region=(0.0, 1.0), cut_scale=(0.03, 0.5),
                         min_contrast=10.0, content="same=0.5,noise=0.25,fractal=0.25")
    _check_invariants(gen, _image(120, 100), 200)


@pytest.mark.parametrize("shape,ch,dtype", [
    ((50, 70), 1, np.uint8), ((50, 70), 3, np.uint8), ((50, 70), 4, np.uint8),
    ((50, 70), 3, np.uint16), ((20, 24), 3, np.uint8), ((9, 31), 1, np.uint8),
])
def test_input_kinds(shape, ch, dtype):
    img = _image(*shape, ch=ch, dtype=dtype)
    if ch == 1 and dtype == np.uint8:
        img = img[:, :, None] if shape == (9, 31) else img
    gen = FractalAnomaly(size=48, seed=0)
    n, a, m = gen(img, 0)
    want = 1 if ch == 1 else 3
    assert n.shape == (48, 48, want) and a.dtype == np.uint8 and m.shape == (48, 48)
    _check_invariants(gen, img, 10)


def test_source_resolution_mode():
    gen = FractalAnomaly(size=64, seed=0, resolution="source")
    for i in range(20):
        n, a, m = gen(_image(200, 160), i)
        assert m.any() and n.shape == (64, 64, 3)


def test_same_seed_same_bytes_and_index_addressing():
    img = _image()
    a = FractalAnomaly(size=64, seed=5)
    b = FractalAnomaly(size=64, seed=5)
    for i in (0, 7, 3):
        assert all(np.array_equal(x, y) for x, y in zip(a(img, i), b(img, i)))
    c = FractalAnomaly(size=64, seed=6)
    assert not np.array_equal(a(img, 0)[1], c(img, 0)[1])
    batch = a.batch([img, img], indices=[7, 3])
    assert np.array_equal(batch[1][0], b(img, 7)[1])


def test_record_compose_matches_call():
    img = _image()
    gen = FractalAnomaly(size=64, seed=9)
    from fractalsynth.images import prepare_normal
    normal = prepare_normal(img, 64, 3)
    out = compose(normal, gen.record(img, 4))
    assert all(np.array_equal(x, y) for x, y in zip(out, gen(img, 4)))


def test_unusable_inputs_and_options():
    gen = FractalAnomaly(size=32)
    with pytest.raises(ImageError):
        gen(np.zeros((0, 5), np.uint8))
    with pytest.raises(ImageError):
        gen(np.zeros((10, 10, 2), np.uint8))
    with pytest.raises(ValueError, match="placement"):
        FractalAnomaly(placement="middle")
    with pytest.raises(ValueError, match="content"):
        parse_mix("same=lots", "content")
    with pytest.raises(ValueError, match="content"):
        AnomalyConfig(content=(("glitter", 1.0),))
    with pytest.raises(ValueError, match="mask source 'square'"):
        AnomalyConfig(mask_source="square")
    with pytest.raises(ValueError, match="mask source proportions must not all be 0"):
        AnomalyConfig(mask_source="fractal=0")
    with pytest.raises(ValueError, match="texture"):
        FractalAnomaly(size=32, content="texture")(_image(), 0)
    with pytest.raises(ValueError, match="8x8"):
        AnomalyConfig(size=4)


@pytest.mark.parametrize("shape", [(600, 520, 1), (600, 520), (530, 700, 3), (100, 90, 1)])
def test_resize_keeps_channel_axis(shape):
    from fractalsynth.images import prepare_normal, resize
    img = np.zeros(shape, np.uint8)
    out = resize(img, 64, 64)
    assert out.ndim == len(shape) and out.shape[:2] == (64, 64)
    assert prepare_normal(img, 64, 1).shape == (64, 64, 1)


@pytest.mark.parametrize("shape", [(300, 100), (300, 64), (100, 300, 3), (257, 100, 1)])
def test_resize_filters_the_shrinking_axis(shape):
    """Stripes finer than the target along the shrinking axis average to grey, even when the
    other axis grows (a tall, narrow tile made square); plain bilinear would keep stripes."""
    from fractalsynth.images import resize
    img = np.zeros(shape, np.uint8)
    tall = shape[0] > shape[1]
    if tall:
        img[::2] = 255
    else:
        img[:, ::2] = 255
    out = resize(img, 128, 128).astype(np.float64)
    assert out.shape[:2] == (128, 128) and out.ndim == len(shape)
    assert abs(out.mean() - img.mean()) < 2 and out.std() < 25  # bilinear: about 70


def test_region_band():
    """The method's 10-90 % band keeps anomalies off the border; region 0-1 reaches it."""
    img = _image(128, 128)

    def border_hits(region):
        gen = FractalAnomaly(size=64, seed=3, region=region, cut_scale=(0.1, 0.2))
        hits = 0
        for i in range(150):
            rec = gen.record(img, i)
            hits += rec.y <= 1 or rec.x <= 1 or rec.y + rec.mask.shape[0] >= 63 \
                or rec.x + rec.mask.shape[1] >= 63
        return hits

    assert border_hits((0.1, 0.9)) == 0
    assert border_hits((0.0, 1.0)) > 0
    with pytest.raises(ValueError, match="region"):
        AnomalyConfig(region=(0.5, 0.4))
    with pytest.raises(ValueError, match="region"):
        AnomalyConfig(region=(0.0, 1.5))


def test_noise_kernel_matches_numpy():
    from fractalsynth.anomaly import add_noise_inside
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = (rng.random((20, 30)) < 0.4).astype(np.uint8)
    noise = rng.standard_normal(int(mask.sum()), dtype=np.float32) * 20
    want = img.copy()
    inside = mask > 0
    want[inside] = np.clip(img[inside] + noise[:, None] * np.float32(10) + np.float32(0.5),
                           0, 255).astype(np.uint8)
    assert np.array_equal(add_noise_inside(img.copy(), mask, noise, 10.0), want)
    assert (want[inside] == 255).any() and (want[inside] == 0).any()  # both clips exercised


def test_min_contrast_redraws_faint_anomalies():
    from fractalsynth.anomaly import contrast
    img = np.tile(np.linspace(90, 110, 96, dtype=np.float32), (80, 1)).astype(np.uint8)

    def faint(min_contrast):
        gen = FractalAnomaly(size=64, seed=4, min_contrast=min_contrast, noise_prob=0.0,
                             mild_jitter=0.0, dilate_iterations=0, content="same")
        values = []
        for i in range(80):
            n, a, m = gen(img, i)
            values.append(contrast(a, n, m))
        return np.array(values)

    assert (faint(0.0) < 8).mean() > 0.05  # the paper's colour changes are often faint here
    assert (faint(8.0) >= 8).all()
    with pytest.raises(ValueError, match="min_contrast"):
        AnomalyConfig(min_contrast=-1)


def test_thin_anomalies_are_lines():
    from fractalsynth.anomaly import skeleton_lines
    disc = cv2.circle(np.zeros((40, 40), np.uint8), (20, 20), 12, 1, -1)
    line = skeleton_lines(disc, 1)
    assert 0 < line.sum() < 0.2 * disc.sum() and not (line & (1 - disc)).any()
    assert not cv2.erode(line, np.ones((2, 2), np.uint8)).any()  # nowhere two pixels thick
    assert skeleton_lines(disc, 3).sum() > 2 * line.sum()

    def core_share(thin):  # mask pixels whose whole 3x3 neighbourhood is in the mask
        gen = FractalAnomaly(size=64, seed=3, thin=thin, thin_width=(1, 1), dilate_iterations=0)
        masks = [gen(_image(), i)[2] > 0 for i in range(40)]
        core = sum(cv2.erode(m.view(np.uint8), np.ones((3, 3), np.uint8)).sum() for m in masks)
        return core / sum(m.sum() for m in masks)

    assert core_share(1.0) < 0.05 < 0.3 < core_share(0.0)
    _check_invariants(FractalAnomaly(size=64, seed=1, thin=0.5, region=(0.0, 1.0)), _image(), 40)
    for bad in (dict(thin=1.5), dict(thin_width=(0, 2)), dict(thin_width=(3, 2))):
        with pytest.raises(ValueError, match="thin"):
            AnomalyConfig(**bad)


def test_label_dilation_grows_only_the_mask():
    k = np.ones((3, 3), np.uint8)
    for i in range(20):
        n0, a0, m0 = FractalAnomaly(size=64, seed=5, noise_prob=0.0, dilate_iterations=0)(_image(), i)
        n2, a2, m2 = FractalAnomaly(size=64, seed=5, noise_prob=0.0, dilate_iterations=2)(_image(), i)
        assert np.array_equal(n0, n2) and np.array_equal(a0, a2)
        assert np.array_equal(m2, cv2.dilate(m0, k, iterations=2))
    with pytest.raises(ValueError, match="dilate"):
        AnomalyConfig(dilate_iterations=-1)


@pytest.mark.parametrize("h, w, aspect, count", [(300, 600, 0.82, 2), (300, 270, 0.82, 1),
                                                 (300, 122, 0.82, 2), (40, 400, 1.0, 10),
                                                 (3, 1000, 1.0, 333), (1, 5, 0.01, 5),
                                                 (7, 2, 500.0, 7)])
def test_piece_boxes_tile_the_image_along_its_long_side(h, w, aspect, count):
    from fractalsynth.images import piece_boxes
    boxes = piece_boxes(h, w, aspect)
    assert len(boxes) == count
    cover = np.zeros((h, w), int)
    for top, bottom, left, right in boxes:
        assert bottom > top and right > left  # no empty piece, however thin the image
        cover[top:bottom, left:right] += 1
    assert (cover == 1).all()  # every pixel in exactly one piece
    # cut one way only, into pieces equal to within a pixel
    assert len({(b[0], b[1]) for b in boxes}) == 1 or len({(b[2], b[3]) for b in boxes}) == 1
    sides = [max(b[1] - b[0], b[3] - b[2]) if len(boxes) > 1 else 0 for b in boxes]
    assert max(sides) - min(sides) <= 1
    with pytest.raises(ValueError, match="aspect"):
        piece_boxes(h, w, 0)
