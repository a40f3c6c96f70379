#!/usr/bin/env bash
# Image PushT on one GPU within one device allowance (issue 19's GPU path): iSD with Diffusion
# Policy's network size (U-Net 256/512/1024 + a GroupNorm ResNet-18 per camera), bf16 autocast
# with the JVP derivative (the finite difference is below bf16 resolution), the longest training
# the time allows, then 500 test episodes at 1 and at 2 network steps, the envs on the machine's
# CPU cores and the policy on the GPU.
#
#   bash eval/gpu_image.sh OUT_DIR [PYTHON] [TOTAL_SECONDS]
#
# Stages, each under its own time limit (eval/stage.sh): check (nvidia-smi, imports, data) ->
# probe (PROBE_STEPS eager steps: the step cost) -> probe_compiled (with COMPILE=auto: the same
# steps under torch.compile, its compile time and step cost) -> train (eager or compiled, whichever
# fits more steps in the time left minus EVAL_RESERVE and MARGIN, the compile time paid again
# inside it) -> eval at 1 step -> eval at 2 steps.
# OUT_DIR gets at most 8 files: stages.txt, nvidia-smi.txt, summary.md (the figures, with the
# budget and the card), logs.tar.gz (logs, train_log.jsonl, config, metrics and episodes of both
# evaluations), and up to 3 parts of the final EMA weights (eval/stage.sh pack_weights).
#
# On a device machine: `bash eval/gpu_prepare.sh .venv/bin/python image` here first, and carry
# .gpu/whl and .gpu/pusht_image.zarr (the package's wheels and the data; stage.sh's use_wheels).
#
# Knobs (environment): DATA (the human PushT zarr with images), MODEL (unet_dp), BATCH (128),
# LR (1e-4), COMPILE (auto | true | false), EPISODES (500), N_ENVS (32), EVAL_RESERVE (240 s),
# MARGIN (45 s), THREADS (8), DEVICE (cuda; cpu with MODEL=unet_tiny EPISODES=4
# TOTAL_SECONDS=400 THREADS=1 is a dry run on a laptop).
set -uo pipefail
OUT=${1:?usage: bash eval/gpu_image.sh OUT_DIR [PYTHON] [TOTAL_SECONDS]}
PY=${2:-python3}
TOTAL=${3:-720}
DATA=${DATA:-}
MODEL=${MODEL:-unet_dp}
BATCH=${BATCH:-128}
LR=${LR:-1e-4}
COMPILE=${COMPILE:-auto}
THREADS=${THREADS:-8}
EPISODES=${EPISODES:-500}
N_ENVS=${N_ENVS:-32}
EVAL_RESERVE=${EVAL_RESERVE:-240}
MARGIN=${MARGIN:-45}
PROBE_STEPS=${PROBE_STEPS:-30}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/gpu_image}
rm -rf "$WORK"/probe* "$WORK/run" "$WORK"/eval_steps*  # a rerun on a warm machine starts afresh
mkdir -p "$OUT" "$WORK/logs"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 SDL_VIDEODRIVER=dummy
START=$SECONDS
STAGE_LOGS=$WORK/logs STAGE_SUMMARY=$OUT/stages.txt
source eval/stage.sh
use_wheels "$PY"
# The data: the copy eval/gpu_prepare.sh made (carried in .gpu/), else ../shared beside the checkout.
[ -z "$DATA" ] && [ -d .gpu/pusht_image.zarr ] && DATA=$PWD/.gpu/pusht_image.zarr
[ -z "$DATA" ] && DATA=$(cd .. && pwd)/shared/data/pusht/pusht_cchi_v7_replay.zarr
VIDEOS=0
"$PY" -c "import av" 2>/dev/null && VIDEOS=2  # PyAV is carried only with EXTRA=video

