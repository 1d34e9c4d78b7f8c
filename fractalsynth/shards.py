"""The shard format: compact, self-describing HDF5 anomaly datasets, and their numpy reader.

A dataset is a folder::

    dataset.json        generation parameters (written first; a mismatched re-run is refused)
    normals.h5          every normal image once, prepared at the output size
    shard-00000.h5 ...  per-sample records, shuffled at write time
    manifest.json       shards, counts and SHA-256 checksums (written when all shards exist)

``normals.h5``: ``/images`` uint8 [N, S, S, C], ``/means`` float32 [N] (mean luma, for the
contrast jitter), ``/paths`` (source file names); attrs ``schema``, ``version``, ``checksum``.
With ``generate --holdout``, also ``/holdout_images`` and ``/holdout_paths`` (normals kept out
of every sample) and, for normals cut into pieces, ``/holdout_layout`` int32 [K, 5]: each
held-out piece's image number and its (top, bottom, left, right) on that image's S x S canvas.

``shard-XXXXX.h5`` (schema ``fractalsynth.shard``): for its ``n`` samples

    /sample_index  int64 [n]     global sample number (sample i is the same bytes in any run)
    /normal_index  int32 [n]     row of normals.h5/images
    /box           int16 [n, 4]  y, x, h, w of the anomaly's crop
    /jitter        float32 [n, 4] shared mild jitter (brightness, contrast, saturation, hue)
    /content       uint8 [n]     index into anomaly.CONTENTS
    /pixel_offset  int64 [n+1]   into /pixels: the crops (h*w*C bytes each, row-major)
    /pixels        uint8 [...]
    /mask_offset   int64 [n+1]   into /mask_bits: np.packbits of each h*w mask crop
    /mask_bits     uint8 [...]

All datasets are contiguous and uncompressed (compression costs read speed and gains little on
image crops); a reader takes whole runs of records with one read per dataset. The shard's
``checksum`` attribute is the SHA-256 of those datasets' bytes in the order above.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import NamedTuple

import h5py
import numpy as np

from .anomaly import AnomalyRecord, compose, compose_into
from .color import jitter_matrices

SHARD_SCHEMA = "fractalsynth.shard"
NORMALS_SCHEMA = "fractalsynth.normals"
FORMAT_VERSION = 1
RECORD_FIELDS = ("sample_index", "normal_index", "box", "jitter", "content", "pixel_offset",
                 "pixels", "mask_offset", "mask_bits")
NORMALS_FILE = "normals.h5"
PARAMS_FILE = "dataset.json"
MANIFEST_FILE = "manifest.json"


class ShardError(ValueError):
    """A dataset problem; the message names the file and the fix."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def _sha256(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- writing


def write_normals(path: str, images: np.ndarray, means: np.ndarray, names: list[str],
                  holdout_images: np.ndarray | None = None, holdout_names: list[str] | None = None,
                  holdout_layout: np.ndarray | None = None) -> str:
    """Write the prepared normals (and any held-out ones) atomically; returns their checksum."""
    checksum = _sha256([images, means])
    tmp = path + ".partial"
    with h5py.File(tmp, "w") as f:
        f.attrs.update(schema=NORMALS_SCHEMA, version=FORMAT_VERSION, checksum=checksum,
                       count=len(images))
        f.create_dataset("images", data=images)
        f.create_dataset("means", data=means.astype(np.float32))
        f.create_dataset("paths", data=np.array(names, dtype=h5py.string_dtype()))
        if holdout_images is not None:
            f.create_dataset("holdout_images", data=holdout_images)
            f.create_dataset("holdout_paths", data=np.array(holdout_names, dtype=h5py.string_dtype()))
            if holdout_layout is not None:
                f.create_dataset("holdout_layout", data=holdout_layout.astype(np.int32))
    os.replace(tmp, path)
    return checksum


