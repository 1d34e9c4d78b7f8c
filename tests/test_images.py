import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from fractalsynth.images import ImageError, list_images, load_ground_truth, load_image


def _with_orientation(path, rgb, orientation):
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_images_load_upright_by_their_exif_orientation(tmp_path, orientation):
    rgb = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3)).astype(np.uint8)
    path = str(tmp_path / "tilted.png")
    _with_orientation(path, rgb, orientation)
    want = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    got = load_image(path)
    assert got.shape == want.shape and np.array_equal(got, want)


def test_a_portrait_jpeg_loads_upright(tmp_path):
    # what a camera writes: the sensor's landscape pixels, and a tag saying turn them a quarter
    rgb = np.zeros((40, 80, 3), np.uint8)
    rgb[:, :20] = 255  # a bright band on the left of the sensor's image
    path = str(tmp_path / "portrait.jpg")
    _with_orientation(path, rgb, 6)
    got = load_image(path)
    assert got.shape == (80, 40, 3)
    assert got[:20].mean() > 200 and got[30:].mean() < 30  # turned clockwise: the band on top


def test_masks_of_every_encoding_mean_the_same(tmp_path):
    mask = np.zeros((12, 16), np.uint8)
    mask[3:7, 5:12] = 1
    encodings = {"zero_one.png": mask, "zero_255.png": mask * 255,
                 "sixteen_bit.png": mask.astype(np.uint16) * 1000,
                 "red.png": np.dstack([np.zeros_like(mask), np.zeros_like(mask), mask * 200]),
                 "compressed.jpg": mask * 255}
    for name, pixels in encodings.items():
        cv2.imwrite(str(tmp_path / name), pixels)
        got = load_ground_truth(str(tmp_path / name))
        assert got.dtype == np.uint8 and np.array_equal(got, mask), name
    cv2.imwrite(str(tmp_path / "empty.png"), np.zeros_like(mask))
    assert not load_ground_truth(str(tmp_path / "empty.png")).any()
    (tmp_path / "junk.png").write_bytes(b"nope")
    with pytest.raises(ImageError, match="junk.png"):
        load_ground_truth(str(tmp_path / "junk.png"))


def test_hidden_files_and_folders_are_not_images(tmp_path):
    for rel in ("a.png", "sub/b.jpg", ".ipynb_checkpoints/a-checkpoint.png", "._a.png",
                "sub/.hidden/c.png", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            (tmp_path / rel).write_text("x")
        else:
            cv2.imwrite(str(tmp_path / rel), np.zeros((4, 4), np.uint8))
    assert list_images(str(tmp_path)) == [str(tmp_path / "a.png"), str(tmp_path / "sub" / "b.jpg")]
    assert list_images(str(tmp_path), recursive=False) == [str(tmp_path / "a.png")]
    (tmp_path / "a.png").unlink()
    (tmp_path / "sub" / "b.jpg").unlink()
    with pytest.raises(ImageError, match="no images found"):
        list_images(str(tmp_path))
