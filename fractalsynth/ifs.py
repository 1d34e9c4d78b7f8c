"""IFS fractals: sigma-factor sampling, a float32 chaos game, and binary / density / colour rendering.

An IFS is ``n`` affine maps ``w_i(p) = A_i p + b_i``. Parameters are stored as rows
``(a, b, c, d, e, f, p)`` with ``A = [[a, b], [c, d]]``, ``b = (e, f)`` and map probability ``p``.

Everything random about fractal ``index`` under ``seed`` comes from one counter-based stream
(``rng.stream_key``), so a fractal is the same whatever the thread count or batch split.

Framing rule (stable, canvas-independent): the attractor's box is the bounding box of the first
``PREPASS_POINTS`` chaos-game points of the fractal's stream, started at map 0's fixed point.
Later points outside that box are dropped. The same box is used at every canvas size, so a
mask re-rendered at another size shows the same shape.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
from numba import njit, prange

from .rng import mix64, stream_key, uniform, word

MAX_MAPS = 8
PARAM_COLS = 7
PREPASS_POINTS = 4096
WALKERS = 4
_TWO_PI = np.float32(2.0 * math.pi)

MODE_BINARY = 0
MODE_DENSITY = 1
MODE_COLOR = 2
RENDER_MODES = {"binary": MODE_BINARY, "density": MODE_DENSITY, "color": MODE_COLOR}


@dataclass(frozen=True)
class IFSConfig:
    """Sampling, rendering and quality-control settings of the fractal engine."""

    n_maps_min: int = 2
    n_maps_max: int = 2
    translation_bound: float = 1.0
    probabilities: str = "det"  # "det": proportional to |det A|, or "uniform"
    max_singular: float = 0.999  # < 1: every map strictly contractive
    points_per_pixel: float = 1.5  # 256x256 -> 98,304 points (the reference uses 100k)
    min_points: int = 2048
    stamp: bool = True
    keep_aspect: bool = False
    min_fill: float = 0.10  # set pixels / pixels of the attractor's box
    min_axis_ratio: float = 0.05  # sqrt(minor / major covariance eigenvalue); below = line-like
    max_attempts: int = 64

    def __post_init__(self):
        if not (1 <= self.n_maps_min <= self.n_maps_max <= MAX_MAPS):
            raise ValueError(f"n_maps must satisfy 1 <= min <= max <= {MAX_MAPS}, "
                             f"got {self.n_maps_min}..{self.n_maps_max}")
        if self.probabilities not in ("det", "uniform"):
            raise ValueError(f"probabilities must be 'det' or 'uniform', got {self.probabilities!r}")
        if not (0.0 < self.max_singular < 1.0):
            raise ValueError(f"max_singular must be in (0, 1), got {self.max_singular}")
        if self.translation_bound <= 0:
            raise ValueError(f"translation_bound must be > 0, got {self.translation_bound}")
        if self.points_per_pixel <= 0 or self.min_points < 1:
            raise ValueError("points_per_pixel must be > 0 and min_points >= 1")
        if not (0.0 <= self.min_fill < 1.0) or not (0.0 <= self.min_axis_ratio < 1.0):
            raise ValueError("min_fill and min_axis_ratio must be in [0, 1)")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    def as_array(self) -> np.ndarray:
        """The settings packed as float64, the form the Numba kernels take."""
        return np.array([
            self.n_maps_min, self.n_maps_max, self.translation_bound,
            1.0 if self.probabilities == "uniform" else 0.0, self.max_singular,
            self.points_per_pixel, self.min_points, float(self.stamp), float(self.keep_aspect),
            self.min_fill, self.min_axis_ratio, self.max_attempts,
        ], dtype=np.float64)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IFSConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------- sampling


@njit(cache=True)
def _sample_maps(key, cfg, out):
    """Fill ``out[:n]`` with a sigma-factor IFS drawn from stream ``key``; return ``n``."""
    n_lo = int(cfg[0])
    n_hi = int(cfg[1])
    bound = cfg[2]
    uniform_p = cfg[3] > 0.5
    smax = cfg[4]
    ctr = 1 << 40  # parameter draws use their own counter range of the stream
    n = n_lo + int(uniform(key, ctr) * (n_hi - n_lo + 1))
    if n > n_hi:
        n = n_hi
    ctr += 1
    alpha = 0.5 * (5 + n) + 0.5 * uniform(key, ctr)  # U((5+n)/2, (6+n)/2)
    ctr += 1
    budget = min(alpha, 3.0 * smax * n)
    total_det = 0.0
    for i in range(n):
        left = n - i - 1
        if left == 0:
            c = min(max(budget, 0.0), 3.0 * smax)
        else:
            lo = max(0.0, budget - 3.0 * smax * left)
            hi = min(3.0 * smax, budget)
            c = lo + (hi - lo) * uniform(key, ctr)
            ctr += 1
        budget -= c
        # s1 + 2 s2 = c with 0 <= s2 <= s1 <= smax
        s1_lo = max(c / 3.0, c - 2.0 * smax)
        s1_hi = min(smax, c)
        s1 = s1_lo + (s1_hi - s1_lo) * uniform(key, ctr)
        ctr += 1
        s2 = 0.5 * (c - s1)
        th = _TWO_PI * uniform(key, ctr)
        ph = _TWO_PI * uniform(key, ctr + 1)
        d1 = 1.0 if uniform(key, ctr + 2) < 0.5 else -1.0
        d2 = 1.0 if uniform(key, ctr + 3) < 0.5 else -1.0
        ctr += 4
        ct, st, cp, sp = math.cos(th), math.sin(th), math.cos(ph), math.sin(ph)
        # A = R(theta) diag(s1, s2) R(phi) D
        m00 = ct * s1 * cp - st * s2 * sp
        m01 = -ct * s1 * sp - st * s2 * cp
        m10 = st * s1 * cp + ct * s2 * sp
        m11 = -st * s1 * sp + ct * s2 * cp
        out[i, 0] = m00 * d1
        out[i, 1] = m01 * d2
        out[i, 2] = m10 * d1
        out[i, 3] = m11 * d2
        out[i, 4] = bound * (2.0 * uniform(key, ctr) - 1.0)
        out[i, 5] = bound * (2.0 * uniform(key, ctr + 1) - 1.0)
        ctr += 2
        out[i, 6] = s1 * s2
        total_det += s1 * s2
    for i in range(n):
        if uniform_p or total_det <= 1e-12:
            out[i, 6] = 1.0 / n
        else:
            out[i, 6] = out[i, 6] / total_det
    # the sequential split favours early maps: shuffle map order (Fisher-Yates)
    for i in range(n - 1, 0, -1):
        j = int(uniform(key, ctr) * (i + 1))
        ctr += 1
        if j > i:
            j = i
        for k in range(PARAM_COLS):
            t = out[i, k]
            out[i, k] = out[j, k]
            out[j, k] = t
    for i in range(n, out.shape[0]):
        for k in range(PARAM_COLS):
            out[i, k] = 0.0
    return n


# ---------------------------------------------------------------- chaos game


@njit(cache=True, inline="always")
def _thresholds(maps, n):
    """Cumulative map probabilities as 16-bit integer thresholds (16 bits choose a map)."""
    th = np.empty(MAX_MAPS, dtype=np.int64)
    acc = 0.0
    for i in range(n):
        acc += maps[i, 6]
        th[i] = int(acc * 65536.0 + 0.5)
    th[n - 1] = 65536
    return th


@njit(cache=True)
def _prepass(maps, n, key, pts):
    """Chaos-game points into ``pts`` (float32 [M, 2]) from map 0's fixed point."""
    a, b, c, d, e, f = maps[0, 0], maps[0, 1], maps[0, 2], maps[0, 3], maps[0, 4], maps[0, 5]
    det = (1.0 - a) * (1.0 - d) - b * c
    if abs(det) < 1e-12:
        x, y = 0.0, 0.0
    else:
        x = ((1.0 - d) * e + b * f) / det
        y = (c * e + (1.0 - a) * f) / det
    th = _thresholds(maps, n)
    m = pts.shape[0]
    ctr = 0
    k = 0
    while k < m:
        w = word(key, ctr)
        ctr += 1
        for lane in range(4):  # four 16-bit map choices per 64-bit word
            if k >= m:
                break
            r = np.int64((w >> np.uint64(16 * lane)) & np.uint64(0xFFFF))
            i = 0
            for q in range(n - 1):  # branch-free: a random branch mispredicts half the time
                i += r >= th[q]
            nx = maps[i, 0] * x + maps[i, 1] * y + maps[i, 4]
            y = maps[i, 2] * x + maps[i, 3] * y + maps[i, 5]
            x = nx
            pts[k, 0] = x
            pts[k, 1] = y
            k += 1
    return ctr