class ShardWriter:
    """Collects the records of one shard and writes them atomically (temporary name, rename)."""

    def __init__(self, path: str, shard_index: int, attrs: dict):
        self.path = path
        self.shard_index = shard_index
        self.attrs = attrs
        self.records: list[tuple[int, int, AnomalyRecord]] = []

    def add(self, sample_index: int, normal_index: int, record: AnomalyRecord) -> None:
        self.records.append((sample_index, normal_index, record))

    def arrays(self, order) -> dict:
        """The record datasets, with samples in ``order``."""
        recs = [self.records[i] for i in order]
        n = len(recs)
        box = np.array([(r.y, r.x, r.mask.shape[0], r.mask.shape[1]) for _, _, r in recs],
                       dtype=np.int16).reshape(n, 4)
        crops = [r.crop.reshape(-1) for _, _, r in recs]
        bits = [np.packbits(r.mask.reshape(-1) > 0) for _, _, r in recs]
        return {
            "sample_index": np.array([s for s, _, _ in recs], dtype=np.int64),
            "normal_index": np.array([k for _, k, _ in recs], dtype=np.int32),
            "box": box,
            "jitter": np.array([r.jitter for _, _, r in recs], dtype=np.float32).reshape(n, 4),
            "content": np.array([r.content for _, _, r in recs], dtype=np.uint8),
            "pixel_offset": np.concatenate([[0], np.cumsum([c.size for c in crops])]).astype(np.int64),
            "pixels": np.concatenate(crops) if crops else np.zeros(0, np.uint8),
            "mask_offset": np.concatenate([[0], np.cumsum([b.size for b in bits])]).astype(np.int64),
            "mask_bits": np.concatenate(bits) if bits else np.zeros(0, np.uint8),
        }

    def close(self, order) -> str:
        """Write the shard with samples in ``order``; returns its checksum."""
        data = self.arrays(order)
        checksum = _sha256(data[k] for k in RECORD_FIELDS)
        tmp = self.path + ".partial"
        with h5py.File(tmp, "w") as f:
            f.attrs.update(self.attrs)
            f.attrs.update(schema=SHARD_SCHEMA, version=FORMAT_VERSION, shard=self.shard_index,
                           count=len(order), checksum=checksum)
            for k in RECORD_FIELDS:
                f.create_dataset(k, data=data[k])
        os.replace(tmp, self.path)
        return checksum


# ---------------------------------------------------------------- reading


@dataclass
class RecordBatch:
    """Compact records of consecutive samples of one shard, as stored."""

    sample_index: np.ndarray
    normal_index: np.ndarray
    box: np.ndarray
    jitter: np.ndarray
    content: np.ndarray
    pixel_offset: np.ndarray  # relative to ``pixels``
    pixels: np.ndarray
    mask_offset: np.ndarray
    mask_bits: np.ndarray

    def __len__(self):
        return len(self.sample_index)

    def record(self, j: int, channels: int) -> AnomalyRecord:
        """Record ``j`` of the batch as an ``AnomalyRecord``."""
        y, x, h, w = (int(v) for v in self.box[j])
        crop = self.pixels[self.pixel_offset[j]:self.pixel_offset[j + 1]].reshape(h, w, channels)
        bits = self.mask_bits[self.mask_offset[j]:self.mask_offset[j + 1]]
        mask = np.unpackbits(bits, count=h * w).reshape(h, w)
        return AnomalyRecord(y, x, crop, mask, self.jitter[j], int(self.content[j]))


def open_shard(path: str) -> h5py.File:
    """Open a shard, with a clear error for missing, truncated or foreign files."""
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise ShardError(f"{path}: missing; re-run 'fractalsynth generate' to make it") from None
    except OSError as e:
        raise ShardError(f"{path}: unreadable or truncated HDF5 ({e}); delete it and re-run "
                         "'fractalsynth generate' with the same options") from None
    if f.attrs.get("schema") != SHARD_SCHEMA:
        f.close()
        raise ShardError(f"{path}: not a fractalsynth shard; move it out of the dataset folder")
    if int(f.attrs.get("version", 0)) > FORMAT_VERSION:
        f.close()
        raise ShardError(f"{path}: shard format {f.attrs['version']} is newer than this "
                         f"fractalsynth reads ({FORMAT_VERSION}); upgrade fractalsynth")
    return f


def read_records(f: h5py.File, start: int, stop: int) -> RecordBatch:
    """Records ``start:stop`` of an open shard: one contiguous read per dataset."""
    po = f["pixel_offset"][start:stop + 1]
    mo = f["mask_offset"][start:stop + 1]
    return RecordBatch(
        f["sample_index"][start:stop], f["normal_index"][start:stop], f["box"][start:stop],
        f["jitter"][start:stop], f["content"][start:stop], po - po[0],
        f["pixels"][po[0]:po[-1]], mo - mo[0], f["mask_bits"][mo[0]:mo[-1]])


def load_manifest(root: str) -> dict:
    """The dataset's manifest, with a clear error when it is missing or broken."""
    path = os.path.join(root, MANIFEST_FILE)
    if not os.path.isdir(root):
        raise ShardError(f"{root}: no such dataset folder; make one with 'fractalsynth generate'")
    if not os.path.isfile(path):
        raise ShardError(f"{path}: missing; finish the dataset with 'fractalsynth generate' or "
                         f"'fractalsynth index {root}'")
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: unreadable manifest ({e}); rebuild it with "
                         f"'fractalsynth index {root}'") from None
    if manifest.get("schema") != "fractalsynth.dataset":
        raise ShardError(f"{path}: not a fractalsynth manifest")
    return manifest


