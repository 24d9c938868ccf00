"""Every paged-attention kernel against the pure-jnp reference, in interpret mode on the CPU.

Inputs are fresh random draws per case: pool pages in a random order, block-table entries past a
sequence's last block set far out of range (a kernel that reads them fails: out-of-bounds DMA in
TPU interpret mode, garbage otherwise), padded sequences with a nonzero context. Interpret mode
starts every output as NaN (checked below), so an element a kernel forgets to write fails.
The case list covers context lengths 0, 1, 15, 16, 17 and long, GQA 1/4/7, head_dim 64/128, block
size 8/16/32, fp32 and bf16, without the full Cartesian product.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pagedjax.kernels import paged_attention_ref
from pagedjax.kernels.quantization import is_quantized
from pagedjax.kernels.dispatch import ragged_paged_attention
from tests.kernels.seeds import seed_of

LONG = 150
TOL = {"float32": 1e-3, "bfloat16": 1e-2}

# (dtype, N, K, H, block_size)
CASES = [
    pytest.param("float32", 2, 2, 64, 8, id="f32-gqa1-h64-bs8"),
    pytest.param("bfloat16", 8, 2, 128, 16, id="bf16-gqa4-h128-bs16"),
    pytest.param("bfloat16", 7, 1, 64, 32, id="bf16-gqa7-h64-bs32"),
    pytest.param("float32", 14, 2, 128, 16, id="f32-gqa7-h128-bs16"),
    pytest.param("bfloat16", 4, 4, 128, 8, id="bf16-gqa1-h128-bs8"),
]
# (q_len, context_len): decode rows at the page-boundary lengths and a long one, a padded sequence
# (q_len 0) with a stale context, and for the ragged kernels prefill chunks over paged context.
DECODE = [(1, 1), (1, 15), (0, 40), (1, 16), (1, 17), (1, LONG)]
RAGGED = [(1, 1), (15, 15), (0, 40), (1, 16), (5, 17), (17, LONG), (3, 3)]


def random_batch(seed, seqs, n, k, h, bs, dtype, pad_rows=3):
    """A step with one sequence per (q_len, context_len) pair and ``pad_rows`` padding rows."""
    rng = np.random.default_rng(seed)
    s = len(seqs)
    w = max(-(-c // bs) for _, c in seqs) + 1
    nb = sum(-(-c // bs) for _, c in seqs) + 5
    perm = rng.permutation(nb)
    tables = np.full((s, w), 10**6, np.int32)  # past a sequence's blocks: must never be read
    at = 0
    for i, (_, c) in enumerate(seqs):
        used = -(-c // bs)
        tables[i, :used] = perm[at:at + used]
        at += used
    q_lens = np.array([ql for ql, _ in seqs])
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    t = int(qsl[-1]) + pad_rows
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    return (draw(t, n, h), draw(nb, bs, k, h), draw(nb, bs, k, h), jnp.asarray(tables),
            jnp.asarray([c for _, c in seqs], jnp.int32), jnp.asarray(qsl))


def check(out, args, dtype, tol=TOL):
    """``out`` against the fp32 reference on the same values (quantized pages as they are: the
    reference dequantizes them), padding rows zero, nothing unwritten."""
    q, k_pages, v_pages, *meta = args
    up = lambda x: x if is_quantized(x) else x.astype(jnp.float32)  # noqa: E731
    ref = np.asarray(paged_attention_ref(up(q), up(k_pages), up(v_pages), *meta), np.float64)
    out = np.asarray(out.astype(jnp.float32), np.float64)
    assert out.shape == ref.shape
    assert not np.isnan(out).any(), f"{np.isnan(out).any(axis=(1, 2)).sum()} rows unwritten/NaN"
    real = int(meta[2][-1])
    assert (out[real:] == 0).all(), "padding rows must be zero"
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert err < tol[dtype], f"relative error {err:.2e} >= {tol[dtype]}"


@pytest.mark.parametrize("dtype,n,k,h,bs,tuning", [
    *[pytest.param(*c.values, {}, id=c.id) for c in CASES],
    *[pytest.param(*c.values, {"num_splits": 4, "block_kv": 16}, id=c.id + "-split4")
      for c in CASES[1:4]],
])
def test_gpu_decode(dtype, n, k, h, bs, tuning):
    args = random_batch(seed_of(dtype, n, k, h, bs), DECODE, n, k, h, bs, dtype)
    out = ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, decode_only=True,
                                 **tuning)
    check(out, args, dtype)


@pytest.mark.parametrize("dtype,n,k,h,bs", CASES)
def test_gpu_ragged(dtype, n, k, h, bs):
    args = random_batch(seed_of(dtype, n, k, h, bs, 1), RAGGED, n, k, h, bs, dtype)
    out = ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, block_m=16,
                                 block_n=16 if bs != 32 else 32)
    check(out, args, dtype)


def test_gpu_ragged_decode_batch():
    """The ragged kernel also serves a pure decode step (the engine may use it for one)."""
    dtype, n, k, h, bs = CASES[2].values
    args = random_batch(7, DECODE, n, k, h, bs, dtype, pad_rows=0)
    check(ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, block_m=32,
                                 block_n=16), args, dtype)


def test_gpu_decode_fewer_rows_than_seqs():
    """T < S (more sequence slots than rows): the padded sequences' slots store nothing."""
    seqs = [(1, 5), (0, 3), (1, 33), (0, 0), (0, 9)]
    args = random_batch(3, seqs, 4, 2, 64, 8, "float32", pad_rows=1)  # T = 3 < S = 5
    for splits in (1, 2):
        out = ragged_paged_attention(*args, backend="pallas-gpu", interpret=True,
                                     decode_only=True, num_splits=splits, block_kv=16)
        check(out, args, "float32")