AMP=true
[ "$DEVICE" = cpu ] && AMP=false  # bf16 autocast is for the GPU
COMMON=(task=pusht_image "task.dataset_path=$DATA" "model=$MODEL" method=isd
  method.derivative=jvp "training.amp=$AMP"
  "training.batch_size=$BATCH" "training.lr=$LR" "training.device=$DEVICE"
  "training.num_threads=$THREADS" training.log_every=10 eval.progress=false
  training.eval_every=null)  # the eval stages below evaluate, with their own settings

finish() {
  "$PY" - "$WORK" "$OUT" "$MODEL" "$BATCH" "$LR" "$COMPILE" "$AMP" <<'EOF' || true
import json, sys
from pathlib import Path
from cm_policy.evaluation.machine import describe_machine
work, out, model, batch, lr, compile_, amp = sys.argv[1:]
work = Path(work)
log = [json.loads(x) for x in (work / "run" / "train_log.jsonl").read_text().splitlines()] \
    if (work / "run" / "train_log.jsonl").exists() else []
lines = ["# Image PushT on one GPU: iSD, one device allowance", "",
         f"Machine: {describe_machine()}.", "",
         f"Command: `bash eval/gpu_image.sh OUT` (model {model}, batch {batch}, lr {lr}, "
         f"compile {compile_}, bf16 autocast {amp}, JVP derivative; the human PushT data).", ""]
if log:
    last = log[-1]
    lines.append(f"Training: {last['step']} steps in {last['wall_s'] / 60:.1f} min "
                 f"({last['step'] * int(batch) / last['wall_s']:.0f} samples/s).")
lines += ["", "| network steps | episodes | mean_score (95%) | success (Wilson 95%) |",
          "|---|---|---|---|"]
for steps in (1, 2):
    path = work / f"eval_steps{steps}" / "metrics.json"
    if path.exists():
        m = json.loads(path.read_text())
        lo, hi = m["mean_score_ci95"]; slo, shi = m["success_rate_ci95"]
        lines.append(f"| {steps} | {m['n_episodes']} | {m['mean_score']:.3f} [{lo:.3f}, {hi:.3f}]"
                     f" | {m['success_rate']:.3f} [{slo:.3f}, {shi:.3f}] |")
    else:
        lines.append(f"| {steps} | - | not evaluated | - |")
(Path(out) / "summary.md").write_text("\n".join(lines) + "\n")
EOF
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='*.safetensors' --exclude='*.mp4' \
    --exclude='tensorboard' logs run/train_log.jsonl run/config.yaml eval_steps1 eval_steps2 \
    2>/dev/null
  MAX_PARTS=3 pack_weights "$WORK" "$OUT" "$WORK/run"
  echo "stages:"
  cat "$OUT/stages.txt"
}
trap finish EXIT

check_stage "$PY" "$OUT" "from cm_policy.data import ReplayBuffer
print(ReplayBuffer.open('$DATA').n_episodes, 'episodes')" || exit 1

