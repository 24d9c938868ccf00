"""The quantized-KV parts of ``python -m benchmarks kernel --kv-cache-dtype D``: decode on the same
pages in D's format as the engine stores it (raw fp8 pages for fp8, QuantizedPages with a scale per
token and KV head for int8: pagedjax/kernels/quantization.py): time, bandwidth, speedup over bf16,
error; its variant sweep; and a device check of the KV write in that format. Findings:
benchmarks/KERNEL_NOTES.md ("Quantized KV cache") and
benchmarks/results/gpu-nvidia_h100_80gb_hbm3/decode-probe-e24938b."""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.kernels import dequantize_pages, paged_attention_ref, quantize_pages, write_kv_ref
from pagedjax.kernels.dispatch import ragged_paged_attention, write_kv
from pagedjax.kernels.quantization import (SCALE_BYTES, has_token_scales, is_quantized, saturate,
                                           storage_dtype)

from .common import rel_err


def cache_pages(pages, name: str, keys: bool = False):
    """Pages -> the same values in cache dtype ``name``'s format: QuantizedPages for a dtype with
    scales (int8; int4, whose ``keys`` take a scale per channel of a block), else raw fp8 pages
    (saturated to +-qmax; the benchmark's N(0, 1) values need no static scale to fit)."""
    if has_token_scales(name):
        return quantize_pages(pages, name, keys=keys)
    return saturate(pages, storage_dtype(name))


def cache_kv(k_pages, v_pages, name: str) -> tuple:
    """(K, V) pages in cache dtype ``name``'s format."""
    return cache_pages(k_pages, name, keys=True), cache_pages(v_pages, name)


def kv_bytes_per_token_head(name: str, h: int, block_size: int) -> float:
    """K + V bytes of one token and KV head in cache dtype ``name``'s format, scales included
    (int4's K scales are per block: 2 H bytes over its tokens)."""
    if name == "int4":
        return h + 2 + 2 * h / block_size
    return 2 * (h + (SCALE_BYTES if has_token_scales(name) else 0))  # raw fp8: no scale bytes


def quantized_decode(b, ours, q, kp, vp, tables, cl, qsl, bf16_out, bf16_t, kv_bytes,
                     copy_bw) -> dict:
    """The same decode on the same pages in ``b.kv_dtype``'s format, through
    ``ragged_paged_attention`` with its defaults (kv_heads_per_program 2 on raw fp8 pages): time,
    bandwidth, speedup over bf16, error against the reference on those pages and against the
    bf16 output."""
    name = b.kv_dtype
    qk, qv = cache_kv(kp, vp, name)
    bytes_per_call = kv_bytes + 2 * q.nbytes
    try:
        t = ours({}, (qk, qv), bytes_per_call / 2.5e12 + 4e-6)
    except Exception as e:  # noqa: BLE001 - a kernel that fails to build is a finding
        return {"kv_error": f"{type(e).__name__}: {str(e)[:1500]}"}
    out = b.one_call(lambda: ragged_paged_attention(q, qk, qv, tables[0], cl, qsl,
                                                    backend=b.backend, interpret=b.interpret,
                                                    decode_only=True))
    row = {"kv_dtype": name, "kv_us": t * 1e6, "kv_GBps": bytes_per_call / t / 1e9,
           "kv_pct_copy": 100 * bytes_per_call / t / copy_bw, "kv_speedup": bf16_t / t,
           "kv_rel_diff_vs_bf16": rel_err(out, bf16_out)}
    if q.shape[0] * tables.shape[-1] * b.bs <= 65536:
        row["kv_rel_err_vs_ref"] = rel_err(out, paged_attention_ref(q.astype(jnp.float32), qk, qv,
                                                                 tables[0], cl, qsl))
    return row


# Quantized decode variants, timed at 64 x 4096 (and at the tiny shape with --tiny) on the cache
# dtype's format. Raw fp8: the default is kvp 2 with 5 stages (109 us in the decode probe, 115
# with the kernel's 3); the sweep re-times the runners-up of the probe in this benchmark's loop
# (6 stages; block_kv 32 with 8 stages) and the old default (3 stages). Per-token
# QuantizedPages (int8): kv_heads_per_program (two KV heads' 7 + 7 query heads in one 16-row
# tile, one 256-wide gather per token) alone and with the tile knobs it shifts. Earlier sweeps
# (float32 scales, float16 matmuls, block_kv 32/128, 8 warps, 2/4 stages) are in
# benchmarks/KERNEL_NOTES.md.
SWEEP_QUANTIZED = {
    "raw": [{"num_stages": 6}, {"block_kv": 32, "num_stages": 8}, {"num_stages": 3}],
    "per_token": [{"kv_heads_per_program": 2}, {"kv_heads_per_program": 2, "num_splits": 4},
                  {"kv_heads_per_program": 2, "block_kv": 32},
                  {"kv_heads_per_program": 2, "num_warps": 8},
                  {"kv_heads_per_program": 4, "block_kv": 32, "num_warps": 8, "num_splits": 4}],
    "tiny": [{"kv_heads_per_program": 2}, {"num_splits": 3, "block_kv": 32}],
    # int4 (one KV head per program: the packed halves): the float16 path (int4_dtype) with
    # its PTX (int4_asm "dequant", the default, "unpack") and without, then the tile and
    # pipeline knobs on it. K's parameters loaded once per page instead of per token ran
    # 0.80-1.25x bf16 against the default's 1.33x (benchmarks/KERNEL_NOTES.md) and were removed.
    "int4": [{"int4_dtype": "float16"}, {"int4_dtype": "float16", "int4_asm": "unpack"},
             {"int4_dtype": "float16", "int4_asm": "none"},
             {"int4_dtype": "float16", "block_kv": 128}, {"int4_dtype": "float16", "num_warps": 8},
             {"int4_dtype": "float16", "num_stages": 4}, {"int4_dtype": "float16", "num_splits": 4},
             {"int4_dtype": "float16", "block_kv": 32}],
    "tiny_int4": [{"num_splits": 3, "block_kv": 32}, {"int4_dtype": "float16"}],
}
SWEEP_TOL = 1e-2  # bf16 output against the float32 reference: ~2e-3 when right


