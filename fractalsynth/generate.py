"""Building shard datasets: parallel, resumable, splittable across independent jobs.

Sample ``i`` depends only on (seed, i, options, normals): its normal is
``perm[i % N]`` for a seeded permutation ``perm`` of the N normals, and its randomness is
``sample_rng(seed, i)``. Shard ``k`` holds samples ``[k * shard_size, (k+1) * shard_size)`` in a
seeded shuffled order. So any worker count, any ``--shard-range`` split and any resume give
the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from dataclasses import dataclass

import numpy as np

from . import __version__
from .anomaly import AnomalyConfig, synthesize_record
from .color import mean_luma
from .images import (ImageError, canvas_boxes, channels_of, list_images, load_image, median_aspect,
                     piece_boxes, prepare_normal, to_channels)
from .placement import find_foreground
from .rng import sample_rng
from .shards import (MANIFEST_FILE, NORMALS_FILE, PARAMS_FILE, ShardError,
                     ShardWriter, _sha256, open_shard, shard_name,
                     write_normals)

_CHUNK = 256


@dataclass
class Normals:
    """The normal images of a run: prepared at the output size, plus what synthesis needs."""

    images: np.ndarray  # uint8 [N, S, S, C]
    means: np.ndarray
    names: list
    sources: list | None  # full-resolution images, for resolution='source'
    foregrounds: list
    skipped: list
    piece_aspect: float = 0.0  # > 0: each image was cut into pieces of about this width / height
    # pieces only: int32 [N, 5], each piece's image (its number in reading order) and its
    # (top, bottom, left, right) on the S x S canvas that image's stretched version would fill
    layout: np.ndarray | None = None

    def subset(self, idx) -> "Normals":
        """The normals at positions ``idx`` (skipped-file notes kept)."""
        def pick(seq):
            return None if seq is None else [seq[i] for i in idx]
        return Normals(self.images[idx], self.means[idx], pick(self.names), pick(self.sources),
                       pick(self.foregrounds), self.skipped, self.piece_aspect,
                       None if self.layout is None else self.layout[idx])

    def image_numbers(self) -> np.ndarray:
        """Per normal, the number of the image it came from (itself unless cut into pieces)."""
        return np.arange(len(self.images)) if self.layout is None else self.layout[:, 0]


def holdout_indices(count: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of the ``fraction`` of ``count`` normals held out of a dataset (seeded)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout must be a fraction between 0 and 1, got {fraction}")
    k = max(1, int(round(count * fraction)))
    if k >= count:
        raise ValueError(f"holdout {fraction} of {count} normal image(s) leaves none to train on; "
                         "use a smaller --holdout or more images")
    return np.sort(np.random.default_rng([seed, 5]).permutation(count)[:k])


def _check_memory(folder: str, count: int, size: int, channels: int) -> None:
    """Refuse normals that would not fit in memory, before resizing them (a crash otherwise)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): nothing to compare
        return
    # the resized normals are held for the whole run (and copied into each worker where
    # processes cannot fork)
    need = count * size * size * channels
    if need > total // 2:
        raise ImageError(f"{folder}: {count} normals at {size} px take {need / 2**30:.1f} GiB, "
                         f"more than half of this machine's {total / 2**30:.0f} GiB; lower "
                         "--size or use fewer images")


def check_pieces(pieces) -> bool:
    """Whether ``pieces`` asks to cut images (None, 0, 'off': no; 'auto' or a width / height
    above 0: yes); a clear error for anything else, before any image is read."""
    if pieces in (None, 0, "off"):
        return False
    if pieces == "auto":
        return True
    try:
        aspect = float(pieces)
    except (TypeError, ValueError):
        aspect = float("nan")
    if not aspect > 0 or aspect == float("inf"):
        raise ValueError(f"pieces must be 'auto', 'off' or a width / height above 0, got {pieces!r}")
    return True


def resolve_piece_aspect(pieces, shapes) -> float:
    """The piece aspect (width / height) ``pieces`` asks for: 0 for whole images (None, 0,
    'off'), ``median_aspect`` of ``shapes`` for 'auto', else the number itself."""
    if not check_pieces(pieces):
        return 0.0
    return median_aspect(shapes) if pieces == "auto" else float(pieces)