@njit(cache=True)
def _frame(pts, height, width, keep_aspect, margin):
    """Affine (sx, sy, ox, oy) mapping the points' box onto the canvas, and the box's pixel area."""
    x0 = pts[:, 0].min()
    x1 = pts[:, 0].max()
    y0 = pts[:, 1].min()
    y1 = pts[:, 1].max()
    bw = max(x1 - x0, 1e-9)
    bh = max(y1 - y0, 1e-9)
    # a hair under the span, so the box's far edge floors to the last pixel, not past it
    aw = width - 2.0 * margin - 1e-3
    ah = height - 2.0 * margin - 1e-3
    sx = aw / bw
    sy = ah / bh
    if keep_aspect:
        s = min(sx, sy)
        sx = s
        sy = s
    # centre the box on the canvas
    ox = 0.5 * (width - bw * sx) - x0 * sx
    oy = 0.5 * (height - bh * sy) - y0 * sy
    box_area = max(bw * sx, 1.0) * max(bh * sy, 1.0)
    return sx, sy, ox, oy, box_area


@njit(cache=True)
def _axis_ratio(pts):
    """sqrt(minor / major eigenvalue) of the points' covariance: near 0 means line-like."""
    m = pts.shape[0]
    mx = 0.0
    my = 0.0
    for k in range(m):
        mx += pts[k, 0]
        my += pts[k, 1]
    mx /= m
    my /= m
    sxx = 0.0
    syy = 0.0
    sxy = 0.0
    for k in range(m):
        dx = pts[k, 0] - mx
        dy = pts[k, 1] - my
        sxx += dx * dx
        syy += dy * dy
        sxy += dx * dy
    tr = sxx + syy
    disc = math.sqrt(max((sxx - syy) ** 2 + 4.0 * sxy * sxy, 0.0))
    lmax = 0.5 * (tr + disc)
    lmin = max(0.5 * (tr - disc), 0.0)
    if lmax <= 0.0:
        return 0.0
    return math.sqrt(lmin / lmax)


