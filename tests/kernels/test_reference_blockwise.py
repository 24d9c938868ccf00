"""The reference attention computes blockwise (online softmax over KV chunks, one gather per work
tile and chunk): the same results as the one-shot formula it replaced, on fresh random batches,
and a compiled program whose scratch memory does not grow with the context."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.kernels import paged_attention_ref, quantize_pages
from pagedjax.kernels.quantization import dequantize, is_quantized, is_raw_fp8
from pagedjax.kernels.reference import SCRATCH_BYTES, scratch_bytes, token_positions
from tests.kernels.test_paged_attention import DECODE, RAGGED, random_batch


def dense_ref(q, k_pages, v_pages, block_tables, context_lens, query_start_loc):
    """The one-shot formula: every query row gathers its whole context ([T, W x bs, K, H])."""
    t, n, h = q.shape
    _, bs, kh, _ = k_pages.shape
    _, w = block_tables.shape
    seq, pos, valid = token_positions(query_start_loc, context_lens, t)
    blocks = block_tables[seq]

    def keys(pages):
        if is_quantized(pages):
            return dequantize(pages.data[blocks], pages.scale[blocks]).reshape(t, w * bs, kh, h)
        if is_raw_fp8(pages):
            return pages[blocks].astype(jnp.float32).reshape(t, w * bs, kh, h)
        return pages[blocks].reshape(t, w * bs, kh, h)

    k, v = keys(k_pages), keys(v_pages)
    qg = q.reshape(t, kh, n // kh, h)
    scores = jnp.einsum("tkgh,tskh->tkgs", qg, k, preferred_element_type=jnp.float32) * h ** -0.5
    mask = (jnp.arange(w * bs)[None, :] <= pos[:, None]) & valid[:, None]
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    o = jnp.einsum("tkgs,tskh->tkgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(t, n, h).astype(q.dtype)


BATCHES = {"decode": DECODE, "ragged": RAGGED,
           "fewer-rows-than-seqs": [(1, 5), (0, 3), (1, 33), (0, 0), (0, 9)],
           "one-long-prefill": [(70, 150)], "prefill-and-decodes": [(40, 41), (1, 90), (1, 7)]}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("chunk_blocks", [3, None])
@pytest.mark.parametrize("dtype,n,k,h,bs", [("float32", 4, 2, 16, 8), ("bfloat16", 7, 1, 32, 16),
                                            ("float32", 6, 3, 16, 16)])
def test_blockwise_equals_the_one_shot_formula(batch, chunk_blocks, dtype, n, k, h, bs):
    seqs = BATCHES[batch]
    args = random_batch(sum(map(ord, batch + dtype)) + n, seqs, n, k, h, bs, dtype,
                        pad_rows=0 if batch == "fewer-rows-than-seqs" else 3)
    out = paged_attention_ref(*args, chunk_blocks=chunk_blocks)
    want = dense_ref(*args)
    real = int(args[-1][-1])
    assert (np.asarray(out[real:]) == 0).all(), "padding rows are zero"
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("cache", ["int8", "fp8_e4m3", "raw-fp8"])
def test_blockwise_equals_the_one_shot_formula_on_1_byte_pages(cache):
    q, kp, vp, *meta = random_batch(5, RAGGED, 4, 2, 16, 8, "float32")
    if cache == "raw-fp8":
        kp, vp = kp.astype(jnp.float8_e4m3fn), vp.astype(jnp.float8_e4m3fn)
    else:
        kp, vp = quantize_pages(kp, cache), quantize_pages(vp, cache)
    np.testing.assert_allclose(np.asarray(paged_attention_ref(q, kp, vp, *meta, chunk_blocks=2)),
                               np.asarray(dense_ref(q, kp, vp, *meta)), rtol=1e-5, atol=1e-5)


def test_scratch_does_not_grow_with_the_context():
    """SmolLM2-135M's attention shapes at the default token budget (2048 rows, one sequence
    slot bucket of 4) over an 8192-token context: the compiled program's temporaries stay
    within the scratch bound plus the step's own [T, N, H] tensors, where the one-shot formula
    needed [T, 8192, K, H] gathers (12 GiB in float32)."""
    t, s, n, kh, h, bs, ctx = 2048, 4, 9, 3, 64, 16, 8192
    f32, i32 = jnp.float32, jnp.int32
    nb = ctx // bs + 1
    shapes = [jax.ShapeDtypeStruct(x, d) for x, d in (
        ((t, n, h), f32), ((nb, bs, kh, h), f32), ((nb, bs, kh, h), f32),
        ((s, ctx // bs), i32), ((s,), i32), ((s + 1,), i32))]
    own = 8 * t * n * h * 4  # q tiles, accumulators, output and their copies: [T, N, H] each
    bound = max(SCRATCH_BYTES, scratch_bytes(t, s, n, kh, h, bs)) + own
    for f, fits in ((paged_attention_ref, True), (dense_ref, False)):
        temp = jax.jit(f).lower(*shapes).compile().memory_analysis().temp_size_in_bytes
        assert (temp < bound) == fits, (f.__name__, temp, bound)