def cut_into_pieces(images: list, names: list, aspect: float,
                    size: int) -> tuple[list, list, np.ndarray]:
    """Each image cut by ``piece_boxes``: (pieces, names, layout). A piece of a cut image is
    named ``name#k``; ``layout`` is int32 [P, 5], each piece's image number and its
    ``canvas_boxes`` at ``size``."""
    pieces, piece_names, layout = [], [], []
    for n, (img, name) in enumerate(zip(images, names)):
        cuts = piece_boxes(img.shape[0], img.shape[1], aspect)
        boxes = canvas_boxes(cuts, img.shape[:2], size)
        for k, ((top, bottom, left, right), box) in enumerate(zip(cuts, boxes)):
            pieces.append(img[top:bottom, left:right])
            piece_names.append(name if len(cuts) == 1 else f"{name}#{k}")
            layout.append((n, *box))
    return pieces, piece_names, np.array(layout, np.int32).reshape(-1, 5)


def read_normals(folder: str, cfg: AnomalyConfig, skip_bad: bool = False, progress=None,
                 pieces=None) -> Normals:
    """Load, convert and resize every image under ``folder`` (recursively); with ``pieces``
    (see ``resolve_piece_aspect``), each image is first cut into pieces of about one aspect."""
    paths = list_images(folder)
    raw, names, skipped = [], [], []
    for p in paths:
        try:
            raw.append(load_image(p))
            names.append(os.path.relpath(p, folder))
        except ImageError as e:
            if not skip_bad:  # the hint only this reader can give
                raise ImageError(f"{e} (--skip-bad leaves such files out)") from None
            skipped.append(str(e))
        if progress:
            progress(1)
    if not raw:
        raise ImageError(f"{folder}: none of the {len(paths)} images could be read")
    aspect = resolve_piece_aspect(pieces, [r.shape for r in raw])
    layout = None
    if aspect:
        raw, names, layout = cut_into_pieces(raw, names, aspect, cfg.size)
    if cfg.channels == "auto":
        ch = 3 if any(channels_of(r) == 3 for r in raw) else 1
    else:
        ch = 1 if cfg.channels == "grey" else 3
    _check_memory(folder, len(raw), cfg.size, ch)
    images = np.stack([prepare_normal(r, cfg.size, ch) for r in raw])
    means = np.array([mean_luma(im) for im in images], dtype=np.float32)
    sources = [to_channels(r, ch) for r in raw] if cfg.resolution == "source" else None
    fgs = [None] * len(raw)
    if cfg.placement != "uniform":
        fgs = [find_foreground(s) for s in (sources or images)]
    return Normals(images, means, names, sources, fgs, skipped, aspect, layout)


def dataset_params(cfg: AnomalyConfig, seed: int, n: int, shard_size: int, normals: Normals,
                   textures_digest: str | None, holdout: float = 0.0) -> dict:
    """Everything that determines the dataset's bytes (compared on every re-run)."""
    params = {
        "seed": int(seed), "n": int(n), "shard_size": int(shard_size),
        "config": cfg.to_dict(), "normals": len(normals.names),
        "normals_digest": hashlib.sha256("\n".join(normals.names).encode()).hexdigest(),
        "textures_digest": textures_digest,
    }
    if holdout:  # absent when 0, so datasets made before the option still resume
        params["holdout"] = float(holdout)
    if normals.piece_aspect:  # read by fractalad: test images are cut alike
        params["piece_aspect"] = normals.piece_aspect
    return params


def _params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


# per-process state of the worker pool (inherited through fork, or loaded by the initializer)
_STATE: dict = {}


def _init_worker(state):
    import numba
    numba.set_num_threads(1)
    if state is not None:
        _STATE.update(state)


def _make_chunk(indices):
    st = _STATE
    cfg, seed, perm = st["cfg"], st["seed"], st["perm"]
    normals: Normals = st["normals"]
    out = []
    for i in indices:
        k = int(perm[i % len(perm)])
        src = normals.sources[k] if normals.sources is not None else None
        rec = synthesize_record(normals.images[k], sample_rng(seed, int(i), domain=2), cfg,
                                normals.foregrounds[k], st["pool"], st["textures"], src)
        out.append((int(i), k, rec))
    return out


