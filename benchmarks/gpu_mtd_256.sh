#!/usr/bin/env bash
# The Magnetic Tile runs the open issue (targets at 256 px) needs, side by side on one GPU (device
# tool, one call): the CPU's best recipe (tiles cut into pieces, small defects anywhere, batch 32,
# 2,444 steps, distillation, combined map) at 256 px -- fractal masks and area-matched rectangles
# (the mask ablation), both in bf16 as the earlier GPU runs -- and, in a third lane, the same
# recipe at 128 px in float32 (the control against the CPU's 128 px runs), then the 256 px fractal
# run in float32 with what is left of TOTAL seconds. Running them at once overlaps one run's CPU
# stages (generation, Numba compilation, test) with another's training. SEED picks the seed (all
# lanes), SKIP="NAME_sSEED ..." leaves runs out.
# Session 36 (H200): seed 0, all four lanes, 364 s; seed 1 without the float32 run, 223 s
# (docs/results/h200_mtd_256px_pieces.jsonl; notebook "Pieces at 256 px on an H200"). Next:
# SEED=2 and 3 (fresh 256 px models for the two-size mean of the notebook), and the 128 px
# float32 seed-1 run again, which failed there with no log (SEED=1 SKIP="fractal_256_bf16_s1
# rectangle_256_bf16_s1 fractal_256_fp32_s1").
# The bf16 256 px runs' folders (model.pt, config, thresholds) come back as tars in two parts
# (the tool returns 8 files of 16 MiB at most, 64 MiB in all: two such runs per call) so their
# maps can be studied and averaged on the CPU afterwards: cat NAME.tar.part_* | tar x.
# Every run's training log (metrics.csv) and stderr come back in $OUT/logs.tar.
# Needs .gpu/lite0.pth and .gpu/magnetic_tile (carried; benchmarks/prepare_gpu.sh builds both).
# Results: one JSON line per run in $OUT/results.jsonl (and on stdout).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
DEV=${DEV:-cuda}; W=${W:-3}; STEPS=${STEPS:-2444}; DATA=${DATA:-.gpu/magnetic_tile}
LIMIT=${LIMIT:-480}; TOTAL=${TOTAL:-540}  # seconds: one run at most; the whole script
WORK=${WORK:-/tmp/mtd256}; mkdir -p "$WORK/logs"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
recipe=(python3 benchmarks/bench_mtd.py --data "$DATA" --weights .gpu/lite0.pth --device "$DEV"
        --workers "$W" --steps "$STEPS" --batch-size 32 --kd --region 0-1
        --content same=0.5,noise=0.25,fractal=0.25 --pieces auto --combined --seed "${SEED:-0}")
[ "$DEV" = cuda ] && recipe+=(--cuda-graph)
job() {  # name, keep (1: bring the run folder back), then bench_mtd's own flags
  name=$1_s${SEED:-0}; keep=$2; shift 2
  left=$((TOTAL - SECONDS)); limit=$((left < LIMIT ? left : LIMIT))
  case " ${SKIP:-} " in *" $name "*) echo "== $name skipped (SKIP)"; return;; esac
  if [ "$limit" -lt 60 ]; then echo "== $name skipped ($left s of TOTAL left)"; return; fi
  NUMBA_CACHE_DIR=/tmp/numba_$name timeout "$limit" "${recipe[@]}" --out "$WORK/$name" "$@" \
    2>"$WORK/logs/$name.err" | tail -n 1 | tee -a "$OUT/results.jsonl"
  echo "== $name rc=${PIPESTATUS[0]} at $SECONDS s"
  log="$WORK/$name/run/metrics.csv"; [ -f "$log" ] && cp "$log" "$WORK/logs/$name.metrics.csv"
  if [ "$keep" = 1 ] && [ -f "$WORK/$name/run/model.pt" ]; then
    tar -C "$WORK/$name" -cf - run/model.pt run/config.json run/thresholds.json run/metrics.csv \
      | split -b 15m - "$OUT/$name.tar.part_"
  fi
}
job fractal_256_bf16 1 --size 256 --cut-scale 0.03-0.5 --precision bf16 &
job rectangle_256_bf16 1 --size 256 --mask-source rectangle --cut-scale 0.03-0.38 --precision bf16 &
{ job fractal_128_fp32 0 --size 128 --cut-scale 0.03-0.5 --precision fp32
  job fractal_256_fp32 0 --size 256 --cut-scale 0.03-0.5 --precision fp32; } &
wait
tar -C "$WORK" -cf "$OUT/logs.tar" logs
echo "== done in $SECONDS s"
