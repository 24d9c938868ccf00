"""The quantized-KV parts of ``python -m benchmarks kernel --kv-cache-dtype D``: decode on the same
pages quantized (time, bandwidth, speedup over bf16, error), its variant sweep, and a device check
of the quantizing KV write. Findings: benchmarks/KERNEL_NOTES.md ("Quantized KV cache")."""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from pagedjax.kernels import (QuantizedPages, dequantize_pages, paged_attention_ref,
                              quantize_pages, write_kv_ref)
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


# Quantized decode variants: tuning knobs and the scales' storage ("f32": float32 scales, 4-byte
# gathers the Triton pipeliner prefetches, where it loads 2-byte ones synchronously; "none": raw
# 1-byte pages without scales, the ceiling of the conversion alone).
SWEEP_QUANTIZED = [{"scales": "f32"}, {"scales": "none"}, {"num_stages": 4}, {"num_splits": "x2"},
                   {"block_kv": 128}, {"block_kv": 32}, {"num_warps": 8},
                   {"block_kv": 128, "num_warps": 8}]


def quantized_sweep(b, ours, q, kp, vp, meta, rot, splits) -> dict:
    """Microseconds of each SWEEP_QUANTIZED variant on the same pages quantized."""
    from pagedjax.kernels.decode_attention_gpu import paged_decode_attention

    qk, qv = (quantize_pages(x, b.kv_dtype) for x in (kp, vp))
    out = {}
    for var in SWEEP_QUANTIZED:
        tun = dict(var)
        scales = tun.pop("scales", "bf16")
        if "num_splits" in tun:
            tun["num_splits"] = splits * 2 if tun["num_splits"] == "x2" else max(splits // 2, 1)
        pages = {"bf16": (qk, qv), "f32": tuple(QuantizedPages(x.data, x.scale.astype(
            jnp.float32)) for x in (qk, qv)), "none": (qk.data, qv.data)}[scales]
        try:
            if scales == "none":  # bypasses dispatch, which rightly refuses unscaled 1-byte pages
                out[str(var)] = b.timed(
                    functools.partial(_raw_decode_step, fn=paged_decode_attention, b=b, tun=tun),
                    q, (*pages, *meta), rot, 1e-4) * 1e6
            else:
                out[str(var)] = ours(tun, pages) * 1e6
        except Exception as e:  # noqa: BLE001
            out[str(var)] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    return out


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
