"""Dataset generation end to end with all cores, then reading it back on one core.

    python benchmarks/bench_generate.py [--n 10000] [--normals DIR]

``samples_per_s``: ``fractalsynth generate`` from the folder of normals (loading and resizing
them included) to a finished, indexed dataset. ``bytes_per_sample``: every file of the dataset
(normals included) over the sample count. ``read_samples_per_s``: compact records read in
chunks of 1,024 on one core (what the GPU loader consumes); ``rebuild_samples_per_s``: full
numpy (normal, anomalous, mask) triples from those records. One final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from fractalsynth.anomaly import AnomalyConfig  # noqa: E402
from fractalsynth.generate import generate  # noqa: E402
from fractalsynth.shards import ShardDataset  # noqa: E402

DEFAULT_NORMALS = os.path.join(HERE, "..", "..", "shared", "data", "magnetic_tile", "magnetic_tile",
                               "train", "good")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--normals", default=DEFAULT_NORMALS)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=None, help="dataset folder (default: temporary, removed)")
    args = ap.parse_args(argv)
    work = args.out or tempfile.mkdtemp(prefix="bench_generate_")
    out = os.path.join(work, "ds") if args.out is None else args.out
    t = time.perf_counter()
    generate(args.normals, out, args.n, AnomalyConfig(size=args.size), workers=args.workers,
             log=lambda m: None)
    gen_s = time.perf_counter() - t
    total_bytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))

    ds = ShardDataset(out)
    t = time.perf_counter()
    n_read = sum(len(rb) for rb in ds.iter_record_blocks(1024, shuffle=True))
    read_s = time.perf_counter() - t
    rb = next(ds.iter_record_blocks(1024, shuffle=False))
    t = time.perf_counter()
    ds.compose_batch(rb)
    rebuild = len(rb) / (time.perf_counter() - t)
    result = {
        "n": args.n, "size": args.size, "workers": args.workers,
        "samples_per_s": round(args.n / gen_s, 1), "generate_seconds": round(gen_s, 2),
        "bytes_per_sample": round(total_bytes / args.n, 1),
        "read_samples_per_s": round(n_read / read_s, 1),
        "rebuild_samples_per_s": round(rebuild, 1),
    }
    ds.close()
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