def load_normals(root: str, expected_checksum: str | None = None):
    """(images [N,S,S,C] uint8, means [N] float32) of a dataset."""
    path = os.path.join(root, NORMALS_FILE)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("schema") != NORMALS_SCHEMA:
                raise ShardError(f"{path}: not a fractalsynth normals file")
            images, means = f["images"][()], f["means"][()]
            checksum = f.attrs["checksum"]
    except FileNotFoundError:
        raise ShardError(f"{path}: missing; re-run 'fractalsynth generate'") from None
    except OSError as e:
        raise ShardError(f"{path}: unreadable or truncated ({e}); delete it and re-run "
                         "'fractalsynth generate'") from None
    if expected_checksum is not None and checksum != expected_checksum:
        raise ShardError(f"{path}: belongs to another dataset (checksum differs from the "
                         "manifest); regenerate the dataset")
    return images, means


class Holdout(NamedTuple):
    """The normals held out of a dataset (``generate --holdout``)."""

    images: np.ndarray  # uint8 [K, S, S, C]; K = 0 if none
    names: list
    layout: np.ndarray | None  # int32 [K, 5] for normals cut into pieces (see the module doc)


def load_holdout(root: str) -> Holdout:
    """The normals held out of a dataset (none: K = 0)."""
    path = os.path.join(root, NORMALS_FILE)
    try:
        with h5py.File(path, "r") as f:
            if "holdout_images" not in f:
                shape = f["images"].shape
                return Holdout(np.zeros((0, *shape[1:]), np.uint8), [], None)
            return Holdout(f["holdout_images"][()],
                           [p.decode() if isinstance(p, bytes) else str(p) for p in f["holdout_paths"][()]],
                           f["holdout_layout"][()] if "holdout_layout" in f else None)
    except (OSError, KeyError) as e:
        raise ShardError(f"{path}: unreadable or truncated ({e}); delete it and re-run "
                         "'fractalsynth generate'") from None


