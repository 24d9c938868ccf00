"""Paged-attention kernels on the device: decode GB/s against the copy bandwidth and jax's own
Pallas kernel, prefill TFLOP/s against the matmul ceiling and cuDNN, all measured in one run.

Every time is taken on the device: ``n`` calls chained inside one jitted ``lax.fori_loop`` (the
output of a call is the next call's query, so nothing is hoisted or skipped), each loop iteration
walking ``R`` different block tables over one pool of ``R`` page sets, so that the pages read by
consecutive calls are different and (R times the KV bytes >= 4x the L2) the L2 cannot flatter;
the R calls are repeated within an iteration until it holds 16 calls or ~500 us, so the loop's
own per-iteration cost is amortised (``Bench.timed``), for our kernels and the peers alike.
Correctness is checked on the device first: each kernel against the reference on a ragged batch
with context lengths 0/1/15/16/17/long, and every timed decode shape against jax's kernel.
``--tiny`` runs the same code on the CPU in interpret mode (a test calls it).

Quantized KV (``--kv-cache-dtype``, default fp8_e4m3; ``auto`` skips it): every decode shape is
timed a second time on the same pages in the engine's format for that dtype (fp8: raw fp8 pages,
1 byte per value; int8: ``QuantizedPages``, 1-byte values and a bf16 scale per token and KV
head; int4: packed half-byte codes, V scaled per token, K per channel of a block), through
``ragged_paged_attention`` and its defaults (kv_heads_per_program 2 on raw fp8), and checked
against the reference on those pages; ``summary["fp8_decode_speedup"]`` (``int8_...``,
``int4_...``) is bf16 time / that dtype's time at 64 x 4096.
"""
from __future__ import annotations

import argparse
import functools
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.kernels import paged_attention_ref
from pagedjax.kernels.dispatch import ragged_paged_attention, write_kv
from pagedjax.kernels.quantization import QUANTIZED_DTYPES

from . import common, plots
from .common import as_f32, rel_err
from .kernel_prefill import prefill
from .kernel_quantized import (cache_kv, check_quantized_write, checked_timings,
                               kv_bytes_per_token_head, quantized_decode, quantized_sweep)

