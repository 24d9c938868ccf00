"""int4 KV pages (kernels/quantization.py): packing, the two scale layouts (V per token, K per
channel within a block), the write's handling of partly filled blocks, and every attention kernel
(GPU-style and TPU, interpret mode) against the reference on the *same* int4 pages.

Kernel inputs follow test_paged_attention.py: fresh random draws with fixed integer seeds, pool
pages in a random order, block-table entries past a sequence's blocks far out of range, padded
sequences with a stale context, context lengths 0/1/15/16/17/long (block boundaries and + 1).
The reference dequantizes in float32; the kernels unpack the bytes in registers, so they agree to
float rounding, not to the quantization error.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.kernels import QuantizedPages, dequantize_pages, paged_attention_ref, quantize_pages
from pagedjax.kernels import write_kv_ref
from pagedjax.kernels.dispatch import ragged_paged_attention, write_kv
from pagedjax.kernels.quantization import (pack_int4, quantize_values, scale_up, unpack_codes,
                                           unpack_int4)
from tests.kernels.seeds import seed_of
from tests.kernels.test_paged_attention import DECODE, RAGGED, random_batch
from tests.kernels.test_quantized_kv import check


def channel_magnitudes(rng, shape):
    """Per-channel magnitudes spanning two decades, as real keys have (outlier channels)."""
    return 10.0 ** rng.uniform(-1, 1, shape)


def int4_batch(seed, seqs, dtype, n, k, h, bs, pad_rows=3):
    q, kp, vp, *meta = random_batch(seed, seqs, n, k, h, bs, "float32", pad_rows)
    rng = np.random.default_rng(seed + 1)
    kp = kp * jnp.asarray(channel_magnitudes(rng, (1, 1, k, h)), jnp.float32)
    vp = vp * jnp.asarray(10.0 ** rng.uniform(-2, 1, vp.shape[:3] + (1,)), jnp.float32)
    return (q.astype(dtype), quantize_pages(kp, "int4", keys=True), quantize_pages(vp, "int4"),
            *meta)


def empty_pages(nb, bs, k, h):
    """int4 K and V pages holding garbage codes and scales, as a reused block does."""
    rng = np.random.default_rng(99)
    data = lambda: jnp.asarray(rng.integers(0, 256, (nb, bs, k, h // 2)), jnp.uint8)  # noqa: E731
    return (QuantizedPages(data(), jnp.asarray(rng.uniform(1, 9, (nb, 1, k, h)), jnp.bfloat16)),
            QuantizedPages(data(), jnp.asarray(rng.uniform(1, 9, (nb, bs, k, 1)), jnp.bfloat16)))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def partial_block_errors(keys) -> dict:
    """Keys [num_blocks, block_size, K, H] of whole blocks, quantized three ways; the error of
    each relative to the keys' norm. "whole": each block's channel scales from all its keys at
    once (not possible while decoding: the floor). "running": the engine's write, the tokens
    one by one (the running maximum, earlier codes re-quantized). "first": the scale fixed by the
    block's first token, later tokens clamped to it. "per_token": K scaled per token like V (no
    partial-block question; what KIVI found keys need more than)."""
    keys = jnp.asarray(keys, jnp.float32)
    nb, bs, k, h = keys.shape
    kp, vp = empty_pages(nb, bs, k, h)
    slots = jnp.arange(nb * bs, dtype=jnp.int32)
    flat = keys.reshape(nb * bs, k, h)
    for i in range(bs):  # offset i of every block: decode's one token per block and step
        kp, vp = write_kv_ref(kp, vp, flat[i::bs], flat[i::bs], slots[i::bs])
    first = scale_up(jnp.abs(keys[:, :1]), jnp.uint8)
    codes = quantize_values(keys, jnp.where(first == 0, 1.0, first), jnp.uint8)
    return {"whole": rel(dequantize_pages(quantize_pages(keys, "int4", keys=True)), keys),
            "running": rel(dequantize_pages(kp), keys),
            "first": rel(codes.astype(jnp.float32) * first, keys),
            "per_token": rel(dequantize_pages(quantize_pages(keys, "int4")), keys)}


# ---- format ------------------------------------------------------------------------------------
def test_pack_unpack_every_code():
    codes = np.stack(np.meshgrid(np.arange(-8, 8), np.arange(-8, 8)), -1).reshape(256, 2)
    codes = jnp.asarray(codes[:, [0, 1]].reshape(256, 2), jnp.int32)  # channels 0 and 1 of H=2
    packed = pack_int4(codes)
    assert packed.dtype == jnp.uint8 and packed.shape == (256, 1)
    assert sorted(np.asarray(packed[:, 0]).tolist()) == list(range(256))
    lo, hi = unpack_int4(packed)
    np.testing.assert_array_equal(np.asarray(lo[:, 0]), np.asarray(codes[:, 0]))
    np.testing.assert_array_equal(np.asarray(hi[:, 0]), np.asarray(codes[:, 1]))
    # the halves layout: byte j holds channels j and j + H/2
    wide = jnp.arange(-7, 9, dtype=jnp.int32).reshape(1, 16) % 15 - 7
    np.testing.assert_array_equal(np.asarray(unpack_codes(pack_int4(wide))), np.asarray(wide))


def test_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    nb, bs, k, h = 5, 16, 2, 64
    x = rng.standard_normal((nb, bs, k, h)) * channel_magnitudes(rng, (1, 1, k, h))
    x[1, :, 0, 3] = 0.0  # an all-zero channel of a block: scale 0, values 0
    x = jnp.asarray(x, jnp.float32)
    keys, values = quantize_pages(x, "int4", keys=True), quantize_pages(x, "int4")
    assert keys.shape == values.shape == (nb, bs, k, h)
    assert keys.data.shape == (nb, bs, k, h // 2) and keys.data.dtype == jnp.uint8
    assert keys.scale.shape == (nb, 1, k, h) and values.scale.shape == (nb, bs, k, 1)
    assert float(keys.scale[1, 0, 0, 3]) == 0.0
    for pages, axis in ((keys, 1), (values, 3)):
        step = np.asarray(pages.scale, np.float64)
        err = np.abs(np.asarray(dequantize_pages(pages), np.float64) - np.asarray(x))
        assert (err <= 0.5 * step * (1 + 1e-6)).all()
        # the scale is absmax / 7 rounded up: the largest element maps to at most code 7
        absmax = np.abs(np.asarray(x)).max(axis=axis, keepdims=True)
        assert (step * 7 >= absmax).all() and (step * 7 <= absmax * (1 + 2 ** -6)).all()


# ---- the write ---------------------------------------------------------------------------------
def test_write_is_the_same_whatever_the_chunking():
    """One prefill, chunks cutting blocks anywhere, and one token at a time store the same bits
    (the engine's greedy parity with a full recompute rests on it); padding rows write nothing;
    blocks no row touches keep their bits."""
    rng = np.random.default_rng(3)
    nb, bs, k, h = 8, 8, 2, 32
    kp0, vp0 = empty_pages(nb, bs, k, h)
    blocks = rng.permutation(nb)[:3]
    slots = np.concatenate([b * bs + np.arange(bs) for b in blocks])[:20].astype(np.int32)
    x = jnp.asarray(rng.standard_normal((20, k, h)) * channel_magnitudes(rng, (1, k, h)),
                    jnp.float32)

    def run(cuts, pad=0):
        kp, vp = kp0, vp0
        for a, b in zip(cuts[:-1], cuts[1:]):
            s = np.concatenate([slots[a:b], -np.ones(pad, np.int32)])
            xs = jnp.concatenate([x[a:b], jnp.ones((pad, k, h))])
            order = rng.permutation(len(s))  # rows of a step in any order
            kp, vp = write_kv_ref(kp, vp, xs[order], xs[order], jnp.asarray(s[order]))
        return [np.asarray(a.astype(jnp.float32)) for a in (*kp, *vp)]

    one_by_one = run(list(range(21)))
    for cuts, pad in (([0, 20], 0), ([0, 3, 11, 12, 20], 2), ([0, 9, 20], 5)):
        for a, b in zip(run(cuts, pad), one_by_one):
            np.testing.assert_array_equal(a, b)
    untouched = np.setdiff1d(np.arange(nb), blocks)
    for a, b in zip(one_by_one, [np.asarray(a.astype(jnp.float32)) for a in (*kp0, *vp0)]):
        np.testing.assert_array_equal(a[untouched], b[untouched])
    kp = QuantizedPages(jnp.asarray(one_by_one[0], jnp.uint8),
                        jnp.asarray(one_by_one[1], jnp.bfloat16))
    got = np.asarray(dequantize_pages(kp)).reshape(nb * bs, k, h)[slots]
    assert rel(got, x) < 0.12


@pytest.mark.parametrize("backend", ["pallas-gpu", "reference"])
def test_dispatch_write_kv_int4(backend):
    """The dispatch's write takes int4 pages on every backend (the XLA write: the block-wide
    re-quantization of K is a gather and scatter of whole blocks) and stores the reference's
    bits."""
    rng = np.random.default_rng(4)
    nb, bs, k, h, t = 9, 8, 2, 64, 13
    pool = empty_pages(nb, bs, k, h)
    new = [jnp.asarray(rng.standard_normal((t, k, h)), jnp.bfloat16) for _ in range(2)]
    slots = rng.permutation(nb * bs)[:t].astype(np.int32)
    slots[[0, 5]] = -1
    got = write_kv(*pool, *new, jnp.asarray(slots), backend=backend, interpret=True)
    want = write_kv_ref(*pool, *new, jnp.asarray(slots))
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                          np.asarray(b.astype(jnp.float32)))


def test_partly_filled_blocks_running_max_beats_a_fixed_first_token_scale():
    """The measurement behind the write's choice (kernels/quantization.py's table, random row):
    the running maximum stays near the whole-block floor; a scale fixed by the first token and
    clamped is far worse."""
    rng = np.random.default_rng(7)
    keys = rng.standard_normal((64, 16, 2, 64)) * channel_magnitudes(rng, (1, 1, 2, 64))
    err = partial_block_errors(keys)
    print(f"\nint4 K of 16-token blocks, error relative to the keys' norm: {err}")
    assert err["whole"] <= err["running"] < 1.15 * err["whole"]
    assert err["first"] > 2 * err["running"]


# ---- attention kernels -------------------------------------------------------------------------
# (q dtype, N, K, H, block_size)
CASES = [
    pytest.param("bfloat16", 8, 2, 128, 16, id="bf16-gqa4-h128-bs16"),
    pytest.param("float32", 2, 2, 64, 8, id="f32-gqa1-h64-bs8"),
    pytest.param("bfloat16", 7, 1, 64, 32, id="bf16-gqa7-h64-bs32"),
    pytest.param("float32", 14, 2, 128, 16, id="f32-gqa7-h128-bs16"),
]


@pytest.mark.parametrize("dtype,n,k,h,bs,tuning", [
    *[pytest.param(*c.values, {}, id=c.id) for c in CASES],
    *[pytest.param(*c.values, {"num_splits": 4, "block_kv": 16}, id=c.id + "-split4")
      for c in CASES[::3]],
])
def test_gpu_decode(dtype, n, k, h, bs, tuning):
    args = int4_batch(seed_of("int4", dtype, n, k, h, bs), DECODE, dtype, n, k, h, bs)
    out = ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, decode_only=True,
                                 **tuning)
    check(out, args, dtype)


@pytest.mark.parametrize("dtype,n,k,h,bs", CASES)
def test_gpu_ragged(dtype, n, k, h, bs):
    args = int4_batch(seed_of("int4", dtype, n, k, h, bs, 1), RAGGED, dtype, n, k, h, bs)
    out = ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, block_m=16,
                                 block_n=16 if bs != 32 else 32)
    check(out, args, dtype)


@pytest.mark.parametrize("dtype,n,k,h,bs", CASES)
def test_tpu_decode(dtype, n, k, h, bs):
    args = int4_batch(seed_of("int4", dtype, n, k, h, bs, 2), DECODE, dtype, n, k, h, bs)
    out = ragged_paged_attention(*args, backend="pallas-tpu", interpret=True, decode_only=True,
                                 pages_per_block=3)
    check(out, args, dtype)


@pytest.mark.parametrize("dtype,n,k,h,bs", CASES)
def test_tpu_ragged(dtype, n, k, h, bs):
    args = int4_batch(seed_of("int4", dtype, n, k, h, bs, 3), RAGGED, dtype, n, k, h, bs)
    out = ragged_paged_attention(*args, backend="pallas-tpu", interpret=True, block_q=8,
                                 pages_per_block=2)
    check(out, args, dtype)


def test_reference_dequantizes_in_float32():
    """The reference on int4 pages is the reference on the dequantized float32 pages."""
    q, kp, vp, *meta = int4_batch(5, RAGGED, "float32", 8, 2, 64, 16)
    np.testing.assert_allclose(
        np.asarray(paged_attention_ref(q, kp, vp, *meta)),
        np.asarray(paged_attention_ref(q, dequantize_pages(kp), dequantize_pages(vp), *meta)),
        rtol=1e-6, atol=1e-6)


def test_int4_close_to_unquantized():
    """Same inputs, unquantized vs int4 pages through the GPU kernel: the error is int4's; and
    per-channel K scales beat per-token ones (the reference on the same layout as V's, which
    the kernels refuse for K) on keys with outlier channels, KIVI's finding."""
    q, kp, vp, *meta = random_batch(9, RAGGED, 8, 2, 64, 16, "float32")
    kp = kp * jnp.asarray(channel_magnitudes(np.random.default_rng(9), (1, 1, 2, 64)),
                          jnp.float32)
    exact = np.asarray(paged_attention_ref(q, kp, vp, *meta))
    qv = quantize_pages(vp, "int4")
    channel = rel(ragged_paged_attention(q, quantize_pages(kp, "int4", keys=True), qv, *meta,
                                         backend="pallas-gpu", interpret=True, block_m=16,
                                         block_n=16), exact)
    token = rel(paged_attention_ref(q, quantize_pages(kp, "int4"), qv, *meta), exact)
    print(f"\nint4 attention error against unquantized KV: K per channel {channel:.2e}, "
          f"K per token {token:.2e}")
    assert channel < 0.2 and channel < 0.8 * token  # measured 0.156 and 0.238


@pytest.mark.parametrize("bad,match", [
    # K with V's per-token scale layout; V with K's per-channel one
    (lambda a: (a[0], QuantizedPages(a[1].data, a[2].scale)) + a[2:], r"k_pages.scale must be"),
    (lambda a: a[:2] + (QuantizedPages(a[2].data, a[1].scale),) + a[3:], r"v_pages.scale must be"),
])
def test_bad_int4_pages_raise(bad, match):
    args = int4_batch(0, DECODE, "float32", 4, 2, 64, 8)
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*bad(args), backend="pallas-gpu", interpret=True)


def test_gpu_kernels_need_head_dim_32():
    args = int4_batch(0, DECODE, "float32", 4, 2, 16, 8)
    with pytest.raises(ValueError, match="head_dim >= 32"):
        ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, decode_only=True)