class ShardDataset:
    """Numpy reader of a shard dataset: ``len``, indexing, and chunk-wise shuffled batches.

    ``ds[i]`` and the batches give (normal, anomalous, mask) uint8 arrays with the shared mild
    jitter applied, exactly as ``FractalAnomaly`` would return them. ``shards`` restricts the
    reader to some shards (e.g. one rank's share in distributed training).
    """

    def __init__(self, root: str, shards: list[int] | None = None):
        self.root = root
        self.manifest = load_manifest(root)
        entries = self.manifest["shards"]
        if shards is not None:
            entries = [entries[i] for i in shards]
        if not entries:
            raise ShardError(f"{root}: the dataset has no shards")
        self.entries = entries
        self.counts = np.array([e["count"] for e in entries], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.params = self.manifest["params"]
        self.size = int(self.params["config"]["size"])
        self.channels = int(self.manifest["channels"])
        self.normals, self.means = load_normals(root, self.manifest["normals_checksum"])
        self._files: dict[int, h5py.File] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def check_files(self) -> None:
        """Open every shard's header once: missing, truncated or foreign files fail here."""
        for k, e in enumerate(self.entries):
            with open_shard(os.path.join(self.root, e["name"])) as f:
                if f.attrs.get("params_hash") != self.manifest["params_hash"] or \
                        int(f.attrs.get("count", -1)) != e["count"]:
                    raise ShardError(f"{os.path.join(self.root, e['name'])}: does not match the "
                                     "manifest; run 'fractalsynth verify' and regenerate it")

    def __getstate__(self):  # h5py handles do not pickle: workers reopen lazily
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def file(self, k: int) -> h5py.File:
        """Shard ``k``'s open handle (opened on first use, per process)."""
        if k not in self._files:
            self._files[k] = open_shard(os.path.join(self.root, self.entries[k]["name"]))
        return self._files[k]

    def records(self, k: int, start: int, stop: int) -> RecordBatch:
        return read_records(self.file(k), start, stop)

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        i %= len(self)
        k = int(np.searchsorted(self.starts, i, side="right") - 1)
        rb = self.records(k, i - int(self.starts[k]), i - int(self.starts[k]) + 1)
        n = int(rb.normal_index[0])
        return compose(self.normals[n], rb.record(0, self.channels), float(self.means[n]))

    def blocks(self, block: int):
        """(shard, start, stop) runs of at most ``block`` records covering the dataset."""
        return [(k, s, min(s + block, int(c))) for k, c in enumerate(self.counts)
                for s in range(0, int(c), block)]

    def compose_batch(self, rb: RecordBatch, order=None):
        """Stacked (normals, anomalous, masks) of a record batch, in ``order``."""
        order = list(range(len(rb)) if order is None else order)
        idx = rb.normal_index
        mats, offs = jitter_matrices(rb.jitter, self.means[idx], self.channels)
        s, c = self.size, self.channels
        out_n = np.empty((len(order), s, s, c), np.uint8)
        out_a = np.empty_like(out_n)
        out_m = np.empty((len(order), s, s), np.uint8)
        for o, j in enumerate(order):
            compose_into(self.normals[idx[j]], rb.record(j, c), mats[j], offs[j],
                         out_n[o], out_a[o], out_m[o])
        return out_n, out_a, out_m

    def iter_record_blocks(self, block: int = 1024, shuffle: bool = True, seed: int = 0,
                           epoch: int = 0):
        """Record batches, block order shuffled by (seed, epoch); records within stay stored order."""
        blocks = self.blocks(block)
        if shuffle:
            rng = np.random.default_rng([seed, epoch, 7])
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        for k, s, e in blocks:
            yield self.records(k, s, e)

    def iter_batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                     block: int = 1024, drop_last: bool = False):
        """(normals, anomalous, masks) batches read chunk by chunk (samples are pre-shuffled)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        for rb in self.iter_record_blocks(block, shuffle, seed, epoch):
            for s in range(0, len(rb), batch_size):
                order = range(s, min(s + batch_size, len(rb)))
                if drop_last and len(order) < batch_size:
                    continue
                yield self.compose_batch(rb, order)

    def close(self):
        for f in self._files.values():
            f.close()
        self._files = {}


def verify_dataset(out_dir: str) -> list[str]:
    """Every problem found in a dataset folder (empty when it is sound)."""
    problems = []
    try:
        manifest = load_manifest(out_dir)
    except ShardError as e:
        return [str(e)]
    listed = {e["name"] for e in manifest["shards"]}
    for e in manifest["shards"]:
        path = os.path.join(out_dir, e["name"])
        try:
            with open_shard(path) as f:
                if f.attrs.get("params_hash") != manifest["params_hash"]:
                    problems.append(f"{path}: belongs to another dataset (parameters differ)")
                    continue
                if f.attrs.get("normals_checksum") != manifest["normals_checksum"]:
                    problems.append(f"{path}: made from other normal images than the dataset's "
                                    f"{NORMALS_FILE}; delete it and re-run the same "
                                    "'fractalsynth generate' command")
                    continue
                got = _sha256(f[k][()] for k in RECORD_FIELDS)
                if int(f.attrs["count"]) != e["count"] or len(f["sample_index"]) != e["count"]:
                    problems.append(f"{path}: holds {len(f['sample_index'])} samples, "
                                    f"manifest says {e['count']}")
                elif got != e["sha256"] or got != f.attrs["checksum"]:
                    problems.append(f"{path}: checksum mismatch (corrupted); delete it and "
                                    "re-run the same 'fractalsynth generate' command")
        except ShardError as err:
            problems.append(str(err))
        except (OSError, KeyError) as err:
            problems.append(f"{path}: damaged ({err}); delete it and re-run 'fractalsynth generate'")
    try:
        load_normals(out_dir, manifest["normals_checksum"])
    except ShardError as err:
        problems.append(str(err))
    for name in sorted(os.listdir(out_dir)):
        if name.endswith((".h5", ".hdf5", ".partial")) and name not in listed \
                and name != NORMALS_FILE:
            problems.append(f"{os.path.join(out_dir, name)}: foreign or leftover file, not in "
                            "the manifest; remove it")
    return problems


def export_pngs(root: str, out: str, limit: int | None = None, progress=None) -> int:
    """Write samples as PNG folders ``image/``, ``mask/``, ``normal/`` (same file names)."""
    import cv2
    ds = ShardDataset(root)
    n = len(ds) if limit is None else min(limit, len(ds))
    for sub in ("image", "mask", "normal"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    done = 0
    for k, s, e in ds.blocks(512):
        rb = ds.records(k, s, e)
        normals, anomalous, masks = ds.compose_batch(rb)
        for j in range(len(rb)):
            if done >= n:
                return done
            name = f"{int(rb.sample_index[j]):08d}.png"
            for sub, img in (("image", anomalous[j]), ("normal", normals[j]), ("mask", masks[j])):
                img = img[:, :, ::-1] if img.ndim == 3 and img.shape[2] == 3 else img
                cv2.imwrite(os.path.join(out, sub, name), img)
            done += 1
            if progress:
                progress(1)
    return done
