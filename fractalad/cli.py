"""Command line: ``fractalad fit | test | calibrate | predict | export | demo``."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import click

from fractalsynth.cli import fail_cleanly

from .choices import (BACKBONES, COMPILE_MODES, FORMATS, IMAGE_SCORES, MAP_KINDS, NORMALS_QUANTILE,
                      PRECISIONS, PRESETS)

MAP_CHOICE = click.Choice(MAP_KINDS)
SCORE_CHOICE = click.Choice(IMAGE_SCORES)
_fail_cleanly = fail_cleanly(RuntimeError)


class FiniteFloat(click.ParamType):
    """A float that is neither NaN nor infinite (a NaN threshold would flag nothing)."""

    name = "number"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE = FiniteFloat()
TRAINED_OPTION = click.option("--trained", is_flag=True,
                              help="An --ema run: use the trained weights, not their moving average.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fractalsynth")
def main():
    """FractalAD: train on fractalsynth shards, test on real defects, predict, export."""


@main.command()
@click.argument("shards", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run folder.")
@click.option("--backbone", type=click.Choice(BACKBONES), default="efficientnet_lite0", show_default=True)
@click.option("--weights", type=click.Path(), default=None,
              help="ImageNet checkpoint for the teacher (default: Lite0 ships; ResNets download).")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=100.0, show_default=True,
              help="Paper epochs of 391 samples.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps (overrides --epochs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-3, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Record-reading processes.")
@click.option("--kd/--no-kd", default=None, help="Distillation (default: on, or the preset's).")
@click.option("--head-width", type=click.IntRange(min=1), default=None,
              help="Head channels (default: the smallest stage width, as in the method).")
@click.option("--clean-share", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Share of samples shown without their anomaly (normal image, empty mask).")
@click.option("--flips/--no-flips", default=False, show_default=True,
              help="Flip each sample at random, horizontally and vertically (the paper: no).")
@click.option("--zoom", type=click.FloatRange(1, 4), default=1.0, show_default=True,
              help="Magnify each sample (its normal twin and mask alike) by a random factor in "
                   "[1, ZOOM] at a random position (the paper: 1, none).")
@click.option("--input-blur", type=click.FloatRange(0, 8), default=0.0, show_default=True,
              help="Gaussian sigma (pixels) on every input image, in training and at inference "
                   "(the paper: 0, none).")
@click.option("--decay-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Lower the learning rate linearly to 0 over the last N steps (the paper: 0).")
@click.option("--ema", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Keep a moving average of the weights with this decay (e.g. 0.998) and save "
                   "it as the run's model (the paper: 0, off).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="MVTec category: textures train without distillation.")
@click.option("--compile/--no-compile", default=False, show_default=True, help="torch.compile the step.")
@click.option("--compile-mode", type=click.Choice(COMPILE_MODES), default="default", show_default=True,
              help="torch.compile's mode (with --compile); reduce-overhead replays CUDA graphs.")
@click.option("--cuda-graph/--no-cuda-graph", default=False, show_default=True,
              help="Capture the step as a CUDA graph and replay it (one GPU).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="auto: bf16 autocast on CUDA, float32 on the CPU; bf16: also on CPUs with "
                   "AVX512-BF16 or AMX (1.5-2.1x faster there, scored a little lower); fp32: "
                   "float32 everywhere.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=500, show_default=True,
              help="Save checkpoint.pt every N steps (and, on one process, when Ctrl-C or "
                   "SIGTERM stops the run).")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its checkpoint, with its settings; a longer "
                   "--steps / --epochs (and --decay-steps) extends a finished run.")
@_fail_cleanly
def fit(shards, out, backbone, weights, epochs, steps, batch_size, lr, weight_decay, seed, device,
        workers, kd, head_width, clean_share, flips, zoom, input_blur, decay_steps, ema, preset,
        compile, compile_mode, cuda_graph, precision, checkpoint_every, resume):
    """Train FractalAD from a shard dataset into a run folder."""
    from .train import FitConfig, TrainingInterrupted, fit as run
    if kd is None and preset:
        kd = PRESETS[preset]["kd"]
    given = dict(backbone=backbone, weights=weights, kd=kd, head_width=head_width,
                 clean_share=clean_share, flips=flips, zoom=zoom, input_blur=input_blur,
                 decay_steps=decay_steps, ema=ema, epochs=epochs, steps=steps, batch_size=batch_size,
                 lr=lr, weight_decay=weight_decay, seed=seed, device=device, workers=workers,
                 compile=compile, compile_mode=compile_mode, cuda_graph=cuda_graph,
                 **PRECISIONS[precision], checkpoint_every=checkpoint_every)
    settings = _resumed_settings(out, given) if resume else given
    if settings["kd"] is None:
        settings["kd"] = True
    try:
        summary = run(shards, out, FitConfig(**settings), resume=resume)
    except TrainingInterrupted as e:
        click.echo(str(e), err=True)
        sys.exit(128 + e.signum)  # the shell's convention for a process stopped by a signal
    if "loss" not in summary:  # a resume of a finished run with the same schedule
        click.echo(f"{out}: already at step {summary['steps']}; nothing trained (a longer --steps "
                   "or --epochs extends it)")
        return
    click.echo(f"{out}: {summary['steps']} steps, {summary['samples_per_s']:.1f} samples/s, "
               f"last loss {summary['loss']:.4f}")


def _resumed_settings(out: str, given: dict) -> dict:
    """Settings for ``fit --resume``: the run's own, except options typed on this command line."""
    from click.core import ParameterSource

    from .train import FitConfig
    path = os.path.join(out, "config.json")
    try:
        with open(path) as fh:
            saved = json.load(fh)["fit"]
    except (OSError, ValueError, KeyError):
        raise click.UsageError(f"{path}: missing or unreadable; --resume needs a run folder "
                               "that 'fractalad fit' started") from None
    ctx = click.get_current_context()
    typed = {k for k in given if k in ctx.params and
             ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}
    if ctx.get_parameter_source("preset") == ParameterSource.COMMANDLINE:
        typed.add("kd")
    if ctx.get_parameter_source("precision") == ParameterSource.COMMANDLINE:
        typed |= {"bf16", "cpu_bf16"}
    if typed & {"epochs", "steps"}:  # a schedule typed now replaces the saved one whole
        typed |= {"epochs", "steps"}
    fields = {f.name for f in dataclasses.fields(FitConfig)}
    # settings the command line lacks (pretrained, channels_last, ...) come from the run too
    return {**given, **{k: v for k, v in saved.items() if k in fields},
            **{k: given[k] for k in typed}}


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--data", type=click.Path(), required=True, help="MVTec-layout folder.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Default: RUN_DIR/test, suffixed by non-default settings (test-combined, ...).")
@click.option("--device", default="auto", show_default=True)
@click.option("--overlays", type=click.IntRange(min=0), default=8, show_default=True,
              help="Overlay PNGs of the N worst and best cases.")
