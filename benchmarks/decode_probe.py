"""Questions about decode attention, answered on the device before changing a default.

1. What does the timing loop itself cost? ``benchmarks kernel`` chains calls in a jitted
   ``lax.fori_loop`` with ``R`` rotated block tables per iteration (R = 1-4 at the target shapes).
   If each iteration carried a fixed cost (a while loop's predicate round trip), short kernels
   such as 1 x 32K (36 us) would pay it per R calls. Each shape is timed with the rotation
   repeated U = 1 and 4 times per iteration, and a loop whose body is one tiny op gives the
   per-iteration cost alone. (Answer, e24938b: it overlaps the kernels; U moves nothing.)
2. Tuning knobs against the defaults at the target shapes: raw fp8 pages (what a static
   per-KV-head scale stores) in rounds 1-3, bf16 pipeline depth in round 4 (``BF16_VARIANTS``);
   each round's variants and results are in the comments above it and in
   benchmarks/KERNEL_NOTES.md.

``python -m benchmarks.decode_probe --out DIR`` (prints a table, writes decode-probe.json).
"""
from __future__ import annotations

import argparse
import functools

import jax.numpy as jnp
import numpy as np

from benchmarks import kernel as kb
from benchmarks.common import print_table, results_dir, write_result
from pagedjax.kernels.dispatch import ragged_paged_attention

SHAPES = [(1, 32768), (8, 32768), (64, 4096)]
# Round 1 (e24938b): kvp 1/2/4, block_kv 128, 8 warps, 2/4 stages, 4 splits; kvp 2 won (115 us).
# Round 2 (be605e4), u = 4: 1 split 156.1, 3 splits 135.3, block_kv 32 + 4 stages 138.6, block_kv
# 32 + 6 stages 108.0, 5 stages 108.4 us (kvp 2 default 114.9, bf16 187.9). Round 3: deeper
# pipelines around the two winners at 64 x 4096 (6 / 7 stages, block_kv 32 with 6 / 8 / 10),
# and the winners at the other shapes: 5 stages became the default (benchmarks/KERNEL_NOTES.md).
# Round 4 (after 5 stages became the raw-fp8 default, 22cc0e3): do deeper pipelines help bf16 at
# 1 x 32K (66% of copy bandwidth, the open gap of issue 4)? 3 stages was the best of 2/3/4 there.
# fp8 is timed at its (new) default only; the other bf16 shapes check for regressions.
BF16_VARIANTS = {
    (1, 32768): [{"num_stages": 5}, {"num_stages": 6}, {"block_kv": 32, "num_stages": 6},
                 {"block_kv": 32, "num_stages": 8}, {"num_splits": 32, "num_stages": 5},
                 {"num_splits": 32, "block_kv": 32, "num_stages": 8}],
    (8, 32768): [{"num_stages": 5}, {"block_kv": 32, "num_stages": 6}],
    (64, 4096): [{"num_stages": 5}, {"block_kv": 32, "num_stages": 6}],
}


def _case(b, batch, ctx):
    """decode_case's inputs (benchmarks.kernel.decode_inputs) and its rotation count."""
    kv_bytes = 2 * batch * ctx * b.k * b.h * 2
    rot = 1 if b.tiny else int(np.clip(-(-4 * kb.L2_BYTES // kv_bytes), 1, 16))
    return (*kb.decode_inputs(b, batch, ctx, rot), rot, kv_bytes)


def _time(b, fn, q, pages, tables, cl, qsl, rot, unroll, tun):
    def step(x, c):
        for _ in range(unroll):
            for r in range(rot):
                x = fn(x, c[0], c[1], c[2][r], cl, qsl, **tun)
        return x
    return b.timed(step, q, (*pages, tables), rot * unroll, 1e-4) * 1e6


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_probe")
    kb.add_arguments(p)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    b = kb.Bench(args)
    ours = functools.partial(ragged_paged_attention, backend=b.backend, interpret=b.interpret,
                             decode_only=True)
    copy_bw = kb.copy_bandwidth(b)
    tiny = jnp.zeros((8,), jnp.float32)
    loop_us = b.timed(lambda x, _: x + 1.0, tiny, None, 1, 1e-6) * 1e6
    rows = []
    shapes = [(2, 64)] if b.tiny else SHAPES
    for batch, ctx in shapes:
        q, kp, vp, tables, cl, qsl, rot, kv_bytes = _case(b, batch, ctx)
        by = kv_bytes + 2 * q.nbytes
        for u in (1, 4):  # question 1: the same calls with 1/4 of the loop iterations
            us = _time(b, ours, q, (kp, vp), tables, cl, qsl, rot, u, {})
            rows.append({"case": f"bf16 {batch}x{ctx}", "variant": "default", "unroll": u,
                         "calls_per_iter": rot * u, "us": us,
                         "pct_copy": 100 * by / (us * 1e-6) / copy_bw})
        bf16_us = rows[-1]["us"]
        for tun in [{"num_stages": 3}] if b.tiny else BF16_VARIANTS.get((batch, ctx), []):
            us = _time(b, ours, q, (kp, vp), tables, cl, qsl, rot, 4, tun)
            rows.append({"case": f"bf16 {batch}x{ctx}", "variant": str(tun), "unroll": 4,
                         "calls_per_iter": rot * 4, "us": us,
                         "pct_copy": 100 * by / (us * 1e-6) / copy_bw})
        fp8 = (kp.astype(jnp.float8_e4m3fn), vp.astype(jnp.float8_e4m3fn))
        for tun in [{}]:  # rounds 1-3 swept the fp8 knobs; now its default only
            us = _time(b, ours, q, fp8, tables, cl, qsl, rot, 4, tun)
            rows.append({"case": f"fp8 {batch}x{ctx}", "variant": "default",
                         "unroll": 4, "calls_per_iter": rot * 4, "us": us,
                         "speedup_vs_bf16_u4": bf16_us / us})
        del kp, vp
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s; empty loop iteration {loop_us:.2f} us")
    print_table(rows)
    write_result("decode-probe", {"compilations_after_warmup": None},
                 {"copy_GBps": copy_bw / 1e9, "loop_iteration_us": loop_us, "rows": rows},
                 str(results_dir(args.out)))


if __name__ == "__main__":
    main()
