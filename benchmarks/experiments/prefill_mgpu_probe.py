"""Prefill attention on the GPU: the Mosaic GPU kernel (kernels/ragged_prefill_mgpu.py) against
our Triton ragged kernel and cuDNN flash attention, checked and timed in one run.

    python -m benchmarks.experiments.prefill_mgpu_probe --out DIR    # on the H100: DIR/prefill_mgpu.json

Qwen2.5-7B heads (28 q / 4 kv / 128), bf16, pages of 16 in a randomly permuted pool. Two cases:
causal prefill of 8K tokens (q_len = ctx = 8192) and a 2K chunk over 6K of paged context
(q_len = 2048, ctx = 8192). For each:
  1. correctness on the device: the kernel (every timed configuration) against a float32
     reference computed on the gathered (contiguous) K/V, all rows, max abs and relative error;
     Triton and cuDNN against the same reference; plus small edge cases (unaligned chunk offsets,
     one-token and empty chunks, padding rows, out-of-range table entries) against
     ``paged_attention_ref`` for both ways of feeding K/V;
  2. device time: ``benchmarks.kernel.Bench.timed`` (n calls chained in one jitted fori_loop,
     median of 3), the same inputs for every contender; TFLOP/s with kernel.py's FLOP count
     (4 N H (q_len * ctx0 + q_len (q_len + 1) / 2)). Our time includes the metadata ops and, for
     ``paged_tma=False``, the XLA gather. cuDNN runs on contiguous K/V (its best case); for the
     chunk, cuDNN has no bottom-right causal mask here, so its dense 2K x 8K TFLOP/s is recorded
     as a proxy only.
Each section is saved as it lands; the table at the end is the short answer.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.kernels import paged_attention_ref
from pagedjax.kernels.dispatch import ragged_paged_attention
from pagedjax.kernels.ragged_prefill_mgpu import ragged_prefill_mgpu

from benchmarks import common, kernel
from benchmarks.common import as_f32, rel_err
from benchmarks.kernel import Bench

N, K, H, BS = 28, 4, 128, 16
CONFIGS = [  # the default first
    dict(block_q=64, block_kv=128, num_stages=2, paged_tma=True),
    dict(block_q=64, block_kv=128, num_stages=2, paged_tma=False),
    dict(block_q=64, block_kv=128, num_stages=3, paged_tma=True),
    dict(block_q=64, block_kv=64, num_stages=4, paged_tma=True),
    dict(block_q=64, block_kv=128, num_stages=3, paged_tma=False),
    dict(block_q=64, block_kv=64, num_stages=3, paged_tma=False),
]
TRITON_TILES = [dict(block_m=128, block_n=128, num_warps=8, num_stages=3),  # its default
                dict(block_m=128, block_n=64, num_warps=4, num_stages=3)]  # best causal 8K
EDGE = [(150, 150, 0), (70, 333, 0), (1, 17, 0), (16, 16, 0), (128, 256, 0), (0, 40, 0),
        (40, 90, 5), (300, 1000, 0)]


def _name(cfg):
    return ("paged" if cfg["paged_tma"] else "gather") + \
        f"-q{cfg['block_q']}-kv{cfg['block_kv']}-s{cfg['num_stages']}"


@functools.partial(jax.jit, static_argnames=("scale", "rows"))
def ref_f32(q, kc, vc, off, *, scale, rows=512):
    """float32 attention of q [T, N, H] (row t at position off + t) over contiguous kc, vc
    [L, K, H], causal by position; computed ``rows`` query rows at a time."""
    t, n, h = q.shape
    kh = kc.shape[1]
    kf, vf = kc.astype(jnp.float32), vc.astype(jnp.float32)
    keys = jnp.arange(kc.shape[0])
    hp = jax.lax.Precision.HIGHEST

    def chunk(i):
        qb = jax.lax.dynamic_slice_in_dim(q, i * rows, rows).astype(jnp.float32)
        qb = qb.reshape(rows, kh, n // kh, h)
        s = jnp.einsum("tkgh,skh->tkgs", qb, kf, precision=hp) * scale
        pos = off + i * rows + jnp.arange(rows)
        s = jnp.where((keys[None, :] <= pos[:, None])[:, None, None, :], s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        return jnp.einsum("tkgs,skh->tkgh", p, vf, precision=hp).reshape(rows, n, h)

    return jax.lax.map(chunk, jnp.arange(t // rows)).reshape(t, n, h)


def _errs(out, ref) -> dict:
    a, b = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return {"rel_err": rel_err(a, b), "max_abs_err": float(np.abs(a - b).max()),
            "max_abs_ref": float(np.abs(b).max()), "nan": bool(np.isnan(a).any())}


def edge_cases(b: Bench) -> dict:
    """Small single-sequence steps against paged_attention_ref, both K/V feeds."""
    rng = np.random.default_rng(3)
    out = {}
    t = max(s + ql for ql, _, s in EDGE) + 3  # one shape for all cases: one compile per feed
    w = max(-(-c // BS) for _, c, _ in EDGE) + 2
    nb = w + 5
    for q_len, ctx, q_start in EDGE:
        used = -(-ctx // BS)
        table = np.full((1, w), 10**6, np.int32)
        table[0, :used] = rng.permutation(nb)[:used]
        args = (b.rand((t, N, H)), b.rand((nb, BS, K, H)), b.rand((nb, BS, K, H)),
                jnp.asarray(table), jnp.array([ctx], jnp.int32),
                jnp.array([q_start, q_start + q_len], jnp.int32))
        ref = paged_attention_ref(*as_f32(*args[:3]), *args[3:])
        for paged in (True, False):
            key = f"q{q_len}-ctx{ctx}-start{q_start}-{'paged' if paged else 'gather'}"
            try:
                res = np.asarray(ragged_prefill_mgpu(*args, paged_tma=paged), np.float32)
                live = np.zeros(t, bool)
                live[q_start:q_start + q_len] = True
                row = {"padding_zero": bool((res[~live] == 0).all()),
                       "nan": bool(np.isnan(res).any())}
                if q_len:
                    row.update(rel_err=rel_err(res[live], np.asarray(ref)[live]),
                               max_abs_err=float(np.abs(res[live] - np.asarray(ref)[live]).max()))
                out[key] = row
            except Exception as e:  # noqa: BLE001 - a kernel that fails to build is a finding
                out[key] = {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
                traceback.print_exc()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--target-ms", type=float, default=25.0)
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="skip the remaining optional sections once this much wall time passed")
    p.add_argument("--shrink", type=int, default=1,
                   help="divide every q_len and context by this (a CPU smoke run of the plumbing)")
    args = p.parse_args()
    t_start = time.perf_counter()
    kernel_args = argparse.ArgumentParser()
    kernel.add_arguments(kernel_args)  # kernel.py's own defaults, whatever they grow into
    b = Bench(kernel_args.parse_args(["--target-ms", str(args.target_ms)]))
    rec: dict = {"heads": {"q": N, "kv": K, "head_dim": H}, "block_size": BS, "dtype": "bfloat16",
                 "jax": jax.__version__, "device_kind": jax.devices()[0].device_kind,
                 "cases": {}}
    summary: dict = {}
    scale = H ** -0.5
    # (the JSON's top-level "command" reads "python -m benchmarks ARGS"; this is the real one)
    rec["probe_command"] = " ".join(["python -m benchmarks.experiments.prefill_mgpu_probe", *sys.argv[1:]])

    def save():
        common.write_result("prefill_mgpu", summary, rec, args.out)

    def section(name, fn, optional=False):
        if optional and time.perf_counter() - t_start > args.budget_s:
            rec.setdefault("skipped", []).append(name)
            return
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - record, keep measuring
            traceback.print_exc()
            rec.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:1500]}"
        rec.setdefault("section_s", {})[name] = time.perf_counter() - t0
        print(f"[probe] {name}: {time.perf_counter() - t0:.1f} s "
              f"(total {time.perf_counter() - t_start:.0f} s)", flush=True)
        save()

    # ---- inputs: per context length one pool in permuted pages; per case fresh queries ---------
    cases = {"causal": (8192, 8192), "chunk": (2048, 8192),  # (q_len, ctx incl. the chunk)
             "chunk512": (512, 8192), "chunk128": (128, 8192), "chunk2k_ctx32k": (2048, 32768)}
    cases = {k: (ql // args.shrink, c // args.shrink) for k, (ql, c) in cases.items()}
    pools, data, refs = {}, {}, {}

    def pool(ctx):
        if ctx not in pools:
            w = ctx // BS
            kp, vp = b.rand((w + 1, BS, K, H)), b.rand((w + 1, BS, K, H))
            table = jnp.asarray(np.random.default_rng(ctx).permutation(w), jnp.int32)[None]
            pools[ctx] = (kp, vp, table, kp[table[0]].reshape(ctx, K, H),
                          vp[table[0]].reshape(ctx, K, H))
        return pools[ctx]

    def inputs(name):
        if name not in data:
            q_len, ctx = cases[name]
            data[name] = (b.rand((q_len, N, H)), jnp.array([ctx], jnp.int32),
                          jnp.array([0, q_len], jnp.int32),
                          4 * N * H * (q_len * (ctx - q_len) + q_len * (q_len + 1) / 2))
        return data[name]

    def reference(name):
        if name not in refs:
            q, _, _, _ = inputs(name)
            q_len, ctx = cases[name]
            _, _, _, kc, vc = pool(ctx)
            refs[name] = jax.block_until_ready(ref_f32(q, kc, vc, ctx - q_len, scale=scale,
                                                       rows=min(512, q_len)))
        return refs[name]

    def record(name, who, row, fn, step, consts, flops, pred_tflops):
        try:
            row.update(_errs(jax.block_until_ready(fn()), reference(name)))
            t = b.timed(step, inputs(name)[0], consts, 1, flops / (pred_tflops * 1e12))
            row.update(us=t * 1e6, TFLOPs=flops / t / 1e12)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
        rec["cases"].setdefault(name, {}).setdefault(who, []).append(row)
        print(f"[probe] {who} {name} {row.get('config', row.get('tile'))}: "
              f"{row.get('TFLOPs', float('nan')):.0f} TFLOP/s, rel err {row.get('rel_err')}",
              flush=True)

    def ours(name, cfg, rep=0):
        q, cl, qsl, flops = inputs(name)
        kp, vp, table, _, _ = pool(cases[name][1])
        f = functools.partial(ragged_prefill_mgpu, **cfg)
        record(name, "ours", {"config": _name(cfg), "rep": rep, **cfg},
               lambda: f(q, kp, vp, table, cl, qsl),
               lambda x, c: f(x, c[0], c[1], c[2], cl, qsl), (kp, vp, table), flops, 400)

    def ours_kernel_only(name):
        """The gather variant's kernel alone, on K/V gathered once outside the timing."""
        from pagedjax.kernels.ragged_prefill_mgpu import _mgpu_call, make_meta
        q, cl, qsl, flops = inputs(name)
        _, _, table, kc, vc = pool(cases[name][1])
        meta = make_meta(cl, qsl, BS)
        f = functools.partial(_mgpu_call, group=N // K, block_q=64, block_kv=128, num_stages=2,
                              block_size=BS, paged_tma=False, scale=scale, interpret=False)
        record(name, "ours_kernel_only", {"config": "gather-q64-kv128-s2, K/V pre-gathered"},
               lambda: f(meta, table[0], q, kc, vc),
               lambda x, c: f(meta, c[2], x, c[0], c[1]), (kc, vc, table[0]), flops, 400)

    def triton(name, tile):
        q, cl, qsl, flops = inputs(name)
        kp, vp, table, _, _ = pool(cases[name][1])
        f = functools.partial(ragged_paged_attention, backend="pallas-gpu", **tile)
        record(name, "triton", {"tile": str(tile)}, lambda: f(q, kp, vp, table, cl, qsl),
               lambda x, c: f(x, c[0], c[1], c[2], cl, qsl), (kp, vp, table), flops, 300)

    def cudnn(rep=0):
        q, _, _, flops = inputs("causal")
        _, _, _, kc, vc = pool(cases["causal"][1])
        f = functools.partial(jax.nn.dot_product_attention, is_causal=True,
                              implementation="cudnn")
        row = {"rep": rep}
        record("causal", "cudnn", row, lambda: f(q[None], kc[None], vc[None])[0],
               lambda x, c: f(x[None], c[0], c[1])[0], (kc[None], vc[None]), flops, 500)
        if rep == 0:  # chunk proxy: dense (non-causal) 2K queries x 8K keys
            qc = inputs("chunk")[0]
            fd = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
            flops_d = 4 * N * H * qc.shape[0] * kc.shape[0]
            t = b.timed(lambda x, c: fd(x[None], c[0], c[1])[0], qc, (kc[None], vc[None]), 1,
                        flops_d / 500e12)
            rec["cases"].setdefault("chunk", {})["cudnn_dense_2k_x_8k_proxy"] = {
                "us": t * 1e6, "TFLOPs": flops_d / t / 1e12}

    default, gather = CONFIGS[0], CONFIGS[1]
    # Most wanted first; the paged-vs-gather comparison is repeated, interleaved, because the
    # two differ by less than one run's spread at 8K (KERNEL_NOTES.md).
    section("edge cases", lambda: rec.__setitem__("edge_cases", edge_cases(b)))
    section("ours causal+chunk", lambda: [ours(n, c) for c in (default, gather)
                                          for n in ("causal", "chunk")])
    section("cudnn", cudnn)
    section("triton", lambda: [triton(n, TRITON_TILES[0]) for n in ("causal", "chunk")])
    section("repeat", lambda: ([ours(n, c, rep=1) for n in ("causal", "chunk")
                                for c in (default, gather)], cudnn(rep=1)))
    section("kernel only", lambda: [ours_kernel_only(n) for n in ("causal", "chunk",
                                                                  "chunk2k_ctx32k")])
    for name in ("chunk2k_ctx32k", "chunk512"):
        section(f"shape {name}", lambda name=name: ([ours(name, c) for c in (default, gather)],
                                                    triton(name, TRITON_TILES[0])),
                optional=True)
    section("repeat 2", lambda: [ours(n, c, rep=2 if n in ("causal", "chunk") else 1)
                                 for n in ("causal", "chunk", "chunk2k_ctx32k", "chunk512")
                                 for c in (gather, default)], optional=True)
    section("shape chunk128", lambda: ([ours("chunk128", c) for c in (default, gather)],
                                       triton("chunk128", TRITON_TILES[0])), optional=True)
    section("sweep", lambda: [ours(n, CONFIGS[4]) for n in ("causal", "chunk")], optional=True)

    # ---- summary: per configuration the mean over repeats -------------------------------------
    def mean_tflops(name, who):
        by: dict = {}
        for r in rec["cases"].get(name, {}).get(who, []):
            if "TFLOPs" in r:
                by.setdefault(r.get("config", r.get("tile", who)), []).append(r["TFLOPs"])
        return {k: float(np.mean(v)) for k, v in by.items()}, by

    for name in rec["cases"]:
        o, o_all = mean_tflops(name, "ours")
        tr, _ = mean_tflops(name, "triton")
        rows = rec["cases"][name].get("ours", [])
        best = max(o, key=o.get) if o else None
        summary[name] = {
            "ours_best_config": best, "ours_best_TFLOPs": o.get(best),
            "ours_default_TFLOPs": o.get(_name(default)),
            "ours_gather_TFLOPs": o.get(_name(gather)),
            "ours_all_TFLOPs": o_all,
            "ours_max_rel_err": max((r["rel_err"] for r in rows if "rel_err" in r), default=None),
            "ours_max_abs_err": max((r["max_abs_err"] for r in rows if "max_abs_err" in r),
                                    default=None),
            "triton_TFLOPs": max(tr.values()) if tr else None}
    cud, cud_all = mean_tflops("causal", "cudnn")
    cud = next(iter(cud.values()), None)
    summary["cudnn_causal_TFLOPs"] = cud
    summary["cudnn_causal_all_TFLOPs"] = next(iter(cud_all.values()), None)
    c8 = summary.get("causal", {})
    summary["prefill_8k_vs_cudnn"] = c8.get("ours_best_TFLOPs") / cud if cud and c8.get(
        "ours_best_TFLOPs") else None
    summary["prefill_8k_default_vs_cudnn"] = c8.get("ours_default_TFLOPs") / cud if cud and \
        c8.get("ours_default_TFLOPs") else None
    edge = rec.get("edge_cases", {})
    summary["edge_cases_max_rel_err"] = max((r.get("rel_err", 0) for r in edge.values()),
                                            default=None)
    summary["edge_cases_ok"] = bool(edge) and all(
        "error" not in r and r.get("padding_zero") and not r.get("nan")
        and r.get("rel_err", 0) < 1e-2 for r in edge.values())
    save()
    rows = []
    for name in rec["cases"]:
        for who in ("ours", "ours_kernel_only", "triton", "cudnn"):
            for r in rec["cases"][name].get(who, []):
                rows.append({"case": name, "who": who,
                             "config": str(r.get("config", r.get("tile", "")))[:40],
                             "us": r.get("us"), "TFLOPs": r.get("TFLOPs"),
                             "rel_err": r.get("rel_err"), "max_abs": r.get("max_abs_err"),
                             "error": (r.get("error") or "")[:60]})
    common.print_table(rows, ["case", "who", "config", "us", "TFLOPs", "rel_err", "max_abs",
                              "error"])
    print(summary)


if __name__ == "__main__":
    main()
