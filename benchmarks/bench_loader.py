"""The GPU data path's host side: one packed buffer per batch vs host-computed int64 indices.

    python benchmarks/bench_loader.py [--shards DIR] [--device cpu|cuda]

Ours (``fractalad.data``): a worker packs a batch of records into one uint8 buffer; the device
derives the paste indices and unpacks the mask bits. Baseline (the previous design, restated
here): the worker computes flat int64 target indices and unpacks the mask bits with numpy, and
ships five tensors. Both rebuild the same batches (checked equal). Reports bytes per sample
that cross to the device, tensors per batch, worker and rebuild microseconds per sample
(medians of interleaved rounds, one thread). Prints one final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fractalad.data import DeviceNormals, RecordBatches, _color  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_NORMALS = os.path.join(HERE, "..", "..", "shared", "data", "magnetic_tile", "magnetic_tile",
                               "train", "good")


class IndexBatches(RecordBatches):
    """Baseline worker: flat int64 target indices and unpacked mask bytes computed on the host."""

    def __getitem__(self, k):
        shard, start, stop = self.ranges[k]
        rb = self.shards.records(shard, start, stop)
        s, ch = self.shards.size, self.shards.channels
        y, x, h, w = (rb.box[:, i].astype(np.int64) for i in range(4))
        areas = h * w
        sample = np.repeat(np.arange(len(rb)), areas)
        local = np.arange(areas.sum()) - np.repeat(np.cumsum(areas) - areas, areas)
        rows = local // np.repeat(w, areas) + np.repeat(y, areas)
        cols = local % np.repeat(w, areas) + np.repeat(x, areas)
        bits = [np.unpackbits(rb.mask_bits[rb.mask_offset[j]:rb.mask_offset[j + 1]], count=int(areas[j]))
                for j in range(len(rb))]
        return {"normal_index": torch.from_numpy(rb.normal_index.astype(np.int64)),
                "target": torch.from_numpy((sample * s + rows) * s + cols),
                "pixels": torch.from_numpy(rb.pixels.reshape(-1, ch)),
                "mask": torch.from_numpy(np.concatenate(bits)),
                "jitter": torch.from_numpy(rb.jitter)}


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


def index_rebuild(normals: DeviceNormals, batch: dict):
    """Baseline device side: scatter with the shipped indices."""
    dev = normals.device
    idx, target, pixels, maskv, jit = (batch[k].to(dev, non_blocking=True) for k in
                                       ("normal_index", "target", "pixels", "mask", "jitter"))
    base = normals.images.index_select(0, idx)
    b, c, s, _ = base.shape
    anom = base.permute(0, 2, 3, 1).reshape(-1, c).clone()
    anom.index_copy_(0, target, pixels)
    mask = torch.zeros(b * s * s, dtype=torch.uint8, device=dev)
    mask.index_copy_(0, target, maskv)
    mats, offs = normals.jitter(jit, normals.means.index_select(0, idx))
    anom = anom.view(b, s, s, c).permute(0, 3, 1, 2)
    return _color(base, mats, offs), _color(anom, mats, offs), mask.view(b, 1, s, s).float()


def _bytes(item: dict) -> int:
    return sum(v.numel() * v.element_size() for v in item.values() if torch.is_tensor(v))


def sync_device(device):
    """Wait for the device's queued work (timings on a GPU need it)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default=None)
    ap.add_argument("--normals", default=DEFAULT_NORMALS)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from fractalsynth.shards import ShardDataset
    shards, tmp = args.shards, None
    if shards is None:
        shards, tmp, _ = temporary_shards(args.normals, args.samples, args.size, "bench_loader_")
    ds = ShardDataset(shards)
    dev = torch.device(args.device)
    normals = DeviceNormals(ds, dev)
    paths = {"ours": (RecordBatches(ds, args.batch_size), normals.rebuild),
             "baseline": (IndexBatches(ds, args.batch_size), lambda b: index_rebuild(normals, b))}
    n = len(paths["ours"][0]) * args.batch_size
    worker = {k: [] for k in paths}
    rebuild = {k: [] for k in paths}
    items = {}
    for _ in range(args.rounds):
        for name, (batches, rebuild_fn) in paths.items():
            t = time.perf_counter()
            items[name] = [batches[k] for k in range(len(batches))]
            worker[name].append(time.perf_counter() - t)
            sync_device(dev)
            t = time.perf_counter()
            for item in items[name]:
                rebuild_fn(item)
            sync_device(dev)
            rebuild[name].append(time.perf_counter() - t)
    for a, b in zip(items["ours"], items["baseline"]):
        if not all(torch.equal(x, y) for x, y in zip(normals.rebuild(a), index_rebuild(normals, b))):
            raise SystemExit("the two data paths rebuilt different batches")
    result = {"device": args.device, "size": args.size, "batch_size": args.batch_size, "samples": n,
              "channels": ds.channels}
    for name in paths:
        result[name] = {
            "bytes_per_sample": round(sum(_bytes(i) for i in items[name]) / n),
            "tensors_per_batch": sum(torch.is_tensor(v) for v in items[name][0].values()),
            "worker_us_per_sample": round(float(np.median(worker[name])) / n * 1e6, 1),
            "rebuild_us_per_sample": round(float(np.median(rebuild[name])) / n * 1e6, 1),
        }
    result["bytes_ratio"] = round(result["baseline"]["bytes_per_sample"] / result["ours"]["bytes_per_sample"], 2)
    result["worker_speedup"] = round(result["baseline"]["worker_us_per_sample"] /
                                     result["ours"]["worker_us_per_sample"], 2)
    remove_temporary(tmp)
    print(json.dumps(result))  # the benchmark's one final JSON line
    return result


if __name__ == "__main__":
    main()