@njit(cache=True)
def _pixel_maps(maps, n, sx, sy, ox, oy):
    """The maps conjugated into canvas pixel coordinates (float32), so the loop skips scaling."""
    pm = np.empty((MAX_MAPS, 6), dtype=np.float32)
    for i in range(n):
        a, b, c, d, e, f = maps[i, 0], maps[i, 1], maps[i, 2], maps[i, 3], maps[i, 4], maps[i, 5]
        pm[i, 0] = a
        pm[i, 1] = b * sx / sy
        pm[i, 2] = c * sy / sx
        pm[i, 3] = d
        pm[i, 4] = sx * e + ox - a * ox - b * sx / sy * oy
        pm[i, 5] = sy * f + oy - c * sy / sx * ox - d * oy
    return pm


@njit(cache=True)
def _chaos_game(maps, n, key, ctr0, pts, sx, sy, ox, oy, npts, mode, hits, rgb, colors):
    """Run ``npts`` chaos-game points (pre-pass included) onto the canvas.

    mode 0: ``hits`` (uint8) set to 1; mode 1: ``hits`` (uint32) counts; mode 2: counts and
    per-pixel colour sums in ``rgb``, each walker's colour being a running average of its
    chosen maps' colours. ``WALKERS`` independent walkers, started on the last pre-pass points
    (all on the attractor), take 16-bit map choices from one 64-bit word: their dependency
    chains overlap. The body is written out in full because helper calls taking arrays cost
    reference-count updates on every point, and a mispredicted map branch costs more than the
    arithmetic; the map choice is branch-free.
    """
    h, w = hits.shape
    m = pts.shape[0]
    fw = np.float32(w)
    fh = np.float32(h)
    half = np.float32(0.5)
    zero = np.float32(0.0)
    wx = np.empty(WALKERS, dtype=np.float32)
    wy = np.empty(WALKERS, dtype=np.float32)
    col = np.full((WALKERS, 3), 0.5, dtype=np.float32)
    for k in range(min(m, npts)):
        x = np.float32(pts[k, 0] * sx + ox)
        y = np.float32(pts[k, 1] * sy + oy)
        if x >= zero and y >= zero and x < fw and y < fh:
            if mode == 0:
                hits[int(y), int(x)] = 1
            else:
                hits[int(y), int(x)] += 1
    if npts <= m:
        return
    pm = _pixel_maps(maps, n, sx, sy, ox, oy)
    th = _thresholds(maps, n)
    for j in range(WALKERS):
        wx[j] = np.float32(pts[m - 1 - j, 0] * sx + ox)
        wy[j] = np.float32(pts[m - 1 - j, 1] * sy + oy)
    steps = (npts - m + WALKERS - 1) // WALKERS
    for s in range(steps):
        wd = word(key, ctr0 + s)
        for j in range(WALKERS):
            r = np.int64((wd >> np.uint64(16 * j)) & np.uint64(0xFFFF))
            i = np.uint64(0)  # unsigned indices skip numba's negative-index wraparound
            for q in range(n - 1):
                i += np.uint64(r >= th[q])
            x = wx[j]
            y = wy[j]
            nx = pm[i, 0] * x + pm[i, 1] * y + pm[i, 4]
            y = pm[i, 2] * x + pm[i, 3] * y + pm[i, 5]
            x = nx
            wx[j] = x
            wy[j] = y
            if x >= zero and y >= zero and x < fw and y < fh:
                px = np.uint64(x)
                py = np.uint64(y)
                if mode == 0:
                    hits[py, px] = 1
                else:
                    hits[py, px] += 1
                    if mode == 2:
                        for c in range(3):
                            col[j, c] = half * (col[j, c] + colors[i, c])
                            rgb[py, px, c] += col[j, c]


