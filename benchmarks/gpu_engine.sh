#!/usr/bin/env bash
# Engine scenarios on the lent H100 (Qwen2.5 dummy bf16), one device call:
#   bash benchmarks/gpu_engine.sh probe | profile | throughput | beam
# Results go to $OUT (the device tool brings them back); copy them to benchmarks/results/<device>/.
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/pagedjax-jax-cache}
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-engine}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
B="python3 -m benchmarks"
M="--model Qwen2.5-7B-Instruct --load-format dummy"
case "${1:-probe}" in
  probe)
    timeout 150 $B throughput --model Qwen2.5-0.5B-Instruct --load-format dummy --input-len 128 \
      --output-len 64 --num-prompts 64 --max-model-len 512 --out "$OUT/smoke"
    timeout 300 $B latency $M --batch-sizes 1,8 --input-lens 128 --output-len 512 \
      --num-iters 2 --num-iters-warmup 1 --max-model-len 1024 --out "$OUT" ;;
  profile)  # where a decode step's time goes (engine step vs device loop vs trace), then latency
    timeout 300 $B step-profile $M --batch-sizes 1,64,256 --input-len 512 --max-model-len 1024 \
      --out "$OUT"
    timeout 240 $B latency $M --batch-sizes 1,8 --input-lens 128 --output-len 512 \
      --num-iters 2 --num-iters-warmup 1 --max-model-len 1024 --out "$OUT" ;;
  throughput)
    timeout 500 $B throughput $M --input-len 1000 --output-len 1000 --num-prompts ${N:-512} \
      --max-model-len 2048 --max-num-batched-tokens 4096 --out "$OUT" ;;
  beam)
    timeout 500 $B beam $M --prompt-len 1000 --output-len 500 --num-requests 8 --out "$OUT" ;;
esac
ls -la "$OUT" "$OUT"/* 2>/dev/null | head -20
