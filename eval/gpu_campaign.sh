#!/usr/bin/env bash
# A campaign plan on one GPU within one device allowance (issue 15, item 7): the same runs,
# seeds, marks (the CPU plan's steps, from its step_costs.json), samplers and test episodes as
# `cm-policy campaign PLAN` on 2 CPU cores, with the training and the policy on the GPU and
# the evaluation envs on the machine's CPU cores. What finishes before the time is up is reported:
# every mark is cached as it is evaluated.
#
#   bash eval/gpu_prepare.sh                      # here, once: wheels + low-dim data in .gpu/
#   bash eval/gpu_campaign.sh OUT_DIR [PYTHON] [TOTAL_SECONDS]   # on the device, carry .gpu
#
# OUT_DIR gets at most 8 files: stages.txt, nvidia-smi.txt, the report (<name>.md, <name>.png),
# cache.tar.gz (the per-run caches: copy them into the plan's results folder as cache_gpu/ or
# compare), and logs.tar.gz (the campaign's and every run's training logs).
#
# Knobs (environment): PLAN (eval/plans/pusht_campaign.yaml), DATA (.gpu/<name of the plan's
# data set>, the low-dim copy from gpu_prepare.sh, if there; else the plan's), JOBS (10: one per
# (run, seed) of the PushT plan), THREADS (1 torch thread per job), N_ENVS (250 envs per batch:
# one batch per seed's 250 test episodes), RUNS (all runs, or a comma-separated subset), MARGIN
# (40 s for the report and packing), DEVICE (cuda; cpu with a tiny PLAN is a dry run).
set -uo pipefail
OUT=${1:?usage: bash eval/gpu_campaign.sh OUT_DIR [PYTHON] [TOTAL_SECONDS]}
PY=${2:-python3}
TOTAL=${3:-540}
cd "$(dirname "$0")/.."
PLAN=${PLAN:-eval/plans/pusht_campaign.yaml}
DATA=${DATA:-}
if [ -z "$DATA" ]; then  # the low-dim copy that eval/gpu_prepare.sh made of the plan's data set
  source=$("$PY" -c "import yaml; print(yaml.safe_load(open('$PLAN'))['dataset'])" 2>/dev/null)
  copy=.gpu/$(basename "$source")
  [ -d "$copy" ] && DATA=$copy
fi
JOBS=${JOBS:-10}
THREADS=${THREADS:-1}
N_ENVS=${N_ENVS:-250}
RUNS=${RUNS:-}
MARGIN=${MARGIN:-40}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/gpu_campaign}
mkdir -p "$OUT" "$WORK/logs"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 SDL_VIDEODRIVER=dummy
START=$SECONDS
STAGE_LOGS=$WORK/logs STAGE_SUMMARY=$OUT/stages.txt
source eval/stage.sh
use_wheels "$PY"
NAME=$("$PY" -c "import yaml; print(yaml.safe_load(open('$PLAN'))['name'])") || exit 1
ARGS=("$PLAN" --jobs "$JOBS" --threads "$THREADS" --device "$DEVICE" --n-envs "$N_ENVS"
  --results "$WORK/results" --root "$WORK/runs" --no-reuse)  # every run trained here
[ -n "$DATA" ] && ARGS+=(--dataset "$DATA")
[ -n "$RUNS" ] && ARGS+=(--runs "$RUNS")

finish() {
  # Without step costs nothing was trained: a report would only measure them.
  [ -f "$WORK/results/step_costs.json" ] \
    && { "$PY" -m cm_policy.cli campaign "${ARGS[@]}" --report-only >"$WORK/logs/report.log" 2>&1 \
      || tail -5 "$WORK/logs/report.log"; }
  cp "$WORK/results/$NAME.md" "$WORK/results/$NAME.png" "$OUT/" 2>/dev/null
  tar -czf "$OUT/cache.tar.gz" -C "$WORK/results" cache step_costs.json 2>/dev/null
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs $(cd "$WORK" && ls runs/*.log 2>/dev/null) \
    $(cd "$WORK" && ls runs/*/train_log.jsonl 2>/dev/null)
  echo "stages:"
  cat "$OUT/stages.txt"
}
trap finish EXIT

check_stage "$PY" "$OUT" "assert '$DEVICE' == 'cpu' or torch.cuda.is_available(), 'no CUDA'" \
  || exit 1
# The marks come from the plan's CPU step costs; a plan without them (no CPU campaign yet) has
# them measured here first, on this machine's CPU, and its x-axis is this CPU's.
costs=$("$PY" -c "import yaml; p = yaml.safe_load(open('$PLAN'))
print(p.get('results', 'eval/results/' + p['name']))")/step_costs.json
[ -f "$costs" ] || echo "no $costs: step costs measured on this machine's CPU" \
  | tee -a "$OUT/stages.txt"
left=$((TOTAL - (SECONDS - START) - MARGIN))
stage campaign "$left" "$PY" -m cm_policy.cli campaign "${ARGS[@]}"
