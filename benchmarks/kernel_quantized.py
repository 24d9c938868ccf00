"""The quantized-KV parts of ``python -m benchmarks kernel --kv-cache-dtype D``: decode on the same
pages quantized (time, bandwidth, speedup over bf16, error), its variant sweep, and a device check
of the quantizing KV write. Findings: benchmarks/KERNEL_NOTES.md ("Quantized KV cache")."""
from __future__ import annotations

import functools
import math
import time

import jax.numpy as jnp
import numpy as np

from pagedjax.kernels import dequantize_pages, paged_attention_ref, quantize_pages, write_kv_ref
from pagedjax.kernels.dispatch import ragged_paged_attention, write_kv

from .common import rel_err


def quantized_decode(b, ours, q, kp, vp, tables, cl, qsl, bf16_out, bf16_t, kv_bytes,
                     copy_bw) -> dict:
    """The same decode on the same pages quantized to ``b.kv_dtype``: time, bandwidth, speedup
    over bf16, error against the reference on the quantized pages and against the bf16 output."""
    name = b.kv_dtype
    qk, qv = quantize_pages(kp, name), quantize_pages(vp, name)
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


# Quantized decode variants, timed at 64 x 4096 (and at the tiny shape with --tiny). Earlier
# sweeps (float32 scales, float16 matmuls, block_kv 32/128, 8 warps, 2/4 stages, splits 1/4) are in
# benchmarks/KERNEL_NOTES.md; these time the knobs added against the per-token overhead:
# kv_heads_per_program (two KV heads' 7 + 7 query heads in one 16-row tile, one 256-wide gather
# per token) alone and with the tile knobs it shifts. "scales": "none" times raw 1-byte pages
# without scales (the ceiling of the conversion alone), at kvp 2 and 1.
SWEEP_QUANTIZED = {
    "target": [{"kv_heads_per_program": 2}, {"kv_heads_per_program": 2, "num_splits": 4},
               {"kv_heads_per_program": 2, "block_kv": 32},
               {"kv_heads_per_program": 2, "num_warps": 8},
               {"kv_heads_per_program": 4, "block_kv": 32, "num_warps": 8, "num_splits": 4},
               {"kv_heads_per_program": 2, "scales": "none"}, {"scales": "none"}],
    "tiny": [{"kv_heads_per_program": 2}, {"num_splits": 3, "block_kv": 32},
             {"scales": "none", "num_splits": 3, "block_kv": 16}],
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


def quantized_sweep(b, ours, q, kp, vp, meta, rot) -> dict:
    """Microseconds of each SWEEP_QUANTIZED variant on the same pages quantized, each checked
    against the reference on those pages first (rel errors under ``kv_sweep_rel_err``)."""
    from pagedjax.kernels.decode_attention_gpu import paged_decode_attention

    tables, cl, qsl = meta
    qk, qv = (quantize_pages(x, b.kv_dtype) for x in (kp, vp))
    pages = {"bf16": (qk, qv), "none": (qk.data, qv.data)}
    q32 = q.astype(jnp.float32)
    refs = {"bf16": paged_attention_ref(q32, qk, qv, tables[0], cl, qsl)}

    def split(var):
        tun = dict(var)
        return tun.pop("scales", "bf16"), tun

    def ref(scales):
        if scales not in refs:  # raw pages: value = stored number
            refs[scales] = paged_attention_ref(
                q32, *(x.astype(jnp.float32) for x in pages[scales]), tables[0], cl, qsl)
        return refs[scales]

    def check(var):
        scales, tun = split(var)
        if scales == "none":  # bypasses dispatch, which rightly refuses unscaled 1-byte pages
            out = paged_decode_attention(q, *pages[scales], tables[0], cl, qsl,
                                         scale=q.shape[-1] ** -0.5, interpret=b.interpret, **tun)
        else:
            out = ragged_paged_attention(q, *pages[scales], tables[0], cl, qsl,
                                         backend=b.backend, interpret=b.interpret,
                                         decode_only=True, **tun)
        return rel_err(out, ref(scales))

    def timed(var):
        scales, tun = split(var)
        if scales == "none":
            return b.timed(functools.partial(_raw_decode_step, fn=paged_decode_attention, b=b,
                                             tun=tun), q, (*pages[scales], *meta), rot, 1e-4)
        return ours(tun, pages[scales])

    us, errs = checked_timings(SWEEP_QUANTIZED["tiny" if b.tiny else "target"], b.k, check, timed,
                               b.sweep_deadline)
    return {"kv_sweep": us, "kv_sweep_rel_err": errs}


def _raw_decode_step(x, c, *, fn, b, tun):
    for r in range(c[2].shape[0]):
        x = fn(x, c[0], c[1], c[2][r], c[3], c[4], scale=x.shape[-1] ** -0.5,
               interpret=b.interpret, **tun)
    return x


def check_quantized_write(b) -> dict:
    """The fused Pallas KV write quantizing into a QuantizedPages pool against the XLA reference:
    the device's float32 division may round a value to the neighbouring level, nothing more."""
    pages, t = 32, 40
    pool = [quantize_pages(b.rand((pages, b.bs, b.k, b.h)), b.kv_dtype) for _ in range(2)]
    new = [b.rand((t, b.k, b.h)) * 3.0 for _ in range(2)]
    slots = np.random.default_rng(2).permutation(pages * b.bs)[:t].astype(np.int32)
    slots[::7] = -1
    slots = jnp.asarray(slots)
    try:
        got = write_kv(*pool, *new, slots, backend=b.backend, interpret=b.interpret)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e)[:1500]}", "rel_err": math.inf,
                "nan": True, "padding_zero": False}
    want = write_kv_ref(*pool, *new, slots)
    same = [float(jnp.mean((g.data.astype(jnp.float32) == w.data.astype(jnp.float32))
                           .astype(jnp.float32))) for g, w in zip(got, want)]
    deq = [(dequantize_pages(g), dequantize_pages(w)) for g, w in zip(got, want)]
    return {"rel_err": max(rel_err(g, w) for g, w in deq), "values_identical_frac": min(same),
            "scales_identical": all(bool((g.scale == w.scale).all()) for g, w in zip(got, want)),
            "nan": any(bool(jnp.isnan(g).any()) for g, _ in deq), "padding_zero": True}
