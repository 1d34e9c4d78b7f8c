"""Command line: ``fractalsynth masks | preview | generate | index | verify | info | export``."""
from __future__ import annotations

import functools
import json
import os
import sys
import time

import click

from .anomaly import BLENDS, CONTENTS, MASK_SOURCES, AnomalyConfig, parse_mix
from .ifs import IFSConfig
from .paths import parse_count
from .placement import MVTEC_CATEGORIES, PLACEMENTS, preset_placement


def fail_cleanly(*extra: type):
    """Decorator: library errors (and ``extra`` types) become one stderr line and exit status 2."""
    caught = (ValueError, OSError, KeyError, *extra)

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except caught as e:
                click.echo(f"error: {e}", err=True)
                sys.exit(2)
        return wrapper
    return decorate


_fail_cleanly = fail_cleanly()


class Count(click.ParamType):
    name = "count"

    def convert(self, value, param, ctx):
        try:
            return parse_count(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class Mix(click.ParamType):
    """A --content or --mask-source mix, checked where it is given so the error names the flag."""
    name = "mix"

    def __init__(self, what: str):
        self.what = what

    def convert(self, value, param, ctx):
        try:
            parse_mix(value, self.what)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        return value


def _range(text: str, name: str, cast=float):
    """'2' -> (2, 2); '2-4' or '2:4' -> (2, 4)."""
    parts = text.replace(":", "-").split("-") if text.count("-") <= 1 else [text]
    try:
        vals = [cast(p) for p in parts]
    except ValueError:
        raise click.BadParameter(f"{name}: expected a number or a range like 2-4, got {text!r}")
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or vals[0] > vals[1]:
        raise click.BadParameter(f"{name}: expected lo-hi with lo <= hi, got {text!r}")
    return tuple(vals)


def ifs_options(fn):
    opts = [
        click.option("--maps", default="2", show_default=True, help="Maps per IFS: N or a range N-M."),
        click.option("--probabilities", type=click.Choice(["det", "uniform"]), default="det",
                     show_default=True, help="Map probabilities: proportional to |det A| or uniform."),
        click.option("--points-per-pixel", type=float, default=1.5, show_default=True,
                     help="Chaos-game points per canvas pixel (scales with the canvas area)."),
        click.option("--min-fill", type=float, default=0.10, show_default=True,
                     help="Reject fractals covering less of their box than this."),
        click.option("--min-axis-ratio", type=float, default=0.05, show_default=True,
                     help="Reject line-like fractals (minor/major spread below this)."),
        click.option("--keep-aspect/--stretch", default=False, show_default=True,
                     help="Keep the attractor's aspect ratio instead of filling the canvas."),
        click.option("--stamp/--no-stamp", default=True, show_default=True,
                     help="Thicken points with a random 3x3 stamp."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _ifs_config(maps, probabilities, points_per_pixel, min_fill, min_axis_ratio, keep_aspect,
                stamp, **_) -> IFSConfig:
    lo, hi = _range(maps, "--maps", int)
    return IFSConfig(n_maps_min=lo, n_maps_max=hi, probabilities=probabilities,
                     points_per_pixel=points_per_pixel, min_fill=min_fill,
                     min_axis_ratio=min_axis_ratio, keep_aspect=keep_aspect, stamp=stamp)


def synth_options(fn):
    opts = [
        click.option("--size", type=int, default=256, show_default=True, help="Output size (pixels)."),
        click.option("--placement", type=click.Choice(PLACEMENTS), default=None,
                     help="Where anomalies go [default: uniform, or the --preset's]."),
        click.option("--preset", type=click.Choice(MVTEC_CATEGORIES), default=None,
                     help="MVTec AD category: the method's placement for it."),
        click.option("--content", type=Mix("content"), default="same", show_default=True,
                     help=f"Anomaly content mix, e.g. same=0.7,noise=0.3 ({', '.join(CONTENTS)})."),
        click.option("--mask-source", type=Mix("mask_source"), default="fractal", show_default=True,
                     help=f"Shape of the anomalies ({', '.join(MASK_SOURCES)}; the paper's ablations), "
                          "or a mix, e.g. fractal=0.5,rectangle=0.5."),
        click.option("--blend", type=click.Choice(BLENDS), default="paste", show_default=True),
        click.option("--opacity", default="0.5-1.0", show_default=True,
                     help="Patch weight range for --blend alpha."),
        click.option("--cut-scale", default="0.1-0.5", show_default=True,
                     help="Anomaly cut size range, as a fraction of the shorter side."),
        click.option("--region", default="0.1-0.9", show_default=True,
                     help="Uniform placement band of each side (the method's 0.1-0.9; 0-1: anywhere, "
                          "borders included)."),
        click.option("--min-contrast", type=float, default=0.0, show_default=True,
                     help="Redraw anomalies whose mean grey-level change is below this (0: off)."),
        click.option("--thin", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                     help="Share of anomalies drawn as their shape's skeleton: lines like cracks."),
        click.option("--thin-width", default="1-3", show_default=True,
                     help="Width range of those lines, pixels."),
        click.option("--dilate", type=click.IntRange(min=0), default=3, show_default=True,
                     help="3x3 dilations of each mask label at the output size (the method's 3)."),
        click.option("--resolution", type=click.Choice(["output", "source"]), default="output",
                     show_default=True, help="Synthesise at the output size (fast) or the source's."),
        click.option("--channels", type=click.Choice(["auto", "grey", "rgb"]), default="auto",
                     show_default=True),
        click.option("--textures", type=click.Path(file_okay=False), default=None,
                     help="Folder of texture images for --content texture=..."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return ifs_options(fn)


def _synth_config(size, placement, preset, content, mask_source, blend, opacity, cut_scale,
                  region, min_contrast, thin, thin_width, dilate, resolution, channels,
                  **kw) -> AnomalyConfig:
    if placement is None:
        placement = preset_placement(preset) if preset else "uniform"
    return AnomalyConfig(size=size, placement=placement, content=parse_mix(content, "content"),
                         mask_source=mask_source, blend=blend,
                         opacity=_range(opacity, "--opacity"),
                         cut_scale=_range(cut_scale, "--cut-scale"),
                         region=_range(region, "--region"), min_contrast=min_contrast,
                         thin=thin, thin_width=_range(thin_width, "--thin-width", int),
                         dilate_iterations=dilate,
                         resolution=resolution,
                         channels=channels, ifs=_ifs_config(**kw))


def _load_textures(folder):
    if folder is None:
        return None, None
    from .images import list_images, load_image
    import hashlib
    paths = list_images(folder)
    digest = hashlib.sha256("\n".join(os.path.relpath(p, folder) for p in paths).encode()).hexdigest()
    return [load_image(p) for p in paths], digest


class _LazyBar:
    """A tqdm bar that appears with the first update, so an early error or message prints alone."""

    def __init__(self, total, desc):
        self.total, self.desc, self.bar = total, desc, None

    def _bar(self):
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, desc=self.desc, unit="sample", smoothing=0.1,
                            dynamic_ncols=True)
        return self.bar

    def update(self, k=1):
        self._bar().update(k)

    def write(self, message):
        from tqdm import tqdm
        tqdm.write(message)  # above the bar if there is one; it does not create one

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fractalsynth")
def main():
    """Fractal synthetic anomalies: mask banks, previews and sharded HDF5 datasets."""


@main.command()
@click.option("--n", "n", type=Count(), required=True, help="Number of masks (e.g. 10k, 1m).")
@click.option("--size", type=int, default=256, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--out", type=click.Path(), required=True, help="Output .h5 file.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Threads (masks are the same bytes for any count).")
@ifs_options
@_fail_cleanly
def masks(n, size, seed, out, workers, **kw):
    """Write a bank of bit-packed fractal masks with their IFS parameters."""
    import numba
    from .maskbank import write_mask_bank
    numba.set_num_threads(min(workers, numba.config.NUMBA_NUM_THREADS))
    cfg = _ifs_config(**kw)
    t = time.perf_counter()
    with _LazyBar(n, "masks") as bar:
        info = write_mask_bank(out, n, size, seed, cfg, progress=bar.update)
    dt = time.perf_counter() - t
    click.echo(f"wrote {info.count} masks of {size}x{size} to {out} in {dt:.1f}s "
               f"({info.count / dt:.0f} masks/s); {info.rejected} weak draws rejected and redrawn")


@main.command()
@click.argument("dataset", required=False, type=click.Path())
@click.option("--normals", type=click.Path(), help="Folder of normal images (instead of DATASET).")
@click.option("--n", "n", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--out", type=click.Path(), required=True, help="Output PNG.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--columns", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--pieces", default="off", show_default=True, metavar="off|auto|ASPECT",
              help="With --normals: cut the images into pieces first, as 'generate --pieces' does.")
@synth_options
@_fail_cleanly
def preview(dataset, normals, n, out, seed, columns, pieces, textures, **kw):
    """A labelled grid of normal / anomalous / mask samples (from DATASET or --normals DIR)."""
    from .preview import preview_from_dataset, preview_from_normals, save_rgb
    if (dataset is None) == (normals is None):
        raise ValueError("give either a DATASET folder or --normals DIR")
    if dataset is not None:
        grid = preview_from_dataset(dataset, n, columns)
    else:
        tex, _ = _load_textures(textures)
        grid = preview_from_normals(normals, n, seed, columns, _synth_config(**kw), tex, pieces)
    save_rgb(out, grid)
    click.echo(f"wrote {out}")


@main.command()
@click.option("--normals", type=click.Path(), required=True, help="Folder of normal images (recursive).")
@click.option("--n", "n", type=Count(), required=True, help="Number of samples (e.g. 100k).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Dataset folder.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=os.cpu_count() or 1,
              show_default="all cores")
@click.option("--shard-size", type=click.IntRange(min=1), default=10000, show_default=True)
@click.option("--shard-range", default=None, help="Make only shards i:j (for job arrays).")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (listed) instead of failing.")
@click.option("--holdout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Fraction of the normals kept out of training (seeded), for calibration.")
@click.option("--pieces", default="off", show_default=True, metavar="off|auto|ASPECT",
              help="Cut each normal along its long side into pieces of about this width / height "
                   "('auto': the normals' median) before resizing, so long images are not "
                   "squeezed; fractalad cuts test images alike.")
@synth_options
@_fail_cleanly
def generate(normals, n, out, seed, workers, shard_size, shard_range, skip_bad, holdout, pieces,
             textures, **kw):
    """Precompute a sharded HDF5 anomaly dataset from a folder of normal images."""
    from .generate import generate as run
    cfg = _synth_config(**kw)
    sr = None
    if shard_range:
        try:
            a, b = shard_range.split(":")
            sr = (int(a), int(b))
        except ValueError:
            raise ValueError(f"--shard-range must look like 0:4, got {shard_range!r}") from None
    tex, digest = _load_textures(textures)
    n_shards = (n + shard_size - 1) // shard_size
    lo, hi = sr or (0, n_shards)
    total = sum(min(shard_size, n - k * shard_size) for k in range(max(lo, 0), min(hi, n_shards)))
    t = time.perf_counter()
    with _LazyBar(total, "generate") as bar:
        summary = run(normals, out, n, cfg, seed, shard_size, workers, sr, skip_bad, tex, digest,
                      progress=bar.update, log=lambda m: bar.write(m), holdout=holdout,
                      pieces=pieces)
    dt = time.perf_counter() - t
    click.echo(f"{out}: shards {summary['shards']} ready ({summary['made']} samples made in "
               f"{dt:.1f}s)" + ("; manifest written" if "manifest" in summary else
                                "; run 'fractalsynth index' once every range is done"))


@main.command()
@click.argument("dataset", type=click.Path())
@_fail_cleanly
def index(dataset):
    """Check all shards and write the manifest (after --shard-range jobs)."""
    from .generate import index_dataset
    click.echo(f"wrote {index_dataset(dataset)}")


@main.command()
@click.argument("dataset", type=click.Path())
@_fail_cleanly
def verify(dataset):
    """Recompute checksums; exit 1 naming every truncated, corrupted or foreign file."""
    from .shards import ShardError, verify_dataset
    if not os.path.isdir(dataset):  # a wrong argument (exit 2), not a damaged dataset (exit 1)
        raise ShardError(f"{dataset}: no such dataset folder; make one with 'fractalsynth generate'")
    problems = verify_dataset(dataset)
    for p in problems:
        click.echo(p, err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{dataset}: OK")


@main.command()
@click.argument("dataset", type=click.Path())
@_fail_cleanly
def info(dataset):
    """Counts, bytes per sample and generation parameters of a dataset."""
    from .shards import load_manifest
    m = load_manifest(dataset)
    total = sum(e["bytes"] for e in m["shards"]) + m["normals_bytes"]
    click.echo(json.dumps({
        "samples": m["count"], "shards": len(m["shards"]), "channels": m["channels"],
        "bytes_total": total, "bytes_per_sample": round(total / m["count"], 1),
        "normals_bytes": m["normals_bytes"], "params": m["params"]}, indent=1))


@main.command()
@click.argument("dataset", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--limit", type=Count(), default=None, help="Export only the first N samples.")
@_fail_cleanly
def export(dataset, out, limit):
    """Write samples as PNG folders image/, mask/, normal/."""
    from .shards import ShardDataset, export_pngs
    total = limit or len(ShardDataset(dataset))
    with _LazyBar(total, "export") as bar:
        done = export_pngs(dataset, out, limit, progress=bar.update)
    click.echo(f"wrote {done} samples to {out}")


if __name__ == "__main__":
    main()
