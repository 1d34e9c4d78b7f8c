"""The whole pipeline on a real defect set: generate -> fit -> test, one final JSON line.

    python benchmarks/bench_mtd.py                      # paper schedule, default Lite0 teacher
    python benchmarks/bench_mtd.py --mask-source rectangle   # ablation: mask shape only
    python benchmarks/bench_mtd.py --no-kd                   # ablation: no distillation
    python benchmarks/bench_mtd.py --region 0-1 --cut-scale 0.03-0.5 \
        --content same=0.5,noise=0.25,fractal=0.25           # small defects anywhere (README)

Default data: ../shared/data/magnetic_tile/magnetic_tile (MVTec layout). The paper schedule is
100 epochs x 391 samples = 39,100 samples (1,222 steps of 32); ``--steps`` shortens it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "magnetic_tile",
                                             "magnetic_tile"))


def _range(text: str, cast=float) -> tuple:
    """'0.1-0.5' -> (0.1, 0.5); '2' -> (2, 2)."""
    try:
        values = [cast(v) for v in text.split("-")]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise ValueError(f"expected a number or a range like 0.1-0.5, got {text!r}")
    return values[0], values[-1]


def _rounded(metrics: dict) -> dict:
    return {t: {k: round(v, 4) for k, v in m.items()} for t, m in metrics.items()}


def _test(run: str, work: str, prefix: str, args, seconds: dict, trained: bool = False) -> tuple[dict, dict]:
    """Test the run: its report, plus {"metrics_tta": ...} under --tta, {"metrics_smooth": ...}
    under --smooth and {"metrics_combined": ...} under --combined, and each test's
    held_out_operating_point under --holdout; stages timed into ``seconds``. ``trained``: an
    --ema run's trained weights, not their average."""
    from fractalad.evaluate import test_run
    variants = [("", {})] + [("_tta", {"tta": True})] * args.tta \
        + [("_smooth", {"smooth": args.smooth})] * bool(args.smooth) \
        + [("_combined", {"map_kind": "combined"})] * args.combined
    reports = {}
    for suffix, options in variants:
        t = time.perf_counter()
        reports[suffix] = test_run(run, args.data, os.path.join(work, prefix + "test" + suffix),
                                   device=args.device, n_overlays=4,
                                   pixel_resolution=args.pixel_resolution, trained=trained, **options)
        seconds[prefix + "test" + suffix] = time.perf_counter() - t
    extra = {"metrics" + k: _rounded(r["metrics"]) for k, r in reports.items() if k}
    for k, r in reports.items():  # runs on shards made with --holdout: calibrate's threshold, judged
        op = r["held_out_operating_point"]
        if op:
            extra["held_out_operating_point" + k] = {
                "threshold": round(op["threshold"], 6), "n_normals": op["n_normals"],
                "flagged": {t: round(v, 4) for t, v in op["flagged"].items()}}
    return reports[""], extra


