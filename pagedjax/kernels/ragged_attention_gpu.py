"""Ragged paged attention for GPUs (chunked prefill, mixed prefill + decode), Pallas on Triton.

A program owns one *query tile* of one sequence and one KV head: ``block_q`` consecutive query
tokens times the ``G = N / K`` query heads of that KV head, packed as ``block_m = block_q * G``
(padded to a power of two) matrix rows, row ``r`` being token ``r // G``, head ``r % G``. Each
K/V tile gathered from the pages therefore serves all G heads (GQA costs no extra reads) and the
matrix units see a full ``block_m``-row tile even for short chunks.

The tile table (which sequence and first token each tile has) is a handful of tiny XLA ops on the
step's metadata; identical across layers, so XLA computes it once per step. Rows past
``qsl[S]`` are padding and form one extra pseudo-sequence with no context, whose tiles write zeros,
so every output row is written by the kernel and no XLA pass touches the output.

Keys of a tile's sequence are visited in two loops: blocks wholly before the tile's first query
position need no mask (every row sees every key), the last one or two blocks on the causal
diagonal are masked per (row, key). Tiles are launched longest-first (reverse table order) so the
long causal tiles do not form a tail.

1-byte KV as in the decode kernel: raw fp8 pages (the fp8 cache, its static scale applied by the
model) are converted to q's dtype in registers, masked lanes reading an fp8 zero (``load_kv``);
``QuantizedPages`` (int8) also apply K's per-token scales to the score columns, V's to the
probabilities. int4 pages are unpacked in registers as in the decode kernel (``int4_gpu.load_int4``): two
matmuls over the halves of the head dim, two output accumulators.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .decode_attention_gpu import LOG2E, NEG, cdiv, flat_pages, flat_scales, load_kv, split_refs
from .int4_gpu import load_int4
from .quantization import is_int4, is_quantized, to_compute
from .reference import visible


def tile_table(query_start_loc, num_tokens: int, block_q: int, num_tiles: int):
    """Per tile: (sequence index, first token row). Sequence ``S`` is the padding pseudo-sequence;
    tiles past the last needed one get sequence ``S + 1`` and start row ``num_tokens``."""
    s = query_start_loc.shape[0] - 1
    starts = query_start_loc  # [S+1]: sequence s starts at qsl[s]; padding starts at qsl[S]
    ends = jnp.concatenate([query_start_loc[1:], jnp.full((1,), num_tokens, jnp.int32)])
    n_tiles = (jnp.maximum(ends - starts, 0) + block_q - 1) // block_q
    cum = jnp.cumsum(n_tiles)
    i = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.searchsorted(cum, i, side="right").astype(jnp.int32)  # in [0, S+1]
    sc = jnp.minimum(seq, s)
    start = starts[sc] + (i - (cum - n_tiles)[sc]) * block_q
    return seq, jnp.where(seq <= s, start, num_tokens).astype(jnp.int32)


def _ragged_kernel(tseq_ref, tstart_ref, q_ref, k_ref, v_ref, bt_ref, cl_ref, qsl_ref, *refs,
                   num_seqs, num_tokens, num_tiles, num_heads, group, block_q, block_m, block_n,
                   head_dim, block_size, scale_log2, quantized, packed, sink_tokens, window):
    # q_ref, o_ref [T*N, H]; k_ref, v_ref [num_blocks*block_size, K*H]; bt_ref [S, W];
    # quantized: ks_ref, vs_ref [num_blocks*block_size, K] bf16 before o_ref; packed (int4):
    # k_ref, v_ref [num_blocks*block_size, K*H/2] uint8 and ks_ref [num_blocks*2, K*H] fp8
    # (K's scale and zero-point rows of each block).
    ks_ref, vs_ref, (o_ref,) = split_refs(refs, quantized)
    tile, kh = num_tiles - 1 - pl.program_id(0), pl.program_id(1)
    seq, t0 = tseq_ref[tile], tstart_ref[tile]
    is_seq = seq < num_seqs
    sc = jnp.minimum(seq, num_seqs - 1)
    seq_start = qsl_ref[jnp.minimum(seq, num_seqs)]
    seq_end = jnp.where(is_seq, qsl_ref[sc + 1], num_tokens)
    ctx = jnp.where(is_seq, cl_ref[sc], 0)
    first_pos = ctx - (seq_end - seq_start) - seq_start  # position of token row t: first_pos + t

    r = jnp.arange(block_m, dtype=jnp.int32)
    tok = jax.lax.div(r, group)
    t = t0 + tok
    row_ok = (tok < block_q) & (t < seq_end)
    pos = first_pos + t  # [block_m]
    dims = jnp.arange(head_dim, dtype=jnp.int32)
    q_rows = t * num_heads + kh * group + jax.lax.rem(r, group)
    # The head dim in parts: one, or int4's low and high halves.
    # (two iotas, not slices of one: Triton's lowering has no slice)
    halves = [jnp.arange(h, h + head_dim // 2, dtype=jnp.int32) for h in (0, head_dim // 2)]
    out_cols = halves if packed else [dims]
    q_parts = [plgpu.load(q_ref.at[q_rows[:, None], c[None, :]], other=0,
                          mask=jnp.broadcast_to(row_ok[:, None], (block_m, c.shape[0])))
               for c in out_cols]
    dt = q_parts[0].dtype

    pos_lo = first_pos + t0
    pos_hi = first_pos + jnp.minimum(t0 + block_q, seq_end) - 1
    kv_hi = jnp.where(is_seq, jnp.maximum(pos_hi + 1, 0), 0)  # keys [0, kv_hi)
    n_full = jnp.minimum(jax.lax.div(jnp.maximum(pos_lo + 1, 0), block_n),
                         jax.lax.div(kv_hi, block_n))
    n_all = cdiv(kv_hi, block_n)
    cols = (kh * head_dim + dims)[None, :]

    if window:  # first key of the tile's windows; keys before it and past the sinks: never read
        w_lo = jnp.maximum(pos_lo - window + 1, 0)

    def block(b, carry, masked):
        acc, m, l = carry
        j = b * block_n + jnp.arange(block_n, dtype=jnp.int32)  # key positions
        vs = None
        live = None
        if masked:  # keys some row of the tile sees
            live = j < kv_hi
            if window:
                live = live & ((j < sink_tokens) | (j >= w_lo))
        if packed:
            page = bt_ref[sc, jax.lax.div(j, block_size)] if live is None else plgpu.load(
                bt_ref.at[sc, jax.lax.div(j, block_size)], mask=live, other=0)
            rows = page * block_size + jax.lax.rem(j, block_size)
            k_parts, v_parts = load_int4(k_ref, v_ref, ks_ref, rows, page, kh, head_dim, live, dt)
            vs = vs_ref[rows, kh] if live is None else plgpu.load(vs_ref.at[rows, kh], mask=live,
                                                                  other=0)
        elif masked:
            page = plgpu.load(bt_ref.at[sc, jax.lax.div(j, block_size)], mask=live, other=0)
            kv_mask = jnp.broadcast_to(live[:, None], (block_n, head_dim))
            rows = page * block_size + jax.lax.rem(j, block_size)
            k = load_kv(k_ref, (rows[:, None], cols), kv_mask)
            v = load_kv(v_ref, (rows[:, None], cols), kv_mask)
            if quantized:
                ks = plgpu.load(ks_ref.at[rows, kh], mask=live, other=0)
                vs = plgpu.load(vs_ref.at[rows, kh], mask=live, other=0)
        else:
            page = bt_ref[sc, jax.lax.div(j, block_size)]
            rows = page * block_size + jax.lax.rem(j, block_size)
            k, v = k_ref[rows[:, None], cols], v_ref[rows[:, None], cols]
            if quantized:
                ks, vs = ks_ref[rows, kh], vs_ref[rows, kh]
        if not packed:
            k_parts, v_parts = [to_compute(k, dt)], [to_compute(v, dt)]
        s = sum(jax.lax.dot_general(qp, kp, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)
                for qp, kp in zip(q_parts, k_parts)) * scale_log2
        if quantized and not packed:
            s = s * ks.astype(jnp.float32)[None, :]
        if masked:
            s = jnp.where(visible(j[None, :], pos[:, None], sink_tokens, window), s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        pv = p * vs.astype(jnp.float32)[None, :] if quantized else p
        acc = tuple(a * alpha[:, None] + jnp.dot(pv.astype(dt), vp,
                                                 preferred_element_type=jnp.float32)
                    for a, vp in zip(acc, v_parts))
        return acc, m_new, l

    carry = (tuple(jnp.zeros((block_m, c.shape[0]), jnp.float32) for c in out_cols),
             jnp.full((block_m,), NEG, jnp.float32), jnp.zeros((block_m,), jnp.float32))
    full, part = functools.partial(block, masked=False), functools.partial(block, masked=True)
    if window:
        # sink blocks (masked), then the windows: blocks only some rows' windows reach
        # (masked), blocks in every row's window and before every row (not), the diagonal
        n_sink = cdiv(jnp.minimum(sink_tokens, kv_hi), block_n)
        w_first = jnp.maximum(n_sink, jax.lax.div(w_lo, block_n))
        w_full = jnp.minimum(jnp.maximum(w_first, cdiv(jnp.maximum(pos_hi - window + 1, 0),
                                                       block_n)), n_all)
        n_full = jnp.maximum(w_full, n_full)
        carry = jax.lax.fori_loop(0, n_sink, part, carry)
        carry = jax.lax.fori_loop(w_first, w_full, part, carry)
        carry = jax.lax.fori_loop(w_full, n_full, full, carry)
    else:
        carry = jax.lax.fori_loop(0, n_full, full, carry)
    acc, _, l = jax.lax.fori_loop(n_full, n_all, part, carry)
    for a, c in zip(acc, out_cols):
        out = a / jnp.where(l == 0, 1.0, l)[:, None]
        plgpu.store(o_ref.at[q_rows[:, None], c[None, :]], out.astype(o_ref.dtype),
                    mask=jnp.broadcast_to(row_ok[:, None], (block_m, c.shape[0])))


@functools.partial(jax.jit, static_argnames=(
    "scale", "block_m", "block_n", "num_warps", "num_stages", "interpret", "sink_tokens",
    "window"))
def ragged_paged_attention_gpu(q, k_pages, v_pages, block_tables, context_lens, query_start_loc,
                               *, scale: float, block_m: int = 128, block_n: int = 128,
                               num_warps: int = 8, num_stages: int = 3, interpret: bool = False,
                               sink_tokens: int = 0, window: int = 0):
    """Ragged (chunked-prefill / mixed) attention over a paged KV cache.

    q: [T, N, H]; k_pages, v_pages: [num_blocks, block_size, K, H] in q's dtype or raw fp8, or
    QuantizedPages (pagedjax/kernels/quantization.py); block_tables: [S, W] int32; context_lens: [S]
    int32; query_start_loc: [S + 1] int32. Returns [T, N, H] in q's dtype with padding rows
    zero. H, block_m (>= N / K) and block_n must be powers of two. Default tile: the best sum
    over causal 8K and 2K-over-6K chunked prefill on an H100 (KERNEL_NOTES.md).
    sink_tokens, window (static): the mask of ``reference.visible`` (window 0: causal); a tile
    reads its sink blocks and its rows' windows only.
    Shapes are checked by ``pagedjax.kernels.dispatch.ragged_paged_attention``.
    """
    t, n, h = q.shape
    _, bs, kh, _ = k_pages.shape
    s, _ = block_tables.shape
    group = n // kh
    block_q = block_m // group
    num_tiles = -(-t // block_q) + s + 1
    tseq, tstart = tile_table(query_start_loc, t, block_q, num_tiles)
    kernel = functools.partial(
        _ragged_kernel, num_seqs=s, num_tokens=t, num_tiles=num_tiles, num_heads=n, group=group,
        block_q=block_q, block_m=block_m, block_n=block_n, head_dim=h, block_size=bs,
        scale_log2=scale * LOG2E, quantized=is_quantized(k_pages), packed=is_int4(k_pages),
        sink_tokens=sink_tokens, window=window)
    out = pl.pallas_call(
        kernel, grid=(num_tiles, kh), out_shape=jax.ShapeDtypeStruct((t * n, h), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="ragged_paged_attention")(
        tseq, tstart, q.reshape(t * n, h), *flat_pages(k_pages, v_pages), block_tables,
        context_lens, query_start_loc, *flat_scales(k_pages, v_pages))
    return out.reshape(t, n, h)