logger = logging.getLogger(__name__)
L2_BYTES = 50 << 20
# Tuning variants timed at the target shapes (bf16 pages; the default is the row's "us"), each
# checked against the reference first. The earlier sweep (block_kv 32/128, 8 warps, 2/4 stages,
# splits x2 and /2: only the split count mattered) is in KERNEL_NOTES.md; these time the knobs
# added for the open gaps: any split count (1 x 32K: 16-48 splits, i.e. 64-192 programs of
# 2K-704 tokens against the default 256 of 512) and kv_heads_per_program 2 (two KV heads' query
# heads in one 16-row tile). A merge fused into the split programs was timed too and removed
# (5-7 us slower everywhere; KERNEL_NOTES.md). Most wanted first in each list: variants left when
# --sweep-seconds runs out are recorded as skipped.
SWEEP_DECODE = {
    (1, 32768): [{"num_splits": 32}, {"num_splits": 48}, {"num_splits": 24}, {"num_splits": 16},
                 {"kv_heads_per_program": 2}, {"kv_heads_per_program": 2, "num_splits": 128}],
    (8, 32768): [{"kv_heads_per_program": 2}, {"kv_heads_per_program": 2, "num_splits": 32}],
    (64, 4096): [{"kv_heads_per_program": 2}, {"kv_heads_per_program": 2, "num_splits": 4}],
    "tiny": [{"num_splits": 3, "block_kv": 16}, {"kv_heads_per_program": 2}],
}
KV_SWEEP_SHAPE = (64, 4096)  # the quantized variants are timed at this shape only
PEER = [dict(k_splits=16, pages_per_compute_block=8), dict(k_splits=8, pages_per_compute_block=8),
        dict(k_splits=4, pages_per_compute_block=16), dict(k_splits=32, pages_per_compute_block=4)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke run: tiny shapes, kernels in interpret mode")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 4096, 32768])
    p.add_argument("--prefill-tokens", type=int, default=8192)
    p.add_argument("--sweep", action="store_true",
                   help="also time tuning variants of our kernels at the target shapes")
    p.add_argument("--sweep-seconds", type=float, default=170.0,
                   help="wall-clock budget of all --sweep variants together (the target shapes "
                        "are swept in the order 64 x 4096, 1 x 32768, 8 x 32768)")
    p.add_argument("--no-peer", action="store_true", help="skip jax's own paged_attention")
    p.add_argument("--no-prefill", action="store_true", help="skip the prefill section")
    p.add_argument("--target-ms", type=float, default=25.0, help="device time per measurement")
    p.add_argument("--kv-cache-dtype", default="fp8_e4m3", choices=["auto", *QUANTIZED_DTYPES],
                   help="also time decode (and check every kernel) on the same pages in this "
                        "cache dtype's format (fp8: raw pages; int8: per-token scales); auto: "
                        "bf16 only")


class Bench:
    def __init__(self, args):
        self.tiny = args.tiny or jax.devices()[0].platform == "cpu"
        self.gpu = jax.devices()[0].platform == "gpu"
        self.backend = "pallas-tpu" if jax.devices()[0].platform == "tpu" else "pallas-gpu"
        self.interpret = self.tiny
        self.n, self.k, self.h, self.bs = (7, 1, 64, 16) if self.tiny else (28, 4, 128, 16)
        self.dtype = jnp.bfloat16
        self.batches = [2] if self.tiny else args.batches
        self.contexts = [64] if self.tiny else args.contexts
        self.prefill_t = 32 if self.tiny else args.prefill_tokens
        self.target_s = args.target_ms / 1e3
        self.mem = _device_memory() * 0.75
        self.key = jax.random.PRNGKey(0)
        self.kv_dtype = None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype
        self.sweep_seconds, self.sweep_deadline = args.sweep_seconds, None  # set by the 1st sweep

    def rand(self, shape, dtype=None):
        self.key, sub = jax.random.split(self.key)
        return jax.random.normal(sub, shape, dtype or self.dtype)

    def timed(self, step, q, consts, calls_per_iter: int, predicted_s: float) -> float:
        """Seconds per call: ``step(q, consts) -> q`` chained n times in one jitted fori_loop.

        The loop itself costs ~7 us an iteration on the H100 (a 5 us ``memcpy32_post`` and two
        tiny fusions in a profiler trace: decode-probe-45ba7bf), which a 33 us call with 4 calls
        an iteration would pay 1.8 us of. So each iteration chains the step ``u`` times: at least
        16 calls or 500 us of predicted work an iteration, whichever comes first. A chain of XLA
        elementwise steps would fuse into one pass (``-(-x)`` even cancels): such steps must
        predict >= 500 us (the copy below), so they run once an iteration."""
        per_iter = max(predicted_s * calls_per_iter, 1e-7)
        u = 1 if self.tiny else int(max(1, min(-(-16 // calls_per_iter), -(-5e-4 // per_iter))))
        n = 1 if self.tiny else int(np.clip(self.target_s / (per_iter * u), 3, 4000))

        def body(i, x, c):
            for _ in range(u):
                x = step(x, c)
            return x
        loop = jax.jit(lambda q, c: jax.lax.fori_loop(0, n, functools.partial(body, c=c), q))
        jax.block_until_ready(loop(q, consts))  # compile + warm
        times = []
        for _ in range(1 if self.tiny else 3):
            t0 = time.perf_counter()
            self.last = jax.block_until_ready(loop(q, consts))
            times.append(time.perf_counter() - t0)
        return float(np.median(times)) / (n * u * calls_per_iter)

    def one_call(self, fn):
        """fn() (one kernel call, for correctness checks). In tiny mode the last timed loop ran
        exactly that one call (n = 1, R = 1): reuse its result instead of compiling again."""
        return self.last if self.tiny else fn()


# ---- ceilings ----------------------------------------------------------------------------------
def copy_bandwidth(b: Bench) -> float:
    """Bytes read + written per second by an elementwise pass over a large buffer (1 GiB: ~0.7
    ms a pass, one pass per loop iteration, see ``Bench.timed``)."""
    x = b.rand((1 << 16,) if b.tiny else (1 << 29,))
    t = b.timed(lambda x, _: -x, x, None, 1, 2 * x.nbytes / 3e12)
    return 2 * x.nbytes / t


def matmul_flops(b: Bench) -> float:
    m = 256 if b.tiny else 8192
    x, y = b.rand((m, m)), b.rand((m, m)) * (1.0 / math.sqrt(m))
    t = b.timed(lambda x, y: jnp.dot(x, y), x, y, 1, 2 * m**3 / 700e12)
    return 2 * m**3 / t


# ---- decode ------------------------------------------------------------------------------------
def decode_inputs(b: Bench, batch: int, ctx: int, rot: int):
    """One decode step's inputs, ``rot`` rotations: q [batch, N, H]; one pool of ``rot * batch``
    sequences' pages in a random order (k, v); block tables [rot, batch, W], rotation r reading
    its own pages; context lengths all ``ctx``; one query row per sequence."""
    w = -(-ctx // b.bs)
    pages = rot * batch * w
    kp, vp = (b.rand((pages + 1, b.bs, b.k, b.h)) for _ in range(2))
    perm = np.random.default_rng(batch * 7 + ctx).permutation(pages)
    tables = jnp.asarray(perm.reshape(rot, batch, w), jnp.int32)
    cl = jnp.full((batch,), ctx, jnp.int32)
    qsl = jnp.arange(batch + 1, dtype=jnp.int32)
    return b.rand((batch, b.n, b.h)), kp, vp, tables, cl, qsl


def decode_case(b: Bench, batch: int, ctx: int, copy_bw: float, sweep: bool, peer: bool) -> dict:
    k, h = b.k, b.h
    kv_bytes = 2 * batch * ctx * k * h * 2
    q_kv_bytes = (int(batch * ctx * k * kv_bytes_per_token_head(b.kv_dtype, h, b.bs))
                  if b.kv_dtype else 0)
    rot = int(np.clip(-(-4 * L2_BYTES // kv_bytes), 1, 16)) if not b.tiny else 1
    if (kv_bytes * (2 if peer else 1) + q_kv_bytes) * rot > b.mem:
        return {"batch": batch, "ctx": ctx, "skipped": "does not fit"}
    q, kp, vp, tables, cl, qsl = decode_inputs(b, batch, ctx, rot)
    bytes_per_call = kv_bytes + 2 * q.nbytes
    pred = bytes_per_call / 2.5e12 + 4e-6

    def ours(tuning, pages=(kp, vp), pred=pred):
        def step(x, c):
            for r in range(rot):
                x = ragged_paged_attention(x, c[0], c[1], c[2][r], cl, qsl, backend=b.backend,
                                           interpret=b.interpret, decode_only=True, **tuning)
            return x
        return b.timed(step, q, (*pages, tables), rot, pred)

    row = {"batch": batch, "ctx": ctx, "kv_MB": kv_bytes / 1e6, "rotations": rot}
    t = ours({})
    row.update(us=t * 1e6, GBps=bytes_per_call / t / 1e9,
               pct_copy=100 * bytes_per_call / t / copy_bw)
    out = b.one_call(lambda: ragged_paged_attention(q, kp, vp, tables[0], cl, qsl,
                                                    backend=b.backend, interpret=b.interpret,
                                                    decode_only=True))
    if batch * ctx <= 65536:
        row["rel_err_vs_ref"] = rel_err(out, paged_attention_ref(*as_f32(q, kp, vp), tables[0], cl, qsl))
    if b.kv_dtype:
        row.update(quantized_decode(b, ours, q, kp, vp, tables, cl, qsl, out, t, q_kv_bytes,
                                     copy_bw))
    if sweep:
        row.update(_sweep(b, ours, q, kp, vp, tables, cl, qsl, rot))
        if isinstance(row.get("kv_sweep"), dict):  # each quantized variant against bf16
            row["kv_sweep_speedup"] = {var: row["us"] / us for var, us in row["kv_sweep"].items()
                                       if isinstance(us, float)}
    if peer:
        row.update(_peer(b, q, kp, vp, tables, cl, rot, pred, out, bytes_per_call, copy_bw))
        row["speedup_vs_jax"] = row.get("jax_us", math.nan) / row["us"]
    del kp, vp
    return row


def _sweep(b, ours, q, kp, vp, tables, cl, qsl, rot) -> dict:
    """SWEEP_DECODE's variants at this shape, each checked against the float32 reference on
    the same inputs before it is timed; the quantized ones (kernel_quantized.py) at
    KV_SWEEP_SHAPE. Also records the default split count and each variant's programs and split
    length (the grid a variant launches, so a split count that rounds to another is visible)."""
    from pagedjax.kernels.decode_attention_gpu import (_num_sms, default_num_splits,
                                                       split_tokens_of)

    batch, w = tables.shape[1:]
    shape = "tiny" if b.tiny else (batch, w * b.bs)
    max_tokens = w * b.bs
    block_kv = min(64, max(16, 1 << max(max_tokens - 1, 0).bit_length()))
    p = default_num_splits(batch, b.k, max_tokens, block_kv, _num_sms())
    ref = paged_attention_ref(*as_f32(q, kp, vp), tables[0], cl, qsl)

    def check(tun):
        return rel_err(ragged_paged_attention(q, kp, vp, tables[0], cl, qsl, backend=b.backend,
                                              interpret=b.interpret, decode_only=True, **tun), ref)

    if b.sweep_deadline is None:
        b.sweep_deadline = time.perf_counter() + b.sweep_seconds
    variants = SWEEP_DECODE.get(shape, [])
    us, errs = checked_timings(variants, b.k, check, ours, b.sweep_deadline)
    grid = {}
    for var in (v for v in variants if b.k % v.get("kv_heads_per_program", 1) == 0):
        splits, bkv = var.get("num_splits", p), var.get("block_kv", block_kv)
        st = split_tokens_of(max_tokens, splits, bkv)
        grid[str(var)] = (f"{batch * b.k // var.get('kv_heads_per_program', 1) * splits} "
                          f"programs, {-(-max_tokens // st)} of {splits} splits live x {st} tokens")
    out = {"default_num_splits": p, "default_rel_err": check({}), "sweep": us,
           "sweep_rel_err": errs, "sweep_grid": grid}
    if b.kv_dtype and (b.tiny or (batch, max_tokens) == KV_SWEEP_SHAPE):
        try:
            out.update(quantized_sweep(b, ours, q, kp, vp, (tables, cl, qsl)))
        except Exception as e:  # noqa: BLE001 - keep the row's main figures
            out["kv_sweep"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    return out


def _peer(b, q, kp, vp, tables, cl, rot, pred, ours_out, bytes_per_call, copy_bw) -> dict:
    """jax.experimental.pallas.ops.gpu.paged_attention, best of a few settings; its layout is
    [K, pages, page_size, H], converted once outside the timing."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    kt, vt = jnp.transpose(kp, (2, 0, 1, 3)), jnp.transpose(vp, (2, 0, 1, 3))
    q = q * q.shape[-1] ** -0.5  # its kernel applies no softmax scale: pre-scale the query
    w = tables.shape[-1]
    best, err = {}, None
    for setting in [dict(k_splits=2, pages_per_compute_block=2)] if b.tiny else PEER:
        if w % setting["k_splits"] or (w // setting["k_splits"]) % min(
                setting["pages_per_compute_block"], w // setting["k_splits"]):
            continue
        fn = functools.partial(paged_attention, interpret=b.interpret, **setting)

        def step(x, c, fn=fn):
            for r in range(rot):
                x = fn(x, c[0], c[1], c[2][r], cl)
            return x
        try:
            t = b.timed(step, q, (kt, vt, tables), rot, pred)
        except Exception as e:  # noqa: BLE001
            logger.warning("jax paged_attention %s failed: %s", setting, e)
            continue
        if not best or t < best["t"]:
            best = {"t": t, "setting": setting}
            err = rel_err(ours_out, b.one_call(lambda fn=fn: fn(q, kt, vt, tables[0], cl)))
    del kt, vt
    if not best:
        return {}
    t = best["t"]
    return {"jax_us": t * 1e6, "jax_pct_copy": 100 * bytes_per_call / t / copy_bw,
            "jax_setting": str(best["setting"]), "rel_diff_vs_jax": err}


# ---- correctness on the device, compile counting, KV write ------------------------------------
def correctness(b: Bench) -> dict:
    """Ragged and decode kernels against the reference on a batch with the edge-case lengths."""
    long, scale = (40, 8) if b.tiny else (1000, 1)
    out = {}
    for name, seqs, kw in [
        ("ragged", [(1, 1), (15, 15), (0, 40), (1, 16), (5, 17), (17, long), (64 // scale, 64)],
         {}),
        ("decode", [(1, 1), (1, 15), (0, 40), (1, 16), (1, 17), (1, long)], {"decode_only": True}),
        ("decode-split4", [(1, 1), (1, 15), (0, 40), (1, 16), (1, 17), (1, long)],
         {"decode_only": True, "num_splits": 4}),
    ]:
        args = _ragged_batch(b, seqs)
        if b.tiny and not kw:
            kw = {"block_m": 32, "block_n": 16}
        ref = paged_attention_ref(*as_f32(*args[:3]), *args[3:])
        out[name] = _check(b, args, kw, ref)
        if b.kv_dtype:  # the same pages in the cache dtype's format, against the reference on them
            qargs = (args[0], *cache_kv(args[1], args[2], b.kv_dtype), *args[3:])
            ref = paged_attention_ref(args[0].astype(jnp.float32), *qargs[1:])
            out[f"{name}-{b.kv_dtype}"] = _check(b, qargs, kw, ref)
    if b.kv_dtype:
        out[f"write-{b.kv_dtype}"] = check_quantized_write(b)
    return out


def _check(b: Bench, args, kw, ref) -> dict:
    try:
        res = ragged_paged_attention(*args, backend=b.backend, interpret=b.interpret, **kw)
    except Exception as e:  # noqa: BLE001 - a kernel that fails to build is a finding
        return {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
    real = int(args[5][-1])
    return {"rel_err": rel_err(res, ref), "nan": bool(jnp.isnan(res).any()),
            "padding_zero": bool((res[real:] == 0).all())}


def _ragged_batch(b: Bench, seqs, width: int | None = None):
    """A step with one sequence per (q_len, context_len), 3 padding rows, pages in random order and
    out-of-range table entries past each sequence's blocks."""
    used = [-(-c // b.bs) for _, c in seqs]
    width = width or max(used)
    perm = np.random.default_rng(sum(used)).permutation(sum(used) + 3)
    tables = np.full((len(seqs), width), 10**6, np.int32)
    for i, (at, n) in enumerate(zip(np.cumsum([0] + used[:-1]), used)):
        tables[i, :n] = perm[at:at + n]
    qsl = np.concatenate([[0], np.cumsum([ql for ql, _ in seqs])]).astype(np.int32)
    pages = len(perm)
    return (b.rand((int(qsl[-1]) + 3, b.n, b.h)), b.rand((pages, b.bs, b.k, b.h)),
            b.rand((pages, b.bs, b.k, b.h)), jnp.asarray(tables),
            jnp.asarray([c for _, c in seqs], jnp.int32), jnp.asarray(qsl))


def _write_step(pool, c, *, backend, interpret):
    return write_kv(pool[0], pool[1], c[0], c[1], c[2], backend=backend, interpret=interpret)


def compilations_after_warmup(b: Bench) -> int:
    """A jitted decode attention compiled once for a bucket (T, S, W, pool), then fed new context
    lengths, block tables and queries of that bucket: any further compilation would be an engine
    recompile."""
    fn = jax.jit(functools.partial(ragged_paged_attention, backend=b.backend,
                                   interpret=b.interpret, decode_only=True))
    first = _ragged_batch(b, [(1, 20), (1, 33), (0, 0), (1, 50)], width=4)
    jax.block_until_ready(fn(*first))
    warm = fn._cache_size()
    for lens in ([(1, 3), (1, 64), (1, 1), (0, 7)], [(0, 0), (1, 17), (1, 16), (1, 15)]):
        new = _ragged_batch(b, lens, width=4)
        jax.block_until_ready(fn(new[0], *first[1:3], *new[3:]))
    return fn._cache_size() - warm


def kv_write(b: Bench) -> dict:
    """This step's K/V written into slots of the (loop-carried, in-place) pool: the XLA scatter
    (``write_kv_ref``) and the fused Pallas launch (``write_kv(backend="pallas-gpu")``)."""
    pages = 64 if b.tiny else 16384
    kp, vp = b.rand((pages, b.bs, b.k, b.h)), b.rand((pages, b.bs, b.k, b.h))
    out = {}
    pools = [("", (kp, vp))]
    if b.kv_dtype:
        pools.append((f"_{b.kv_dtype}", cache_kv(kp, vp, b.kv_dtype)))
    for t in ([4] if b.tiny else [64, 2048]):
        kn, vn = b.rand((t, b.k, b.h)), b.rand((t, b.k, b.h))
        slots = jnp.asarray(np.random.default_rng(t).permutation(pages * b.bs)[:t], jnp.int32)
        for suffix, pool in pools:
            for name, backend in (("xla", "reference"), ("pallas", b.backend)):
                step = functools.partial(_write_step, backend=backend, interpret=b.interpret)
                key = f"{name}_T{t}{suffix}_us"
                try:
                    out[key] = b.timed(step, pool, (kn, vn, slots), 1, 5e-6) * 1e6
                except Exception as e:  # noqa: BLE001
                    out[key] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    return out


# ---- driver ------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    b = Bench(args)
    record = {"heads": {"q": b.n, "kv": b.k, "head_dim": b.h}, "block_size": b.bs,
              "dtype": "bfloat16", "kv_cache_dtype": b.kv_dtype or "auto",
              "interpret": b.interpret, "backend": b.backend, "decode": []}
    peer = not args.no_peer and b.backend == "pallas-gpu"
    targets = [(64, 4096), (1, 32768), (8, 32768)]  # in this order: the sweeps' priority
    grid = [(bt, c) for bt in b.batches for c in b.contexts]

    def decode_rows(shapes):
        for batch, ctx in shapes:
            try:
                row = decode_case(b, batch, ctx, record["copy_GBps"] * 1e9,
                                  args.sweep and (b.tiny or (batch, ctx) in targets), peer)
            except Exception as e:  # noqa: BLE001 - record the failure, keep measuring
                row = {"batch": batch, "ctx": ctx, "error": f"{type(e).__name__}: {str(e)[:400]}"}
            record["decode"].append(row)
            logger.info("decode %s", row)
            _save(record, args)

    def prefill_rows():
        record["prefill"], record["prefill_best"] = prefill(b, record["matmul_TFLOPs"] * 1e12,
                                                            args.sweep)

    # Most wanted first, each saved as it lands: a run cut short still leaves the target figures.
    sections = [
        ("correctness", lambda: record.__setitem__("correctness", correctness(b))),
        ("copy", lambda: record.__setitem__("copy_GBps", copy_bandwidth(b) / 1e9)),
        ("matmul", lambda: record.__setitem__("matmul_TFLOPs", matmul_flops(b) / 1e12)),
        ("decode targets", lambda: decode_rows([s for s in targets if s in grid])),
        *([] if args.no_prefill else [("prefill", prefill_rows)]),
        ("decode grid", lambda: decode_rows([s for s in grid if s not in targets])),
        ("kv write", lambda: record.__setitem__("kv_write_us", kv_write(b))),
        ("compilations", lambda: record.__setitem__("compilations_after_warmup",
                                                    compilations_after_warmup(b))),
    ]
    for name, section in sections:
        t0 = time.perf_counter()
        try:
            section()
        except Exception as e:  # noqa: BLE001 - record the failure, keep measuring
            logger.exception("section %s failed", name)
            record.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:500]}"
        logger.info("section %s: %.1f s", name, time.perf_counter() - t0)
        _save(record, args)
    record["decode"].sort(key=lambda r: (r["batch"], r["ctx"]))
    path = _save(record, args)
    _plot(path.with_suffix(".png"), record)
    cols = ["batch", "ctx", "us", "GBps", "pct_copy", "jax_us", "jax_pct_copy", "speedup_vs_jax"]
    if b.kv_dtype:
        cols += ["kv_us", "kv_pct_copy", "kv_speedup"]
    common.print_table([r for r in record["decode"] if "us" in r], cols)
    common.print_table([r for r in record.get("prefill", []) if "TFLOPs" in r],
                       ["case", "q_len", "ctx", "us", "TFLOPs", "pct_matmul", "tile"])
    summary = _summary(record)
    print(summary)
    return summary


def _summary(rec: dict) -> dict:
    def row(batch, ctx):
        return next((r for r in rec["decode"] if r["batch"] == batch and r["ctx"] == ctx), {})
    pb = rec.get("prefill_best") or {}
    cud = pb.get("cudnn", {}).get("TFLOPs")
    pre = pb.get("causal", {}).get("TFLOPs")
    quantized = {}
    if rec.get("kv_cache_dtype", "auto") != "auto":
        prefix = "fp8" if rec["kv_cache_dtype"].startswith("fp8") else rec["kv_cache_dtype"]
        quantized = {f"{prefix}_decode_speedup": row(64, 4096).get("kv_speedup"),
                     **({f"{prefix}_decode_speedup_sweep": row(64, 4096)["kv_sweep_speedup"]}
                        if "kv_sweep_speedup" in row(64, 4096) else {}),
                     f"{prefix}_decode_b64_ctx4096_pct_copy_bw": row(64, 4096).get("kv_pct_copy"),
                     "kv_cache_dtype": rec["kv_cache_dtype"]}
    return {**quantized,
            "decode_b64_ctx4096_pct_copy_bw": row(64, 4096).get("pct_copy"),
            "decode_b64_ctx4096_speedup_vs_jax": row(64, 4096).get("speedup_vs_jax"),
            "decode_b1_ctx32768_pct_copy_bw": row(1, 32768).get("pct_copy"),
            "prefill_8k_vs_cudnn": pre / cud if pre and cud else None,
            "compilations_after_warmup": rec.get("compilations_after_warmup"),
            "copy_GBps": rec.get("copy_GBps"), "matmul_TFLOPs": rec.get("matmul_TFLOPs")}


def _save(record, args):
    return common.write_result("kernel", _summary(record), record, args.out,
                               tag="tiny" if args.tiny else "")


def _plot(path, rec):
    rows = [r for r in rec.get("decode", []) if "us" in r]
    labels = [f"{r['batch']}x{r['ctx']}" for r in rows]
    panels = [{"kind": "bars", "title": "decode attention, % of copy bandwidth",
               "ylabel": "% of copy bw", "labels": labels, "rotation": 45,
               "values": [r["pct_copy"] for r in rows],
               "notes": [f"{r['pct_copy']:.0f}" + (f"/{r['jax_pct_copy']:.0f}" if "jax_pct_copy"
                                                    in r else "") for r in rows]}]
    pb = rec.get("prefill_best") or {}
    names = [n for n in ("causal", "chunk", "cudnn") if pb.get(n, {}).get("TFLOPs")]
    panels.append({"kind": "bars", "title": "prefill attention (ours causal, ours chunk, cuDNN)",
                   "ylabel": "TFLOP/s", "labels": names,
                   "values": [pb[n]["TFLOPs"] for n in names],
                   "hlines": {"bf16 matmul": rec.get("matmul_TFLOPs")}})
    plots.save(path, panels, title=f"{common.device_name()}: ours / jax's in the left notes")


def _device_memory() -> float:
    try:
        return float(jax.devices()[0].memory_stats()["bytes_limit"])
    except Exception:  # noqa: BLE001 - CPU: no stats; tiny shapes only
        return 8e9
