"""Fractal anomaly generation (FAG): a normal image in, (normal, anomalous, mask) out.

The published procedure (method section 1), with numpy / OpenCV / Numba only:

1. cut size and locations (``placement``): uniform in the central 10-90 % (``region``) or inside
   the foreground;
2. the patch's content (default: cut from the same image) gets ONE of colour jitter (0.2),
   strong brightness/contrast (1.0) or a two-channel scaling U(0, 2); random flips; a rotation
   by U(15, 75) degrees without expanding (corners become transparent);
3. a fractal mask at the cut size is multiplied into the patch's alpha (with ``thin`` > 0, not
   in the paper, that share of shapes is reduced to its skeleton, ``thin_width`` px wide: branching
   fractal lines, the crack and scratch family);
4. the patch is pasted (hard, or alpha-blended with an opacity range); with ``min_contrast`` > 0
   (not in the paper) steps 1-4 are redrawn while the mean grey-level change is fainter;
5. the mask is dilated (3x3, 3 iterations) at the output size;
6. with probability 0.5 grey-level Gaussian noise (sigma 10, shared by the channels) inside the
   mask;
7. one mild jitter (0.05) shared by the normal and the anomalous image.

Each sample is first a compact ``AnomalyRecord`` (the anomalous crop around the mask, the mask
crop and the shared jitter); ``compose`` turns it into full images. Shards store records, so a
GPU can rebuild samples without re-running the synthesis. Everything random in sample ``i``
comes from ``rng.sample_rng(seed, i)``: the same seed gives the same bytes everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import cv2
import numba
import numpy as np

from . import ifs
from .color import apply_color_transform, jitter_matrix, mean_luma
from .images import ImageError, channels_of, prepare_normal, resize, to_channels
from .placement import PLACEMENTS, Foreground, choose_locations, find_foreground
from .rng import sample_rng

CONTENTS = ("same", "other", "fractal", "texture", "noise")
MASK_SOURCES = ("fractal", "perlin", "rectangle")
BLENDS = ("paste", "alpha")
_DILATE_KERNEL = np.ones((3, 3), np.uint8)
_MAX_TRIES = 16


@dataclass(frozen=True)
class AnomalyConfig:
    """Every option of the synthesis; defaults follow the paper."""

    size: int = 256
    resolution: str = "output"  # "output": synthesise at the output size; "source": then resize
    channels: str = "auto"  # "auto" (grey stays grey), "grey" or "rgb"
    placement: str = "uniform"
    content: tuple = (("same", 1.0),)  # (name, proportion) pairs
    mask_source: str = "fractal"  # one source, or a mix such as "fractal=0.5,rectangle=0.5"
    blend: str = "paste"
    opacity: tuple = (0.5, 1.0)  # alpha blend: the patch's weight ~ U(lo, hi)
    cut_scale: tuple = (0.1, 0.5)
    fg_cut_scale: tuple = (0.05, 1.5)
    region: tuple = (0.1, 0.9)  # uniform placement: the band of each side cuts and pastes use
    rotation: tuple = (15.0, 75.0)
    min_contrast: float = 0.0  # > 0: redraw anomalies whose mean |change| is below (grey levels)
    thin: float = 0.0  # share of anomalies drawn as the skeleton of their shape (lines)
    thin_width: tuple = (1, 3)  # their width in pixels (of the synthesis resolution) ~ U{lo..hi}
    dilate_iterations: int = 3
    noise_prob: float = 0.5
    noise_sigma: float = 10.0
    patch_jitter: float = 0.2
    strong_jitter: float = 1.0
    mild_jitter: float = 0.05
    ifs: ifs.IFSConfig = field(default_factory=ifs.IFSConfig)

    def __post_init__(self):
        content = self.content
        if isinstance(content, dict):
            content = tuple(content.items())
        elif isinstance(content, str):
            content = parse_mix(content, "content")
        object.__setattr__(self, "content", tuple((str(k), float(v)) for k, v in content))
        object.__setattr__(self, "mask_source", _canonical_mix(self.mask_source))
        ifs.check_size(self.size, self.size)
        _check_choice("resolution", self.resolution, ("output", "source"))
        _check_choice("channels", self.channels, ("auto", "grey", "rgb"))
        _check_choice("placement", self.placement, PLACEMENTS)
        _check_choice("blend", self.blend, BLENDS)
        _check_mix("content", self.content, CONTENTS)
        for name in ("opacity", "cut_scale", "fg_cut_scale", "rotation", "region", "thin_width"):
            lo, hi = getattr(self, name)
            if lo > hi or lo < 0:
                raise ValueError(f"{name} must be a range lo <= hi with lo >= 0, got {(lo, hi)}")
        if self.opacity[1] > 1:
            raise ValueError(f"opacity must be a range within [0, 1], got {self.opacity}")
        if self.region[1] > 1 or self.region[0] >= self.region[1]:
            raise ValueError(f"region must satisfy 0 <= lo < hi <= 1, got {self.region}")
        if not 0 <= self.thin <= 1:
            raise ValueError(f"thin must be in [0, 1], got {self.thin}")
        if not 1 <= int(self.thin_width[0]) <= int(self.thin_width[1]):
            raise ValueError(f"thin_width must be a range 1 <= lo <= hi, got {self.thin_width}")
        if self.min_contrast < 0:
            raise ValueError(f"min_contrast must be >= 0, got {self.min_contrast}")
        if int(self.dilate_iterations) < 0:
            raise ValueError(f"dilate_iterations must be >= 0, got {self.dilate_iterations}")
        if not 0 <= self.noise_prob <= 1:
            raise ValueError(f"noise_prob must be in [0, 1], got {self.noise_prob}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "ifs"}
        d["content"] = [list(c) for c in self.content]
        d["ifs"] = self.ifs.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AnomalyConfig":
        d = dict(d)
        d["ifs"] = ifs.IFSConfig.from_dict(d.get("ifs", {}))
        for k in ("opacity", "cut_scale", "fg_cut_scale", "rotation", "region", "thin_width"):
            if k in d:
                d[k] = tuple(d[k])
        d["content"] = tuple(tuple(c) for c in d.get("content", (("same", 1.0),)))
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")


_MIXES = {"content": (CONTENTS, "same=0.7,noise=0.3"),
          "mask_source": (MASK_SOURCES, "fractal=0.5,rectangle=0.5")}


def parse_mix(text: str, what: str = "content") -> tuple:
    """'same=0.7,texture=0.3' -> (('same', 0.7), ('texture', 0.3)), checked; a bare name weighs 1."""
    allowed, example = _MIXES[what]
    label = what.replace("_", " ")
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        try:
            out.append((name.strip(), float(weight) if weight else 1.0))
        except ValueError:
            raise ValueError(f"bad {label} proportion {part!r}; use e.g. {example}") from None
    if not out:
        raise ValueError(f"{label} must name at least one of " + ", ".join(allowed))
    _check_mix(what, tuple(out), allowed)
    return tuple(out)


def _check_mix(what: str, mix: tuple, allowed: tuple):
    what = what.replace("_", " ")  # messages read the same in the API and behind a CLI flag
    for name, weight in mix:
        _check_choice(what, name, allowed)
        if not (np.isfinite(weight) and weight >= 0):
            raise ValueError(f"{what} proportion of {name!r} must be a number >= 0, got {weight}")
    if sum(w for _, w in mix) <= 0:
        raise ValueError(f"{what} proportions must not all be 0")


def _canonical_mix(text: str) -> str:
    """A mask-source mix as one canonical string: the bare name when one source has weight."""
    mix = parse_mix(str(text), "mask_source")
    used = [(n, w) for n, w in mix if w > 0]
    if len(used) == 1:
        return used[0][0]
    return ",".join(f"{n}={w:g}" for n, w in used)


def _cumulative(mix: tuple):
    """(names, cumulative probabilities) of a (name, weight) mix, for ``_pick``."""
    weights = np.array([w for _, w in mix], dtype=np.float64)
    return [n for n, _ in mix], np.cumsum(weights / weights.sum())


def _pick(rng, names_cum) -> str:
    names, cum = names_cum
    return names[min(int(np.searchsorted(cum, rng.random(), side="right")), len(names) - 1)]


@dataclass
class AnomalyRecord:
    """One sample, compactly: the anomalous crop at (y, x), its mask crop and the shared jitter."""

    y: int
    x: int
    crop: np.ndarray  # uint8 [h, w, C], the anomalous pixels before the shared jitter
    mask: np.ndarray  # uint8 [h, w], 1 inside the (dilated) mask
    jitter: np.ndarray  # float32 [4]: brightness, contrast, saturation, hue
    content: int  # index into CONTENTS


# ---------------------------------------------------------------- numeric pieces


def perlin_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A thresholded 2-D Perlin-noise mask (uint8 0/1) of shape h x w; never empty."""
    res = int(2 ** rng.integers(1, 4))
    grid = rng.uniform(0, 2 * np.pi, (res + 1, res + 1))
    gx, gy = np.cos(grid), np.sin(grid)
    ys = np.linspace(0, res, h, endpoint=False)
    xs = np.linspace(0, res, w, endpoint=False)
    yi, xi = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = (ys - yi)[:, None], (xs - xi)[None, :]

    def dot(oy, ox):
        cy, cx = (yi + oy)[:, None], (xi + ox)[None, :]
        return gx[cy, cx] * (fx - ox) + gy[cy, cx] * (fy - oy)

    u, v = 6 * fx ** 5 - 15 * fx ** 4 + 10 * fx ** 3, 6 * fy ** 5 - 15 * fy ** 4 + 10 * fy ** 3
    top = dot(0, 0) + u * (dot(0, 1) - dot(0, 0))
    bot = dot(1, 0) + u * (dot(1, 1) - dot(1, 0))
    noise = top + v * (bot - top)
    mask = (noise > np.quantile(noise, rng.uniform(0.4, 0.7))).astype(np.uint8)
    if not mask.any():
        mask[h // 2, w // 2] = 1
    return mask


def shape_mask(rng, source: str, c: int, ifs_cfg: ifs.IFSConfig) -> np.ndarray:
    """An anomaly shape at c x c (uint8 0/1): a fractal, a Perlin-noise blob or a full square."""
    if source == "rectangle":
        return np.ones((c, c), np.uint8)
    if source == "perlin":
        return perlin_mask(rng, c, c)
    out = np.empty((c, c), np.uint8)
    maps = np.zeros((ifs.MAX_MAPS, ifs.PARAM_COLS))
    key = np.uint64(int(rng.integers(0, 2 ** 63)))
    ifs.make_fractal_mask(key, ifs_cfg.as_array(), out, maps)
    return (out > 0).view(np.uint8)


def skeleton_lines(mask: np.ndarray, width: int) -> np.ndarray:
    """The one-pixel skeleton of a 0/1 mask, thickened to ``width`` px (uint8 0/1)."""
    from skimage.morphology import skeletonize  # here: it takes half a second to import
    lines = skeletonize(mask > 0).view(np.uint8)
    if width > 1:
        lines = cv2.dilate(lines, np.ones((width, width), np.uint8))
    return lines


@numba.njit(cache=True, nogil=True)
def add_noise_inside(image, mask, noise, sigma):
    """In place: ``image += sigma * noise`` (rounded, clipped) at mask pixels, row-major,
    one noise value per pixel shared by the channels (the grey-level noise of step 6)."""
    h, w, ch = image.shape
    k = 0
    s = np.float32(sigma)
    for y in range(h):
        for x in range(w):
            if mask[y, x]:
                d = noise[k] * s + np.float32(0.5)
                k += 1
                for c in range(ch):
                    v = np.float32(image[y, x, c]) + d
                    image[y, x, c] = np.uint8(min(max(v, np.float32(0.0)), np.float32(255.0)))
    return image


def _noise_patch(rng, c: int, ch: int) -> np.ndarray:
    """Smooth random noise with random mean, contrast and grain size."""
    grain = rng.uniform(0.5, 4.0)
    noise = rng.standard_normal((c, c, ch)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), grain).reshape(c, c, ch)
    noise /= max(float(noise.std()), 1e-6)
    out = rng.uniform(40, 215, ch).astype(np.float32) + noise * rng.uniform(10, 60)
    return np.clip(out, 0, 255).astype(np.uint8)


