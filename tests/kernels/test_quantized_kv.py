"""Quantized KV cache (fp8_e4m3, fp8_e5m2, int8 with one float32 scale per block and KV head;
power-of-two scales for fp8): the quantize/dequantize round trip, the block-scale write rule
(``write_quantized``) against a plain-Python model of it and against the truth over random write
sequences, and every attention kernel (GPU-style and TPU interpret mode) against the reference on
the *same* quantized pages.

Inputs follow test_paged_attention.py: fresh random draws, pool pages in a random order, block
table entries past a sequence's blocks far out of range, padded sequences with a stale context,
outputs poisoned (NaN) by interpret mode, context lengths 0/1/15/16/17/long, GQA 1/4/7. The
reference dequantizes in float32; the kernels convert the 1-byte values to q's dtype and apply the
scales to scores and probabilities, so they agree to float rounding, not to quantization error.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedjax.kernels import QuantizedPages, dequantize_pages, paged_attention_ref, quantize_pages
from pagedjax.kernels.dispatch import ragged_paged_attention, write_kv
from pagedjax.kernels.quantization import (QUANTIZED_DTYPES, SCALE_FLOOR, absmax_scale, pow2_ceil,
                                           qmax, write_quantized)
from tests.kernels.test_paged_attention import DECODE, RAGGED, random_batch
from tests.kernels.test_paged_attention import check as check_plain

NAMES = list(QUANTIZED_DTYPES)
TOL = {"float32": 2e-3, "bfloat16": 1.5e-2}
# Worst error of one dequantized element against its (block, KV head)'s absmax: half a step of the
# grid at the top of the block's range (int8: 0.5 / 127; fp8: the pow2 scale puts the absmax in
# (qmax / 2, qmax], where half a step is at most 2^-4.8 (e4m3) / 2^-3.8 (e5m2) of it).
ROUND_TRIP = {"int8": 0.5 / 127 * 1.01, "fp8_e4m3": 2.0 ** -4 * 1.01, "fp8_e5m2": 2.0 ** -3 * 1.01}
# Half a grid step at qmax, in units of the scale: one rounding's worst error is this x scale.
HALF_TOP_STEP = {"int8": 0.5, "fp8_e4m3": 16.0, "fp8_e5m2": 4096.0}

# (kv dtype, q dtype, N, K, H, block_size)
CASES = [
    pytest.param("fp8_e4m3", "bfloat16", 8, 2, 128, 16, id="e4m3-bf16-gqa4-h128-bs16"),
    pytest.param("fp8_e5m2", "float32", 2, 2, 64, 8, id="e5m2-f32-gqa1-h64-bs8"),
    pytest.param("int8", "bfloat16", 7, 1, 64, 32, id="int8-bf16-gqa7-h64-bs32"),
    pytest.param("int8", "float32", 14, 2, 128, 16, id="int8-f32-gqa7-h128-bs16"),
]


def quantized_batch(seed, seqs, name, dtype, n, k, h, bs, pad_rows=3):
    q, kp, vp, *meta = random_batch(seed, seqs, n, k, h, bs, "float32", pad_rows)
    # a spread of magnitudes, as real K/V have (outlier heads, tiny values in early layers): per
    # token, and per (block, KV head) so that neighbouring pages' scales differ by up to 10^4.5
    rng = np.random.default_rng(seed + 1)
    mag = 10.0 ** rng.uniform(-3, 1.5, kp.shape[:3] + (1,))
    mag *= 10.0 ** rng.uniform(-2, 2, (kp.shape[0], 1, kp.shape[2], 1))
    mag = jnp.asarray(mag, jnp.float32)
    return (q.astype(dtype), quantize_pages(kp * mag, name), quantize_pages(vp * mag[::-1], name),
            *meta)


def check(out, args, dtype):
    check_plain(out, args, dtype, tol=TOL)


def is_pow2(x) -> bool:
    m, _ = np.frexp(np.asarray(x, np.float64))
    return bool((m == 0.5).all())


# ---- quantize / dequantize ---------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_round_trip_within_the_dtypes_precision(name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 16, 4, 128)) * 10.0 ** rng.uniform(-4, 3, (16, 1, 4, 1))
    x[3, :, 1] = 0.0  # an all-zero (block, head): the floor scale, values 0
    x[5, 4, 2, 7] = 1e4  # an outlier: its block's absmax, stored without clipping
    qp = quantize_pages(jnp.asarray(x, jnp.float32), name)
    data, scale = qp
    assert data.dtype == QUANTIZED_DTYPES[name] and scale.dtype == jnp.float32
    assert scale.shape == (16, 1, 4, 1)
    back = np.asarray(dequantize_pages(qp), np.float64)
    absmax = np.abs(x).max(axis=(1, 3), keepdims=True)
    err = np.abs(back - x) / np.where(absmax == 0, 1, absmax)
    assert err.max() <= ROUND_TRIP[name], f"worst error {err.max():.2e} of the block's absmax"
    assert (back[3, :, 1] == 0).all() and float(scale[3, 0, 1, 0]) == absmax_scale(
        jnp.float32(0), QUANTIZED_DTYPES[name])
    assert back[5, 4, 2, 7] == pytest.approx(1e4, rel=ROUND_TRIP[name])
    # the scale is absmax / qmax, rounded up to a power of two for fp8: the largest element maps
    # to at most qmax (fp8: above qmax / 2)
    top = np.asarray(scale, np.float64)[absmax > 0] * qmax(QUANTIZED_DTYPES[name])
    assert (top >= absmax[absmax > 0] * (1 - 2 ** -23)).all()
    slack = 2.0 if name != "int8" else 1 + 2 ** -20
    assert (top <= absmax[absmax > 0] * slack).all()
    assert is_pow2(scale) == (name != "int8")


def test_pow2_ceil_is_exact():
    x = np.asarray([2.0 ** -100, 0.3, 0.5, 1.0, 1.0 + 2 ** -23, 3.0, 448.0, 2.0 ** 100 * 1.5],
                   np.float32)
    want = np.asarray([2.0 ** -100, 0.5, 0.5, 1.0, 2.0, 4.0, 512.0, 2.0 ** 101], np.float32)
    np.testing.assert_array_equal(np.asarray(pow2_ceil(jnp.asarray(x))), want)
    rng = np.random.default_rng(1)
    y = (10.0 ** rng.uniform(-30, 30, 10_000)).astype(np.float32)
    got = np.asarray(pow2_ceil(jnp.asarray(y)), np.float64)
    assert is_pow2(got) and (got >= y).all() and (got / 2 < y).all()


def test_absmax_scale_matches_its_definition():
    absmax = jnp.asarray([0.0, 1e-6, 0.3, 127.0, 5e3], jnp.float32)
    s = np.asarray(absmax_scale(absmax, jnp.int8))
    assert s[0] == SCALE_FLOOR
    np.testing.assert_array_equal(s[1:], np.asarray(absmax[1:] * np.float32(1 / 127)))
    for dtype in (jnp.float8_e4m3fn, jnp.float8_e5m2):
        s = np.asarray(absmax_scale(absmax, dtype), np.float64)
        raw = np.maximum(np.asarray(absmax, np.float64) / qmax(dtype), SCALE_FLOOR)
        assert is_pow2(s) and (s >= raw * (1 - 2 ** -23)).all() and (s < 2 * raw).all()


# ---- the block-scale write rule ------------------------------------------------------------------
def write_model(data, scale, new, slots, dtype):
    """The write rule in plain numpy, one touched block at a time (kernels/quantization.py's
    module docstring): the block's scale is max(old unless the step starts the block at offset 0,
    absmax_scale of each new row); old rows [0, o) re-quantized if it grew; then the new rows."""
    data, scale = data.copy(), scale.copy()
    nb, bs, k, _ = data.shape
    new = np.asarray(new, np.float32)
    tok = np.asarray(absmax_scale(jnp.asarray(np.abs(new).max(-1)), dtype))  # [T, K]
    f32 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32))  # noqa: E731
    quant = lambda x, s: np.asarray(  # noqa: E731
        jnp.asarray(np.clip(x / s, -qmax(dtype), qmax(dtype)), jnp.float32).astype(dtype)
        if jnp.dtype(dtype) != jnp.int8 else
        (lambda y: (y + np.where(y >= 0, 0.5, -0.5)).astype(np.int8))(
            np.clip(np.float32(x) / np.float32(s), -127, 127).astype(np.float32)))
    for b in sorted({int(x) // bs for x in slots if x >= 0}):
        rows = [i for i, x in enumerate(slots) if x >= 0 and x // bs == b]
        o = min(int(slots[i]) % bs for i in rows)
        for kh in range(k):
            old = 0.0 if o == 0 else scale[b, 0, kh, 0]
            s = np.float32(max(old, *(tok[i, kh] for i in rows)))
            if s > old and o > 0:
                data[b, :o, kh] = quant(f32(data[b, :o, kh]) * np.float32(old), s)
            scale[b, 0, kh, 0] = s
            for i in rows:
                data[b, int(slots[i]) % bs, kh] = quant(new[i, kh], s)
    return data, scale


def assert_pages_equal(got, want_data, want_scale):
    np.testing.assert_array_equal(np.asarray(got.scale), want_scale)
    np.testing.assert_array_equal(np.asarray(got.data.astype(jnp.float32)),
                                  np.asarray(jnp.asarray(want_data).astype(jnp.float32)))


def filled_pool(name, nb=6, bs=8, k=2, h=16, seed=0):
    rng = np.random.default_rng(seed)
    return quantize_pages(jnp.asarray(rng.uniform(0.1, 1, (nb, bs, k, h))
                                      * rng.choice([-1, 1], (nb, bs, k, h)), jnp.float32), name)


@pytest.mark.parametrize("name", NAMES)
def test_write_rule_matches_the_model(name):
    """Several rows per block in one step, rows continuing blocks (growth, no growth), rows
    starting blocks (stale scale ignored), -1 slots: bit-identical to the per-block model."""
    dtype = QUANTIZED_DTYPES[name]
    pool = filled_pool(name)
    nb, bs, k, h = pool.shape
    rng = np.random.default_rng(2)
    slots = np.asarray([3, 4, -1, 5, 8, 9, 10, 2 * bs + 6, -1, 4 * bs, 4 * bs + 1, 7], np.int32)
    new = rng.standard_normal((len(slots), k, h)) * np.asarray(
        [0.5, 3, 1, 0.1, 2, 0.01, 40, 0.3, 9, 1e-3, 1e-2, 0.2])[:, None, None]
    got = write_quantized(pool, jnp.asarray(new, jnp.float32), jnp.asarray(slots))
    want = write_model(np.asarray(pool.data), np.asarray(pool.scale), new, slots, dtype)
    assert_pages_equal(got, *want)
    # two blocks continued (0 from offset 3, 2 from 6): a gather bound of 2 is enough
    got = write_quantized(pool, jnp.asarray(new, jnp.float32), jnp.asarray(slots), 2)
    assert_pages_equal(got, *want)


@pytest.mark.parametrize("name", NAMES)
def test_growth_requantizes_only_old_rows_of_touched_blocks(name):
    pool = filled_pool(name)
    nb, bs, k, h = pool.shape
    new = np.zeros((1, k, h), np.float32)
    new[0, 0, 0] = 4.0  # KV head 0 grows 4x (absmax 1 -> 4); head 1 stays at scale floor level
    got = write_quantized(pool, jnp.asarray(new), jnp.asarray([2 * bs + 5], jnp.int32))
    d0, d1 = np.asarray(pool.data.astype(jnp.float32)), np.asarray(got.data.astype(jnp.float32))
    s0, s1 = np.asarray(pool.scale), np.asarray(got.scale)
    others = np.arange(nb) != 2
    np.testing.assert_array_equal(d1[others], d0[others])  # untouched blocks: bit-identical
    np.testing.assert_array_equal(s1[others], s0[others])
    np.testing.assert_array_equal(d1[2, :, 1][:5], d0[2, :, 1][:5])  # head 1: no growth
    np.testing.assert_array_equal(d1[2, 6:], d0[2, 6:])  # rows past the write: untouched
    assert s1[2, 0, 0, 0] > s0[2, 0, 0, 0] and s1[2, 0, 1, 0] == s0[2, 0, 1, 0]
    assert (d1[2, :5, 0] != d0[2, :5, 0]).any()  # head 0's old rows re-quantized ...
    old = d0[2, :5, 0] * s0[2, 0, 0, 0]
    back = d1[2, :5, 0] * s1[2, 0, 0, 0]
    if name == "int8":  # ... within one rounding at the new scale
        assert (np.abs(back - old) <= 0.5 * s1[2, 0, 0, 0] * 1.0001).all()
    else:  # ... exactly: a power-of-two growth (4x) of values >= 0.1 * absmax, no underflow
        assert is_pow2(s1) and s1[2, 0, 0, 0] == 4 * s0[2, 0, 0, 0]
        np.testing.assert_array_equal(back, old)
    np.testing.assert_allclose(d1[2, 5, 0, 0] * s1[2, 0, 0, 0], 4.0, rtol=ROUND_TRIP[name])


@pytest.mark.parametrize("name", NAMES)
def test_block_start_ignores_a_stale_scale(name):
    """A block's first write (offset 0) sets its scale from the new rows only: a freed block's
    old (large) scale must not coarsen the new owner's values."""
    dtype = QUANTIZED_DTYPES[name]
    pool = filled_pool(name)
    nb, bs, k, h = pool.shape
    pool = QuantizedPages(pool.data, pool.scale.at[1].set(1e6))
    new = np.full((2, k, h), 1e-3, np.float32)
    got = write_quantized(pool, jnp.asarray(new), jnp.asarray([bs, bs + 1], jnp.int32))
    np.testing.assert_array_equal(np.asarray(got.scale[1]),
                                  np.asarray(absmax_scale(jnp.full((1, k, 1), 1e-3), dtype)))
    back = np.asarray(dequantize_pages(got))[1, :2]
    np.testing.assert_allclose(back, 1e-3, rtol=ROUND_TRIP[name])
    # and a continuing write (offset > 0) keeps the larger old scale
    got2 = write_quantized(got, jnp.asarray(new[:1] * 0.5), jnp.asarray([bs + 2], jnp.int32))
    np.testing.assert_array_equal(np.asarray(got2.scale[1]), np.asarray(got.scale[1]))
    np.testing.assert_array_equal(np.asarray(got2.data[1, :2].astype(jnp.float32)),
                                  np.asarray(got.data[1, :2].astype(jnp.float32)))