#   probe NAME LIMIT COMPILE: PROBE_STEPS training steps in $WORK/NAME
probe() {
  stage "$1" "$2" "$PY" -m cm_policy.cli train "${COMMON[@]}" "training.compile=$3" \
    "training.steps=$PROBE_STEPS" training.warmup_steps=1 \
    "training.checkpoint_every=$PROBE_STEPS" "output_dir=$WORK/$1"
}
#   probe_cost NAME: "STEP_COST OVERHEAD" from the probe's log: seconds per step over its last
#   logged interval, and the seconds its start cost beyond that rate (compilation, warm-up)
probe_cost() {
  "$PY" -c "import json
log = [json.loads(x) for x in open('$WORK/$1/train_log.jsonl')]
a, b = log[-2], log[-1]
cost = (b['wall_s'] - a['wall_s']) / (b['step'] - a['step'])
print(f\"{cost:.5f} {max(0.0, b['wall_s'] - b['step'] * cost):.1f}\")"
}
FIRST=false
[ "$COMPILE" = true ] && FIRST=true  # the first probe compiles only when told to
# One lease has no room for a second try: if bf16 autocast breaks the probe, train in fp32.
if ! probe probe 240 "$FIRST" && [ "$AMP" = true ]; then
  AMP=false
  COMMON=("${COMMON[@]/training.amp=true/training.amp=false}")
  echo "the probe failed with bf16 autocast: fp32 from here" | tee -a "$OUT/stages.txt"
  probe probe_fp32 240 "$FIRST" || exit 1
  mv "$WORK/probe_fp32" "$WORK/probe_ok"
fi
[ -d "$WORK/probe_ok" ] || mv "$WORK/probe" "$WORK/probe_ok"
[ -f "$WORK/probe_ok/train_log.jsonl" ] || exit 1
read -r COST OVERHEAD < <(probe_cost probe_ok)
USE_COMPILE=$FIRST
# The whole run costs more per step than the probe's interval (start-up, data, a loaded CPU):
# 1.24x was measured on the H200 (2584 steps in 363 s against 0.1075 s probed); plan with 1.3x.
#   plan_steps COST OVERHEAD: the steps that fit the training time left at 1.3x COST
plan_steps() {
  local left=$((TOTAL - (SECONDS - START)))
  "$PY" -c "print(max(0, int(($left - $EVAL_RESERVE - $MARGIN - 30 - $2) / (1.3 * $1)) // 100 * 100))"
}
if [ "$COMPILE" = auto ]; then
  # torch.compile pays if its step saving over the run outweighs compiling twice (in this probe
  # and again in the training run, the cache on disk notwithstanding). A failure keeps eager, and
  # so does a probe past 120 s: a compile that long cannot pay back within one allowance.
  if probe probe_compiled 120 true && [ -f "$WORK/probe_compiled/train_log.jsonl" ]; then
    read -r CCOST COVERHEAD < <(probe_cost probe_compiled)
    eager=$(plan_steps "$COST" "$OVERHEAD")
    compiled=$(plan_steps "$CCOST" "$COVERHEAD")
    echo "eager ${COST} s/step -> ${eager} steps; compiled ${CCOST} s/step after" \
      "${COVERHEAD} s of compiling -> ${compiled} steps" | tee -a "$OUT/stages.txt"
    if [ "$compiled" -gt "$eager" ]; then
      USE_COMPILE=true COST=$CCOST OVERHEAD=$COVERHEAD
    fi
  else
    echo "the compiled probe failed: eager" | tee -a "$OUT/stages.txt"
  fi
fi
left=$((TOTAL - (SECONDS - START)))
train_s=$((left - EVAL_RESERVE - MARGIN))
STEPS=$(plan_steps "$COST" "$OVERHEAD")
echo "compile ${USE_COMPILE}; step cost ${COST} s (+${OVERHEAD} s start); ${train_s} s of" \
  "training -> ${STEPS} steps" | tee -a "$OUT/stages.txt"
[ "$STEPS" -ge 100 ] || { echo "only ${left} s left: no time to train"; exit 1; }
COMPILE=$USE_COMPILE  # as summary.md reports it

stage train $((train_s + 60)) "$PY" -m cm_policy.cli train "${COMMON[@]}" \
  "training.compile=$USE_COMPILE" "training.steps=$STEPS" \
  training.warmup_steps=$((STEPS / 20)) "training.checkpoint_every=$((STEPS / 4))" \
  "output_dir=$WORK/run"  # stopped at its limit, the latest quarter's checkpoint is evaluated
for steps in 1 2; do
  left=$((TOTAL - (SECONDS - START) - 10))
  stage "eval_steps$steps" "$left" "$PY" -m cm_policy.cli eval "checkpoint=$WORK/run" \
    "steps=$steps" "n_episodes=$EPISODES" "n_envs=$N_ENVS" layout=async "n_videos=$VIDEOS" \
    "device=$DEVICE" progress=false "output_dir=$WORK/eval_steps$steps"
done
