"""Matmul TFLOP/s of the engine's linears in bf16 and in fp8 (``--quantization fp8``,
models/fp8.py), at Qwen2.5-7B's shapes, and whether XLA compiled the fp8 one to an FP8 GEMM.

Per shape and token count: ``bf16`` is the engine's bf16 linear (einsum of two bf16 operands);
``fp8_gemm`` the float8 x float8 dot alone (activations already quantised: the GEMM's own rate);
``fp8_linear`` the whole fp8 linear as the step runs it (per-token quantisation of x, the dot,
the scale multiply). ``custom_calls`` lists the compiled programs' GEMM custom calls: on a Hopper
GPU the fp8 ones must contain ``__cublas$lt$matmul$f8`` (an FP8 tensor-core GEMM), not a bf16
GEMM of upcast operands.

    python -m benchmarks.experiments.fp8_gemm --out DIR             (GPU: prints a table, JSON)
    python -m benchmarks.experiments.fp8_gemm --tiny                (CPU smoke run)
"""
from __future__ import annotations

import argparse
import re
import time

import jax
import jax.numpy as jnp

from benchmarks.common import print_table, results_dir, write_result
from pagedjax.models import fp8

# (name, out rows, in): Qwen2.5-7B's fused q/k/v, o, fused gate/up and down projections
SHAPES = (("qkv_proj", 4608, 3584), ("o_proj", 3584, 3584), ("gate_up_proj", 37888, 3584),
          ("down_proj", 3584, 18944))
TINY_SHAPES = (("tiny", 256, 128),)
F8_GEMM = "__cublas$lt$matmul$f8"


def _timed(fn, *args, n: int) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def _custom_calls(fn, *args) -> list[str]:
    hlo = fn.lower(*args).compile().as_text()
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))


def _bf16(x, w):
    return jnp.einsum("td,od->to", x, w)


def _fp8_gemm(xq, wq):
    return jax.lax.dot_general(xq, wq, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.fp8_gemm")
    p.add_argument("--out", default=None)
    p.add_argument("--tokens", default="1,64,256,2048,8192",
                   help="comma list of rows (tokens in a step): 1 is batch-1 decode, 2048 the "
                        "default prefill budget")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="one small shape (a CPU smoke run)")
    args = p.parse_args(argv)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    tokens = [int(t) for t in args.tokens.split(",")] if not args.tiny else [1, 16]
    fns = {"bf16": jax.jit(_bf16), "fp8_gemm": jax.jit(_fp8_gemm),
           "fp8_linear": jax.jit(fp8.fp8_linear)}
    rows = []
    key = jax.random.key(0)
    for name, o, d in shapes:
        w = (jax.random.normal(key, (o, d), jnp.float32) * 0.02).astype(jnp.bfloat16)
        wq, ws = fp8.quantize_weight(w)
        for t in tokens:
            x = jax.random.normal(jax.random.fold_in(key, t), (t, d), jnp.bfloat16)
            xq, _ = fp8.quantize(x)
            inputs = {"bf16": (x, w), "fp8_gemm": (xq, wq), "fp8_linear": (x, wq, ws)}
            row = {"matmul": name, "tokens": t, "out": o, "in": d}
            for v, fn in fns.items():
                s = _timed(fn, *inputs[v], n=args.iters)
                row[f"{v}_ms"] = s * 1e3
                row[f"{v}_tflops"] = 2 * t * o * d / s / 1e12
                row[f"{v}_custom_calls"] = _custom_calls(fn, *inputs[v])
            row["fp8_is_f8_gemm"] = F8_GEMM in row["fp8_gemm_custom_calls"]
            row["fp8_linear_is_f8_gemm"] = F8_GEMM in row["fp8_linear_custom_calls"]
            row["speedup_fp8_linear"] = row["bf16_ms"] / row["fp8_linear_ms"]
            print(row, flush=True)
            rows.append(row)
    cols = ["matmul", "tokens", "bf16_tflops", "fp8_gemm_tflops", "fp8_linear_tflops",
            "speedup_fp8_linear", "fp8_linear_is_f8_gemm"]
    print_table(rows, cols)
    prefill = [r for r in rows if r["tokens"] == max(tokens)]
    summary = {"fp8w_prefill_fp8_tflops": max(r["fp8_linear_tflops"] for r in prefill),
               "fp8w_prefill_bf16_tflops": max(r["bf16_tflops"] for r in prefill),
               "fp8w_all_f8_gemm": all(r["fp8_linear_is_f8_gemm"] for r in rows),
               "compilations_after_warmup": None}
    write_result("fp8-gemm", summary, {"rows": rows}, str(results_dir(args.out)))


if __name__ == "__main__":
    main()