@pytest.mark.parametrize("name", NAMES)
def test_padding_slots_write_nothing(name):
    pool = filled_pool(name)
    nb, bs, k, h = pool.shape
    new = jnp.full((3, k, h), 1e3, jnp.float32)
    got = write_quantized(pool, new, jnp.asarray([-1, -1, -1], jnp.int32))
    assert_pages_equal(got, np.asarray(pool.data), np.asarray(pool.scale))


@pytest.mark.parametrize("backend", ["pallas-gpu", "reference"])
@pytest.mark.parametrize("name", NAMES)
def test_write_kv_quantizes_like_the_reference(name, backend):
    """Both backends store the reference's bits (a quantized pool always takes the XLA write);
    blocks no slot touches stay bit-identical; a written row dequantizes to its input within the
    dtype's precision of its block's absmax."""
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
    live = slots >= 0
    for g, w, before, x in zip(got, want, pool, new):
        assert isinstance(g, QuantizedPages)
        for a, b in zip(g, w):
            np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                          np.asarray(b.astype(jnp.float32)))
        assert_pages_equal(g, *write_model(np.asarray(before.data), np.asarray(before.scale),
                                           np.asarray(x.astype(jnp.float32)), slots,
                                           QUANTIZED_DTYPES[name]))
        untouched = np.setdiff1d(np.arange(nb), slots[live] // bs)
        deq = np.asarray(dequantize_pages(g))
        np.testing.assert_array_equal(deq[untouched],
                                      np.asarray(dequantize_pages(before))[untouched])
        flat = deq.reshape(nb * bs, k, h)
        x = np.asarray(x.astype(jnp.float32))[live]
        blk_absmax = np.abs(deq).max(axis=(1, 3))[slots[live] // bs][:, :, None]  # [t, K, 1]
        assert (np.abs(flat[slots[live]] - x) <= 2 * ROUND_TRIP[name] * blk_absmax).all()


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_blocks_do_not_depend_on_how_they_were_written(name):
    """Power-of-two scales: a block written token by token, in chunks, or at once holds the same
    values (FP rounding commutes with power-of-two scaling), except values that the growth pushed
    below the dtype's smallest normal (subnormal at the final scale)."""
    dtype = QUANTIZED_DTYPES[name]
    rng = np.random.default_rng(7)
    nb, bs, k, h = 4, 16, 2, 32
    x = (rng.standard_normal((nb * bs, k, h)) * 10.0 ** rng.uniform(-2, 2, (nb * bs, k, 1))
         ).astype(np.float32)
    empty = QuantizedPages(jnp.zeros((nb, bs, k, h), dtype), jnp.zeros((nb, 1, k, 1), jnp.float32))
    slots = np.arange(nb * bs, dtype=np.int32)
    once = write_quantized(empty, jnp.asarray(x), jnp.asarray(slots))
    for chunk in (1, 5):
        pool = empty
        for i in range(0, nb * bs, chunk):
            pool = write_quantized(pool, jnp.asarray(x[i:i + chunk]),
                                   jnp.asarray(slots[i:i + chunk]))
        np.testing.assert_array_equal(np.asarray(pool.scale), np.asarray(once.scale))
        a, b = np.asarray(dequantize_pages(pool)), np.asarray(dequantize_pages(once))
        normal = np.abs(b) >= float(jnp.finfo(dtype).smallest_normal) * np.asarray(once.scale)
        np.testing.assert_array_equal(a[normal], b[normal])
        assert normal.mean() > 0.9


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES), seed=st.integers(0, 2**31 - 1),
       steps=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 9), st.floats(-3, 2)),
                      min_size=1, max_size=12))