def _content_patch(rng, kind: str, image, sy, sx, c, pool, textures, cfg) -> np.ndarray:
    """The c x c x C pixels the anomaly is made of."""
    ch = image.shape[2]
    if kind == "same" or (kind == "other" and not pool):
        return image[sy:sy + c, sx:sx + c]
    if kind == "other":
        other = pool[int(rng.integers(len(pool)))]
        if other.shape[:2] != image.shape[:2]:
            other = resize(other, image.shape[0], image.shape[1])
        return other[sy:sy + c, sx:sx + c]
    if kind == "fractal":
        mode = "density" if ch == 1 else "color"
        params = np.zeros((ifs.MAX_MAPS, ifs.PARAM_COLS))
        probe = np.empty((16, 16), np.uint8)
        key = np.uint64(int(rng.integers(0, 2 ** 63)))
        att, _, _, n = ifs.make_fractal_mask(key, cfg.ifs.as_array(), probe, params)
        side = max(c, 8)
        tex = ifs.render(params[:n], int(ifs._attempt_key(key, att - 1)), side, side, mode, cfg.ifs)
        return resize(tex.reshape(side, side, ch), c, c)
    if kind == "texture":
        if not textures:
            raise ValueError("content 'texture' needs texture images (textures=... or --textures DIR)")
        tex = textures[int(rng.integers(len(textures)))]
        th, tw = tex.shape[:2]
        side = int(rng.integers(min(c, th, tw), min(th, tw) + 1))
        ty, tx = int(rng.integers(0, th - side + 1)), int(rng.integers(0, tw - side + 1))
        return resize(tex[ty:ty + side, tx:tx + side], c, c)
    return _noise_patch(rng, c, ch)


