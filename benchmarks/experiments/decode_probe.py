"""Questions about decode attention, answered on the device before changing a default.

1. What does the timing loop itself cost? ``benchmarks kernel`` chains calls in a jitted
   ``lax.fori_loop`` with ``R`` rotated block tables per iteration (R = 1-4 at the target shapes).
   If each iteration carried a fixed cost (a while loop's predicate round trip), short kernels
   such as 1 x 32K (36 us) would pay it per R calls. Each shape is timed with the rotation
   repeated U = 1 and 4 times per iteration, and a loop whose body is one tiny op gives the
   per-iteration cost alone. (Answer, e24938b: it overlaps the kernels; U moves nothing.)
2. Tuning knobs against the defaults at the target shapes: raw fp8 pages (what a static
   per-KV-head scale stores) in rounds 1-3, bf16 pipeline depth in round 4, the merge and the
   split count in round 5 (``BF16_VARIANTS``); each round's variants and results are in the
   comments above it and in benchmarks/KERNEL_NOTES.md.
3. Where a call's time goes (round 5): a ``jax.profiler`` trace of the timing loop at the shapes
   in ``TRACED``, summed per kernel (split programs, merge) and against the device's span, so the
   launch gaps between the kernels show as span minus busy time.

``python -m benchmarks.experiments.decode_probe --out DIR`` (prints a table, writes decode-probe.json).
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
# Round 4 (965f8c9): deeper bf16 pipelines at 1 x 32K: 5 stages 36.0, 32 splits + 5 stages 35.0
# (67.8%), default 37.3 us; 5 stages cost 6% at 8 x 32K and 64 x 4096: bf16 defaults kept.
# Round 5 (45ba7bf; u = 4): the merge in one round trip (``merge_chunk`` 64, now the default)
# against 16 splits at a time after a first load of the maxima (the old kernel): 1 x 32K 33.4 us
# (70.9%) against 35.8; in the trace the merge kernel took 2.51 us against 5.25, the split
# kernel 27.8 us. Also at 1 x 32K: 4 stages 33.3, block_kv 32 + 6 stages 33.2, 8 warps 34.3, 32
# splits 40.1 (+5 stages 34.4), 48 splits 36.8, 128 splits 35.7. The trace also showed the timing
# loop's own cost, ~7 us an iteration (``memcpy32_post`` 5 us), which u = 1 pays per 4 calls:
# ``Bench.timed`` now chains >= 16 calls an iteration. Round 6: the merge's partial loads no
# longer wait for the row's context (they leave with the metadata loads), and the two depths
# that tied with the default.
BF16_VARIANTS = {
    (1, 32768): [{"merge_chunk": 16}, {"num_stages": 4}, {"block_kv": 32, "num_stages": 6}],
    (8, 32768): [],
    (64, 4096): [],
}
TRACED = {(1, 32768): [{}], (8, 32768): [{}]}


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


def _trace(b, fn, q, pages, tables, cl, qsl, rot, tun, calls=64):
    """Per-call kernel times of the timing loop, from a profiler trace (step_profile's reader)."""
    import glob
    import tempfile

    import jax

    from benchmarks.step_profile import summarize_trace

    n = max(calls // rot, 1)

    def body(i, x, c):
        for r in range(rot):
            x = fn(x, c[0], c[1], c[2][r], cl, qsl, **tun)
        return x
    loop = jax.jit(lambda x, c: jax.lax.fori_loop(0, n, functools.partial(body, c=c), x))
    consts = (*pages, tables)
    jax.block_until_ready(loop(q, consts))
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        jax.block_until_ready(loop(q, consts))
        jax.profiler.stop_trace()
        files = sorted(glob.glob(f"{d}/**/*perfetto_trace.json.gz", recursive=True))
        if not files:
            return {"error": "no trace"}
        t = summarize_trace(files[-1], n * rot, 8)
    us = lambda ms: round(ms * 1e3, 2)  # noqa: E731
    return {"busy_us": us(t["device_busy_ms"]), "span_us": us(t["device_span_ms"]),
            "kernels_us": {k["name"][:40]: us(k["ms"]) for k in t["top_kernels_ms"]}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.decode_probe")
    kb.add_arguments(p)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    b = kb.Bench(args)
    ours = functools.partial(ragged_paged_attention, backend=b.backend, interpret=b.interpret,
                             decode_only=True)
    copy_bw = kb.copy_bandwidth(b)
    tiny = jnp.zeros((8,), jnp.float32)
    loop_us = b.timed(lambda x, _: x + 1.0, tiny, None, 1, 1e-3) * 1e6  # 1e-3: one add an iter
    rows, traces = [], []
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
        for tun in [{}] if b.tiny else TRACED.get((batch, ctx), []):
            traces.append({"case": f"bf16 {batch}x{ctx}", "variant": str(tun) if tun else "default",
                           **_trace(b, ours, q, (kp, vp), tables, cl, qsl, rot, tun)})
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
    for t in traces:
        print(t)
    write_result("decode-probe", {"compilations_after_warmup": None},
                 {"copy_GBps": copy_bw / 1e9, "loop_iteration_us": loop_us, "rows": rows,
                  "traces": traces},
                 str(results_dir(args.out)))


if __name__ == "__main__":
    main()
