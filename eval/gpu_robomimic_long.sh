#!/usr/bin/env bash
# One GPU session for robomimic, with the GPU shared by three jobs that run side by side:
#   A. Can, low-dim: iSD trained for CAN_TRAIN_S seconds (steps planned from its step cost,
#      measured first) at batch CAN_BATCH on DATA (default: clean + recovery demos), then
#      evaluated at one step on the protocol's 50 initial states;
#   B. Can, low-dim: DDPM on the same budget (it waits for A's planned steps), DDPM-100;
#   C. Lift from images: IMG_PROCS processes generate IMG_DEMOS demos each with two 84x84
#      cameras (MuJoCo's EGL renderer), one buffer is made of them, iSD trains on it for what
#      time is left, and is evaluated at one step on 50 initial states with rendering envs.
#
#   DATA=data/robomimic_can_mix.zarr bash eval/gpu_robomimic_long.sh OUT_DIR [PYTHON] [TOTAL_S]
#
# A failed smoke run (tiny budget on Can, ~30 s) stops everything at once, so that a fixed rerun
# costs little; C is skipped when rendering does not work, and never stops A or B.
# OUT_DIR gets every report, log and metrics file (gpu_long.tar.gz, no weights) and the final
# EMA weights of each run (weights.tar.part-*, `cat weights.tar.part-* | tar -x`), so that the
# evaluations can be redone elsewhere if they did not finish here.
set -uo pipefail
OUT=${1:?usage: bash eval/gpu_robomimic_long.sh OUT_DIR [PYTHON] [TOTAL_S]}
PY=${2:-python3}
TOTAL=${3:-540}
DEVICE=${DEVICE:-cuda}  # cpu: a dry run without a GPU (with small settings below)
PLAN=${PLAN:-eval/plans/compare_robomimic_gpu.yaml}
CAN_TRAIN_S=${CAN_TRAIN_S:-240}
CAN_BATCH=${CAN_BATCH:-1024}
IMG_PROCS=${IMG_PROCS:-12}
IMG_DEMOS=${IMG_DEMOS:-12}
IMG_BATCH=${IMG_BATCH:-128}
IMG_EVAL_RESERVE=${IMG_EVAL_RESERVE:-90}
N_ENVS=${N_ENVS:-25}
SMOKE=${SMOKE:-1}
DDPM=${DDPM:-1}         # 0: iSD only
IMAGE=${IMAGE:-1}       # 0: no image run
SEEDS=${SEEDS:-0}       # training seeds of the Can runs
CAN_STEPS=${CAN_STEPS:-}  # fixed steps instead of CAN_TRAIN_S
WORK=${WORK:-/tmp/gpu_long}
DATA=${DATA:-data/robomimic_can_mix.zarr}
mkdir -p "$OUT" "$WORK/logs" "$WORK/results" "$WORK/img_data"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
START=$SECONDS
left() { echo $((TOTAL - (SECONDS - START))); }

finish() {
  # At most 8 files come back from a device session, 16 MiB each: the tar (reports, logs,
  # metrics, no weights), stages.txt and at most 6 weight parts, iSD's runs first.
  tar -czf "$OUT/gpu_long.tar.gz" -C "$WORK" --exclude='*.safetensors' --exclude='img_data' . \
    2>/dev/null
  pack_weights "$WORK" "$OUT" "$WORK"/can/isd_s* "$WORK"/img/isd_s* "$WORK"/can_ddpm/ddpm_s*
  echo "stages:"
  cat "$OUT/stages.txt"
}
trap finish EXIT

STAGE_LOGS=$WORK/logs STAGE_SUMMARY=$OUT/stages.txt
source eval/stage.sh