def _patch_color_change(rng, patch: np.ndarray, cfg: AnomalyConfig) -> np.ndarray:
    """ONE of: colour jitter, strong brightness/contrast jitter, or a two-channel scaling."""
    ch = patch.shape[2]
    variant = int(rng.integers(3))
    if variant == 2:  # scale two random channels by U(0, 2) (the only channel, for grey)
        m = np.eye(ch)
        for k in rng.choice(ch, size=min(2, ch), replace=False):
            m[k, k] = rng.uniform(0.0, 2.0)
        return apply_color_transform(patch, m, 0.0)
    j = cfg.patch_jitter if variant == 0 else cfg.strong_jitter
    u = rng.random(4)
    lo = max(0.0, 1 - j)
    b, c = lo + (1 + j - lo) * u[0], lo + (1 + j - lo) * u[1]
    s, h = (lo + (1 + j - lo) * u[2], j * (2 * u[3] - 1)) if variant == 0 else (1.0, 0.0)
    m, o = jitter_matrix(b, c, s, h, mean_luma(patch), ch)
    return apply_color_transform(patch, m, o)


def _rotate(patch: np.ndarray, degrees: float):
    """Rotate the patch about its centre without expanding; returns it and its alpha (the
    rotated square, drawn as a polygon: the corners outside it become transparent)."""
    c = patch.shape[0]
    centre = (c - 1) / 2.0
    rot = cv2.getRotationMatrix2D((centre, centre), degrees, 1.0)
    p = cv2.warpAffine(patch, rot, (c, c), flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE).reshape(patch.shape)
    corners = np.array([[-0.5, -0.5], [c - 0.5, -0.5], [c - 0.5, c - 0.5], [-0.5, c - 0.5]])
    poly = corners @ rot[:, :2].T + rot[:, 2]
    alpha = np.zeros((c, c), np.uint8)
    cv2.fillConvexPoly(alpha, np.round(poly * 16).astype(np.int32), 1, cv2.LINE_8, 4)
    return p, alpha