def shard_order(seed: int, shard: int, count: int) -> np.ndarray:
    """The write-time shuffle of shard ``shard``."""
    return np.random.default_rng([seed, shard, 11]).permutation(count)


def _check_existing(out_dir: str, params: dict, normals_dir: str, normals_checksum: str) -> None:
    path = os.path.join(out_dir, PARAMS_FILE)
    if not os.path.exists(path):
        return
    with open(path) as fh:
        old = json.load(fh)
    params = json.loads(json.dumps(params))  # tuples read back as lists
    if old.get("params") != params:
        diffs = [k for k in params if old.get("params", {}).get(k) != params[k]]
        raise ShardError(f"{out_dir} holds a dataset made with other settings ({', '.join(diffs)} "
                         "differ); use another --out, or delete the folder to start over")
    # the params name the normals only; their pixels can change under the same names (an
    # edited file, another OpenCV's decoder), and new shards would then not match normals.h5
    if old.get("normals_checksum", normals_checksum) != normals_checksum:
        raise ShardError(f"{out_dir} was begun from other pixels than the images under "
                         f"{normals_dir} decode to now (same names; edited files, or another "
                         "machine's image decoder); finish it where it was begun, use another "
                         "--out, or delete the folder to start over")


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def shard_complete(path: str, params_hash: str, count: int, normals_checksum: str) -> bool:
    """True if ``path`` is a finished shard of this dataset with ``count`` samples, made from
    the normals of checksum ``normals_checksum``."""
    if not os.path.exists(path):
        return False
    try:
        with open_shard(path) as f:
            return (f.attrs.get("params_hash") == params_hash and int(f.attrs["count"]) == count
                    and f.attrs.get("normals_checksum") == normals_checksum and "checksum" in f.attrs)
    except ShardError:
        return False


