# Shared by the GPU session scripts (eval/gpu_check.sh, eval/gpu_robomimic.sh); source it.
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