def contrast(changed: np.ndarray, original: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute grey-level change inside ``mask`` (the largest over the channels)."""
    return float(max(cv2.mean(cv2.absdiff(changed, original), mask)[:changed.shape[2]]))


def _bbox(mask: np.ndarray):
    x, y, w, h = cv2.boundingRect(mask)
    return y, y + h, x, x + w


# ---------------------------------------------------------------- the synthesis


def _paste(rng, image, fg, cfg, pool, textures, mixes):
    """Steps 1-4 on ``image``: the pasted region (y, x, pixels, alpha) and the content kind."""
    content_p, source_p = mixes
    kind = CONTENTS.index(_pick(rng, content_p))
    for attempt in range(_MAX_TRIES):
        c, (sy, sx), (dy, dx) = choose_locations(rng, image.shape, cfg.placement, fg,
                                                 cfg.cut_scale, cfg.fg_cut_scale, cfg.region)
        patch = _content_patch(rng, CONTENTS[kind], image, sy, sx, c, pool, textures, cfg)
        patch = _patch_color_change(rng, np.ascontiguousarray(patch), cfg)
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        if rng.random() < 0.5:
            patch = patch[::-1]
        patch = np.ascontiguousarray(patch)
        patch, alpha = _rotate(patch, rng.uniform(*cfg.rotation))
        # one source draws nothing, so single-source datasets keep their bytes
        source = source_p[0][0] if len(source_p[0]) == 1 else _pick(rng, source_p)
        alpha &= shape_mask(rng, source, c, cfg.ifs)
        if cfg.thin > 0 and rng.random() < cfg.thin:
            alpha = skeleton_lines(alpha, int(rng.integers(cfg.thin_width[0], cfg.thin_width[1] + 1)))
        if not alpha.any():
            if attempt < _MAX_TRIES - 1:
                continue
            alpha[c // 2, c // 2] = 1  # vanishingly rare: the mask is never empty
        region = image[dy:dy + c, dx:dx + c]
        if cfg.blend == "paste":
            pasted = region.copy()
            cv2.copyTo(patch, alpha, pasted)
        else:
            op = rng.uniform(*cfg.opacity)
            mixed = region.astype(np.float32) * (1 - op) + patch.astype(np.float32) * op
            pasted = np.where(alpha[:, :, None] > 0,
                              np.clip(mixed + 0.5, 0, 255).astype(np.uint8), region)
        # the last try is kept even when faint
        if cfg.min_contrast <= 0 or contrast(pasted, region, alpha) >= cfg.min_contrast:
            break
    return dy, dx, pasted, alpha, kind


def _finish(rng, base, anomalous, mask, y0, x0, cfg, spread):
    """Steps 5-7 on a window at (y0, x0) of the output image: dilate, noise, crop, jitter draw.

    ``spread``: changes may lie outside the mask (after a resize), so the crop covers them too.
    ``anomalous`` (a fresh array of the caller's) receives the noise in place.
    """
    if cfg.dilate_iterations > 0:
        mask = cv2.dilate(mask, _DILATE_KERNEL, iterations=cfg.dilate_iterations)
    if rng.random() < cfg.noise_prob:
        noise = rng.standard_normal(cv2.countNonZero(mask), dtype=np.float32)
        add_noise_inside(anomalous, mask, noise, cfg.noise_sigma)
    changed = (mask | (anomalous != base).any(axis=2)).astype(np.uint8) if spread else mask
    r0, r1, c0, c1 = _bbox(changed)
    j = cfg.mild_jitter  # brightness, contrast, saturation ~ U(1-j, 1+j); hue ~ U(-j, j)
    jit = ((rng.random(4) * 2 - 1) * j + np.array([1.0, 1.0, 1.0, 0.0])).astype(np.float32)
    return (y0 + r0, x0 + c0, np.ascontiguousarray(anomalous[r0:r1, c0:c1]),
            np.ascontiguousarray(mask[r0:r1, c0:c1]), jit)


def synthesize_record(normal: np.ndarray, rng: np.random.Generator, cfg: AnomalyConfig,
                      fg: Foreground | None = None, pool=None, textures=None,
                      source: np.ndarray | None = None) -> AnomalyRecord:
    """One anomaly for ``normal`` (size x size x C uint8, already prepared) as a compact record.

    With ``cfg.resolution == 'source'``, ``source`` (the full-resolution image with the same
    channels) is where the paste happens before resizing to ``normal``'s size.
    """
    mixes = (_cumulative(cfg.content), _cumulative(parse_mix(cfg.mask_source, "mask_source")))
    s = normal.shape[0]
    if cfg.resolution == "source" and source is not None and source.shape[:2] != normal.shape[:2]:
        dy, dx, pasted, alpha, kind = _paste(rng, source, fg, cfg, pool, textures, mixes)
        anomalous = source.copy()
        anomalous[dy:dy + alpha.shape[0], dx:dx + alpha.shape[1]] = pasted
        full_mask = np.zeros(source.shape[:2], np.uint8)
        full_mask[dy:dy + alpha.shape[0], dx:dx + alpha.shape[1]] = alpha
        anomalous = resize(anomalous, s, s)
        full_mask = resize(full_mask, s, s, nearest=True)
        if not full_mask.any():  # the anomaly vanished in the resize: keep its centre
            full_mask[min(s - 1, (dy + alpha.shape[0] // 2) * s // source.shape[0]),
                      min(s - 1, (dx + alpha.shape[1] // 2) * s // source.shape[1])] = 1
        y, x, crop, mask, jit = _finish(rng, normal, anomalous, full_mask, 0, 0, cfg, True)
        return AnomalyRecord(y, x, crop, mask, jit, kind)
    dy, dx, pasted, alpha, kind = _paste(rng, normal, fg, cfg, pool, textures, mixes)
    c = alpha.shape[0]
    pad = cfg.dilate_iterations
    y0, x0 = max(0, dy - pad), max(0, dx - pad)
    y1, x1 = min(s, dy + c + pad), min(s, dx + c + pad)
    base = normal[y0:y1, x0:x1]
    window = base.copy()
    window[dy - y0:dy - y0 + c, dx - x0:dx - x0 + c] = pasted
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    mask[dy - y0:dy - y0 + c, dx - x0:dx - x0 + c] = alpha
    y, x, crop, mask, jit = _finish(rng, base, window, mask, y0, x0, cfg, False)
    return AnomalyRecord(y, x, crop, mask, jit, kind)


def compose_into(normal, record: AnomalyRecord, matrix, offset, out_normal, out_anomalous, out_mask):
    """Write the jittered normal, the anomalous image and the 0/255 mask into given arrays."""
    apply_color_transform(normal, matrix, offset, out_normal)
    out_anomalous[...] = out_normal
    h, w = record.mask.shape
    window = out_anomalous[record.y:record.y + h, record.x:record.x + w]
    window[...] = apply_color_transform(record.crop, matrix, offset)
    out_mask[...] = 0
    out_mask[record.y:record.y + h, record.x:record.x + w] = record.mask * np.uint8(255)


def compose(normal: np.ndarray, record: AnomalyRecord, mean: float | None = None):
    """Full (normal, anomalous, mask) uint8 images from a prepared normal and its record."""
    mean = mean_luma(normal) if mean is None else mean
    m, o = jitter_matrix(*(float(v) for v in record.jitter), mean, normal.shape[2])
    out = (np.empty_like(normal), np.empty_like(normal), np.empty(normal.shape[:2], np.uint8))
    compose_into(normal, record, m, o, *out)
    return out


class FractalAnomaly:
    """The fractal anomaly generator as a plain callable, reusable by any AD pipeline.

    ``FractalAnomaly(size=256, seed=0)(image, index=i)`` returns ``(normal, anomalous, mask)``
    as uint8 arrays of shape (size, size, C), (size, size, C) and (size, size) with mask values
    0 / 255; C is 1 for grey inputs and 3 otherwise (``channels`` forces one). Sample ``i`` is the
    same bytes wherever it is made. ``pool`` (normal images) feeds content 'other';
    ``textures`` (images) feeds content 'texture'.
    """

    def __init__(self, size: int = 256, seed: int = 0, config: AnomalyConfig | None = None,
                 pool=None, textures=None, **options):
        if config is None:
            config = AnomalyConfig(size=size, **options)
        elif options or size != config.size:
            config = replace(config, size=size, **options)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.config = config
        self.seed = int(seed)
        self.pool = list(pool) if pool is not None else None
        self.textures = list(textures) if textures is not None else None
        self._converted = {}  # channel count -> (pool, textures) converted once
        self._next = 0

    def channels_for(self, image: np.ndarray) -> int:
        if self.config.channels == "grey":
            return 1
        if self.config.channels == "rgb":
            return 3
        return channels_of(image)

    def record(self, image: np.ndarray, index: int, normal: np.ndarray | None = None,
               fg: Foreground | None = None) -> AnomalyRecord:
        """The compact record of sample ``index`` made from ``image``."""
        cfg = self.config
        ch = self.channels_for(image)
        if normal is None:
            normal = prepare_normal(image, cfg.size, ch)
        source = to_channels(image, ch) if cfg.resolution == "source" else None
        if fg is None and cfg.placement != "uniform":
            fg = find_foreground(source if source is not None else normal)
        if ch not in self._converted:
            self._converted[ch] = (
                [to_channels(p, ch) for p in self.pool] if self.pool else None,
                [to_channels(t, ch) for t in self.textures] if self.textures else None)
        pool, textures = self._converted[ch]
        return synthesize_record(normal, sample_rng(self.seed, index, domain=2), cfg, fg, pool,
                                 textures, source)

    def __call__(self, image: np.ndarray, index: int | None = None):
        """(normal, anomalous, mask) for one image; ``index`` defaults to a running counter."""
        image = np.asarray(image)
        if image.size == 0 or image.ndim not in (2, 3):
            raise ImageError(f"unusable image of shape {image.shape}: expected HxW or HxWxC")
        if index is None:
            index = self._next
            self._next += 1
        ch = self.channels_for(image)
        normal = prepare_normal(image, self.config.size, ch)
        return compose(normal, self.record(image, index, normal))

    def batch(self, images, indices=None):
        """Stacked (normals, anomalous, masks) for a list of images (all grey or all colour)."""
        if indices is None:
            indices = range(self._next, self._next + len(images))
            self._next += len(images)
        out = [self(img, int(i)) for img, i in zip(images, indices)]
        return tuple(np.stack(parts) for parts in zip(*out))

