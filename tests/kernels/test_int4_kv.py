"""int4 KV pages (pagedjax/kernels/quantization.py): packing, the two scale layouts (V per token, K
per channel within a block), the write's handling of partly filled blocks, and every attention
kernel (GPU-style and TPU, interpret mode) against the reference on the *same* int4 pages.

Kernel inputs follow test_paged_attention.py: fresh random draws with fixed integer seeds, pool
pages in a random order, block-table entries past a sequence's blocks far out of range, padded
sequences with a stale context, context lengths 0/1/15/16/17/long (block boundaries and + 1).
The reference dequantizes in float32; the kernels unpack the bytes in registers, so they agree to
float rounding, not to the quantization error.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.kernels import QuantizedPages, dequantize_pages, paged_attention_ref, quantize_pages
from pagedjax.kernels import write_kv_ref
from pagedjax.kernels.dispatch import ragged_paged_attention, write_kv
from pagedjax.kernels.quantization import (pack_int4, pack_nibbles, unpack_codes, unpack_int4,
                                           unpack_nibbles)
from tests.kernels.seeds import seed_of
from tests.kernels.test_paged_attention import DECODE, RAGGED, random_batch
from tests.kernels.test_quantized_kv import check


def channel_magnitudes(rng, shape):
    """Per-channel magnitudes spanning two decades, as real keys have (outlier channels)."""
    return 10.0 ** rng.uniform(-1, 1, shape)


def offset_keys(rng, x):
    """Keys x [..., K, H] scaled per channel and moved by a per-channel offset of up to 4x the
    channel's magnitude, either sign: a symmetric code would waste most of its range on them."""
    shape = (1,) * (x.ndim - 2) + x.shape[-2:]
    mag = channel_magnitudes(rng, shape)
    return x * mag + rng.uniform(-4, 4, shape) * mag


def int4_batch(seed, seqs, dtype, n, k, h, bs, pad_rows=3):
    q, kp, vp, *meta = random_batch(seed, seqs, n, k, h, bs, "float32", pad_rows)
    rng = np.random.default_rng(seed + 1)
    kp = jnp.asarray(offset_keys(rng, np.asarray(kp)), jnp.float32)
    vp = vp * jnp.asarray(10.0 ** rng.uniform(-2, 1, vp.shape[:3] + (1,)), jnp.float32)
    return (q.astype(dtype), quantize_pages(kp, "int4", keys=True), quantize_pages(vp, "int4"),
            *meta)


