#!/usr/bin/env bash
# The serving benchmarks at full size on the lent H100 (issue 8 deliverable 3, issue 10
# deliverable 3): Qwen2.5-7B-Instruct shape, dummy bf16 weights, one device call.
#
#   bash benchmarks/gpu_serve_prefix.sh                 # serve, then prefix (~7-8 min, budgets 300 + 270 s)
#   T_SERVE=560 bash benchmarks/gpu_serve_prefix.sh serve     # or one per call, with more room
#   T_PREFIX=560 bash benchmarks/gpu_serve_prefix.sh prefix
#
# The device call must carry `.whl`: the GPU image lacks the server's fastapi, starlette, uvicorn,
# pydantic (+ pydantic_core, annotated_types, typing_inspection), and fastapi's opentelemetry-api;
# typing_extensions travels too, because pydantic needs >= 4.14.1 and the image's version is not
# recorded. Everything else the server and the client use (prometheus_client, httpx, anyio, h11,
# click, annotated-doc, tokenizers, transformers) is in the image. The wheels go to /tmp/site; a
# missing import stops the script before any scenario starts.
#
# serve: `pagedjax serve` started by the scenario on 127.0.0.1 (a separate process; the client
#   takes no GPU memory), 200 prompts of 1000 random tokens + 200 new tokens (ignore_eos), at most
#   64 in flight, all at once (rate inf: the throughput case) and then Poisson at 8 requests/s
#   (below capacity: the latency case), each after a warm-up of 128 requests of the same shape.
#   Expected: ~60-90 s start and first compilations, ~30 s a measured rate, ~20 s a warm-up:
#   ~3-4 min.
# prefix: 16 conversations x 8 turns, 300-token user messages, 100-token answers (turn 8: 3,100
#   prompt tokens), prefix caching off then on, each engine warmed up by the whole workload once.
#   Expected: ~30 s load, ~60 s compilation (the second engine reads the persistent compilation
#   cache), ~45 s + ~25 s per engine: ~3-4 min. Target: ttft_turn8_speedup >= 3.
#
# Results in $OUT (default benchmarks/results/gpu-serve-prefix): serve.json, serve.png,
# prefix.json, prefix.png, serve-prefix.log (5 files). Copy them to benchmarks/results/<device>/
# and run `python -m benchmarks.report`. serve rewrites its JSON after each rate and prefix writes
# a placeholder after its first engine, so a scenario cut short by its budget says how far it got.
set -u -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results/gpu-serve-prefix}
PY=${PYTHON:-python3}
MODEL=${MODEL:-Qwen2.5-7B-Instruct}
T_SERVE=${T_SERVE:-300}
T_PREFIX=${T_PREFIX:-270}
read -r -a SERVE_EXTRA <<< "${SERVE_ARGS:-}"    # appended, e.g. SERVE_ARGS="--num-prompts 100"
read -r -a PREFIX_EXTRA <<< "${PREFIX_ARGS:-}"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/pagedjax-jax-cache}
mkdir -p "$OUT"
LOG="$OUT/serve-prefix.log"
SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -eq 0 ] && SCENARIOS=(serve prefix)

say() { echo "[serve-prefix $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

say "scenarios: ${SCENARIOS[*]}; out: $OUT"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | tee -a "$LOG"

if ! ls .whl/fastapi-*.whl >/dev/null 2>&1; then
  say "no .whl/fastapi-*.whl: the device call must carry .whl (the server's wheels): stopping"
  exit 1
fi
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG" || { say "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
# Fail fast: every import the server and both scenarios need, and a GPU for JAX.
if ! $PY - <<'EOF' 2>&1 | tee -a "$LOG"; then
import fastapi, httpx, prometheus_client, pydantic, starlette, tokenizers, transformers, uvicorn
import jax
import pagedjax.models, pagedjax.entrypoints.server.app, benchmarks.prefix, benchmarks.serve
platform = jax.devices()[0].platform
print("jax", jax.__version__, jax.devices(), "| fastapi", fastapi.__version__, "| pydantic",
      pydantic.__version__, "| uvicorn", uvicorn.__version__, "| transformers",
      transformers.__version__)
assert platform == "gpu", f"JAX sees {platform}, not a GPU"
EOF
  say "a needed package does not import (see above; carry it as a wheel in .whl): stopping"
  exit 1
fi

source benchmarks/gpu_run.sh  # run NAME BUDGET ARGS...

ENGINE=(--model "$MODEL" --load-format dummy --dtype bfloat16)
for s in "${SCENARIOS[@]}"; do
  case $s in
    serve)
      run serve "$T_SERVE" "${ENGINE[@]}" --num-prompts 200 --input-len 1000 --output-len 200 \
        --max-concurrency 64 --request-rate inf,8 --num-warmup-prompts 128 \
        --server-timeout $((T_SERVE - 30)) "${SERVE_EXTRA[@]}" ;;
    prefix)
      run prefix "$T_PREFIX" "${ENGINE[@]}" --num-conversations 16 --turns 8 --user-len 300 \
        --answer-len 100 "${PREFIX_EXTRA[@]}" ;;
    *) say "unknown scenario $s (serve, prefix)"; STATUS[$s]="unknown" ;;
  esac
done

# The short table: what ran, and the target figures from each JSON's summary.
for s in "${SCENARIOS[@]}"; do echo "$s ${STATUS[$s]:-?}"; done | $PY -c '
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
keys = {"serve": ["completed", "failed", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
                  "median_tpot_ms", "median_itl_ms", "rate8_output_throughput",
                  "rate8_median_ttft_ms", "rate8_median_tpot_ms", "compilations_after_warmup"],
        "prefix": ["ttft_turn8_speedup", "ttft_turn8_ms_no_cache", "ttft_turn8_ms_cache",
                   "prefix_cache_hit_rate", "compilations_after_warmup", "status"]}
print()
print("%-8s %-11s %s" % ("scenario", "status", "figures"))
for line in sys.stdin:
    name, status = line.split()
    path = out / (name + ".json")
    s = json.loads(path.read_text()).get("summary", {}) if path.exists() else {}
    figs = ", ".join("%s=%s" % (k, format(s[k], ",.1f") if isinstance(s[k], float) else s[k])
                     for k in keys.get(name, []) if k in s)
    print("%-8s %-11s %s" % (name, status, figs or "(no JSON)"))
print("targets: ttft_turn8_speedup >= 3 (issue 10), compilations_after_warmup 0, failed 0")
' "$OUT" 2>&1 | tee -a "$LOG"