check_device "$PY" "$DATA" "$WORK"
nproc >"$WORK/nproc.txt"
# MuJoCo's EGL renderer needs libEGL (glvnd) and NVIDIA's EGL vendor file: the device machine
# lacks the former. Where the repo carries the .deb files in .gl/ (see .library/device/README.md:
# `apt-get download libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2` into .gl), unpack them.
if ls .gl/*.deb >/dev/null 2>&1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
  vendor=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  [ -f "$vendor" ] && export __EGL_VENDOR_LIBRARY_FILENAMES=$vendor
fi

# C, part 1 (CPU): image demonstrations, started first; rendering is checked on one env first.
image_data() {
  MUJOCO_GL=egl stage render_check 60 "$PY" -c "
from cm_policy.envs.robosuite_env import RobosuiteEnv
env = RobosuiteEnv('lift', obs_type='image')
obs, _ = env.reset(seed=0)
print({k: getattr(v, 'shape', None) for k, v in obs.items()})
env.close()" || return 1
  local pids=()
  for i in $(seq 1 "$IMG_PROCS"); do
    MUJOCO_GL=egl OMP_NUM_THREADS=1 timeout 200 "$PY" -m cm_policy.cli data generate robomimic \
      task=lift images=true n="$IMG_DEMOS" seed=$((1000 + 1000 * i)) \
      out="$WORK/img_data/lift_$i.hdf5" >"$WORK/logs/img_gen_$i.log" 2>&1 &
    pids+=($!)
  done
  local ok=()
  for i in $(seq 1 "$IMG_PROCS"); do
    wait "${pids[$((i - 1))]}" && ok+=("$WORK/img_data/lift_$i.hdf5")
  done
  echo "image generation: ${#ok[@]} of $IMG_PROCS processes finished" | tee -a "$STAGE_SUMMARY"
  [ ${#ok[@]} -gt 0 ] || return 1
  stage img_convert 120 "$PY" -m cm_policy.cli data convert robomimic "${ok[@]}" \
    "$WORK/img_data/lift_image.zarr" image=true
}

# Smoke: training, evaluation in env processes and sampling on the GPU, tiny budget.
[ "$IMAGE" = 1 ] || image_data() { echo "IMAGE=0"; return 1; }
image_data >"$WORK/logs/image_data.log" 2>&1 &
IMG_PID=$!
if [ "$SMOKE" = 1 ]; then
  stage smoke 150 "$PY" -m cm_policy.cli campaign eval/plans/smoke.yaml --jobs 1 --runs isd \
    --set task=robomimic_can_lowdim --set dataset="$DATA" --device "$DEVICE" \
    --root "$WORK/smoke" --results "$WORK/smoke_results" || exit 1
fi

# A: iSD on Can; its planned steps are B's.
CAN_ISD_LIMIT=$(($(left) - 20))
stage can_isd "$CAN_ISD_LIMIT" "$PY" -m cm_policy.cli campaign "$PLAN" --jobs 1 --runs isd \
  --set dataset="$DATA" --set "common+=[training.batch_size=$CAN_BATCH]" \
  --set 'runs.isd.samplers=["1"]' --set "runs.isd.seeds=[$SEEDS]" \
  $([ -n "$CAN_STEPS" ] && echo "--set marks_steps=[$CAN_STEPS]" || echo "--fit-seconds $CAN_TRAIN_S") \
  --device "$DEVICE" --n-envs "$N_ENVS" --root "$WORK/can" --results "$WORK/results" \
  --set name=compare_robomimic_can_lowdim_gpu_isd &
ISD_PID=$!

# B: DDPM with A's steps: CAN_STEPS, or those A plans (waiting up to 2 min for them).
STEPS=
if [ "$DDPM" = 1 ]; then
  STEPS=$CAN_STEPS
  for _ in $(seq 1 120); do
    [ -n "$STEPS" ] && break
    sleep 1
    STEPS=$(sed -n 's/^== \([0-9]*\) steps fit.*/\1/p' "$WORK/logs/can_isd.log" 2>/dev/null)
  done
fi
if [ -n "${STEPS:-}" ]; then
  echo "DDPM gets iSD's $STEPS steps" | tee -a "$STAGE_SUMMARY"
  stage can_ddpm $(($(left) - 20)) "$PY" -m cm_policy.cli campaign "$PLAN" --jobs 1 --runs ddpm \
    --set dataset="$DATA" --set "common+=[training.batch_size=$CAN_BATCH]" \
    --set "marks_steps=[$STEPS]" --set "runs.ddpm.seeds=[$SEEDS]" --device "$DEVICE" \
    --n-envs "$N_ENVS" --root "$WORK/can_ddpm" --results "$WORK/results" \
    --set name=compare_robomimic_can_lowdim_gpu_ddpm &
  DDPM_PID=$!
else
  [ "$DDPM" = 1 ] && why="no planned steps from can_isd" || why="DDPM=0"
  echo "$why: DDPM not run" | tee -a "$STAGE_SUMMARY"
  DDPM_PID=
fi

# C, part 2 (GPU): train on the image buffer with what time is left, then evaluate.
if wait "$IMG_PID" && [ -d "$WORK/img_data/lift_image.zarr" ]; then
  img_train_s=$(($(left) - IMG_EVAL_RESERVE - 60))
  if [ "$img_train_s" -ge 45 ]; then
    MUJOCO_GL=egl stage img_lift $(($(left) - 15)) "$PY" -m cm_policy.cli campaign "$PLAN" \
      --jobs 1 --runs isd --set task=robomimic_lift_image \
      --set dataset="$WORK/img_data/lift_image.zarr" --set 'runs.isd.samplers=["1"]' \
      --set "common+=[training.batch_size=$IMG_BATCH]" --device "$DEVICE" \
      --fit-seconds "$img_train_s" --n-envs "$N_ENVS" --root "$WORK/img" \
      --results "$WORK/results" --set name=compare_robomimic_lift_image_gpu
  else
    echo "image run: only ${img_train_s} s left for training, skipped" | tee -a "$STAGE_SUMMARY"
  fi
else
  echo "image data not made (see logs/image_data.log)" | tee -a "$STAGE_SUMMARY"
  tail -20 "$WORK/logs/image_data.log"
fi
wait "$ISD_PID"
[ -z "$DDPM_PID" ] || wait "$DDPM_PID"