def _test_with_live(run: str, work: str, prefix: str, args, seconds: dict) -> tuple[dict, dict]:
    """(the run's report, {"metrics": ..., ...}); under --ema also {"live": the result of the
    same step's weights before averaging}, a paired comparison, tested first so that the
    thresholds the run keeps are its model's (the average's)."""
    live = _test(run, work, prefix + "live_", args, seconds, trained=True) if args.ema else None
    report, extra = _test(run, work, prefix, args, seconds)
    tested = {"metrics": _rounded(report["metrics"]), **extra}
    if live:
        tested["live"] = {"metrics": _rounded(live[0]["metrics"]), **live[1]}
    return report, tested


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--epochs", type=float, default=100.0)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--mask-source", default="fractal",
                    help="fractal, perlin, rectangle, or a mix such as fractal=0.5,rectangle=0.5")
    ap.add_argument("--placement", default="uniform")
    ap.add_argument("--cut-scale", default="0.1-0.5", help="anomaly size range, fraction of the side")
    ap.add_argument("--region", default="0.1-0.9", help="uniform placement band (0-1: anywhere)")
    ap.add_argument("--min-contrast", type=float, default=0.0,
                    help="redraw anomalies whose mean grey-level change is below this")
    ap.add_argument("--thin", type=float, default=0.0,
                    help="share of anomalies drawn as their shape's skeleton (lines)")
    ap.add_argument("--thin-width", default="1-3", help="width range of those lines, pixels")
    ap.add_argument("--dilate", type=int, default=3, help="3x3 dilations of each mask label")
    ap.add_argument("--content", default="same", help="anomaly content mix, e.g. same=0.5,noise=0.5")
    ap.add_argument("--kd", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--head-width", type=int, default=None,
                    help="head channels (default: the smallest stage width, as in the method)")
    ap.add_argument("--clean-share", type=float, default=0.0,
                    help="share of training samples shown without their anomaly")
    ap.add_argument("--flips", action="store_true",
                    help="train on randomly flipped samples (horizontal and vertical)")
    ap.add_argument("--zoom", type=float, default=1.0,
                    help="train on samples magnified by a random factor in [1, ZOOM] (fit --zoom)")
    ap.add_argument("--input-blur", type=float, default=0.0,
                    help="Gaussian sigma on every input, in training and inference (fit --input-blur)")
    ap.add_argument("--decay-steps", type=int, default=0,
                    help="lower the learning rate linearly to 0 over the last N steps")
    ap.add_argument("--ema", type=float, default=0.0,
                    help="save a moving average of the weights (fit --ema); also tests the trained "
                         "weights of the same step (under 'live')")
    ap.add_argument("--cooldown-steps", type=int, default=0,
                    help="after the test, resume the run for N more steps with the learning rate "
                         "falling to 0 and test again (a paired result under 'cooldown')")
    ap.add_argument("--pixel-resolution", default="model", choices=["model", "original"],
                    help="score pixels at the model's size or each image's own")
    ap.add_argument("--smooth", type=float, default=0.0,
                    help="also test with maps smoothed by this Gaussian sigma (metrics_smooth)")
    ap.add_argument("--combined", action="store_true",
                    help="also test with the combined head + student-teacher map (metrics_combined)")
    ap.add_argument("--tta", action="store_true",
                    help="also test with flip-averaged maps (metrics_tta)")
    ap.add_argument("--cuda-graph", action="store_true", help="capture the training step (fit --cuda-graph)")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="fit --precision: auto (bf16 autocast on CUDA, float32 on the CPU), bf16 "
                         "(also on CPUs with AVX512-BF16 or AMX), fp32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--holdout", type=float, default=0.0,
                    help="fraction of train/good kept out of the shards (calibrates --combined)")
    ap.add_argument("--pieces", default="off",
                    help="cut tiles into pieces of this width / height before resizing ('auto': "
                         "the normals' median), in training and test (generate --pieces)")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    if args.cooldown_steps and args.decay_steps:
        ap.error("--cooldown-steps adds its own decay after the run; drop --decay-steps")

    import torch

    from fractalsynth.anomaly import AnomalyConfig, parse_mix
    from fractalsynth.generate import check_pieces, generate
    from fractalad.choices import PRECISIONS
    from fractalad.train import FitConfig, fit

    try:  # bad synthesis options fail here, before any work, as one line
        synth = AnomalyConfig(size=args.size, mask_source=args.mask_source,
                              placement=args.placement, cut_scale=_range(args.cut_scale),
                              region=_range(args.region), content=parse_mix(args.content, "content"),
                              min_contrast=args.min_contrast, thin=args.thin,
                              thin_width=_range(args.thin_width, int), dilate_iterations=args.dilate)
        check_pieces(args.pieces)
    except ValueError as e:
        ap.error(str(e))
    work = args.out or tempfile.mkdtemp(prefix="bench_mtd_")
    cfg = FitConfig(backbone=args.backbone, weights=args.weights, kd=args.kd,
                    head_width=args.head_width, clean_share=args.clean_share, flips=args.flips,
                    zoom=args.zoom, input_blur=args.input_blur, decay_steps=args.decay_steps,
                    ema=args.ema, epochs=args.epochs, steps=args.steps,
                    batch_size=args.batch_size, seed=args.seed,
                    device=args.device, workers=args.workers, cuda_graph=args.cuda_graph,
                    **PRECISIONS[args.precision])
    # every training sample is a fresh one, the cool-down's too
    n = (cfg.total_steps() + args.cooldown_steps) * args.batch_size
    seconds = {}
    t = time.perf_counter()
    shards = os.path.join(work, "shards")
    generate(os.path.join(args.data, "train", "good"), shards, n, synth, seed=args.seed,
             shard_size=min(n, 10000), workers=os.cpu_count() or 1, log=lambda m: None,
             holdout=args.holdout, pieces=args.pieces)
    seconds["generate"] = time.perf_counter() - t
    t = time.perf_counter()
    run = os.path.join(work, "run")
    summary = fit(shards, run, cfg, progress=False)
    seconds["fit"] = time.perf_counter() - t
    report, tested = _test_with_live(run, work, "", args, seconds)
    cooldown = None
    if args.cooldown_steps:
        # the steps taken keep their constant rate, so this equals one run with --decay-steps N
        total = cfg.total_steps() + args.cooldown_steps
        t = time.perf_counter()
        fit(shards, run, dataclasses.replace(cfg, steps=total, decay_steps=args.cooldown_steps),
            resume=True, progress=False)
        seconds["cooldown_fit"] = time.perf_counter() - t
        cooldown = {"steps": total, "decay_steps": args.cooldown_steps,
                    **_test_with_live(run, work, "cooldown_", args, seconds)[1]}
    dev = report["device"]
    if dev.startswith("cuda"):
        dev = torch.cuda.get_device_name(0)
    result = {
        "data": os.path.basename(os.path.normpath(args.data)), "device": dev,
        "backbone": args.backbone, "kd": args.kd, "head_width": args.head_width,
        "clean_share": args.clean_share, "flips": args.flips, "zoom": args.zoom,
        "input_blur": args.input_blur, "decay_steps": args.decay_steps, "ema": args.ema,
        "cuda_graph": args.cuda_graph,
        "mask_source": args.mask_source,
        "cut_scale": args.cut_scale, "region": args.region, "content": args.content,
        "min_contrast": args.min_contrast, "thin": args.thin, "thin_width": args.thin_width,
        "dilate": args.dilate, "pixel_resolution": args.pixel_resolution, "smooth": args.smooth,
        "seed": args.seed, "holdout": args.holdout, "pieces": args.pieces,
        "size": args.size, "steps": summary["steps"], "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "autocast": summary["autocast"],
        "train_samples_per_s": round(summary["samples_per_s"], 1),
        "test_images_per_s": round(report["images_per_s"], 1),
        "stage_seconds": {k: round(v, 1) for k, v in seconds.items()},
        **tested,
    }
    if cooldown:
        result["cooldown"] = cooldown
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