@njit(cache=True)
def _stamp_bits(key):
    """A random 3x3 stamp as 9 flags; the centre is always on, so the stamp is never empty."""
    st = np.zeros(9, dtype=np.uint8)
    wd = word(key, np.int64(1) << 41)
    for j in range(9):
        st[j] = (wd >> np.uint64(j)) & np.uint64(1)
    st[4] = 1
    return st


@njit(cache=True)
def _apply_stamp(hits, st, out, value):
    """``out`` = value where the stamp placed at any hit (0/1) covers the pixel; returns the count.

    Rows are processed through slices indexed from 0, which lets LLVM vectorise the OR (a signed
    ``x - dx`` index keeps numba's negative-index check in the loop: 5x slower).
    """
    h, w = hits.shape
    out[:, :] = 0
    for dy in range(-1, 2):
        for dx in range(-1, 2):
            if st[(dy + 1) * 3 + (dx + 1)] == 0:
                continue
            x0 = max(0, dx)
            n = min(w, w + dx) - x0
            for y in range(max(0, dy), min(h, h + dy)):
                src = hits[y - dy, x0 - dx:x0 - dx + n]
                dst = out[y, x0:x0 + n]
                for i in range(n):
                    dst[i] |= src[i]
    count = 0
    v = np.uint8(value)
    for y in range(h):
        row = out[y]
        for x in range(w):
            c = row[x]
            count += c
            row[x] = c * v
    return count


@njit(cache=True)
def _npoints(cfg, height, width):
    return max(int(cfg[6]), int(cfg[5] * height * width + 0.5))


@njit(cache=True)
def _attempt_key(key, attempt):
    return mix64(key ^ (np.uint64(attempt + 1) * np.uint64(0xD1B54A32D192ED03)))


@njit(cache=True)
def make_fractal_mask(key, cfg, out, maps):
    """Draw, render and quality-check one fractal into ``out`` (uint8, 0/255); retry weak ones.

    Returns (attempts used, fill ratio, axis ratio, number of maps); ``maps`` receives the IFS.
    """
    h, w = out.shape
    hits = np.zeros((h, w), dtype=np.uint8)
    pts = np.empty((PREPASS_POINTS, 2), dtype=np.float32)
    dummy_rgb = np.zeros((1, 1, 3), dtype=np.float32)
    dummy_col = np.zeros((1, 3), dtype=np.float32)
    max_attempts = int(cfg[11])
    npts = _npoints(cfg, h, w)
    fill = 0.0
    ratio = 0.0
    n = 0
    attempt = 0
    margin = 1.0 if cfg[7] > 0.5 else 0.0
    for attempt in range(max_attempts):
        akey = _attempt_key(key, attempt)
        n = _sample_maps(akey, cfg, maps)
        ctr = _prepass(maps, n, akey, pts)
        ratio = _axis_ratio(pts)
        if ratio < cfg[10] and attempt < max_attempts - 1:
            continue
        sx, sy, ox, oy, box_area = _frame(pts, h, w, cfg[8] > 0.5, margin)
        hits[:, :] = 0
        _chaos_game(maps, n, akey, ctr, pts, sx, sy, ox, oy, npts, MODE_BINARY, hits,
                    dummy_rgb, dummy_col)
        if cfg[7] > 0.5:
            count = _apply_stamp(hits, _stamp_bits(akey), out, 255)
        else:
            count = 0
            for y in range(h):
                for x in range(w):
                    out[y, x] = 255 if hits[y, x] else 0
                    count += hits[y, x]
        fill = count / box_area
        if fill >= cfg[9] and count > 0:
            break
    return attempt + 1, fill, ratio, n


