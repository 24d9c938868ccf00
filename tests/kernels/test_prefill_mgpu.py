"""The Mosaic GPU prefill kernel (pagedjax/kernels/ragged_prefill_mgpu.py), checked on the CPU.

Mosaic GPU's interpret mode cannot run this kernel on the CPU (jax 0.10.2's GPU interpreter runs
a single grid block and lacks ``run_state`` and ``layout_cast``), so:
  * ``prefill_attention_twin`` -- the kernel's algorithm block for block in plain jnp, built from
    the same helpers the kernel calls (metadata, per-tile key ranges, unmasked/masked split, page
    addressing or gather, row zeroing) -- equals the pure-jnp reference on fresh random inputs with
    permuted block tables and out-of-range entries past the context;
  * the real kernel traces and lowers for CUDA (Pallas -> Mosaic GPU -> NVVM with wgmma and TMA)
    at the Qwen2.5-7B shapes, and rejects arguments it does not take;
  * the real kernel's numbers were checked on the GPU by
    benchmarks/experiments/prefill_mgpu_probe.py (at commit 92b5fbb; max error against a float32
    reference recorded in prefill_mgpu.json).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.kernels import paged_attention_ref
from pagedjax.kernels.ragged_prefill_mgpu import (prefill_attention_twin, ragged_prefill_mgpu,
                                                  tile_kv_steps, unmasked_steps)

TOL = {"float32": 1e-3, "bfloat16": 1e-2}


def one_sequence(seed, q_len, ctx, n, k, h, bs, dtype, q_start=0, rows=250, max_ctx=340):
    """One sequence's chunk: rows [q_start, q_start + q_len) of a ``rows``-row q (the rest
    padding), its ctx tokens in randomly permuted pages, table entries past the context far out
    of range. Shapes depend only on (rows, max_ctx, bs), so eager ops compile once per test."""
    rng = np.random.default_rng(seed)
    used = -(-ctx // bs)
    w = -(-max_ctx // bs) + 2
    nb = w + 5
    table = np.full((1, w), 10**6, np.int32)
    table[0, :used] = rng.permutation(nb)[:used]
    assert q_start + q_len <= rows and ctx <= max_ctx
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    return (draw(rows, n, h), draw(nb, bs, k, h), draw(nb, bs, k, h), jnp.asarray(table),
            jnp.asarray([ctx], jnp.int32), jnp.asarray([q_start, q_start + q_len], jnp.int32))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# (dtype, N, K, H, block_size)
HEADS = [
    pytest.param("bfloat16", 28, 4, 128, 16, id="bf16-qwen-gqa7-h128-bs16"),
    pytest.param("float32", 8, 2, 64, 8, id="f32-gqa4-h64-bs8"),
    pytest.param("bfloat16", 4, 4, 64, 32, id="bf16-gqa1-h64-bs32"),
]
# (q_len, ctx, q_start): whole prompts, chunks over paged context at unaligned offsets, page and
# tile boundaries, one-token and empty chunks, a chunk that does not start at row 0.
CHUNKS = [(150, 150, 0), (70, 333, 0), (1, 17, 0), (16, 16, 0), (15, 15, 0), (128, 256, 0),
          (0, 40, 0), (40, 90, 5), (200, 201, 0)]


@pytest.mark.parametrize("dtype,n,k,h,bs", HEADS)
@pytest.mark.parametrize("paged_tma", [True, False], ids=["paged_tma", "gather"])
def test_twin_matches_reference(dtype, n, k, h, bs, paged_tma):
    for i, (q_len, ctx, q_start) in enumerate(CHUNKS):
        block_kv = 64 if i % 2 else 128
        args = one_sequence(1000 * i + n + bs, q_len, ctx, n, k, h, bs, dtype, q_start=q_start)
        out = prefill_attention_twin(*args, block_kv=block_kv, paged_tma=paged_tma)
        assert out.shape == args[0].shape and out.dtype == args[0].dtype
        out = np.asarray(out, np.float32)
        ref = np.asarray(_ref(*args), np.float32)
        assert not np.isnan(out).any(), (q_len, ctx)
        live = np.zeros(out.shape[0], bool)
        live[q_start:q_start + q_len] = True
        assert (out[~live] == 0).all(), f"padding rows not zero for {(q_len, ctx)}"
        if q_len:
            err = _rel(out[live], ref[live])
            assert err < TOL[dtype], f"{(q_len, ctx, q_start, block_kv)}: rel err {err:.2e}"


@jax.jit
def _ref(q, k_pages, v_pages, *meta):
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return paged_attention_ref(f32(q), f32(k_pages), f32(v_pages), *meta)


def test_twin_catches_a_wrong_mask():
    """The twin really depends on the causal offset: shifting positions by one breaks it."""
    args = one_sequence(7, 70, 333, 8, 2, 64, 16, "float32")
    ref = _ref(*args)
    good = prefill_attention_twin(*args, block_kv=64)
    shifted = prefill_attention_twin(*args[:4], args[4] + 1, args[5], block_kv=64)
    assert _rel(good[:70], ref[:70]) < 1e-3
    assert _rel(shifted[:70], ref[:70]) > 1e-2


def test_tile_ranges():
    """Key blocks per tile: a tile streams exactly up to its last real row; unmasked blocks are the
    ones every row of a warpgroup sees whole; tiles without real rows stream nothing."""
    bq, bkv = 64, 128
    # causal 8K: tile qi (rows 128 qi .. 128 qi + 127) needs blocks [0, qi], the last one masked
    for qi in (0, 5, 63):
        ub = int(tile_kv_steps(qi, 0, 0, 8192, block_q=bq, block_kv=bkv))
        assert ub == qi + 1
        for wg in range(2):
            assert int(unmasked_steps((2 * qi + wg) * bq, 0, ub, block_kv=bkv)) == qi
    # 2K chunk over 6K of context: off = 6144, tile qi needs 49 + qi blocks, 48 + qi unmasked
    for qi in (0, 15):
        ub = int(tile_kv_steps(qi, 6144, 0, 2048, block_q=bq, block_kv=bkv))
        assert ub == 49 + qi
        assert int(unmasked_steps(2 * qi * bq, 6144, ub, block_kv=bkv)) == 48 + qi
    # tiles past the chunk's rows (T padded to a bucket), and an empty chunk
    assert int(tile_kv_steps(3, 100, 0, 300, block_q=bq, block_kv=bkv)) == 0
    assert int(tile_kv_steps(0, 40, 0, 0, block_q=bq, block_kv=bkv)) == 0


SD = jax.ShapeDtypeStruct
QWEN = (SD((8192, 28, 128), jnp.bfloat16), SD((520, 16, 4, 128), jnp.bfloat16),
        SD((520, 16, 4, 128), jnp.bfloat16), SD((1, 512), jnp.int32), SD((1,), jnp.int32),
        SD((2,), jnp.int32))


@pytest.mark.parametrize("paged_tma", [True, False], ids=["paged_tma", "gather"])
def test_lowers_for_cuda(paged_tma):
    text = ragged_prefill_mgpu.trace(*QWEN, paged_tma=paged_tma).lower(
        lowering_platforms=("cuda",)).as_text()
    for op in ("wgmma.mma_async", "cp.async.bulk.tensor", "mbarrier.arrive.expect_tx",
               "setmaxregister"):
        assert op in text, op


@pytest.mark.parametrize("change,match", [
    (dict(block_tables=SD((2, 512), jnp.int32), context_lens=SD((2,), jnp.int32),
          query_start_loc=SD((3,), jnp.int32)), "one sequence"),
    (dict(q=SD((256, 28, 96), jnp.bfloat16), k_pages=SD((520, 16, 4, 96), jnp.bfloat16),
          v_pages=SD((520, 16, 4, 96), jnp.bfloat16)), "multiple of 64"),
    (dict(q=SD((256, 28, 128), jnp.float32), k_pages=SD((520, 16, 4, 128), jnp.float32),
          v_pages=SD((520, 16, 4, 128), jnp.float32)), "bf16 or f16"),
    (dict(q=SD((256, 30, 128), jnp.bfloat16)), "multiple of KV heads"),
    (dict(context_lens=SD((1,), jnp.int64 if jax.config.x64_enabled else jnp.float32)), "int32"),
    (dict(block_q=32), "block_q"),
    (dict(block_kv=96), "block_kv"),
    (dict(num_stages=1), "num_stages"),
    (dict(k_pages=SD((520, 48, 4, 128), jnp.bfloat16), v_pages=SD((520, 48, 4, 128),
                                                                  jnp.bfloat16)), "page size"),
])
def test_rejects_what_it_does_not_take(change, match):
    names = ("q", "k_pages", "v_pages", "block_tables", "context_lens", "query_start_loc")
    args = dict(zip(names, QWEN))
    kw = {key: change.pop(key) for key in list(change) if key not in names}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ragged_prefill_mgpu.trace(*(args[n] for n in names), **kw)
