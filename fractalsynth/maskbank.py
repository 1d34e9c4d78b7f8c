"""The mask bank: many fractal masks in one HDF5 file, bit-packed, with each mask's IFS and key.

Layout (schema ``fractalsynth.maskbank``, version 1)::

    /masks     uint8  [N, ceil(H*W/8)]  np.packbits of the row-major mask (1 = set)
    /params    float32 [N, 8, 7]        IFS rows (a, b, c, d, e, f, p); unused rows are 0
    /n_maps    uint8  [N]
    /keys      uint64 [N]               stream key of the accepted draw: ifs.render(params, key, ...)
    /attempts  uint16 [N]               draws needed (1 = first draw accepted)
    /fill      float32 [N]              set pixels / pixels of the attractor's box
    attrs: schema, version, seed, height, width, count, ifs_config (JSON), rejected
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import h5py
import numpy as np

from . import __version__
from .ifs import MAX_MAPS, PARAM_COLS, IFSConfig, check_size, make_masks
from .paths import prepare_output_file

SCHEMA = "fractalsynth.maskbank"
VERSION = 1


@dataclass
class MaskBankInfo:
    """What a mask bank holds."""

    path: str
    count: int
    height: int
    width: int
    seed: int
    rejected: int
    config: IFSConfig


def write_mask_bank(path: str, n: int, size: int | tuple[int, int], seed: int = 0,
                    config: IFSConfig | None = None, chunk: int = 2048, progress=None) -> MaskBankInfo:
    """Render ``n`` masks and write them to ``path`` atomically (temporary name, then rename)."""
    config = config or IFSConfig()
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    height, width = (size, size) if np.isscalar(size) else size
    check_size(height, width)
    tmp = prepare_output_file(path)
    row_bytes = (height * width + 7) // 8
    rejected = 0
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(schema=SCHEMA, version=VERSION, seed=seed, height=height, width=width,
                           count=n, ifs_config=json.dumps(config.to_dict()),
                           fractalsynth_version=__version__)
            rows = min(chunk, n)
            dm = f.create_dataset("masks", (n, row_bytes), np.uint8, chunks=(rows, row_bytes))
            dp = f.create_dataset("params", (n, MAX_MAPS, PARAM_COLS), np.float32)
            dn = f.create_dataset("n_maps", (n,), np.uint8)
            dk = f.create_dataset("keys", (n,), np.uint64)
            da = f.create_dataset("attempts", (n,), np.uint16)
            dfill = f.create_dataset("fill", (n,), np.float32)
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                b = make_masks(seed, range(start, stop), height, width, config)
                dm[start:stop] = np.packbits(b.masks.reshape(stop - start, -1) > 0, axis=1)
                dp[start:stop] = b.params
                dn[start:stop] = b.n_maps
                dk[start:stop] = b.keys
                da[start:stop] = b.attempts
                dfill[start:stop] = b.fill
                rejected += int(b.attempts.sum()) - (stop - start)
                if progress is not None:
                    progress(stop - start)
            f.attrs["rejected"] = rejected
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return MaskBankInfo(path, n, height, width, seed, rejected, config)


def mask_bank_info(path: str) -> MaskBankInfo:
    """Read a mask bank's header; a clear error if the file is not one."""
    try:
        with h5py.File(path, "r") as f:
            a = dict(f.attrs)
    except (OSError, FileNotFoundError) as e:
        raise ValueError(f"{path}: not a readable HDF5 mask bank ({e}); regenerate it with "
                         "'fractalsynth masks'") from None
    if a.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a fractalsynth mask bank (schema {a.get('schema')!r})")
    if int(a["version"]) > VERSION:
        raise ValueError(f"{path}: mask bank version {a['version']} is newer than this "
                         f"fractalsynth reads ({VERSION}); upgrade fractalsynth")
    return MaskBankInfo(path, int(a["count"]), int(a["height"]), int(a["width"]), int(a["seed"]),
                        int(a.get("rejected", 0)), IFSConfig.from_dict(json.loads(a["ifs_config"])))


def load_masks(path: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Masks ``start:stop`` of a mask bank as uint8 [n, H, W] with values 0 / 255."""
    info = mask_bank_info(path)
    stop = info.count if stop is None else min(stop, info.count)
    with h5py.File(path, "r") as f:
        packed = f["masks"][start:stop]
    bits = np.unpackbits(packed, axis=1, count=info.height * info.width)
    return (bits.reshape(-1, info.height, info.width) * np.uint8(255))


def load_mask_params(path: str, start: int = 0, stop: int | None = None):
    """(params [n, 8, 7], n_maps [n], keys [n]) of masks ``start:stop``, for ``ifs.render``."""
    info = mask_bank_info(path)
    stop = info.count if stop is None else min(stop, info.count)
    with h5py.File(path, "r") as f:
        return f["params"][start:stop], f["n_maps"][start:stop], f["keys"][start:stop]
