#!/usr/bin/env bash
# The GPU benchmark suite (issue 8) for the lent H100: jax 0.11.2 + CUDA, transformers 5.17,
# torch 2.11, no network. Full sizes, Qwen2.5-7B-Instruct shape, dummy bf16 weights.
#
#   bash benchmarks/gpu_suite.sh throughput capacity    # one device call (budgets 180 + 330 s)
#   bash benchmarks/gpu_suite.sh native-vs-paged        # a second call   (budget 540 s)
#   bash benchmarks/gpu_suite.sh                        # all three in a row (~18 min at most)
#
# A device call is limited to 10 minutes, hence the two calls. Each scenario runs in its own process
# under `timeout` with the budget below (seconds; override with the variables), and the suite
# goes on when one fails or runs out of time: capacity and native-vs-paged rewrite their JSON as
# they go, so a scenario cut short keeps what it finished. Results land in $OUT (default
# benchmarks/results/gpu-suite): <scenario>.json, <scenario>.png and suite.log, at most 7 files
# (the device tool brings back 8). Copy them to benchmarks/results/<device>/ (the JSON's "device")
# and run `python -m benchmarks.report` to refresh benchmarks/README.md.
#
# throughput: 1000-in/1000-out, 512 prompts (THROUGHPUT_PROMPTS), after a warm-up of 256 (one
# full batch of --max-num-seqs). 1000 prompts would take ~85 s at the 12k tok/s target plus the
# warm-up, start-up and compilation: too close to a 3-minute slot, and 512 prompts are already two
# full waves of 256 running sequences, i.e. the steady state the figure is about.
set -u -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results/gpu-suite}
PY=${PYTHON:-python3}
MODEL=${MODEL:-Qwen2.5-7B-Instruct}
T_THROUGHPUT=${T_THROUGHPUT:-180}
T_CAPACITY=${T_CAPACITY:-330}
T_NVP=${T_NVP:-540}
THROUGHPUT_PROMPTS=${THROUGHPUT_PROMPTS:-512}
HF_MAX_TIME_A=${HF_MAX_TIME_A:-60}  # transformers runs case (a) at ~11 tok/s: 2,000 tokens = 3 min
# Extra arguments appended per scenario (they win over the ones below), e.g. for a CPU smoke run:
# THROUGHPUT_ARGS="--tiny --input-len 8 --output-len 4 --num-prompts 8 --num-warmup-prompts 4"
read -r -a THROUGHPUT_EXTRA <<< "${THROUGHPUT_ARGS:-}"
read -r -a CAPACITY_EXTRA <<< "${CAPACITY_ARGS:-}"
read -r -a NVP_EXTRA <<< "${NVP_ARGS:-}"
# Compiled step shapes are shared between the scenarios' processes (and later calls on a warm machine).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/pagedjax-jax-cache}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -eq 0 ] && SCENARIOS=(throughput capacity native-vs-paged)

say() { echo "[suite $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

say "scenarios: ${SCENARIOS[*]}; out: $OUT"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | tee -a "$LOG"

# Packages the image lacks (gguf, ...) travel as wheels in .whl (see README.md).
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import jax, torch, transformers, pagedjax.models, benchmarks
print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__,
      '| transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"; then
  say "pagedjax does not import here (a missing package? carry it as a wheel in .whl): stopping"
  exit 1
fi

source benchmarks/gpu_run.sh  # run NAME BUDGET ARGS...

ENGINE=(--model "$MODEL" --load-format dummy --dtype bfloat16)
for s in "${SCENARIOS[@]}"; do
  case $s in
    throughput)
      run throughput "$T_THROUGHPUT" "${ENGINE[@]}" --input-len 1000 --output-len 1000 \
        --num-prompts "$THROUGHPUT_PROMPTS" --num-warmup-prompts 256 "${THROUGHPUT_EXTRA[@]}" ;;
    capacity)
      run capacity "$T_CAPACITY" "${ENGINE[@]}" --max-model-lens 2048,4096,8192,32768 \
        --input-len 1000 --output-len 512 --gpu-memory-utilization 0.9 "${CAPACITY_EXTRA[@]}" ;;
    native-vs-paged)
      # the two child processes get most of the budget each, the JAX side first
      run native-vs-paged "$T_NVP" "${ENGINE[@]}" --budget-gib 24 --gpu-memory-utilization 0.9 \
        --hf-max-time-a "$HF_MAX_TIME_A" --paged-timeout $((T_NVP * 55 / 100)) \
        --hf-timeout $((T_NVP * 40 / 100)) "${NVP_EXTRA[@]}" ;;
    *) say "unknown scenario $s (throughput, capacity, native-vs-paged)"; STATUS[$s]="unknown" ;;
  esac
done

# The short table: what ran, and the issue's target figures from each JSON's summary.
for s in "${SCENARIOS[@]}"; do echo "$s ${STATUS[$s]:-?}"; done | $PY -c '
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
keys = {"throughput": ["output_tok_s", "total_tok_s", "compilations_after_warmup"],
        "capacity": ["max_concurrency_2048", "output_tok_s_2048", "max_concurrency_32768",
                     "output_tok_s_32768", "compilations_after_warmup"],
        "native-vs-paged": ["case_a_completed", "concurrency_ratio_8k", "speedup_vs_hf_b128",
                            "hf_case_a_status", "compilations_after_warmup"]}
print()
print("%-16s %-11s %s" % ("scenario", "status", "figures"))
for line in sys.stdin:
    name, status = line.split()
    path = out / (name + ".json")
    s = json.loads(path.read_text()).get("summary", {}) if path.exists() else {}
    figs = ", ".join("%s=%s" % (k, format(v, ",.1f") if isinstance(v, float) else v)
                     for k, v in s.items() if k in keys.get(name, []))
    print("%-16s %-11s %s" % (name, status, figs or "(no JSON)"))
print("targets: output_tok_s >= 12000, speedup_vs_hf_b128 >= 6, concurrency_ratio_8k >= 3,"
      " case_a_completed True, compilations_after_warmup 0")
' "$OUT" 2>&1 | tee -a "$LOG"
