#!/usr/bin/env bash
# Every GPU check in one run (device tool): fit throughput (eager and compiled), then the
# Magnetic Tile pipeline with the small-defects options and their ablations (the paper-default
# rows are in docs/results/h100_mtd_*.json). Needs .gpu/lite0.pth and .gpu/magnetic_tile (carried, git-ignored).
# Results: one JSON line per check on stdout and in $OUT/*.json. LIMIT (s) caps each check:
# at the paper schedule a Lite0 distillation run takes ~110 s on an H100, so keep LIMIT >= 200.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/numba
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
DEV=${DEV:-cuda}; W=${W:-4}; SIZE=${SIZE:-256}
MTD_STEPS=${MTD_STEPS:-}   # empty: the paper schedule
FIT_STEPS=${FIT_STEPS:-150}
extra=(); [ -n "$MTD_STEPS" ] && extra=(--steps "$MTD_STEPS")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
run() { name=$1; shift; echo "== $name"; timeout "${LIMIT:-240}" "$@" 2>"$OUT/$name.err" | tail -n 1 | tee "$OUT/$name.json"; tail -n 3 "$OUT/$name.err"; }
run fit_resnet18 python3 benchmarks/bench_fit.py --backbone resnet18 --batch-size 32 --size "$SIZE" --device "$DEV" --steps "$FIT_STEPS" --workers "$W" --normals .gpu/magnetic_tile/train/good
run fit_resnet18_compile python3 benchmarks/bench_fit.py --backbone resnet18 --batch-size 32 --size "$SIZE" --device "$DEV" --steps "$FIT_STEPS" --workers "$W" --normals .gpu/magnetic_tile/train/good --compile
run fit_lite0 python3 benchmarks/bench_fit.py --backbone efficientnet_lite0 --batch-size 32 --size "$SIZE" --device "$DEV" --steps "$FIT_STEPS" --workers "$W" --normals .gpu/magnetic_tile/train/good
mtd=(python3 benchmarks/bench_mtd.py --data .gpu/magnetic_tile --weights .gpu/lite0.pth --device "$DEV" --workers "$W" --size "$SIZE" "${extra[@]}")
# the small-defects options of the README's 128 px CPU table, at 256 px on the paper schedule
small=(--region 0-1 --content same=0.5,noise=0.25,fractal=0.25 --cut-scale 0.03-0.5)
run mtd_small_fractal_kd "${mtd[@]}" "${small[@]}"
run mtd_small_rectangle_kd "${mtd[@]}" "${small[@]}" --mask-source rectangle
run mtd_small_fractal_nokd "${mtd[@]}" "${small[@]}" --no-kd
run mtd_small_fractal_kd_s1 "${mtd[@]}" "${small[@]}" --seed 1
echo "== done"
