#!/usr/bin/env bash
# The swap benchmark (issue 6) on the lent H100, Qwen2.5-7B-Instruct shape, dummy bf16 weights:
#
#   bash benchmarks/gpu_swap.sh transfer  # the transfers alone, no model: < 1 min (budget 150 s)
#   bash benchmarks/gpu_swap.sh full      # the thrashing experiment: ~4 min (budget 400 s)
#   bash benchmarks/gpu_swap.sh           # both, transfer first (one device call, < 10 min)
#
# SWAP_ARGS is appended to both (a CPU smoke run: SWAP_ARGS="--tiny --swap-space 0.001").
#
# Results land in $OUT (default benchmarks/results/gpu-swap): swap-transfer.json, swap.json,
# swap.png and swap.log; copy them to benchmarks/results/<device>/ (the JSON's "device") and run
# `python -m benchmarks.report`. The last lines printed are the figures the issue asks for.
set -u -o pipefail
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/pagedjax-jax-cache}
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-swap}
PY=${PYTHON:-python3}
T_TRANSFER=${T_TRANSFER:-150}
T_FULL=${T_FULL:-400}
mkdir -p "$OUT"
LOG="$OUT/swap.log"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
$PY -c "import pagedjax.models" 2>/dev/null \
  || $PY -m pip install -q --no-index --no-deps --no-build-isolation -e .
read -r -a EXTRA <<< "${SWAP_ARGS:-}"
ENGINE=(--model Qwen2.5-7B-Instruct --load-format dummy --dtype bfloat16 --swap-space 4)

run() {  # run BUDGET ARGS...: one process under timeout, its output in the log
  local budget=$1
  shift
  echo "[swap $(date +%H:%M:%S)] python -m benchmarks swap $* (budget ${budget}s)" | tee -a "$LOG"
  timeout --signal=TERM --kill-after=20 "$budget" $PY -m benchmarks swap "$@" "${EXTRA[@]}" \
    --out "$OUT" 2>&1 | tee -a "$LOG"
  echo "[swap $(date +%H:%M:%S)] exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

case "${1:-all}" in
  transfer) run "$T_TRANSFER" "${ENGINE[@]}" --transfer-only ;;
  full) run "$T_FULL" "${ENGINE[@]}" ;;
  all) run "$T_TRANSFER" "${ENGINE[@]}" --transfer-only
       run "$T_FULL" "${ENGINE[@]}" ;;
  *) echo "usage: $0 [transfer|full|all]"; exit 2 ;;
esac

$PY - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
for name in ("swap-transfer.json", "swap.json"):
    path = Path(sys.argv[1]) / name
    if path.exists():
        s = json.loads(path.read_text())["summary"]
        print(name, ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in s.items()))
print("target: swap_pct_raw_bw >= 70 (like with like); all_completed True")
EOF
