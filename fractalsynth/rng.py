"""Counter-based random streams: every random draw is a pure function of (key, counter).

A sample's key comes from ``(seed, index)`` alone, so sample ``i`` is the same bytes whichever
worker, thread or chunk makes it. The mixer is SplitMix64's finaliser; a stream's ``k``-th
64-bit word is ``mix64(key + k * GOLDEN)``.
"""
from __future__ import annotations

import numpy as np
from numba import njit

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S40 = np.uint64(40)
_INV24 = np.float32(1.0 / (1 << 24))
_MASK64 = (1 << 64) - 1


@njit(cache=True, inline="always")
def mix64(z):
    """SplitMix64 finaliser: a bijective 64-bit hash."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(cache=True, inline="always")
def word(key, counter):
    """The ``counter``-th 64-bit word of the stream ``key``."""
    return mix64(key + np.uint64(counter) * GOLDEN)


@njit(cache=True, inline="always")
def uniform(key, counter):
    """A float32 in [0, 1) from the ``counter``-th word of stream ``key``."""
    return np.float32(word(key, counter) >> _S40) * _INV24


def _mix64_py(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream_key(seed: int, index: int, domain: int = 0) -> np.uint64:
    """The 64-bit key of sample ``index`` under ``seed``; ``domain`` separates independent uses."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed} index={index}")
    k = _mix64_py(seed + 0x9E3779B97F4A7C15)
    k = _mix64_py(k ^ ((domain + 1) * 0xD1B54A32D192ED03))
    return np.uint64(_mix64_py(k + (index + 1) * 0x9E3779B97F4A7C15))


def sample_rng(seed: int, index: int, domain: int = 0) -> np.random.Generator:
    """A numpy Generator (Philox, counter-based) owned by one sample."""
    key = int(stream_key(seed, index, domain))
    return np.random.Generator(np.random.Philox(key=[key, domain]))