@njit(cache=True, parallel=True)
def _make_fractal_masks(keys, cfg, out, maps, info):
    for j in prange(keys.shape[0]):
        att, fill, ratio, n = make_fractal_mask(keys[j], cfg, out[j], maps[j])
        info[j, 0] = att
        info[j, 1] = fill
        info[j, 2] = ratio
        info[j, 3] = n


@njit(cache=True)
def _render_given(maps, n, key, cfg, height, width, mode):
    """Render the given IFS with stream ``key``: uint8 mask, log-density, or RGB colour image."""
    pts = np.empty((PREPASS_POINTS, 2), dtype=np.float32)
    ctr = _prepass(maps, n, key, pts)
    margin = 1.0 if (mode == MODE_BINARY and cfg[7] > 0.5) else 0.0
    sx, sy, ox, oy, _ = _frame(pts, height, width, cfg[8] > 0.5, margin)
    npts = _npoints(cfg, height, width)
    colors = np.empty((MAX_MAPS, 3), dtype=np.float32)
    for i in range(MAX_MAPS):
        hue = uniform(key, (np.int64(1) << 42) + i)
        for ch in range(3):  # a bright colour from the hue, cosine palette
            colors[i, ch] = np.float32(0.5 + 0.5 * math.cos(2.0 * math.pi * (hue + ch / 3.0)))
    if mode == MODE_BINARY:
        hits = np.zeros((height, width), dtype=np.uint8)
        _chaos_game(maps, n, key, ctr, pts, sx, sy, ox, oy, npts, mode, hits,
                    np.zeros((1, 1, 3), dtype=np.float32), colors)
        out = np.zeros((height, width), dtype=np.uint8)
        if cfg[7] > 0.5:
            _apply_stamp(hits, _stamp_bits(key), out, 255)
        else:
            for y in range(height):
                for x in range(width):
                    out[y, x] = 255 if hits[y, x] else 0
        return out.reshape(height, width, 1)
    counts = np.zeros((height, width), dtype=np.uint32)
    rgb = np.zeros((height, width, 3), dtype=np.float32)
    _chaos_game(maps, n, key, ctr, pts, sx, sy, ox, oy, npts, mode, counts, rgb, colors)
    cmax = max(counts.max(), 1)
    scale = 1.0 / math.log1p(cmax)
    nch = 1 if mode == MODE_DENSITY else 3
    img = np.zeros((height, width, nch), dtype=np.uint8)
    for y in range(height):
        for x in range(width):
            c = counts[y, x]
            if c == 0:
                continue
            v = math.log1p(c) * scale
            if mode == MODE_DENSITY:
                img[y, x, 0] = np.uint8(min(255.0, 255.0 * v + 0.5))
            else:
                for ch in range(3):
                    img[y, x, ch] = np.uint8(min(255.0, 255.0 * v * rgb[y, x, ch] / c + 0.5))
    return img


# ---------------------------------------------------------------- public API


@dataclass
class FractalBatch:
    """Masks made by ``make_masks`` and everything needed to re-render them."""

    masks: np.ndarray  # uint8 [N, H, W], 0 or 255
    params: np.ndarray  # float32 [N, MAX_MAPS, 7]
    n_maps: np.ndarray  # uint8 [N]
    attempts: np.ndarray  # uint16 [N]: 1 = accepted at once
    fill: np.ndarray  # float32 [N]
    axis_ratio: np.ndarray  # float32 [N]
    keys: np.ndarray  # uint64 [N]: the accepted attempt's stream key


def fractal_keys(seed: int, indices) -> np.ndarray:
    """The stream keys of fractals ``indices`` under ``seed``."""
    idx = np.asarray(indices, dtype=np.int64).ravel()
    return np.array([stream_key(seed, int(i), domain=1) for i in idx], dtype=np.uint64)


