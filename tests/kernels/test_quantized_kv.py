"""QuantizedPages (1-byte values with a bf16 scale per token and KV head: the int8 cache's format;
fp8 data in it stays accepted, the fp8 cache itself is raw pages, test_fp8_kv.py): the
quantize/dequantize round trip, the KV writes, and every attention kernel (GPU-style and TPU
interpret mode) against the reference on the *same* quantized pages.

Inputs follow test_paged_attention.py: fresh random draws, pool pages in a random order, block
table entries past a sequence's blocks far out of range, padded sequences with a stale context,
outputs poisoned (NaN) by interpret mode, context lengths 0/1/15/16/17/long, GQA 1/4/7. The
reference dequantizes in float32; the kernels convert the 1-byte values to q's dtype and apply the
scales to scores and probabilities, so they agree to float rounding, not to quantization error.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.kernels import QuantizedPages, dequantize_pages, paged_attention_ref, quantize_pages
from pagedjax.kernels.dispatch import ragged_paged_attention, write_kv
from pagedjax.kernels.quantization import QUANTIZED_DTYPES, qmax, quantize, row_scale
from tests.kernels.test_paged_attention import DECODE, RAGGED, random_batch
from tests.kernels.test_paged_attention import check as check_plain
from tests.kernels.seeds import seed_of

NAMES = [n for n in QUANTIZED_DTYPES if n != "int4"]  # int4: test_int4_kv.py
TOL = {"float32": 2e-3, "float16": 5e-3, "bfloat16": 1.5e-2}
# Worst relative error of one dequantized element against its row's absmax: half a step of the
# grid at the top of the row's range (int8: 0.5 / 127; fp8: half an ulp at 448 or 57344).
ROUND_TRIP = {"int8": 0.5 / 127 * 1.01, "fp8_e4m3": 2.0 ** -4 * 1.01, "fp8_e5m2": 2.0 ** -3 * 1.01}

# (kv dtype, q dtype, N, K, H, block_size)
CASES = [
    pytest.param("fp8_e4m3", "bfloat16", 8, 2, 128, 16, id="e4m3-bf16-gqa4-h128-bs16"),
    pytest.param("fp8_e5m2", "float32", 2, 2, 64, 8, id="e5m2-f32-gqa1-h64-bs8"),
    pytest.param("int8", "bfloat16", 7, 1, 64, 32, id="int8-bf16-gqa7-h64-bs32"),
    pytest.param("int8", "float32", 14, 2, 128, 16, id="int8-f32-gqa7-h128-bs16"),
]


def quantized_batch(seed, seqs, name, dtype, n, k, h, bs, pad_rows=3):
    q, kp, vp, *meta = random_batch(seed, seqs, n, k, h, bs, "float32", pad_rows)
    # a spread of row magnitudes, as real K/V have (outlier heads, tiny values in early layers)
    rng = np.random.default_rng(seed + 1)
    mag = jnp.asarray(10.0 ** rng.uniform(-3, 1.5, kp.shape[:3] + (1,)), jnp.float32)
    return (q.astype(dtype), quantize_pages(kp * mag, name), quantize_pages(vp * mag[::-1], name),
            *meta)


def check(out, args, dtype):
    check_plain(out, args, dtype, tol=TOL)


# ---- quantize / dequantize ---------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_round_trip_within_the_dtypes_precision(name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4, 128)) * 10.0 ** rng.uniform(-4, 3, (64, 4, 1))
    x[3, 1] = 0.0  # an all-zero row: scale 1, values 0
    x[5, 2, 7] = 1e4  # an outlier: its row's absmax, stored without clipping
    data, scale = quantize(jnp.asarray(x, jnp.float32), QUANTIZED_DTYPES[name])
    assert data.dtype == QUANTIZED_DTYPES[name] and scale.dtype == jnp.bfloat16
    assert scale.shape == (64, 4, 1)
    back = np.asarray(dequantize_pages(QuantizedPages(data, scale)), np.float64)
    absmax = np.abs(x).max(axis=-1, keepdims=True)
    err = np.abs(back - x) / np.where(absmax == 0, 1, absmax)
    assert err.max() <= ROUND_TRIP[name], f"worst error {err.max():.2e} of the row's absmax"
    assert (back[3, 1] == 0).all() and float(scale[3, 1, 0]) == 1.0
    assert back[5, 2, 7] == pytest.approx(1e4, rel=ROUND_TRIP[name])
    # the scale is absmax / qmax rounded up: the largest element maps to at most qmax
    top = np.asarray(scale, np.float64)[absmax > 0] * qmax(QUANTIZED_DTYPES[name])
    assert (top >= absmax[absmax > 0]).all() and (top <= absmax[absmax > 0] * (1 + 2 ** -6)).all()


def test_row_scale_matches_its_definition():
    absmax = jnp.asarray([0.0, 1e-6, 0.3, 127.0, 5e3], jnp.float32)
    s = np.asarray(row_scale(absmax, jnp.int8))
    assert s[0] == 1.0
    assert (s[1:] >= np.asarray(absmax[1:]) / 127).all()
    assert (np.asarray(jnp.asarray(s, jnp.bfloat16).astype(jnp.float32)) == s).all()


# ---- KV writes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["pallas-gpu", "reference"])
@pytest.mark.parametrize("name", NAMES)
def test_write_kv_quantizes_like_the_reference(name, backend):
    """Fused Pallas write and XLA scatter store the same bits; padding slots stay untouched; a
    written row dequantizes to its input within the dtype's precision."""
    from pagedjax.kernels import write_kv_ref

    rng = np.random.default_rng(4)
    nb, bs, k, h, t = 9, 8, 2, 64, 13
    pool = [quantize_pages(jnp.asarray(rng.standard_normal((nb, bs, k, h)), jnp.float32), name)
            for _ in range(2)]
    new = [jnp.asarray(rng.standard_normal((t, k, h)) * 10.0 ** rng.uniform(-3, 2, (t, k, 1)),
                       jnp.bfloat16) for _ in range(2)]
    slots = rng.permutation(nb * bs)[:t].astype(np.int32)
    slots[[0, 5, 12]] = -1
    slots[1] = nb * bs - 1
    got = write_kv(*pool, *new, jnp.asarray(slots), backend=backend, interpret=True)
    want = write_kv_ref(*pool, *new, jnp.asarray(slots))
    for g, w, before, x in zip(got, want, pool, new):
        assert isinstance(g, QuantizedPages)
        for a, b in zip(g, w):
            np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                          np.asarray(b.astype(jnp.float32)))
        flat = lambda p: np.asarray(dequantize_pages(p)).reshape(nb * bs, k, h)  # noqa: E731
        untouched = np.setdiff1d(np.arange(nb * bs), slots)
        np.testing.assert_array_equal(flat(g)[untouched], flat(before)[untouched])
        live = slots >= 0
        x = np.asarray(x.astype(jnp.float32))[live]
        absmax = np.abs(x).max(axis=-1, keepdims=True)
        assert (np.abs(flat(g)[slots[live]] - x) <= ROUND_TRIP[name] * absmax).all()


