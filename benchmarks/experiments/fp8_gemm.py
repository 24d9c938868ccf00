"""The fp8 linear's candidate forms (``--quantization fp8``, models/fp8.py) at Qwen2.5-7B's shapes,
small steps (decode) and large ones (prefill), each with the GEMM custom calls XLA compiled.

Small T (a weight read; effective GB/s = the variant's weight bytes / time):
  ``bf16``        the engine's bf16 linear (the baseline: twice the bytes)
  ``w8a8``        models/fp8.py's W8A8 form: per-token fp8 activations, f8 x f8 dot in float32,
                  the scale multiply on the float32 [T, O] output
  ``w8a16``       x stays bf16, the fp8 weight converted inside the dot (XLA may fuse the convert
                  into its GEMM or reduction), the channel scale on the output
  ``pallas``      benchmarks/experiments/fp8_matmul_gpu.py: the same arithmetic, the convert in registers
                  (GPU; on the CPU it runs in interpret mode, its time means nothing there)
Large T (compute; TFLOP/s = 2 T O D / time):
  ``bf16``, ``w8a8`` as above; ``f8_gemm`` the f8 x f8 dot alone on quantised x (the GEMM's rate);
  ``w8a8_bf16out`` the f8 dot emitting bf16 (half the output bytes), scales fused after it;
  ``w8a8_prequant`` the same on activations quantised beforehand (what the dot + scale cost
                  when x's quantisation fuses into its producer, as it can in the model);
  ``w8a16``       bf16 GEMM of the weight converted (the convert is O x D, cheap next to T O D).
``custom_calls`` lists each compiled program's custom calls: on Hopper an FP8 tensor-core GEMM
is ``__cublas$lt$matmul$f8``; the Pallas kernel shows as a Triton call; ``fusions`` the fusion
kinds (``__triton_gemm``: XLA's own Triton GEMM). With ``--dump-hlo`` the first shape's compiled
HLO texts are written under ``<out>/fp8-gemm-hlo/`` (off by default: two dozen files crowd out
the JSONs a device run brings back). ``--sweep`` adds the
Pallas kernel at each (block_o, block_d, split_k, num_warps) of a small grid at small T.

Each variant compiles once (the compiled program is both timed and read for its custom calls);
a line is printed per measurement and the JSON is rewritten after every shape, so a cut run
keeps what it measured.

    python -m benchmarks.experiments.fp8_gemm --out DIR             (GPU, ~1 minute)
    python -m benchmarks.experiments.fp8_gemm --out DIR --sweep --small-tokens 1,8 --large-tokens ""
    python -m benchmarks.experiments.fp8_gemm --tiny                (CPU smoke run)
"""
from __future__ import annotations

import argparse
import itertools
import re
import time

import jax
import jax.numpy as jnp

from benchmarks.common import print_table, results_dir, write_result
from benchmarks.experiments import fp8_matmul_gpu
from pagedjax.models import fp8

# (name, out rows, in): Qwen2.5-7B's fused q/k/v, o, fused gate/up and down projections
SHAPES = (("qkv_proj", 4608, 3584), ("o_proj", 3584, 3584), ("gate_up_proj", 37888, 3584),
          ("down_proj", 3584, 18944))
TINY_SHAPES = (("tiny", 200, 96),)  # not tile multiples: the kernel's masks run too
F8_GEMM = "__cublas$lt$matmul$f8"
SWEEP = dict(block_o=(16, 32, 64), block_d=(128, 256, 512), split_k=(None, 1), num_warps=(4,))


def _bf16(x, w):
    return jnp.einsum("td,od->to", x, w)


def _w8a8(x, wq, ws):
    return fp8.fp8_linear(x, wq, ws, path="w8a8")


def _w8a16(x, wq, ws):
    return fp8.fp8_linear(x, wq, ws, path="w8a16")


def _w8a8_bf16out(x, wq, ws):
    return fp8.fp8_linear(x, wq, ws, path="w8a8_out")


