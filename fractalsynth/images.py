"""Robust image loading: any common format, greyscale / RGB / RGBA, 8 or 16 bit, any size, turned
upright by its EXIF orientation."""
from __future__ import annotations

import os

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm",
                    ".pbm", ".pnm", ".jp2")


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the fix."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path  # the unusable file, where the error is about one


def is_image_name(name: str) -> bool:
    """True for a visible file name with an image extension (not ``._x.png``, ``.DS_Store``)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str, recursive: bool = True) -> list[str]:
    """Image files under ``folder`` (sorted, recursive, hidden ones skipped); an error if none."""
    if os.path.isfile(folder):
        raise ImageError(f"{folder}: a file, not a folder; pass the folder of images it is in")
    if not os.path.isdir(folder):
        raise ImageError(f"{folder}: no such folder; pass a folder of normal images")
    found = []
    if recursive:
        for root, dirs, files in os.walk(folder):
            # hidden folders hold copies (.ipynb_checkpoints) or metadata, never more parts
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(root, f) for f in files if is_image_name(f)]
    else:
        found = [os.path.join(folder, f) for f in os.listdir(folder) if is_image_name(f)]
    if not found:
        raise ImageError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(found)


def load_image(path: str) -> np.ndarray:
    """Decode ``path`` upright to HxW (grey) or HxWx3 (RGB), uint8, uint16 or float32."""
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such file", path)
    data = np.fromfile(path, dtype=np.uint8)
    # not IMREAD_UNCHANGED: that flag also skips the EXIF orientation, so a camera's portrait
    # JPEG would load on its side, across its own mask; it would keep an alpha channel, which
    # nothing here uses
    img = cv2.imdecode(data, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH) if data.size else None
    if img is None:
        raise ImageError(f"{path}: cannot decode the image (corrupt or unsupported format); "
                         "replace or remove it", path)
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if min(img.shape[:2]) < 1:
        raise ImageError(f"{path}: empty image", path)
    return img


def load_ground_truth(path: str) -> np.ndarray:
    """A ground-truth mask file as HxW uint8 0/1: defect where a pixel is over half the brightest."""
    m = load_image(path)
    m = m.max(axis=2) if m.ndim == 3 else m  # a coloured label on black counts in any channel
    peak = m.max()
    # relative, not a fixed 127: masks saved as 0/1 labels or in 16 bit are as common as 0/255
    return (m > peak / 2).astype(np.uint8) if peak > 0 else np.zeros(m.shape, np.uint8)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """8-bit copy of an integer or float image (16 bit divides by 257, float in [0,1] scales)."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if np.issubdtype(image.dtype, np.integer) or image.dtype == np.bool_:
        return np.clip(image, 0, 255).astype(np.uint8)
    raise ImageError(f"unsupported image dtype {image.dtype}")


def channels_of(image: np.ndarray) -> int:
    """1 for grey inputs (HxW, HxWx1), else 3 (RGB, RGBA: alpha is dropped)."""
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return 1
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return 3
    raise ImageError(f"unsupported image shape {image.shape}: expected HxW, HxWx1, HxWx3 or HxWx4")


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """HxWxC uint8 with C = ``channels`` (1 or 3); grey is replicated, RGB is reduced to luma."""
    img = to_uint8(image)
    have = channels_of(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 4:
        img = img[:, :, :3]
    if have == channels:
        return np.ascontiguousarray(img)
    if channels == 3:
        return np.ascontiguousarray(np.repeat(img, 3, axis=2))
    return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)[:, :, None]


def resize(image: np.ndarray, height: int, width: int, nearest: bool = False) -> np.ndarray:
    """Resize an HxWxC image keeping the channel axis (area filter when shrinking)."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    keep_axis = image.ndim == 3
    if not nearest and (height - h) * (width - w) < 0:
        # one axis shrinks, the other grows: shrink first (area filter), then stretch, since a
        # bilinear pass over both would alias the shrinking axis (tall narrow tiles, say)
        image = resize(image, height, w) if height < h else resize(image, h, width)
        return resize(image, height, width)
    if nearest:
        out = cv2.resize(image, (width, height), interpolation=cv2.INTER_NEAREST)
    elif height <= h and width <= w:
        # OpenCV's area filter is fast only at exactly 2x: halve with 2x2 box averages while the
        # image is at least twice the target (mip-mapping), then close the last factor (< 2)
        # bilinearly; odd sizes shrink bilinearly to twice the target and then average 2x2.
        halved = False
        while h >= 2 * height and w >= 2 * width and h % 2 == 0 and w % 2 == 0:
            h, w = h // 2, w // 2
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
            halved = True
        if (h, w) == (height, width):
            out = image
        elif halved:
            out = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        else:
            if h >= 2 * height and w >= 2 * width:
                image = cv2.resize(image, (2 * width, 2 * height), interpolation=cv2.INTER_LINEAR)
            out = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    else:
        out = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return out.reshape(height, width, -1) if keep_axis else out


def prepare_normal(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """The normal image as the model sees it: size x size x channels, uint8."""
    return resize(to_channels(image, channels), size, size)


def piece_boxes(height: int, width: int, aspect: float) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of each piece, row by row: the image cut into
    round(width / height / aspect) equal pieces across, or round(height / width * aspect) down."""
    if not aspect > 0:
        raise ValueError(f"a piece aspect must be > 0, got {aspect}")
    ratio = (width / height) / aspect
    # never both above 1; and no piece thinner than a pixel
    across, down = min(width, max(1, round(ratio))), min(height, max(1, round(1 / ratio)))
    ys = np.linspace(0, height, down + 1).round().astype(int)
    xs = np.linspace(0, width, across + 1).round().astype(int)
    return [(int(ys[i]), int(ys[i + 1]), int(xs[j]), int(xs[j + 1]))
            for i in range(down) for j in range(across)]


def canvas_boxes(cuts, image_hw, size: int) -> list[tuple[int, int, int, int]]:
    """Pieces' (top, bottom, left, right) in an image of ``image_hw``, scaled to a S x S canvas."""
    h, w = image_hw
    return [(round(t * size / h), round(b * size / h), round(l * size / w), round(r * size / w))
            for t, b, l, r in cuts]


def median_aspect(shapes) -> float:
    """The median width over the median height of images of ``shapes`` ((height, width, ...))."""
    shapes = list(shapes)
    return float(np.median([s[1] for s in shapes]) / np.median([s[0] for s in shapes]))
