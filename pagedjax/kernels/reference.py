"""Pure-jnp paged attention over a ragged batch: the CPU path and the oracle for the Pallas kernels.

Layout (owned by ``pagedjax.worker.kv_pool``): one layer's pages are ``k_pages, v_pages`` of shape
``[num_blocks, block_size, K, H]``; a slot is ``block * block_size + offset``. An fp8 cache
(``--kv-cache-dtype fp8_e4m3 | fp8_e5m2``) is plain pages in the fp8 dtype holding raw values (the
model applies the static scale outside the kernels): the write saturates to +-qmax, attention
upcasts to float32. An int8 cache passes ``QuantizedPages(data, scale)`` in place of each pages
array (``pagedjax/kernels/quantization.py``): the write quantizes each token's K/V per KV head,
attention dequantizes in float32. An int4 cache is QuantizedPages of packed codes, V scaled per
token, K asymmetric per channel within a block: the write re-derives a block's scale and zero point
from its earlier keys and the step's new ones (``write_int4_keys``).

A step's batch is packed ragged: sequence ``s`` owns query rows ``q[qsl[s]:qsl[s+1]]`` (1 token when
decoding, a chunk when prefilling); ``context_lens[s]`` counts its tokens in the cache *including*
this step's, so its queries sit at positions ``context_lens[s] - q_len .. context_lens[s] - 1`` and
attend to every cached position up to their own (the paged context plus causally within the
chunk). Rows past ``qsl[S]`` are padding and come out as zeros; a padded sequence has
``q_len == 0``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .quantization import (QuantizedPages, dequantize, dequantize_keys, has_channel_scales,
                           is_quantized, is_raw_fp8, key_params, pack_nibbles, quantize,
                           quantize_keys, saturate)


def write_kv_ref(k_pages, v_pages, k_new, v_new, slot_mapping, num_seqs: int | None = None):
    """Scatter this step's K/V into their slots (quantizing them for QuantizedPages; saturating
    to +-qmax for raw fp8 pages, where a plain cast would store NaN / inf).

    k_pages, v_pages: [num_blocks, block_size, K, H] arrays, or QuantizedPages;
    k_new, v_new: [T, K, H]; slot_mapping: [T] int32, a negative slot marks a padding row
    (nothing is written); ``num_seqs``: at most this many sequences own the rows, each in
    consecutive positions (the step's S; None: as many as rows), which bounds the blocks an int4
    write re-quantizes. Returns the updated (k_pages, v_pages).
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
        if has_channel_scales(pages):
            return write_int4_keys(pages, new, slot_mapping, num_seqs)
        if is_quantized(pages):
            return QuantizedPages(*(put(p, x) for p, x in zip(pages, quantize(new, pages.dtype))))
        return put(pages, new)

    return write(k_pages, k_new), write(v_pages, v_new)


def touched_blocks(num_rows: int, block_size: int, num_seqs: int | None) -> int:
    """The most blocks ``num_rows`` written rows can touch when at most ``num_seqs`` sequences own
    them, each in consecutive positions: a sequence's n rows touch at most ceil(n / block_size)
    + 1 <= n / block_size + 2 blocks, so all rows at most ceil(num_rows / block_size) + 2 num_seqs
    (None: one block a row)."""
    if num_seqs is None:
        return num_rows
    return min(num_rows, -(-num_rows // block_size) + 2 * num_seqs)


def write_int4_keys(pages: QuantizedPages, new, slot_mapping,
                    num_seqs: int | None = None) -> QuantizedPages:
    """Write rows into int4 key pages (a scale and zero point per channel within a block).

    pages: data [num_blocks, block_size, K, H / 2] uint8, scale [num_blocks, 2, K, H]
    float8_e4m3fn; new: [T, K, H]; slot_mapping: [T] int32 (negative: padding); num_seqs: the
    most sequences the rows can belong to (None: T), see below.

    Per block the step writes to: its earlier keys are those before the step's first slot in it
    (none when that is slot 0: a new block, whatever stale codes it holds). Per channel, unless
    the new rows fit its current range [zero, zero + 15 scale], its parameters become
    ``key_params`` of the min and max over the earlier keys (dequantized) and the new rows, and
    the earlier codes are re-rounded to them, once; then the new rows are quantized. Slots past
    the written ones are zeroed. One gather and one scatter of the touched blocks, compacted to
    U = ``touched_blocks(T, bs, num_seqs)``; each block is dequantized once, as
    [U, bs, K, H], not once per row (a 2,048-token prefill chunk would hold [2048, bs, K, H]
    float32 keys: ~0.5 GiB a layer for Llama-2-7B).
    """
    nb, bs, kh, h = pages.shape
    t = new.shape[0]
    u = touched_blocks(t, bs, num_seqs)
    live = slot_mapping >= 0
    blk = jnp.where(live, slot_mapping // bs, nb)  # nb: padding, dropped by the scatters
    off = jnp.where(live, slot_mapping % bs, 0)
    row = jnp.arange(t, dtype=jnp.int32)
    first = jnp.full((nb + 1,), bs, jnp.int32).at[blk].min(off)  # first slot written, per block
    leader = jnp.full((nb + 1,), t, jnp.int32).at[blk].min(row)[blk]  # [T]; padding: t
    # The touched blocks in the order of their leaders (each block's first row in the step):
    # touched block j is row lead[j]'s; c [T] is each row's j (padding: u, dropped).
    is_leader = live & (leader == row)
    lead = jnp.nonzero(is_leader, size=u, fill_value=t)[0]  # [U]
    c = jnp.where(live, (jnp.cumsum(is_leader) - 1)[jnp.minimum(leader, t - 1)], u)
    touched = lead < t
    blk_u = jnp.where(touched, blk[jnp.minimum(lead, t - 1)], nb)  # [U]
    x = new.astype(jnp.float32)
    new_lo = jax.ops.segment_min(x, c, num_segments=u)  # per touched block [U, K, H]
    new_hi = jax.ops.segment_max(x, c, num_segments=u)

    at = jnp.minimum(blk_u, nb - 1)
    old = QuantizedPages(pages.data[at], pages.scale[at])  # [U, bs, K, H / 2], [U, 2, K, H]
    scale, zero = (old.scale[:, i].astype(jnp.float32) for i in (0, 1))  # [U, K, H]
    old_x = dequantize_keys(old.data, old.scale)  # [U, bs, K, H]
    first_u = first[blk_u]
    earlier = (jnp.arange(bs)[None, :] < first_u[:, None])[:, :, None, None]  # [U, bs, 1, 1]
    inf = jnp.float32(jnp.inf)
    lo = jnp.minimum(new_lo, jnp.min(jnp.where(earlier, old_x, inf), axis=1))
    hi = jnp.maximum(new_hi, jnp.max(jnp.where(earlier, old_x, -inf), axis=1))
    # A channel whose new values fit keeps its parameters: re-rounding to them is exact.
    fits = (first_u > 0)[:, None, None] & (new_lo >= zero) & (new_hi <= zero + 15 * scale)
    fresh_scale, fresh_zero = key_params(lo, hi)
    scale, zero = jnp.where(fits, scale, fresh_scale), jnp.where(fits, zero, fresh_zero)
    codes = jnp.where(earlier, quantize_keys(old_x, scale[:, None], zero[:, None]), 0)
    g = jnp.minimum(c, u - 1)
    codes = codes.at[c, off].set(quantize_keys(x, scale[g], zero[g]), mode="drop")
    dst = jnp.where(touched, blk_u, nb)
    params = jnp.stack([scale, zero], axis=1).astype(pages.scale.dtype)
    return QuantizedPages(pages.data.at[dst].set(pack_nibbles(codes), mode="drop"),
                          pages.scale.at[dst].set(params, mode="drop"))


def token_positions(query_start_loc, context_lens, num_tokens):
    """Per query row: (sequence index [T], position [T], valid [T])."""
    s = context_lens.shape[0]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(query_start_loc, t, side="right") - 1, 0, s - 1)
    valid = t < query_start_loc[s]
    q_len = query_start_loc[seq + 1] - query_start_loc[seq]
    pos = context_lens[seq] - q_len + (t - query_start_loc[seq])
    return seq, pos, valid


# Attention's scratch per KV chunk is at most this many bytes (more only when one block per
# chunk already needs more): the engine's activation reserve counts it
# (pagedjax.planning.memory_report).
SCRATCH_BYTES = 32 << 20
MAX_TILE_ROWS = 64


def tile_rows(t: int, s: int) -> int:
    """Query rows per work tile: about the rows per sequence (1 for a decode step), at most
    MAX_TILE_ROWS. Each tile gathers its sequence's K/V once per chunk, so longer tiles gather
    less; a tile's rows past its sequence's are computed and dropped, so shorter tiles waste
    less on short sequences."""
    rows = max(t // max(s, 1), 1)
    return min(1 << (rows.bit_length() - 1), MAX_TILE_ROWS)


def num_tiles(t: int, s: int, tq: int) -> int:
    """Work tiles of a step: sequence s brings ceil(q_len_s / tq), at most T / tq + S in all."""
    return min(-(-t // tq) + s, t)


def scratch_bytes(t: int, s: int, n: int, kh: int, h: int, block_size: int,
                  chunk_blocks: int = 1) -> int:
    """Bytes the reference attention holds per KV chunk of ``chunk_blocks`` blocks: float32
    scores, probabilities and mask per tile row, query head and key, and the chunk's K and V
    gathered per tile (float32 at most)."""
    tq = tile_rows(t, s)
    per_key = num_tiles(t, s, tq) * (tq * n * 12 + kh * h * 8)
    return per_key * chunk_blocks * block_size


def visible(key_pos, q_pos, sink_tokens: int = 0, window: int = 0):
    """Which keys a query sees (broadcasting int arrays): causal, and with a window (StreamingLLM,
    arXiv 2309.17453) only the first ``sink_tokens`` keys and the last ``window`` up to the query:
    ``j <= i and (j < sink_tokens or j > i - window)``. window 0: plain causal."""
    causal = key_pos <= q_pos
    if not window:
        return causal
    return causal & ((key_pos < sink_tokens) | (key_pos > q_pos - window))


def paged_attention_ref(q, k_pages, v_pages, block_tables, context_lens, query_start_loc, *,
                        scale: float | None = None, chunk_blocks: int | None = None,
                        sink_tokens: int = 0, window: int = 0):
    """Attention of a ragged batch over its paged KV cache (K/V of this step already written).

    q: [T, N, H]; k_pages, v_pages: [num_blocks, block_size, K, H], or QuantizedPages (then the
    gathered pages are dequantized to float32 and the matmuls run in float32; raw fp8 pages are
    upcast to float32 the same way);
    block_tables: [S, W] int32 (entries past a sequence's blocks are ignored);
    context_lens: [S] int32; query_start_loc: [S + 1] int32, non-decreasing.
    chunk_blocks: KV blocks per chunk; default the most whose scratch fits SCRATCH_BYTES.
    sink_tokens, window (static): the mask of ``visible``; window 0 is plain causal. With a
    window each tile visits its sink chunks and then only the chunks of its rows' windows; keys
    no row of a tile sees (blocks a sequence released: any table entry) are zeroed, never used.
    Returns [T, N, H] in q's dtype; padding rows are zero.

    Blockwise (online softmax), so memory is bounded at any context length: the rows are cut
    into work tiles of one sequence each ([M, Tq]: sequence s's rows in tiles of Tq), and a loop
    over KV chunks of C = chunk_blocks x block_size keys, up to the longest context in the step,
    gathers each tile's K/V chunk ([M, C, K, H]) and folds it into running max / sum / output.
    Nothing of size [T, context] is ever built.
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
    g = n // kh
    tq = tile_rows(t, s)
    m = num_tiles(t, s, tq)
    if chunk_blocks is None:
        chunk_blocks = max(1, SCRATCH_BYTES // scratch_bytes(t, s, n, kh, h, bs))
    cb = min(chunk_blocks, w)
    c = cb * bs
    num_chunks = -(-w // cb)
    tables = jnp.pad(block_tables, ((0, 0), (0, num_chunks * cb - w)))  # padding is masked

    # Work tiles: tile i is rows row0[i] .. row0[i] + Tq - 1 of sequence seq[i].
    qsl = query_start_loc
    q_len = qsl[1:] - qsl[:-1]  # [S]
    tiles_end = jnp.cumsum((q_len + tq - 1) // tq)  # [S]
    i = jnp.arange(m, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(tiles_end, i, side="right"), 0, s - 1)  # [M]
    first = tiles_end[seq] - (q_len[seq] + tq - 1) // tq
    row0 = qsl[seq] + (i - first) * tq
    rows = row0[:, None] + jnp.arange(tq, dtype=jnp.int32)[None, :]  # [M, Tq]
    ok = (i < tiles_end[-1])[:, None] & (rows < qsl[seq + 1][:, None])
    pos = (context_lens[seq] - q_len[seq] + row0 - qsl[seq])[:, None] + rows - row0[:, None]
    qt = q[jnp.where(ok, rows, 0)].reshape(m, tq, kh, g, h)  # [M, Tq, K, G, H]
    tile_tables = tables[seq]  # [M, num_chunks * cb]

    def chunk(pages, blocks):  # blocks [M, cb] -> [M, C, K, H]
        if is_quantized(pages):
            return dequantize(pages.data[blocks], pages.scale[blocks]).reshape(m, c, kh, h)
        if is_raw_fp8(pages):
            return pages[blocks].astype(jnp.float32).reshape(m, c, kh, h)
        return pages[blocks].reshape(m, c, kh, h)

    if window:  # per tile: its sink chunks, then the chunks of its rows' windows
        sink_chunks = -(-sink_tokens // c)
        last = jnp.max(jnp.where(ok, pos, -1), axis=1)  # [M]
        first_pos = jnp.min(jnp.where(ok, pos, jnp.iinfo(jnp.int32).max), axis=1)
        own_sinks = jnp.minimum(sink_chunks, last // c + 1)
        win_chunk = jnp.maximum(sink_chunks, jnp.maximum(first_pos - window + 1, 0) // c)
        tile_chunks = jnp.where(last >= 0, own_sinks + jnp.maximum(last // c + 1 - win_chunk, 0),
                                0)
        num_steps = jnp.max(tile_chunks)
    else:
        num_steps = jnp.minimum((jnp.max(jnp.where(ok, pos, -1)) + 1 + c - 1) // c, num_chunks)

    def body(j, carry):
        run_max, run_sum, acc = carry
        if window:
            at = jnp.where(j < own_sinks, j, win_chunk + j - own_sinks)  # [M]
            at = jnp.clip(at, 0, num_chunks - 1)
            blocks = jnp.take_along_axis(tile_tables, at[:, None] * cb + jnp.arange(cb), axis=1)
            key_pos = at[:, None] * c + jnp.arange(c, dtype=jnp.int32)  # [M, C]
            live = (j < tile_chunks)[:, None, None]
        else:
            blocks = jax.lax.dynamic_slice_in_dim(tile_tables, j * cb, cb, axis=1)
            key_pos = jnp.broadcast_to(j * c + jnp.arange(c, dtype=jnp.int32), (m, c))
            live = True
        k, v = chunk(k_pages, blocks), chunk(v_pages, blocks)
        scores = jnp.einsum("mtkgh,mckh->mtkgc", qt, k,
                            preferred_element_type=jnp.float32) * scale
        mask = visible(key_pos[:, None, :], pos[:, :, None], sink_tokens, window)
        mask = mask & ok[:, :, None] & live  # [M, Tq, C]
        if window:  # a released block may hold anything: 0 x NaN must not reach the output
            v = jnp.where(jnp.any(mask, axis=1)[:, :, None, None], v, 0)
        scores = jnp.where(mask[:, :, None, None, :], scores, -jnp.inf)
        new_max = jnp.maximum(run_max, jnp.max(scores, axis=-1))
        safe = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        p = jnp.exp(scores - safe[..., None])
        alpha = jnp.exp(run_max - safe)  # 0 while run_max is -inf
        run_sum = run_sum * alpha + jnp.sum(p, axis=-1)
        acc = acc * alpha[..., None] + jnp.einsum("mtkgc,mckh->mtkgh", p.astype(v.dtype), v,
                                                  preferred_element_type=jnp.float32)
        return new_max, run_sum, acc

    stats = jnp.full((m, tq, kh, g), -jnp.inf, jnp.float32)
    carry = (stats, jnp.zeros_like(stats), jnp.zeros((m, tq, kh, g, h), jnp.float32))
    _, run_sum, acc = jax.lax.fori_loop(0, num_steps, body, carry)
    o = acc / jnp.where(run_sum == 0, 1.0, run_sum)[..., None]
    out = jnp.zeros((t, n, h), q.dtype)
    return out.at[jnp.where(ok, rows, t).reshape(-1)].set(
        o.reshape(m * tq, n, h).astype(q.dtype), mode="drop")
