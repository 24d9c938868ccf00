"""Pure-jnp paged attention over a ragged batch: the CPU path and the oracle for the Pallas kernels.

Layout (owned by ``pagedjax.kv_pool``): one layer's pages are ``k_pages, v_pages`` of shape
``[num_blocks, block_size, K, H]``; a slot is ``block * block_size + offset``. An fp8 cache
(``--kv-cache-dtype fp8_e4m3 | fp8_e5m2``) is plain pages in the fp8 dtype holding raw values (the
model applies the static scale outside the kernels): the write saturates to +-qmax, attention
upcasts to float32. An int8 cache passes ``QuantizedPages(data, scale)`` in place of each pages
array (``kernels/quantization.py``): the write quantizes each token's K/V per KV head, attention
dequantizes in float32.

A step's batch is packed ragged: sequence ``s`` owns query rows ``q[qsl[s]:qsl[s+1]]`` (1 token when
decoding, a chunk when prefilling); ``context_lens[s]`` counts its tokens in the cache *including*
this step's, so its queries sit at positions ``context_lens[s] - q_len .. context_lens[s] - 1`` and
attend to every cached position up to their own (the paged context plus causally within the
chunk). Rows past ``qsl[S]`` are padding and come out as zeros; a padded sequence has
``q_len == 0``.
"""
from __future__ import annotations

import jax.numpy as jnp

from .quantization import QuantizedPages, dequantize, is_quantized, is_raw_fp8, quantize, saturate


def write_kv_ref(k_pages, v_pages, k_new, v_new, slot_mapping):
    """Scatter this step's K/V into their slots (quantizing them for QuantizedPages; saturating
    to +-qmax for raw fp8 pages, where a plain cast would store NaN / inf).

    k_pages, v_pages: [num_blocks, block_size, K, H] arrays, or QuantizedPages;
    k_new, v_new: [T, K, H]; slot_mapping: [T] int32, a negative slot marks a padding row
    (nothing is written). Returns the updated (k_pages, v_pages).
    """
    nb, bs, kh, h = k_pages.shape
    if k_new.shape[1:] != (kh, h) or v_new.shape != k_new.shape:
        raise ValueError(f"k_new/v_new {k_new.shape}/{v_new.shape} do not match pages {k_pages.shape}")
    if slot_mapping.shape != (k_new.shape[0],):
        raise ValueError(f"slot_mapping {slot_mapping.shape} must be [{k_new.shape[0]}]")
    idx = jnp.where(slot_mapping < 0, nb * bs, slot_mapping)  # out of range: dropped

    def put(pages, rows):  # rows [T, K, X] into pages [nb, bs, K, X]
        flat = pages.reshape(nb * bs, *pages.shape[2:])
        return flat.at[idx].set(saturate(rows, pages.dtype), mode="drop").reshape(pages.shape)

    def write(pages, new):
        if is_quantized(pages):
            return QuantizedPages(*(put(p, x) for p, x in zip(pages, quantize(new, pages.dtype))))
        return put(pages, new)

    return write(k_pages, k_new), write(v_pages, v_new)


def token_positions(query_start_loc, context_lens, num_tokens):
    """Per query row: (sequence index [T], position [T], valid [T])."""
    s = context_lens.shape[0]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(query_start_loc, t, side="right") - 1, 0, s - 1)
    valid = t < query_start_loc[s]
    q_len = query_start_loc[seq + 1] - query_start_loc[seq]
    pos = context_lens[seq] - q_len + (t - query_start_loc[seq])
    return seq, pos, valid


def paged_attention_ref(q, k_pages, v_pages, block_tables, context_lens, query_start_loc, *,
                        scale: float | None = None):
    """Attention of a ragged batch over its paged KV cache (K/V of this step already written).

    q: [T, N, H]; k_pages, v_pages: [num_blocks, block_size, K, H], or QuantizedPages (then the
    gathered pages are dequantized to float32 and the matmuls run in float32; raw fp8 pages are
    upcast to float32 the same way);
    block_tables: [S, W] int32 (entries past a sequence's blocks are ignored);
    context_lens: [S] int32; query_start_loc: [S + 1] int32, non-decreasing.
    Returns [T, N, H] in q's dtype; padding rows are zero.
    """
    t, n, h = q.shape
    nb, bs, kh, h2 = k_pages.shape
    s, w = block_tables.shape
    if h2 != h or n % kh:
        raise ValueError(f"q {q.shape} does not fit pages {k_pages.shape} (N % K must be 0)")
    if context_lens.shape != (s,) or query_start_loc.shape != (s + 1,):
        raise ValueError(f"context_lens {context_lens.shape} / query_start_loc "
                         f"{query_start_loc.shape} must be [{s}] / [{s + 1}]")
    scale = h ** -0.5 if scale is None else scale
    seq, pos, valid = token_positions(query_start_loc, context_lens, t)
    blocks = block_tables[seq]  # [T, W]

    def keys(pages):  # [T, S, K, H]
        if is_quantized(pages):
            return dequantize(pages.data[blocks], pages.scale[blocks]).reshape(t, w * bs, kh, h)
        if is_raw_fp8(pages):
            return pages[blocks].astype(jnp.float32).reshape(t, w * bs, kh, h)
        return pages[blocks].reshape(t, w * bs, kh, h)

    k, v = keys(k_pages), keys(v_pages)
    qg = q.reshape(t, kh, n // kh, h)
    scores = jnp.einsum("tkgh,tskh->tkgs", qg, k, preferred_element_type=jnp.float32) * scale
    key_pos = jnp.arange(w * bs)
    mask = (key_pos[None, :] <= pos[:, None]) & valid[:, None]  # [T, S]
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    o = jnp.einsum("tkgs,tskh->tkgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(t, n, h).astype(q.dtype)