def _f8_gemm(xq, wq):
    return jax.lax.dot_general(xq, wq, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _prequant(xq, xs, wq, ws):
    y = jax.lax.dot_general(xq, wq, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.bfloat16)
    return (y.astype(jnp.float32) * xs * ws).astype(jnp.bfloat16)


def _pallas(interpret: bool, **knobs):
    def run(x, wq, ws):
        return fp8_matmul_gpu.fp8_matmul(x, wq, ws, interpret=interpret, **knobs)
    return run


def _measure(fn, args, iters: int, hlo_path=None) -> dict:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    hlo = compiled.as_text()
    if hlo_path is not None:
        hlo_path.write_text(hlo)
    calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
    # what XLA made of the dot where there is no GEMM custom call: fusion kinds, and whether
    # its Triton GEMM emitter took it
    fusions = sorted(set(re.findall(r"kind=(k\w+)", hlo)) |
                     set(re.findall(r'"kind":"(__\w+)"', hlo)))
    jax.block_until_ready(compiled(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = compiled(*args)
    jax.block_until_ready(out)
    return {"ms": (time.perf_counter() - t0) / iters * 1e3, "custom_calls": calls,
            "fusions": fusions, "compile_s": compile_s}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.fp8_gemm")
    p.add_argument("--out", default=None)
    p.add_argument("--small-tokens", default="1,8,32,64",
                   help="comma list of decode-sized rows (tokens in a step)")
    p.add_argument("--large-tokens", default="2048,8192",
                   help="comma list of prefill-sized rows (2048: the default token budget)")
    p.add_argument("--shapes", default=None, help="comma list of matmul names (default all)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dump-hlo", action="store_true",
                   help="write the first shape's compiled HLO texts under <out>/fp8-gemm-hlo/")
    p.add_argument("--sweep", action="store_true",
                   help="also time the Pallas kernel at each block size of a small grid")
    p.add_argument("--tiny", action="store_true", help="one small shape (a CPU smoke run)")
    args = p.parse_args(argv)
    ints = lambda s: [int(t) for t in s.split(",") if t]  # noqa: E731
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.shapes:
        shapes = [s for s in shapes if s[0] in args.shapes.split(",")]
    small, large = (([1, 16], [128]) if args.tiny
                    else (ints(args.small_tokens), ints(args.large_tokens)))
    interpret = jax.devices()[0].platform != "gpu"
    iters = 2 if args.tiny else args.iters
    small_fns = {"bf16": _bf16, "w8a8": _w8a8, "w8a16": _w8a16, "pallas": _pallas(interpret)}
    if args.sweep:
        for knobs in itertools.product(*SWEEP.values()):
            kw = dict(zip(SWEEP, knobs))
            small_fns["pallas_" + "_".join(f"{k}{v}" for k, v in kw.items())] = \
                _pallas(interpret, **kw)
    large_fns = {"bf16": _bf16, "w8a8": _w8a8, "f8_gemm": _f8_gemm,
                 "w8a8_bf16out": _w8a8_bf16out, "w8a8_prequant": _prequant, "w8a16": _w8a16}
    hlo_dir = results_dir(args.out) / "fp8-gemm-hlo"  # the first shape's compiled programs
    if args.dump_hlo:
        hlo_dir.mkdir(exist_ok=True)
    rows = []
    key = jax.random.key(0)
    t_start = time.perf_counter()
    for name, o, d in shapes:
        w = (jax.random.normal(key, (o, d), jnp.float32) * 0.02).astype(jnp.bfloat16)
        wq, ws = fp8.quantize_weight(w)
        for t in small + large:
            x = jax.random.normal(jax.random.fold_in(key, t), (t, d), jnp.bfloat16)
            xq, xs = fp8.quantize(x)
            regime = "small" if t in small else "large"
            fns = small_fns if regime == "small" else large_fns
            for v, fn in fns.items():
                inputs = {"bf16": (x, w), "f8_gemm": (xq, wq),
                          "w8a8_prequant": (xq, xs, wq, ws)}.get(v, (x, wq, ws))
                hlo = (hlo_dir / f"{name}-T{t}-{v}.txt"
                       if args.dump_hlo and name == shapes[0][0] and not v.startswith("pallas_")
                       else None)
                try:
                    m = _measure(fn, inputs, iters, hlo)
                except Exception as e:  # noqa: BLE001 - a sweep point that fails to compile
                    print(f"{name} T={t} {v}: failed: {type(e).__name__}: {e}"[:400], flush=True)
                    continue
                wbytes = o * d * (2 if v == "bf16" else 1)
                row = {"matmul": name, "tokens": t, "out": o, "in": d, "regime": regime,
                       "variant": v, **m, "gbps": wbytes / m["ms"] / 1e6,
                       "tflops": 2 * t * o * d / m["ms"] / 1e9,
                       "f8_gemm": F8_GEMM in m["custom_calls"]}
                rows.append(row)
                print(f"[{time.perf_counter() - t_start:6.1f}s] {name:13s} T={t:5d} {v:14s} "
                      f"{row['ms']:8.4f} ms {row['gbps']:8.1f} GB/s {row['tflops']:7.1f} TF/s "
                      f"compile {m['compile_s']:.1f}s {','.join(m['custom_calls'] + m['fusions'])}",
                      flush=True)
        _write(rows, args.out)
    for regime, col in (("small", "gbps"), ("large", "tflops")):
        sel = [r for r in rows if r["regime"] == regime]
        if sel:
            print_table(sel, ["matmul", "tokens", "variant", "ms", col, "f8_gemm"])


def _best(rows, regime: str) -> dict:
    """{tokens: best variant over the summed time of every shape} for one regime."""
    out = {}
    for t in sorted({r["tokens"] for r in rows if r["regime"] == regime}):
        total = {}
        for r in rows:
            if r["regime"] == regime and r["tokens"] == t:
                total.setdefault(r["variant"], []).append(r["ms"])
        n = max(len(v) for v in total.values())
        full = {v: sum(ms) for v, ms in total.items() if len(ms) == n}
        out[str(t)] = min(full, key=full.get)
    return out


def _write(rows, out) -> None:
    summary = {"best_small_variant": _best(rows, "small"),
               "best_large_variant": _best(rows, "large")}
    large = [r for r in rows if r["regime"] == "large"]
    if large:
        top = max(r["tokens"] for r in large)
        for v in ("bf16", "w8a8", "f8_gemm", "w8a8_bf16out"):
            got = [r["tflops"] for r in large if r["tokens"] == top and r["variant"] == v]
            if got:
                summary[f"fp8w_prefill_{v}_tflops"] = max(got)
    write_result("fp8-gemm", summary, {"rows": rows}, str(results_dir(out)))


if __name__ == "__main__":
    main()