@pytest.mark.parametrize("dtype,n,k,h,bs", CASES)
def test_tpu_decode(dtype, n, k, h, bs):
    args = random_batch(seed_of(dtype, n, k, h, bs, 2), DECODE, n, k, h, bs, dtype)
    out = ragged_paged_attention(*args, backend="pallas-tpu", interpret=True, decode_only=True,
                                 pages_per_block=3)
    check(out, args, dtype)


@pytest.mark.parametrize("dtype,n,k,h,bs", CASES)
def test_tpu_ragged(dtype, n, k, h, bs):
    args = random_batch(seed_of(dtype, n, k, h, bs, 3), RAGGED, n, k, h, bs, dtype)
    out = ragged_paged_attention(*args, backend="pallas-tpu", interpret=True, block_q=8,
                                 pages_per_block=2)
    check(out, args, dtype)


def test_reference_backend_is_the_reference():
    args = random_batch(11, RAGGED, 8, 2, 64, 16, "float32")
    np.testing.assert_array_equal(ragged_paged_attention(*args, backend="reference"),
                                  paged_attention_ref(*args))


def test_interpret_outputs_start_poisoned():
    """The premise of the NaN checks above: an output element no kernel writes comes back NaN."""
    def writes_nothing(x_ref, o_ref):
        del x_ref, o_ref

    x = jnp.ones((8, 128), jnp.float32)
    out = pl.pallas_call(writes_nothing, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                         interpret=True)(x)
    assert np.isnan(np.asarray(out)).all()
    out = pl.pallas_call(writes_nothing, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                         grid=(1,), in_specs=[pl.BlockSpec((8, 128), lambda i: (0, 0))],
                         out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
                         interpret=pltpu.InterpretParams())(x)
    assert np.isnan(np.asarray(out)).all()


@pytest.mark.parametrize("bad,match", [
    (lambda a: (a[0][0],) + a[1:], "q must be"),
    (lambda a: (a[0], a[1], a[2][:, :, :1]) + a[3:], "k_pages/v_pages"),
    (lambda a: (a[0][:, :, :32],) + a[1:], "head_dim"),
    (lambda a: (a[0][:, :3],) + a[1:], "multiple of KV heads"),
    (lambda a: a[:4] + (a[4][:-1],) + a[5:], "context_lens"),
    (lambda a: a[:5] + (a[5][:-1],), "query_start_loc"),
    (lambda a: a[:3] + (a[3].astype(jnp.float32),) + a[4:], "block_tables must be int32"),
    (lambda a: (a[0].astype(jnp.bfloat16),) + a[1:], "q dtype"),
])
def test_bad_shapes_raise(bad, match):
    args = random_batch(0, DECODE, 4, 2, 64, 8, "float32")
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*bad(args), backend="pallas-gpu", interpret=True)


@pytest.mark.parametrize("kwargs,match", [
    ({"backend": "cuda"}, "backend must be"),
    ({"backend": "pallas-gpu", "block_kv": 16}, "unknown tuning"),
    ({"backend": "pallas-gpu", "decode_only": True, "block_kv": 24}, "power of two"),
    ({"backend": "pallas-gpu", "decode_only": True, "num_splits": 0}, "positive"),
    ({"backend": "pallas-tpu", "block_q": 12}, "multiple of 8"),
])
def test_bad_options_raise(kwargs, match):
    args = random_batch(0, DECODE, 4, 2, 64, 8, "float32")
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*args, interpret=True, **kwargs)


def test_gpu_rejects_odd_head_dim():
    args = random_batch(0, DECODE, 4, 2, 80, 8, "float32")
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        ragged_paged_attention(*args, backend="pallas-gpu", interpret=True)


@pytest.mark.parametrize("backend", ["pallas-gpu", "reference"])
def test_write_kv_matches_reference(backend):
    """Fused KV write == the XLA scatter, padding slots (-1) untouched, k_new cast to the pool."""
    from pagedjax.kernels import write_kv_ref
    from pagedjax.kernels.dispatch import write_kv

    rng = np.random.default_rng(4)
    nb, bs, k, h, t = 9, 8, 2, 64, 13
    pool = [jnp.asarray(rng.standard_normal((nb, bs, k, h)), jnp.bfloat16) for _ in range(2)]
    new = [jnp.asarray(rng.standard_normal((t, k, h)), jnp.float32) for _ in range(2)]
    slots = rng.permutation(nb * bs)[:t].astype(np.int32)
    slots[[0, 5, 12]] = -1
    slots[1] = nb * bs - 1  # the last slot, next to padding lanes in the same program
    got = write_kv(*pool, *new, jnp.asarray(slots), backend=backend, interpret=True)
    want = write_kv_ref(*pool, *new, jnp.asarray(slots))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(*pool, *new, jnp.asarray(slots[:-1]), backend=backend)