def generate(normals_dir: str, out_dir: str, n: int, cfg: AnomalyConfig | None = None,
             seed: int = 0, shard_size: int = 10000, workers: int = 1,
             shard_range: tuple[int, int] | None = None, skip_bad: bool = False,
             textures=None, textures_digest: str | None = None, progress=None,
             log=print, holdout: float = 0.0, pieces=None) -> dict:
    """Build (or finish) the dataset in ``out_dir``; returns a summary dict.

    ``holdout``: a seeded fraction of the normals kept out of every sample and stored apart
    in the normals file, so a model trained on the dataset can be calibrated on unseen images
    (with ``pieces``, whole images are held out, stored as pieces with their canvas boxes).
    ``pieces``: 'auto' (the normals' median aspect), a width / height, or None / 'off': cut each
    normal along its long side into pieces of about that aspect before it is resized, so that
    long images are not squeezed; fractalad cuts test images the same way.
    """
    cfg = cfg or AnomalyConfig()
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    if shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {shard_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    n_shards = (n + shard_size - 1) // shard_size
    lo, hi = shard_range if shard_range is not None else (0, n_shards)
    if not (0 <= lo < hi <= n_shards):
        raise ValueError(f"--shard-range {lo}:{hi} is outside 0:{n_shards} "
                         f"({n} samples in shards of {shard_size})")
    if "texture" in [c for c, w in cfg.content if w > 0] and not textures:
        raise ValueError("content 'texture' needs --textures DIR")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: a file, not a folder; --out takes a folder for the shards")
    normals = read_normals(normals_dir, cfg, skip_bad, pieces=pieces)
    for s in normals.skipped:
        log(f"skipped: {s}")
    held = None
    if holdout:  # whole images are held out, with all their pieces
        numbers = normals.image_numbers()
        out = np.isin(numbers, holdout_indices(int(numbers.max()) + 1, holdout, seed))
        held = normals.subset(np.flatnonzero(out))
        normals = normals.subset(np.flatnonzero(~out))
    params = dataset_params(cfg, seed, n, shard_size, normals, textures_digest, holdout)
    checksum = _sha256([normals.images, normals.means])
    _check_existing(out_dir, params, normals_dir, checksum)
    os.makedirs(out_dir, exist_ok=True)  # only now: bad normals leave no empty folder behind
    channels = int(normals.images.shape[3])
    phash = _params_hash(params)
    normals_path = os.path.join(out_dir, NORMALS_FILE)
    if not os.path.exists(normals_path):
        write_normals(normals_path, normals.images, normals.means, normals.names,
                      held.images if held else None, held.names if held else None,
                      held.layout if held else None)
    _write_json(os.path.join(out_dir, PARAMS_FILE),
                {"schema": "fractalsynth.params", "params": params, "params_hash": phash,
                 "channels": channels, "normals_checksum": checksum,
                 "fractalsynth_version": __version__})
    perm = np.random.default_rng([seed, 3]).permutation(len(normals.names))
    attrs = {"params_hash": phash, "seed": seed, "channels": channels,
             "params": json.dumps(params, sort_keys=True), "normals_checksum": checksum}
    todo = []
    for k in range(lo, hi):
        count = min(shard_size, n - k * shard_size)
        path = os.path.join(out_dir, shard_name(k))
        if os.path.exists(path + ".partial"):
            os.remove(path + ".partial")
        if shard_complete(path, phash, count, checksum):
            if progress:
                progress(count)
            continue
        todo.append((k, count, path))
    pool = list(normals.images) if any(c == "other" for c, w in cfg.content if w > 0) else None
    state = {"cfg": cfg, "seed": seed, "perm": perm, "normals": normals, "textures": textures,
             "pool": pool}
    made = 0
    if todo:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        _STATE.update(state)
        pool = (ctx or mp).Pool(workers, _init_worker, (None if ctx else state,)) \
            if workers > 1 else None
        try:
            for k, count, path in todo:
                writer = ShardWriter(path, k, attrs)
                first = k * shard_size
                chunks = [range(s, min(s + _CHUNK, first + count))
                          for s in range(first, first + count, _CHUNK)]
                results = pool.imap(_make_chunk, chunks) if pool else map(_make_chunk, chunks)
                for chunk in results:
                    for i, nk, rec in chunk:
                        writer.add(i, nk, rec)
                    if progress:
                        progress(len(chunk))
                writer.close(shard_order(seed, k, count))
                made += count
        finally:
            if pool:
                pool.terminate()
    summary = {"out": out_dir, "shards": f"{lo}:{hi}", "made": made, "skipped_images": normals.skipped}
    if all(os.path.exists(os.path.join(out_dir, shard_name(k))) for k in range(n_shards)):
        summary["manifest"] = index_dataset(out_dir)
    return summary


def index_dataset(out_dir: str) -> str:
    """Check every shard of the dataset and write ``manifest.json``; returns its path."""
    ppath = os.path.join(out_dir, PARAMS_FILE)
    if not os.path.isfile(ppath):
        raise ShardError(f"{ppath}: missing; {out_dir} is not a dataset made by "
                         "'fractalsynth generate'")
    with open(ppath) as fh:
        meta = json.load(fh)
    params = meta["params"]
    n, shard_size = params["n"], params["shard_size"]
    n_shards = (n + shard_size - 1) // shard_size
    entries, missing = [], []
    for k in range(n_shards):
        name = shard_name(k)
        path = os.path.join(out_dir, name)
        count = min(shard_size, n - k * shard_size)
        if not shard_complete(path, meta["params_hash"], count, meta["normals_checksum"]):
            missing.append(name)
            continue
        with open_shard(path) as f:
            entries.append({"name": name, "count": count, "sha256": str(f.attrs["checksum"]),
                            "bytes": os.path.getsize(path)})
    if missing:
        raise ShardError(f"{out_dir}: {len(missing)} shard(s) missing or incomplete "
                         f"({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}); "
                         "run the remaining --shard-range jobs, then index again")
    manifest = {"schema": "fractalsynth.dataset", "version": 1, "params": params,
                "params_hash": meta["params_hash"], "channels": meta["channels"],
                "normals_checksum": meta["normals_checksum"], "count": n, "shards": entries,
                "normals_bytes": os.path.getsize(os.path.join(out_dir, NORMALS_FILE)),
                "fractalsynth_version": __version__}
    path = os.path.join(out_dir, MANIFEST_FILE)
    _write_json(path, manifest)
    return path
