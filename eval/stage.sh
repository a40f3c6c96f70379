# Shared by the GPU session scripts (eval/gpu_*.sh); source it.
#   stage NAME SECONDS COMMAND...
# runs COMMAND under a time limit with its output in $STAGE_LOGS/NAME.log, appends
# "NAME: exit RC after S s" to $STAGE_SUMMARY, shows the log's end on failure and returns RC,
# so that one stage that hangs cannot eat the others' time.
stage() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s)"
  local start=$SECONDS
  timeout "$limit" "$@" >"$STAGE_LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$STAGE_SUMMARY"
  [ $rc -eq 0 ] || tail -30 "$STAGE_LOGS/$name.log"
  return $rc
}

#   pack_weights WORK OUT RUN_DIR...
# writes the final EMA weights (+ policy.json, config.yaml) of each RUN_DIR (a training run under
# WORK) as 15 MB parts OUT/weights.tar.part-* (`cat weights.tar.part-* | tar -x`), keeping the
# first MAX_PARTS (default 6): a device session returns at most 8 files of 16 MiB. Runs without a
# checkpoint are skipped.
pack_weights() {
  local work=$1 out=$2 run ckpt
  shift 2
  local keep=()
  for run in "$@"; do
    [ -f "$run/checkpoints/latest" ] || continue
    ckpt=${run#"$work"/}/checkpoints/$(cat "$run/checkpoints/latest")
    keep+=("$ckpt/ema.safetensors" "$ckpt/policy.json" "$ckpt/config.yaml")
  done
  [ ${#keep[@]} -gt 0 ] || return 0
  tar -cf - -C "$work" "${keep[@]}" | split -b 15m - "$out/weights.tar.part-"
  ls "$out"/weights.tar.part-* | tail -n +$((${MAX_PARTS:-6} + 1)) | xargs -r rm -f
}

#   check_device PYTHON DATA LOG_DIR
# saves nvidia-smi's report in LOG_DIR and exits the script unless PYTHON imports torch,
# cm_policy and robosuite (the stage "check", check_stage below) and the replay buffer DATA exists.
check_device() {
  check_stage "$1" "$3" "import robosuite" \
    || { echo "torch, cm_policy or robosuite not importable"; exit 1; }
  [ -d "$2" ] || { echo "no $2"; exit 1; }
}

#   use_wheels PYTHON
# on a device machine whose PYTHON lacks this package's needs: installs the wheels that
# eval/gpu_prepare.sh gathered in .gpu/whl (carried along) into /tmp/site, and puts /tmp/site and
# the checkout on PYTHONPATH, so the package runs uninstalled. Does nothing where PYTHON already
# imports them (a development machine).
use_wheels() {
  "$1" -c "import hydra, zarr, pymunk, gymnasium, diffusers" 2>/dev/null && return 0
  [ -d .gpu/whl ] || { echo "no .gpu/whl: run bash eval/gpu_prepare.sh and carry .gpu"; exit 1; }
  "$1" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || { echo "installing .gpu/whl failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
}

#   check_stage PYTHON OUT_DIR [PYTHON_CODE]
# saves nvidia-smi's report as OUT_DIR/nvidia-smi.txt, then runs the stage "check": imports torch
# and the package, prints torch's version and the GPU, and runs PYTHON_CODE (the script's own
# checks: its data, its device).
check_stage() {
  nvidia-smi >"$2/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" >"$2/nvidia-smi.txt"
  stage check 120 "$1" -c "import torch, cm_policy.cli
print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))
${3:-}"
}
