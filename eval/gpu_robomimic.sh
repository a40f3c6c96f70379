#!/usr/bin/env bash
# One short GPU session: robomimic Can at a GPU budget (iSD-1 beside DDPM-100) and the action
# server with its policy on the GPU.
#
#   bash eval/gpu_robomimic.sh OUT_DIR [PYTHON] [TOTAL_SECONDS]
#
# Needs the Can buffer DATA (default data/robomimic_can.zarr: `cm-policy data generate robomimic
# task=can n=200 seed=0`; the CPU's best so far is clean + recovery demos, DATA=
# data/robomimic_can_mix.zarr, see eval/results/robomimic.md) and a PYTHON with CUDA torch that
# imports this package and robosuite. Within TOTAL_SECONDS (default
# 560), in this order:
#   1. smoke: eval/plans/smoke.yaml on Can with training, evaluation and sampling on the GPU
#      (~30 s); a failure stops the script at once, so a fixed rerun costs little;
#   2. eval/bench_server.py --device cuda -> OUT_DIR/server_gpu.md;
#   3. the campaign eval/plans/compare_robomimic_gpu.yaml (iSD and DDPM on Can) with
#      --fit-seconds set to the time left minus EVAL_RESERVE (default 180 s) for the evaluation:
#      the steps are planned from step costs measured first
#      -> OUT_DIR/compare_robomimic_can_lowdim_gpu.md.
# OUT_DIR/gpu_robomimic.tar.gz holds every report, PNG, metrics file and log (no weights).
set -uo pipefail
OUT=${1:?usage: bash eval/gpu_robomimic.sh OUT_DIR [PYTHON] [TOTAL_SECONDS]}
PY=${2:-python3}
TOTAL=${3:-560}
EVAL_RESERVE=${EVAL_RESERVE:-180}
DEVICE=${DEVICE:-cuda}  # cpu: a dry run of the script without a GPU
SERVER=${SERVER:-1}     # 0: skip the server benchmark
SMOKE_METHODS=${SMOKE_METHODS:-isd,ddpm}
MARGIN=${MARGIN:-40}
WORK=${WORK:-/tmp/gpu_robomimic}
mkdir -p "$OUT" "$WORK/logs" "$WORK/results"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
START=$SECONDS
DATA=${DATA:-data/robomimic_can.zarr}

finish() {
  cp "$WORK"/results/*.md "$OUT"/ 2>/dev/null
  tar -czf "$OUT/gpu_robomimic.tar.gz" -C "$WORK" --exclude='*.safetensors' . 2>/dev/null
  # The final EMA weights of each run, so the evaluation can be redone elsewhere if it did not
  # finish here (3 parts: with the reports, the tar and the logs, 8 files come back at most).
  MAX_PARTS=3 pack_weights "$WORK" "$OUT" "$WORK"/can/isd_s* "$WORK"/can/ddpm_s*
  echo "stages:"
  cat "$OUT/stages.txt"
}
trap finish EXIT

STAGE_LOGS=$WORK/logs STAGE_SUMMARY=$OUT/stages.txt
source eval/stage.sh

check_device "$PY" "$DATA" "$OUT"

stage smoke 150 "$PY" -m cm_policy.cli campaign eval/plans/smoke.yaml --jobs 1 \
  --set task=robomimic_can_lowdim --set dataset="$DATA" --device "$DEVICE" \
  --runs "$SMOKE_METHODS" --root "$WORK/smoke" --results "$WORK/smoke_results" || exit 1

if [ "$SERVER" = 1 ]; then
  stage server 120 "$PY" eval/bench_server.py --device "$DEVICE" --threads 2 \
    --clients 1,4,16,64 --duration 2 --requests 300 --pace-ms 20 \
    --out "$WORK/results/server_gpu.md"
fi

left=$((TOTAL - (SECONDS - START)))
train_s=$((left - EVAL_RESERVE - MARGIN))
[ $train_s -ge 60 ] || { echo "only ${left} s left: no time to train"; exit 1; }
stage can $((left - 15)) "$PY" -m cm_policy.cli campaign eval/plans/compare_robomimic_gpu.yaml \
  --jobs 1 --threads 4 --set dataset="$DATA" --set 'runs.isd.samplers=["1"]' \
  --device "$DEVICE" --fit-seconds "$train_s" --root "$WORK/can" --results "$WORK/results"