# ---- attention kernels -------------------------------------------------------------------------
@pytest.mark.parametrize("name,dtype,n,k,h,bs,tuning", [
    *[pytest.param(*c.values, {}, id=c.id) for c in CASES],
    *[pytest.param(*c.values, {"num_splits": 4, "block_kv": 16}, id=c.id + "-split4")
      for c in CASES[::3]],
])
def test_gpu_decode(name, dtype, n, k, h, bs, tuning):
    args = quantized_batch(seed_of(name, n, k, h, bs), DECODE, name, dtype, n, k, h, bs)
    out = ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, decode_only=True,
                                 **tuning)
    check(out, args, dtype)


@pytest.mark.parametrize("name,dtype,n,k,h,bs", CASES)
def test_gpu_ragged(name, dtype, n, k, h, bs):
    args = quantized_batch(seed_of(name, n, k, h, bs, 1), RAGGED, name, dtype, n, k, h, bs)
    out = ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, block_m=16,
                                 block_n=16 if bs != 32 else 32)
    check(out, args, dtype)


@pytest.mark.parametrize("name,dtype,n,k,h,bs", CASES)
def test_tpu_decode(name, dtype, n, k, h, bs):
    args = quantized_batch(seed_of(name, n, k, h, bs, 2), DECODE, name, dtype, n, k, h, bs)
    out = ragged_paged_attention(*args, backend="pallas-tpu", interpret=True, decode_only=True,
                                 pages_per_block=3)
    check(out, args, dtype)


@pytest.mark.parametrize("name,dtype,n,k,h,bs", CASES)
def test_tpu_ragged(name, dtype, n, k, h, bs):
    args = quantized_batch(seed_of(name, n, k, h, bs, 3), RAGGED, name, dtype, n, k, h, bs)
    out = ragged_paged_attention(*args, backend="pallas-tpu", interpret=True, block_q=8,
                                 pages_per_block=2)
    check(out, args, dtype)


def test_reference_dequantizes_in_float32():
    """The reference on QuantizedPages is the reference on the dequantized float32 pages."""
    args = quantized_batch(5, RAGGED, "int8", "float32", 8, 2, 64, 16)
    q, kp, vp, *meta = args
    np.testing.assert_allclose(
        np.asarray(paged_attention_ref(*args)),
        np.asarray(paged_attention_ref(q, dequantize_pages(kp), dequantize_pages(vp), *meta)),
        rtol=1e-6, atol=1e-6)


def test_quantized_close_to_unquantized():
    """Same inputs, unquantized vs int8 / fp8 pages: the error is the quantization's, small."""
    q, kp, vp, *meta = random_batch(9, RAGGED, 8, 2, 64, 16, "float32")
    exact = np.asarray(paged_attention_ref(q, kp, vp, *meta))
    for name, tol in (("int8", 2e-2), ("fp8_e4m3", 6e-2), ("fp8_e5m2", 1.2e-1)):
        got = np.asarray(ragged_paged_attention(
            q, quantize_pages(kp, name), quantize_pages(vp, name), *meta, backend="pallas-gpu",
            interpret=True, block_m=16, block_n=16))
        err = np.linalg.norm(got - exact) / np.linalg.norm(exact)
        assert err < tol, f"{name}: relative error {err:.2e} against unquantized KV"


@pytest.mark.parametrize("bad,match", [
    (lambda a: a[:2] + (a[2].data,) + a[3:], "both be quantized"),
    (lambda a: a[:2] + (QuantizedPages(a[2].data, a[2].scale[:, :, :1]),) + a[3:], "scale must"),
    (lambda a: a[:2] + (QuantizedPages(a[2].data.astype(jnp.float8_e5m2), a[2].scale),) + a[3:],
     "dtypes differ"),
])
def test_bad_quantized_pages_raise(bad, match):
    args = quantized_batch(0, DECODE, "fp8_e4m3", "float32", 4, 2, 64, 8)
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*bad(args), backend="pallas-gpu", interpret=True)
