#!/usr/bin/env bash
# Every GPU check in one run (device tool): the CUDA-graph tests, the Lite0 distillation step's
# speed under other settings and where its time goes, the Magnetic Tile pipeline with the
# small-defects options on twice the paper schedule plus a cool-down, fractal against rectangle
# masks (earlier results: docs/results/h100_*.json).
# Needs .gpu/lite0.pth and .gpu/magnetic_tile (carried, git-ignored).
# Results: one JSON line per check on stdout and in $OUT/*.json. BUDGET (s, default 540) caps
# the whole script: a check starts only with >= 60 s left and gets at most LIMIT (s) or what
# is left. A Lite0 distillation run on the paper schedule takes ~110 s on an H100 eager
# (fit 83 s, test 19 s); with --cuda-graph (~1,200 samples/s) twice the schedule plus a
# cool-down of a quarter should take about 3 min.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/numba
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
DEV=${DEV:-cuda}; W=${W:-4}; SIZE=${SIZE:-256}; BUDGET=${BUDGET:-540}; LIMIT=${LIMIT:-200}
MTD_STEPS=${MTD_STEPS:-}   # empty: the paper schedule
FIT_STEPS=${FIT_STEPS:-150}
extra=(); [ -n "$MTD_STEPS" ] && extra=(--steps "$MTD_STEPS")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
run() {
  name=$1; shift; left=$((BUDGET - SECONDS))
  if [ "$left" -lt 60 ]; then echo "== $name skipped ($left s of BUDGET left)"; return; fi
  echo "== $name"
  # only the JSON lines go to $OUT: the device tool brings back a handful of files at most
  timeout $((left < LIMIT ? left : LIMIT)) "$@" 2>"/tmp/$name.err" | tail -n 1 | tee "$OUT/$name.json"
  tail -n 3 "/tmp/$name.err"
}
run tests_cuda python3 -m pytest -q -p no:cacheprovider tests/test_fractalad_train.py -k "cuda_graph or rebuild" --tb=short
fit=(python3 benchmarks/bench_fit.py --batch-size 32 --size "$SIZE" --device "$DEV" --steps "$FIT_STEPS" --workers "$W" --normals .gpu/magnetic_tile/train/good)
lite=("${fit[@]}" --backbone efficientnet_lite0)
# session 5: ResNet-18 + graph 1,905 samples/s (ratio 0.98), Lite0 + distillation + graph 1,216;
# which setting speeds up the Lite0 distillation step, and which kernels take its time?
LIMIT=60 run fit_lite0_graph_fp32 "${lite[@]}" --cuda-graph --fp32
LIMIT=60 run fit_lite0_graph_nchw "${lite[@]}" --cuda-graph --no-channels-last
LIMIT=60 run fit_lite0_profile "${lite[@]}" --steps 30 --profile "$OUT/lite0_profile.txt"
# CPU, 128 px, distillation, two seeds: twice the schedule lifted image_AUROC 0.854 -> 0.911,
# a cool-down of a quarter more steps to 0.933 (fractal) / 0.926 (rectangle); rectangles kept
# the lead on pixel_AUROC and AUPRO. The same paired comparison at 256 px, seed 0, the step
# captured (the decay now works inside the graph; eager again if that run fails)
mtd=(python3 benchmarks/bench_mtd.py --data .gpu/magnetic_tile --weights .gpu/lite0.pth --device "$DEV" --workers "$W" --size "$SIZE" "${extra[@]}")
small=(--region 0-1 --content same=0.5,noise=0.25,fractal=0.25 --cut-scale 0.03-0.5)
long=(--epochs 200 --cooldown-steps 611)
LIMIT=250 run mtd_small_fractal_kd_e200 "${mtd[@]}" "${small[@]}" "${long[@]}" --cuda-graph
graph=(--cuda-graph); grep -q Traceback /tmp/mtd_small_fractal_kd_e200.err && graph=()  # a failure, not a timeout
LIMIT=250 run mtd_small_rectangle_kd_e200 "${mtd[@]}" "${small[@]}" "${long[@]}" --mask-source rectangle "${graph[@]}"
run fit_lite0_compile "${lite[@]}" --compile
echo "== done in $SECONDS s"
