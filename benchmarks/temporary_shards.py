"""Not a benchmark: the throw-away shard set that bench_fit.py and bench_loader.py time against."""
from __future__ import annotations

import os
import shutil
import tempfile
import time


def temporary_shards(normals: str, n: int, size: int, prefix: str):
    """``n`` default-config samples of ``size`` px in a new temp folder: (shards, folder, seconds)."""
    from fractalsynth.anomaly import AnomalyConfig
    from fractalsynth.generate import generate
    folder = tempfile.mkdtemp(prefix=prefix)
    shards = os.path.join(folder, "shards")
    t = time.perf_counter()
    generate(normals, shards, n, AnomalyConfig(size=size), seed=0, shard_size=n,
             workers=os.cpu_count() or 1, log=lambda m: None)
    return shards, folder, time.perf_counter() - t


def remove_temporary(folder: str | None) -> None:
    """Remove the temp folder ``temporary_shards`` made (if any)."""
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