def empty_pages(nb, bs, k, h):
    """int4 K and V pages holding garbage codes, scales and zero points, as a reused block
    does."""
    rng = np.random.default_rng(99)
    data = lambda: jnp.asarray(rng.integers(0, 256, (nb, bs, k, h // 2)), jnp.uint8)  # noqa: E731
    params = np.stack([rng.uniform(1, 9, (nb, k, h)), rng.uniform(-9, 9, (nb, k, h))], axis=1)
    return (QuantizedPages(data(), jnp.asarray(params, jnp.float8_e4m3fn)),
            QuantizedPages(data(), jnp.asarray(rng.uniform(1, 9, (nb, bs, k, 1)), jnp.bfloat16)))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def symmetric_channels(x):
    """Keys [num_blocks, block_size, K, H] through a *symmetric* int4 code per channel of a
    block (absmax / 7, codes -7..7, exact scale): the format this one replaced."""
    s = np.abs(x).max(axis=1, keepdims=True) / 7
    return np.round(x / np.where(s == 0, 1, s)) * s


def bits(pages):
    return [np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint8)) if a.dtype.itemsize == 1
            else np.asarray(a.astype(jnp.float32)) for a in pages]


_write = jax.jit(write_kv_ref)


def write_steps(keys, cuts, pool=None, seed=0):
    """Keys [num_blocks, block_size, K, H] written as K and V (block b at pool block b) in steps
    of rows ``cuts[i]:cuts[i + 1]`` of the flattened keys, each step's rows in a random order
    with 2 padding rows. Returns the pool (K pages, V pages)."""
    nb, bs, k, h = keys.shape
    kp, vp = pool or empty_pages(nb, bs, k, h)
    flat = jnp.asarray(keys, jnp.float32).reshape(nb * bs, k, h)
    rng = np.random.default_rng(seed)
    for a, b in zip(cuts[:-1], cuts[1:]):
        slots = np.concatenate([np.arange(a, b), [-1, -1]]).astype(np.int32)
        rows = jnp.concatenate([flat[a:b], jnp.full((2, k, h), 7.0)])
        order = rng.permutation(len(slots))
        kp, vp = _write(kp, vp, rows[order], rows[order], jnp.asarray(slots[order]))
    return kp, vp


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
    lo, hi = unpack_nibbles(pack_nibbles(codes + 8))  # keys: nibbles 0..15, no offset
    np.testing.assert_array_equal(np.asarray(lo[:, 0]), np.asarray(codes[:, 0] + 8))
    np.testing.assert_array_equal(np.asarray(hi[:, 0]), np.asarray(codes[:, 1] + 8))
    # the halves layout: byte j holds channels j and j + H/2
    wide = jnp.arange(-7, 9, dtype=jnp.int32).reshape(1, 16) % 15 - 7
    np.testing.assert_array_equal(np.asarray(unpack_codes(pack_int4(wide))), np.asarray(wide))


def test_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    nb, bs, k, h = 5, 16, 2, 64
    x = offset_keys(rng, rng.standard_normal((nb, bs, k, h)))
    x[1, :, 0, 3] = 0.0  # a constant channel of a block: scale 0, values exact
    x[2, :, 1, 5] = -3.25
    x = jnp.asarray(x, jnp.float32)
    keys, values = quantize_pages(x, "int4", keys=True), quantize_pages(x, "int4")
    assert keys.shape == values.shape == (nb, bs, k, h)
    assert keys.data.shape == (nb, bs, k, h // 2) and keys.data.dtype == jnp.uint8
    assert keys.scale.shape == (nb, 2, k, h) and keys.scale.dtype == jnp.float8_e4m3fn
    assert values.scale.shape == (nb, bs, k, 1) and values.scale.dtype == jnp.bfloat16
    xs = np.asarray(x, np.float64)
    back = np.asarray(dequantize_pages(keys), np.float64)
    scale, zero = (np.asarray(keys.scale[:, i:i + 1].astype(jnp.float32), np.float64)
                   for i in (0, 1))
    assert scale[1, 0, 0, 3] == 0 and (back[1, :, 0, 3] == 0).all()
    assert scale[2, 0, 1, 5] == 0 and (back[2, :, 1, 5] == -3.25).all()
    assert (np.abs(back - xs) <= 0.5 * scale * (1 + 1e-6)).all()
    # zero: the block's min rounded down to e4m3 (3 mantissa bits: within an eighth, or 2^-9);
    # 15 steps reach the max, and the step is rounded up by at most an eighth
    lo, hi = xs.min(axis=1, keepdims=True), xs.max(axis=1, keepdims=True)
    assert (zero <= lo).all() and (zero >= lo - np.abs(lo) / 8 - 2 ** -9).all()
    assert (zero + 15 * scale >= hi).all()
    assert (15 * scale <= (hi - zero) * (1 + 1 / 8) + 15 * 2 ** -9).all()
    step = np.asarray(values.scale, np.float64)
    assert (np.abs(np.asarray(dequantize_pages(values)) - xs) <= 0.5 * step * (1 + 1e-6)).all()
    # symmetric codes on these keys: about twice the error (measured 0.034 and 0.064)
    assert rel(back, xs) * 1.5 < rel(symmetric_channels(xs), xs)


# ---- the write ---------------------------------------------------------------------------------
def test_whole_blocks_written_at_once_store_their_own_range():
    """A step that writes whole blocks (a prefill, a chunk starting on a block boundary) stores
    each block as ``quantize_pages`` quantizes it alone, whatever the rows' order, padding rows
    write nothing, and blocks no row touches keep their bits."""
    rng = np.random.default_rng(3)
    nb, bs, k, h = 6, 8, 2, 32
    keys = offset_keys(rng, rng.standard_normal((nb, bs, k, h)))
    whole = bits(quantize_pages(jnp.asarray(keys, jnp.float32), "int4", keys=True))
    pool = empty_pages(nb, bs, k, h)
    for cuts in ([0, nb * bs], [0, 2 * bs, 3 * bs, nb * bs]):
        got = bits(write_steps(keys, cuts, pool, seed=len(cuts))[0])
        for g, w in zip(got, whole):
            np.testing.assert_array_equal(g, w)
    got = bits(write_steps(keys[:4], [0, 4 * bs], pool)[0])  # blocks 4 and 5 untouched
    for g, w, old in zip(got, whole, bits(pool[0])):
        np.testing.assert_array_equal(g[:4], w[:4])
        np.testing.assert_array_equal(g[4:], old[4:])


def test_partly_filled_blocks_re_round_once_per_step():
    """Rows added to a partly filled block: a row inside the block's range leaves the earlier
    codes and the parameters bit-identical; a row outside widens the range and re-rounds the
    earlier codes once. Written a token at a time, the keys' error stays near the whole-block
    floor (one re-rounding per growth of the range), well below a symmetric code's."""
    rng = np.random.default_rng(7)
    nb, bs, k, h = 32, 16, 2, 64
    keys = offset_keys(rng, rng.standard_normal((nb, bs, k, h)))
    flat = keys.reshape(nb * bs, k, h)
    inside = flat.copy()
    inside[bs - 1] = (flat[0] + flat[1]) / 2  # between two earlier keys, in every channel
    pool = write_steps(inside.reshape(keys.shape), [0, bs - 1])
    codes, params = bits(pool[0])
    more_codes, more_params = bits(write_steps(inside.reshape(keys.shape)[:1], [bs - 1, bs],
                                               pool)[0])
    np.testing.assert_array_equal(more_codes[0, :bs - 1], codes[0, :bs - 1])
    np.testing.assert_array_equal(more_params[0], params[0])  # scale and zero point
    outside = flat.copy()
    lo, hi = flat[:bs - 1].min(axis=0), flat[:bs - 1].max(axis=0)
    outside[bs - 1] = 2 * hi - lo  # doubles every channel's range
    grown = write_steps(outside.reshape(keys.shape)[:1], [bs - 1, bs], pool)[0]
    assert (np.asarray(grown.scale[0, 0].astype(jnp.float32))
            > np.asarray(pool[0].scale[0, 0].astype(jnp.float32))).all()
    assert rel(dequantize_pages(grown)[0], outside[:bs]) < 0.1

    xs = jnp.asarray(keys, jnp.float32)
    whole = rel(dequantize_pages(quantize_pages(xs, "int4", keys=True)), keys)
    one_by_one = rel(dequantize_pages(write_steps(keys, list(range(nb * bs + 1)))[0]), keys)
    sym = rel(symmetric_channels(keys), keys)
    print(f"\nint4 K error relative to the keys' norm: whole blocks {whole:.3f}, "
          f"a token at a time {one_by_one:.3f}, symmetric whole blocks {sym:.3f}")
    assert whole <= one_by_one < 1.4 * whole and 1.5 * one_by_one < sym  # 0.029, 0.037, 0.063


@pytest.mark.parametrize("seed", range(4))
def test_write_touches_each_block_once_within_the_sequence_bound(seed):
    """The write gathers the step's touched blocks compacted to ceil(T / bs) + 2 S of them (S
    sequences of consecutive positions, each starting anywhere in a block), and stores the same
    bits as with one gathered block per row (num_seqs None). Steps are ragged: prefill chunks
    crossing blocks, decode rows, padding rows, all in a random row order, over a pool that
    already holds keys (so blocks are re-rounded)."""
    rng = np.random.default_rng(seed_of("int4-compact", seed))
    nb, bs, k, h = 40, 8, 2, 32
    pool = empty_pages(nb, bs, k, h)
    blocks = rng.permutation(nb)
    keys = offset_keys(rng, rng.standard_normal((nb * bs, k, h)))
    pool = _write(*pool, jnp.asarray(keys, jnp.float32), jnp.asarray(keys, jnp.float32),
                  jnp.asarray(np.arange(nb * bs), jnp.int32))  # earlier keys everywhere
    slots, seqs, used = [], int(rng.integers(2, 6)), 0
    for _ in range(seqs):  # each sequence: its own blocks, a run of positions from any offset
        n_blocks = int(rng.integers(1, 4))
        mine = blocks[used:used + n_blocks]
        used += n_blocks
        start = int(rng.integers(0, bs))
        n = int(rng.integers(1, n_blocks * bs - start + 1))
        pos = np.arange(start, start + n)
        slots += list(mine[pos // bs] * bs + pos % bs)
    slots += [-1] * int(rng.integers(0, 4))
    slots = np.asarray(rng.permutation(slots), np.int32)
    new = jnp.asarray(offset_keys(rng, rng.standard_normal((len(slots), k, h))), jnp.float32)
    compact = jax.jit(write_kv_ref, static_argnames="num_seqs")(
        *pool, new, new, jnp.asarray(slots), num_seqs=seqs)
    per_row = _write(*pool, new, new, jnp.asarray(slots))
    for g, w in zip(compact, per_row):
        for a, b in zip(bits(g), bits(w)):
            np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(bits(compact[0]), bits(pool[0])))


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
        for a, b in zip(bits(g), bits(w)):
            np.testing.assert_array_equal(a, b)


# ---- attention kernels -------------------------------------------------------------------------
# (q dtype, N, K, H, block_size)
CASES = [
    pytest.param("bfloat16", 8, 2, 128, 16, id="bf16-gqa4-h128-bs16"),
    pytest.param("float32", 2, 2, 64, 8, id="f32-gqa1-h64-bs8"),
    pytest.param("bfloat16", 7, 1, 64, 32, id="bf16-gqa7-h64-bs32"),
    pytest.param("float32", 14, 2, 128, 16, id="f32-gqa7-h128-bs16"),
    pytest.param("float16", 8, 2, 64, 16, id="f16-gqa4-h64-bs16"),  # the float16 unpack
]


@pytest.mark.parametrize("dtype,n,k,h,bs,tuning", [
    *[pytest.param(*c.values, {}, id=c.id) for c in CASES],
    *[pytest.param(*c.values, {"num_splits": 4, "block_kv": 16}, id=c.id + "-split4")
      for c in CASES[::3]],
    *[pytest.param(*c.values, {"int4_dtype": "float16"}, id=c.id + "-f16") for c in CASES[::2]],
    pytest.param(*CASES[0].values, {"int4_dtype": "float16", "num_splits": 4, "block_kv": 16},
                 id=CASES[0].id + "-f16-split4"),
])
def test_gpu_decode(dtype, n, k, h, bs, tuning):
    args = int4_batch(seed_of("int4", dtype, n, k, h, bs), DECODE, dtype, n, k, h, bs)
    out = ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, decode_only=True,
                                 **tuning)
    check(out, args, dtype)


@pytest.mark.parametrize("knob,match", [({"int4_asm": "all"}, "int4_asm must be one of"),
                                        ({"int4_dtype": "int8"}, "int4_dtype must be")])
def test_bad_int4_knobs_raise(knob, match):
    args = int4_batch(3, DECODE, "bfloat16", 8, 2, 64, 16)
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, decode_only=True,
                               **knob)


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