@click.option("--pixel-resolution", type=click.Choice(["model", "original"]), default="model",
              show_default=True, help="Score pixels at the model's input size or each image's own.")
@click.option("--tta", is_flag=True, help="Average each map with its image's flips (4x the inference).")
@click.option("--smooth", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Gaussian sigma (pixels at the model's input size) on each map before scoring; "
                   "PatchCore-style: 4 at 256 px.")
@click.option("--map", "map_kind", type=MAP_CHOICE, default="head",
              show_default=True, help="The head's map (the paper), or head and student-teacher maps "
                                      "averaged, each scaled on the run's held-out normals or "
                                      "DATA/train/good (distillation runs).")
@click.option("--image-score", type=SCORE_CHOICE, default="max", show_default=True,
              help="The image score whose F1Max threshold is saved for 'predict' (both are reported).")
@TRAINED_OPTION
@_fail_cleanly
def test(run_dir, data, out, device, overlays, pixel_resolution, tta, smooth, map_kind, image_score,
         trained):
    """Metrics (image_AUROC, pixel_AUROC, AUPRO, F1Max) per defect type, and overlays."""
    from .evaluate import format_table, test_run
    report = test_run(run_dir, data, out, device, overlays, pixel_resolution=pixel_resolution, tta=tta,
                      smooth=smooth, map_kind=map_kind, image_score=image_score, trained=trained)
    click.echo(format_table(report["metrics"]))
    op = report["held_out_operating_point"]
    if op:
        rates = op["flagged"]
        found = ", ".join(f"{t} {100 * v:.1f} %" for t, v in rates.items() if t not in ("good", "all_defects"))
        click.echo(f"at the {op['quantile']} quantile of {op['n_normals']} held-out normals ('calibrate'): "
                   f"{100 * rates.get('good', float('nan')):.1f} % of good images flagged, "
                   f"{100 * rates.get('all_defects', float('nan')):.1f} % of defective found ({found})")
    click.echo(f"{report['n_images']} images, {report['images_per_s']:.1f} images/s on "
               f"{report['device']}; metrics.json and overlays in {report['out']}")


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--normals", type=click.Path(file_okay=False), default=None,
              help="Good images the run never trained on (default: the run's held-out normals, "
                   "from 'fractalsynth generate --holdout').")
