"""Every benchmark runs end to end at a tiny size and ends with its one JSON line.

Timings are not checked (tests check correctness only); this keeps the scripts, and the flags
``benchmarks/gpu_checks.sh`` passes them, from rotting between the rare GPU sessions.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from tiny_data import make_mvtec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _bench(script, *args):
    """Run ``benchmarks/script`` and return its final stdout line, parsed."""
    res = subprocess.run([sys.executable, os.path.join(BENCH, script), *map(str, args)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_mvtec(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "data"
    make_mvtec(root, n=4, size=40)
    return root


def test_mask_and_synthesis_benchmarks(tiny_mvtec):
    ifs = _bench("bench_ifs.py", "--n", 32, "--repeats", 1, "--size", 32, "--coverage-n", 8)
    assert ifs["masks_per_s"] > 0 and ifs["baseline_masks_per_s"] > 0 and "speedup_per_core" in ifs
    synth = _bench("bench_synth.py", "--n", 4, "--normals", tiny_mvtec / "train" / "good",
                   "--repeats", 1)
    assert synth["from_900"]["speedup_per_core"] > 0 and synth["from_256"]["speedup_per_core"] > 0
    gen = _bench("bench_generate.py", "--n", 16, "--size", 32, "--normals",
                 tiny_mvtec / "train" / "good", "--workers", 2)
    assert gen["n"] == 16 and gen["workers"] == 2 and gen["bytes_per_sample"] > 0


def test_loader_and_fit_benchmarks(tiny_mvtec, tmp_path):
    normals = tiny_mvtec / "train" / "good"
    loader = _bench("bench_loader.py", "--normals", normals, "--samples", 16, "--size", 32,
                    "--batch-size", 4, "--device", "cpu", "--rounds", 1)
    assert loader["bytes_ratio"] > 1 and loader["ours"]["tensors_per_batch"] == 1
    profile = tmp_path / "profile.txt"
    fit = _bench("bench_fit.py", "--backbone", "efficientnet_lite0", "--batch-size", 2, "--size", 32,
                 "--device", "cpu", "--steps", 2, "--warmup", 1, "--workers", 0, "--normals",
                 normals, "--profile", profile)
    # the keys, and the settings that make two figures comparable
    for key in ("device", "backbone", "shard_samples_per_s", "resident_samples_per_s", "ratio",
                "batch_size", "size", "kd", "bf16", "compile", "cuda_graph"):
        assert key in fit, key
    assert fit["backbone"] == "efficientnet_lite0" and fit["shard_samples_per_s"] > 0
    assert "convolution" in profile.read_text()
    precision = _bench("bench_precision.py", "--size", 32, "--batch-size", 2, "--steps", 1,
                       "--rounds", 1, "--batches", 2, "--device", "cpu", "--normals", normals)
    assert precision["bf16_autocast"] == precision["native_bf16"] and fit["bf16"] is False  # CPU: auto
    assert precision["float32_samples_per_s"] > 0 and precision["bf16_samples_per_s"] > 0
    assert 0 < precision["float32_last_round_loss"] < 100 and 0 < precision["bf16_last_round_loss"] < 100
    heap = _bench("bench_cpu_heap.py", "--size", 32, "--batch-size", 2, "--steps", 1, "--rounds", 1,
                  "--batches", 2, "--normals", normals)
    assert heap["default_samples_per_s"] > 0 and heap["held_samples_per_s"] > 0
    assert heap["default_last_loss"] == heap["held_last_loss"]  # same steps, same numbers
    heap = _bench("bench_cpu_heap.py", "--stage", "maps", "--size", 32, "--batch-size", 2, "--steps", 1,
                  "--rounds", 1, "--normals", normals)
    assert heap["stage"] == "maps" and heap["held_samples_per_s"] > 0
    assert heap["default_map_sum"] == heap["held_map_sum"] > 0  # same model, same maps
    layout = _bench("bench_layout.py", "--size", 32, "--batch-size", 2, "--steps", 1, "--rounds", 1)
    assert set(layout["train_samples_per_s"]) == {"nchw", "channels_last"} and layout["train_speedup"] > 0
    assert layout["map_max_abs_diff"] < 1e-4  # one model, two layouts: the same maps
    fold = _bench("bench_fold.py", "--size", 32, "--batch-size", 2, "--images", 4, "--rounds", 1,
                  "--map", "combined", "--normals", normals)
    assert set(fold["images_per_s"]) == {"batchnorm", "folded"} and fold["speedup"] > 0
    assert fold["map_max_abs_diff"] < 1e-4  # the same maps, batch norms folded or not


def test_startup_benchmark():
    out = _bench("bench_startup.py", "--rounds", 1)
    assert set(out["median_seconds"]) == {"fractalad_help", "fractalsynth_help", "baseline_eager_imports"}
    assert all(v > 0 for v in out["median_seconds"].values()) and out["fractalad_speedup"] > 0


def test_metrics_benchmark():
    out = _bench("bench_metrics.py", "--images", 6, "--size", 40, "--repeats", 1)
    # ours and the one-sort baseline agree; the figures are there
    assert out["max_metric_difference"] < 1e-9 and 0 < out["metrics"]["pixel_AUROC"] <= 1
    assert out["peak_bytes_per_pixel"] > 0 and out["baseline_peak_bytes_per_pixel"] > 0


@pytest.mark.parametrize("args", [
    ["--cooldown-steps", 2, "--combined", "--ema", 0.9, "--tta", "--smooth", 1],
    ["--mask-source", "rectangle", "--no-kd"],  # the two ablations
])
def test_the_whole_pipeline_benchmark(tiny_mvtec, args):
    out = _bench("bench_mtd.py", "--data", tiny_mvtec, "--size", 32, "--steps", 4, "--batch-size", 4,
                 "--device", "cpu", "--workers", 0, *args)
    names = {"image_AUROC", "image_F1Max", "image_AUROC_mean", "pixel_AUROC", "pixel_F1Max", "AUPRO"}
    assert names <= set(out["metrics"]["all"]) and "spot" in out["metrics"]
    assert out["device"] == "cpu" and out["steps"] == 4
    assert {"generate", "fit", "test"} <= set(out["stage_seconds"])
    if "--combined" in args:
        assert {"cooldown_fit", "cooldown_test_combined", "test_tta", "test_smooth"} <= set(out["stage_seconds"])
    else:
        assert out["mask_source"] == "rectangle" and out["kd"] is False


def test_the_map_mean_benchmark(tiny_mvtec, tmp_path):
    from fractalsynth.anomaly import AnomalyConfig
    from fractalsynth.generate import generate
    from fractalad.train import FitConfig, fit
    generate(str(tiny_mvtec / "train" / "good"), str(tmp_path / "shards"), 8, AnomalyConfig(size=32),
             shard_size=8)
    run = tmp_path / "run"
    fit(str(tmp_path / "shards"), str(run), FitConfig(steps=2, batch_size=4, workers=0, device="cpu"),
        progress=False)
    out = _bench("bench_map_mean.py", run, run, "--data", tiny_mvtec, "--device", "cpu", "--map", "head")
    assert out["grid"] == 32 and out["map"] == "head" and len(out["members"]) == 2
    # a run averaged with itself is that run: the same figures, no gain over its best member
    assert out["metrics"] == out["members"][0]["metrics"] == out["members"][1]["metrics"]
    assert set(out["mean_minus_best_member"].values()) == {0.0}
    missing = subprocess.run([sys.executable, os.path.join(BENCH, "bench_map_mean.py"),
                              str(tmp_path / "nowhere"), "--data", str(tiny_mvtec)],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert missing.returncode == 2 and "nowhere" in missing.stderr.strip().splitlines()[-1]


def _help_flags(script):
    res = subprocess.run([sys.executable, os.path.join(BENCH, script), "--help"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return set(re.findall(r"(--[a-z0-9-]+)", res.stdout))


@pytest.mark.parametrize("script", ["gpu_checks.sh", "gpu_mtd_256.sh"])
def test_gpu_scripts_pass_only_flags_the_benchmarks_take(script):
    path = os.path.join(BENCH, script)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    known = set()
    for name in ("bench_fit.py", "bench_mtd.py"):
        known |= _help_flags(name)
    known |= {"--query-gpu", "--format", "--tb"}  # nvidia-smi's and pytest's
    code = "\n".join(line.split("#")[0] for line in open(path).read().splitlines())  # comments aside
    used = set(re.findall(r"(?<![\w-])(--[a-z0-9-]+)", code))
    assert used and used <= known, used - known