def test_random_write_sequences_stay_within_quantization_error(name, seed, steps):
    """Random decode/prefill-like steps: each step appends ``n`` tokens to sequence ``seq % 3``
    (blocks taken in order, reused after a sequence is reset, so stale scales meet new owners),
    magnitudes 10^mag. After every step each live token dequantizes within the error its
    history allows of the truth: one rounding at its block's final scale (fp8: growth by powers
    of two is exact up to underflow), int8 one more per growth of the block since it was written.
    And every step is bit-identical to the per-block model."""
    dtype = QUANTIZED_DTYPES[name]
    nb, bs, k, h = 12, 4, 2, 8
    rng = np.random.default_rng(seed)
    pool = QuantizedPages(jnp.zeros((nb, bs, k, h), dtype), jnp.zeros((nb, 1, k, 1), jnp.float32))
    free = list(range(nb))
    seqs = {i: {"blocks": [], "len": 0} for i in range(3)}
    truth = np.zeros((nb, bs, k, h), np.float32)
    grows = np.zeros((nb, bs, k), np.int64)  # growths of a token's block since it was written
    # one sequence per step: at most one block continued, the engine's bound
    step_fn = jax.jit(functools.partial(write_quantized, max_continued=1))
    for n, which, mag in steps:
        seq = seqs[which % 3]
        if which >= 7 or seq["len"] + n > 3 * bs:  # reset: free the blocks (stale data stays)
            free += seq["blocks"]
            seq["blocks"], seq["len"] = [], 0
        slots = []
        for pos in range(seq["len"], seq["len"] + n):
            if pos % bs == 0:
                if not free:
                    break
                seq["blocks"].append(free.pop(0))
            slots.append(seq["blocks"][pos // bs] * bs + pos % bs)
        seq["len"] += len(slots)
        t = len(slots) + 2  # two padding rows
        new = (rng.standard_normal((t, k, h)) * 10.0 ** mag).astype(np.float32)
        sl = np.asarray(slots + [-1, -1], np.int32)
        perm = rng.permutation(t)
        new, sl = new[perm], sl[perm]
        before = np.asarray(pool.scale)
        want = write_model(np.asarray(pool.data), before, new, sl, dtype)
        pool = step_fn(pool, jnp.asarray(new), jnp.asarray(sl))
        assert_pages_equal(pool, *want)
        after = np.asarray(pool.scale)
        for b in {int(x) // bs for x in sl if x >= 0}:
            o = min(int(x) % bs for x in sl if x >= 0 and x // bs == b)
            grows[b, :o] += (after[b, 0, :, 0] > before[b, 0, :, 0])[None, :]
        for i, x in enumerate(sl):
            if x >= 0:
                truth[x // bs, x % bs] = new[i]
                grows[x // bs, x % bs] = 0
        deq = np.asarray(dequantize_pages(pool))
        s = after[:, 0, :, 0]  # [nb, K]
        for seq_ in seqs.values():
            for pos in range(seq_["len"]):
                b, off = seq_["blocks"][pos // bs], pos % bs
                if jnp.dtype(dtype) == jnp.int8:
                    bound = HALF_TOP_STEP[name] * (1 + grows[b, off]) * s[b]
                else:  # one rounding + underflow losses (< 2^-9 of the final scale in all)
                    bound = (HALF_TOP_STEP[name] + 2.0 ** -8) * s[b]
                err = np.abs(deq[b, off] - truth[b, off]).max(axis=-1)  # [K]
                assert (err <= bound * 1.0001 + 1e-30).all(), (pos, err, bound)
                # and within the dtype's precision of the block's absmax when nothing grew
                if jnp.dtype(dtype) != jnp.int8:
                    assert (err <= 2 * ROUND_TRIP[name] * np.abs(deq[b]).max(axis=(0, 2))
                            + 2.0 ** -8 * s[b] + 1e-30).all()


# ---- attention kernels -------------------------------------------------------------------------
@pytest.mark.parametrize("name,dtype,n,k,h,bs,tuning", [
    *[pytest.param(*c.values, {}, id=c.id) for c in CASES],
    *[pytest.param(*c.values, {"num_splits": 4, "block_kv": 16}, id=c.id + "-split4")
      for c in CASES[::3]],
])
def test_gpu_decode(name, dtype, n, k, h, bs, tuning):
    args = quantized_batch(hash((name, n, k, h, bs)) % 2**31, DECODE, name, dtype, n, k, h, bs)
    out = ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, decode_only=True,
                                 **tuning)
    check(out, args, dtype)


@pytest.mark.parametrize("name,dtype,n,k,h,bs", CASES)
def test_gpu_ragged(name, dtype, n, k, h, bs):
    args = quantized_batch(hash((name, n, k, h, bs, 1)) % 2**31, RAGGED, name, dtype, n, k, h, bs)
    out = ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, block_m=16,
                                 block_n=16 if bs != 32 else 32)
    check(out, args, dtype)


@pytest.mark.parametrize("bs,tuning", [(12, {"block_kv": 16}),
                                       (24, {"block_kv": 16, "kv_heads_per_program": 2})])
def test_gpu_tiles_straddling_pages(bs, tuning):
    """Block sizes that neither divide nor are divided by the tile: a tile spans pages at
    unaligned offsets, each of its keys must get its own page's scale (decode and ragged)."""
    args = quantized_batch(bs, DECODE, "fp8_e4m3", "float32", 8, 2, 64, bs)
    check(ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, decode_only=True,
                                 **tuning), args, "float32")
    args = quantized_batch(bs + 1, RAGGED, "int8", "float32", 8, 2, 64, bs)
    check(ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, block_m=16,
                                 block_n=16), args, "float32")


@pytest.mark.parametrize("name,dtype,n,k,h,bs", CASES)
def test_tpu_decode(name, dtype, n, k, h, bs):
    args = quantized_batch(hash((name, n, k, h, bs, 2)) % 2**31, DECODE, name, dtype, n, k, h, bs)
    out = ragged_paged_attention(*args, backend="pallas-tpu", interpret=True, decode_only=True,
                                 pages_per_block=3)
    check(out, args, dtype)


@pytest.mark.parametrize("name,dtype,n,k,h,bs", CASES)
def test_tpu_ragged(name, dtype, n, k, h, bs):
    args = quantized_batch(hash((name, n, k, h, bs, 3)) % 2**31, RAGGED, name, dtype, n, k, h, bs)
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
    (lambda a: a[:2] + (QuantizedPages(a[2].data, jnp.repeat(a[2].scale, 8, axis=1)),) + a[3:],
     "scale must"),
    (lambda a: a[:2] + (QuantizedPages(a[2].data, a[2].scale.astype(jnp.bfloat16)),) + a[3:],
     "float32"),
    (lambda a: a[:2] + (QuantizedPages(a[2].data.astype(jnp.float8_e5m2), a[2].scale),) + a[3:],
     "dtypes differ"),
])
def test_bad_quantized_pages_raise(bad, match):
    args = quantized_batch(0, DECODE, "fp8_e4m3", "float32", 4, 2, 64, 8)
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*bad(args), backend="pallas-gpu", interpret=True)