@click.option("--quantile", type=click.FloatRange(0, 1, min_open=True), default=NORMALS_QUANTILE,
              show_default=True,
              help="The thresholds sit at this quantile of the normals' image scores.")
@click.option("--device", default="auto", show_default=True)
@click.option("--tta", is_flag=True, help="Flip-averaged maps.")
@click.option("--smooth", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Gaussian sigma on each map.")
@click.option("--map", "map_kind", type=MAP_CHOICE, default="head", show_default=True,
              help="combined: also fits its scales on the same normals.")
@click.option("--image-score", type=SCORE_CHOICE, default="max", show_default=True,
              help="Threshold the max of each map or its mean (masks: always the max's quantile).")
@TRAINED_OPTION
@_fail_cleanly
def calibrate(run_dir, normals, quantile, device, tta, smooth, map_kind, image_score, trained):
    """Thresholds for 'predict' from good images alone (no defect photos needed)."""
    from .evaluate import calibrate_run
    saved = calibrate_run(run_dir, normals, quantile, device, tta=tta, smooth=smooth,
                          map_kind=map_kind, image_score=image_score, trained=trained)
    click.echo(f"threshold {saved['image']:.6f}: {saved['source']}; saved for 'predict'")


@main.command()
@click.argument("run_dir", type=click.Path())
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--threshold", type=FINITE, default=None,
              help="Decision threshold (default: the thresholds 'test' or 'calibrate' saved).")
@click.option("--device", default="auto", show_default=True)
@click.option("--tta/--no-tta", default=None,
              help="Flip-averaged maps (default: as 'test' did for the saved thresholds).")
@click.option("--smooth", type=click.FloatRange(min=0), default=None,
              help="Gaussian sigma on each map (default: as 'test' did for the saved thresholds).")
@click.option("--map", "map_kind", type=MAP_CHOICE, default=None,
              help="Which map (default: as 'test' did for the saved thresholds).")
@click.option("--image-score", type=SCORE_CHOICE, default=None,
              help="Decide on the max or the mean of each map (default: the saved thresholds' score).")
@click.option("--trained/--no-trained", default=None,
              help="An --ema run's trained weights or their moving average (default: as for the "
                   "saved thresholds).")
@click.option("--skip-bad", is_flag=True, help="Leave out unreadable images (listed) instead of stopping.")
@click.option("--resume", is_flag=True,
              help="Keep the rows an earlier predict with the same settings left in --out; "
                   "predict only the images they lack.")
@_fail_cleanly
def predict(run_dir, paths, out, threshold, device, tta, smooth, map_kind, image_score, trained,
            skip_bad, resume):
    """Scores, heatmaps and binary masks for images or folders."""
    from .evaluate import predict as run
    skipped = []

    def note(message):
        if message.startswith("skipped: "):
            skipped.append(message)
        click.echo(message, err=True)

    csv_path = run(run_dir, paths, out, threshold, device, tta=tta, smooth=smooth, map_kind=map_kind,
                   image_score=image_score, trained=trained, skip_bad=skip_bad, resume=resume,
                   log=note)
    n = len(skipped)
    click.echo(f"wrote {csv_path}" + (f" ({n} unreadable image{'s' * (n > 1)} left out)" if n else ""))


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="pt2: a torch.export program (torch.export.load); torchscript: traced, "
                   "for runtimes that still load it (PyTorch deprecates it).")
@click.option("--out", type=click.Path(), required=True)
@click.option("--map", "map_kind", type=MAP_CHOICE, default="head",
              show_default=True, help="combined: with the scales 'test --map combined' saved.")
@TRAINED_OPTION
@_fail_cleanly
def export(run_dir, fmt, out, map_kind, trained):
    """Export the anomaly-map model as ONNX, a torch.export program (.pt2) or TorchScript."""
    from .export import export_run
    click.echo(f"wrote {export_run(run_dir, fmt, out, map_kind=map_kind, trained=trained)}")


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="fractalad-demo", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@_fail_cleanly
def demo(out, steps, device, seed):
    """Build a texture defect set, generate shards, train, test, and write a report."""
    from .demo import run_demo
    report = run_demo(out, steps=steps, device=device, seed=seed)
    click.echo(json.dumps(report["metrics"]["all"], indent=1))
    click.echo(f"report: {report['report']}")


if __name__ == "__main__":
    main()