MAX_SIDE = 16384  # a mask this size is 256 MiB; far beyond, one mask fills a machine's memory


def check_size(height: int, width: int) -> None:
    """Refuse sizes masks cannot be made at: below 8 or above MAX_SIDE pixels a side."""
    if int(height) < 8 or int(width) < 8:
        raise ValueError(f"size must be at least 8x8 pixels, got {height}x{width}")
    if max(int(height), int(width)) > MAX_SIDE:
        raise ValueError(f"size must be at most {MAX_SIDE} pixels a side, got {height}x{width}")


def make_masks(seed: int, indices, height: int, width: int | None = None,
               config: IFSConfig | None = None) -> FractalBatch:
    """Quality-checked binary fractal masks for ``indices`` under ``seed`` (threads: numba's)."""
    config = config or IFSConfig()
    width = height if width is None else width
    check_size(height, width)
    keys = fractal_keys(seed, indices)
    n = keys.shape[0]
    out = np.empty((n, int(height), int(width)), dtype=np.uint8)
    maps = np.zeros((n, MAX_MAPS, PARAM_COLS), dtype=np.float64)
    info = np.zeros((n, 4), dtype=np.float64)
    _make_fractal_masks(keys, config.as_array(), out, maps, info)
    attempts = info[:, 0].astype(np.uint16)
    akeys = np.array([_attempt_key(k, int(a) - 1) for k, a in zip(keys, attempts)],
                     dtype=np.uint64)
    return FractalBatch(out, maps.astype(np.float32), info[:, 3].astype(np.uint8), attempts,
                        info[:, 1].astype(np.float32), info[:, 2].astype(np.float32), akeys)


def sample_ifs(seed: int, index: int, config: IFSConfig | None = None) -> np.ndarray:
    """One sigma-factor IFS (no quality control) as float64 rows (a, b, c, d, e, f, p)."""
    config = config or IFSConfig()
    maps = np.zeros((MAX_MAPS, PARAM_COLS), dtype=np.float64)
    n = _sample_maps(stream_key(seed, index, domain=1), config.as_array(), maps)
    return maps[:n].copy()


def render(params: np.ndarray, key: int, height: int, width: int | None = None,
           mode: str = "binary", config: IFSConfig | None = None) -> np.ndarray:
    """Render a given IFS with stream ``key``: 'binary' (0/255), 'density' (log hits) or 'color'.

    Returns uint8 [H, W] for binary and density, [H, W, 3] for color. ``params`` and ``key``
    of a mask bank entry re-render that mask at any size.
    """
    config = config or IFSConfig()
    width = height if width is None else width
    check_size(height, width)
    if mode not in RENDER_MODES:
        raise ValueError(f"mode must be one of {sorted(RENDER_MODES)}, got {mode!r}")
    params = np.asarray(params, dtype=np.float64)
    n = int(np.count_nonzero(params[:, 6] > 0)) if params.ndim == 2 else 0
    if params.ndim != 2 or params.shape[1] != PARAM_COLS or n == 0:
        raise ValueError("params must be an [n, 7] array of (a, b, c, d, e, f, p) rows")
    maps = np.zeros((MAX_MAPS, PARAM_COLS), dtype=np.float64)
    maps[:n] = params[:n]
    img = _render_given(maps, n, np.uint64(key), config.as_array(), int(height), int(width),
                        RENDER_MODES[mode])
    return img[:, :, 0] if img.shape[2] == 1 else img


def render_mask(seed: int, index: int, height: int, width: int | None = None,
                config: IFSConfig | None = None) -> np.ndarray:
    """One quality-checked binary fractal mask (uint8 0/255) for ``(seed, index)``."""
    return make_masks(seed, [index], height, width, config).masks[0]


def render_texture(seed: int, index: int, height: int, width: int | None = None,
                   mode: str = "density", config: IFSConfig | None = None) -> np.ndarray:
    """A quality-checked fractal rendered as 'density' (grey) or 'color' (RGB) texture."""
    config = config or IFSConfig()
    width = height if width is None else width
    b = make_masks(seed, [index], 16, 16, config)  # picks the accepted IFS cheaply
    return render(b.params[0, :b.n_maps[0]], int(b.keys[0]), height, width, mode, config)


def box_fill(mask: np.ndarray) -> float:
    """Set pixels over the area of their bounding box (0 for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return 0.0
    return ys.size / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