def checked_timings(variants, kv_heads: int, check, timed, deadline: float) -> tuple[dict, dict]:
    """Each variant (a dict of tuning knobs) checked first: ``check(tun)`` is its relative error
    against the reference on the same inputs; only a variant within SWEEP_TOL is then timed
    (``timed(tun)``, seconds per call). Variants left after ``deadline`` (perf_counter) are
    skipped. Returns ({variant: us or why not}, {variant: rel err})."""
    us, errs = {}, {}
    for var in variants:
        key = str(var)
        kvp = var.get("kv_heads_per_program", 1)
        if kv_heads % kvp:
            us[key] = f"skipped: {kv_heads} KV heads"
            continue
        if time.perf_counter() > deadline:
            us[key] = "skipped: --sweep-seconds spent"
            continue
        try:
            errs[key] = err = check(var)
            us[key] = timed(var) * 1e6 if err <= SWEEP_TOL else f"wrong: rel_err {err:.2e}"
        except Exception as e:  # noqa: BLE001 - a variant that fails to build is a finding
            us[key] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    return us, errs


def quantized_sweep(b, ours, q, kp, vp, meta) -> dict:
    """Microseconds of each SWEEP_QUANTIZED variant of the cache dtype's format on the same pages
    in that format, each checked against the reference on those pages first (rel errors under
    ``kv_sweep_rel_err``)."""
    tables, cl, qsl = meta
    pages = cache_kv(kp, vp, b.kv_dtype)
    ref = paged_attention_ref(q.astype(jnp.float32), *pages, tables[0], cl, qsl)

    def check(tun):
        return rel_err(ragged_paged_attention(q, *pages, tables[0], cl, qsl, backend=b.backend,
                                              interpret=b.interpret, decode_only=True, **tun), ref)

    variants = SWEEP_QUANTIZED["tiny_int4" if b.tiny and b.kv_dtype == "int4" else
                               "tiny" if b.tiny else "int4" if b.kv_dtype == "int4" else
                               "per_token" if has_token_scales(b.kv_dtype) else "raw"]
    us, errs = checked_timings(variants, b.k, check, lambda tun: ours(tun, pages),
                               b.sweep_deadline)
    return {"kv_sweep": us, "kv_sweep_rel_err": errs}


def check_quantized_write(b) -> dict:
    """The fused Pallas KV write into a pool of the cache dtype's format against the XLA
    reference. Raw fp8: the saturating cast, identical bits expected (a few rows hold 1e5, beyond
    both fp8 formats' range); QuantizedPages: the device's float32 division may round a value to
    the neighbouring level, nothing more."""
    pages, t = 32, 40
    pool = list(cache_kv(b.rand((pages, b.bs, b.k, b.h)), b.rand((pages, b.bs, b.k, b.h)),
                         b.kv_dtype))
    new = [(b.rand((t, b.k, b.h)) * 3.0).at[::5, 0, 0].set(1e5) for _ in range(2)]
    slots = np.random.default_rng(2).permutation(pages * b.bs)[:t].astype(np.int32)
    slots[::7] = -1
    slots = jnp.asarray(slots)
    try:
        got = write_kv(*pool, *new, slots, backend=b.backend, interpret=b.interpret)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e)[:1500]}", "rel_err": math.inf,
                "nan": True, "padding_zero": False}
    want = write_kv_ref(*pool, *new, slots)
    if is_quantized(pool[0]):
        values = [(g.data, w.data) for g, w in zip(got, want)]
        deq = [(dequantize_pages(g), dequantize_pages(w)) for g, w in zip(got, want)]
        extra = {"scales_identical": all(bool((g.scale == w.scale).all())
                                         for g, w in zip(got, want))}
    else:
        values = list(zip(got, want))
        deq = [(g.astype(jnp.float32), w.astype(jnp.float32)) for g, w in zip(got, want)]
        extra = {}
    bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint8)  # noqa: E731 - NaN-proof equality
    same = [float(jnp.mean((bits(g) == bits(w)).astype(jnp.float32))) for g, w in values]
    return {"rel_err": max(rel_err(g, w) for g, w in deq), "values_identical_frac": min(same),
            **extra, "nan": any(not bool(jnp.isfinite(g).all()) for g, _ in deq),
            "padding_zero": True}
