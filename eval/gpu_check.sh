#!/usr/bin/env bash
# GPU check: benchmark, train briefly, evaluate, in under 8 minutes on one GPU.
#
#   bash eval/gpu_check.sh OUT_DIR [PYTHON]
#
# PYTHON (default: python3) must have a CUDA build of torch and this package installed
# (pip install -e .). Every stage writes into OUT_DIR; commit the figures to eval/results/ with
# the card named (OUT_DIR/nvidia-smi.txt says which). Stages have their own time limits, so one
# that hangs cannot eat the others' time; a failed stage is reported and the next one runs.
set -uo pipefail
OUT=${1:?usage: bash eval/gpu_check.sh OUT_DIR [PYTHON]}
PY=${2:-python3}
DATA=${CM_POLICY_PUSHT_DATASET:-$(dirname "$0")/../../shared/data/pusht/pusht_cchi_v7_replay.zarr}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export SDL_VIDEODRIVER=dummy
status=0
STAGE_LOGS=$OUT STAGE_SUMMARY=$OUT/stages.txt
source eval/stage.sh

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" >"$OUT/nvidia-smi.txt"
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" \
  >"$OUT/torch.txt" 2>&1 || { cat "$OUT/torch.txt"; echo "CUDA torch not usable"; exit 1; }

# 1. Latency, training throughput and data pipeline at Diffusion Policy's network size (fp32),
#    then the same with bf16 autocast and torch.compile.
stage bench_fp32 120 "$PY" eval/bench.py --device cuda --model unet_dp --threads 8 \
  --dataset "$DATA" --skip-memory --out "$OUT/bench_gpu.md" || status=1
stage bench_amp_compile 200 "$PY" eval/bench.py --device cuda --model unet_dp --threads 8 \
  --dataset "$DATA" --skip-memory --amp --compile --out "$OUT/bench_gpu_amp_compile.md" || status=1
# 2. A short iSD training run of the DP-size keypoint policy, then 100 test episodes at 1 step.
stage train 150 "$PY" -m cm_policy.cli train task=pusht_keypoints model=unet_dp \
  task.dataset_path="$DATA" training.steps=1500 training.batch_size=256 training.lr=1e-4 \
  training.warmup_steps=100 training.checkpoint_every=1500 training.num_threads=8 \
  training.eval_every=null output_dir="$OUT/train_keypoints_dp" || status=1
stage eval 90 "$PY" -m cm_policy.cli eval checkpoint="$OUT/train_keypoints_dp" steps=1 \
  n_episodes=100 n_envs=16 n_videos=2 output_dir="$OUT/eval_keypoints_dp_steps1" || status=1
echo "stages:"; cat "$OUT/stages.txt"
exit $status
