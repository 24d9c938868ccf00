# Sourced by the GPU scripts (gpu_suite.sh, gpu_serve_prefix.sh): run each scenario in its own
# process under a time budget and record how it ended in STATUS. Needs PY, OUT, LOG and say().
declare -A STATUS
run() {  # run NAME BUDGET ARGS...: one scenario, its own process, its exit status recorded
  local name=$1 budget=$2
  shift 2
  say "start $name (budget ${budget}s): python -m benchmarks $name $*"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=30 "$budget" \
    $PY -m benchmarks "$name" --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
  local rc=$?
  case $rc in
    0) STATUS[$name]="ok" ;;
    124|137) STATUS[$name]="timeout" ;;
    *) STATUS[$name]="failed($rc)" ;;
  esac
  say "end $name: ${STATUS[$name]} after $((SECONDS - t0))s"
}
