"""Shared by the throughput benchmarks: a throw-away shard set and the one-JSON-line ending."""
from __future__ import annotations

import json
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


def finish(result: dict, folder: str | None) -> dict:
    """Remove the temp folder (if any) and print the result as the final JSON line."""
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result))
    return result
