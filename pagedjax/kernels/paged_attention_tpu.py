"""Paged attention for TPUs in Pallas Mosaic TPU: block tables by scalar prefetch (SMEM), K/V pages
copied HBM -> VMEM by hand, double-buffered (block b+1 in flight while block b is computed).

Both kernels DMA whole pages ``[block_size, K, H]`` (one contiguous run of the pool, whatever the
KV head) ``pages_per_block`` at a time into a ``[2, P, block_size, K, H]`` VMEM buffer, and split
the KV heads in VMEM. Pages past a sequence's end are neither copied nor waited for, and their
stale buffer rows are masked out of both matmuls.

- decode (every q_len 0 or 1): one program per token row; row -> sequence is a tiny XLA
  ``searchsorted`` passed as a scalar-prefetch table; padding rows get zeros.
- ragged (chunked prefill / mixed): one program per aligned block of ``block_q`` token rows; it
  visits every sequence that has rows in its block (usually one) and attends those rows over that
  sequence's pages with the causal mask. q and the output are presented head-major
  ``[N, T, H]`` (transposed by XLA) so one KV head's ``G`` query heads are a leading-dim slice.

1-byte KV: raw fp8 pages (the fp8 cache, its static scale applied by the model) are DMA'd like
bf16 ones (half the bytes) and converted to q's dtype in VMEM per KV head; ``QuantizedPages``
(int8) DMA their ``[block_size, K, 1]`` bfloat16 scale pages beside the values (1/64 more at
H = 128) and dequantize (values x scale in float32, then q's dtype) before the two matmuls.
int4 pages DMA their packed ``[block_size, K, H / 2]`` bytes (a quarter of bf16's), V's per-token
scale pages and K's ``[2, K, H]`` float8_e4m3fn scale and zero-point rows per page; the bytes are
unpacked in VMEM (mask and shift, the halves concatenated) and dequantized in float32 (V: codes x
scale; K: nibbles x scale + zero).

Verified here in TPU interpret mode on the CPU (``pltpu.InterpretParams``: simulated HBM/VMEM/SMEM,
DMAs and semaphores, uninitialised memory as NaN) and by lowering to Mosaic for a TPU target; not
yet run on a TPU (none lent). See benchmarks/KERNEL_NOTES.md for the layout caveat.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .quantization import dequantize_keys, is_quantized, unpack_codes
from .reference import visible

NEG = -1e30


def _cdiv(a, b: int):
    """Ceil division of a non-negative int32 (lax.div: no sign fix-up ops in the kernel)."""
    return jax.lax.div(a + (b - 1), b)


def check_shapes(q, k_pages, tuning) -> None:
    block_q = int(tuning.get("block_q", 16))
    if block_q < 8 or block_q % 8:
        raise ValueError(f"pallas-tpu block_q must be a positive multiple of 8, got {block_q}")
    if int(tuning.get("pages_per_block", 1)) < 1:
        raise ValueError("pallas-tpu pages_per_block must be >= 1")


def _interpret(interpret):
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret or False


class _PageBlocks:
    """Double-buffered copies of a sequence's pages, ``pages_per_block`` pages per block.

    hbm, bufs: the (K, V) page arrays in HBM and their [2, P, block_size, K, X] VMEM buffers; for
    a quantized pool also the (K, V) scale arrays and buffers after them (4 of each)."""

    def __init__(self, hbm, bufs, sems, bt_ref, seq, n_pages, page_at=None):
        self.hbm, self.bufs, self.sems = hbm, bufs, sems
        self.kbuf = bufs[0]
        self.bt_ref, self.seq, self.n_pages = bt_ref, seq, n_pages
        # the sequence's page (block-table column) of the i-th page visited: pages the window
        # skips are never copied
        self.page_at = page_at or (lambda i: i)
        self.per_block = bufs[0].shape[1]
        self.width = bt_ref.shape[1]

    def _each(self, blk, slot, action):
        for p in range(self.per_block):
            i = blk * self.per_block + p

            @pl.when(i < self.n_pages)
            def _():
                page = self.bt_ref[self.seq, jnp.minimum(self.page_at(i), self.width - 1)]
                for j, (src, dst) in enumerate(zip(self.hbm, self.bufs)):
                    copy = pltpu.make_async_copy(src.at[page], dst.at[slot, p],
                                                 self.sems.at[j, slot])
                    getattr(copy, action)()

    def tiles(self, slot, kh, dtype):
        """K and V of KV head kh in buffer ``slot``: [P * block_size, H] each, in ``dtype``
        (dequantized for a quantized pool: times the scales [P, block_size, 1] broadcast; int4
        bytes unpacked, K's with its scale and zero point [P, 2, H]; converted for raw fp8
        pages)."""
        _, p_blk, bs, _, x = self.kbuf.shape
        k, v = (buf[slot, :, :, kh, :] for buf in self.bufs[:2])  # [P, block_size, X]
        if len(self.bufs) == 4:
            ks, vs = (buf[slot, :, :, kh, :].astype(jnp.float32) for buf in self.bufs[2:])
            if k.dtype == jnp.uint8:  # int4: X = H / 2; K's scale and zero point [P, 2, H]
                k = dequantize_keys(k[:, :, None], ks[:, :, None])[:, :, 0]
                v = unpack_codes(v)
            else:
                k = k.astype(jnp.float32) * ks
            v = v.astype(jnp.float32) * vs
        h = k.shape[-1]
        return k.reshape(p_blk * bs, h).astype(dtype), v.reshape(p_blk * bs, h).astype(dtype)

    def start(self, blk, slot):
        self._each(blk, slot, "start")

    def wait(self, blk, slot):
        self._each(blk, slot, "wait")


def _visits(n_pages, first_pos, bs: int, sink_tokens: int, window: int):
    """(pages to visit, page_at) of ``_PageBlocks`` for queries at positions >= first_pos over a
    sequence's first ``n_pages`` pages: every page, or with a window its sink pages and then the
    pages from the first one a query's window reaches (``reference.visible``); page_at maps the
    i-th visited page to its block-table column."""
    if not window:
        return n_pages, None
    sinks = jnp.minimum(_cdiv(sink_tokens, bs), n_pages)
    start = jnp.maximum(sinks, jax.lax.div(jnp.maximum(first_pos - window + 1, 0), bs))
    return (sinks + jnp.maximum(n_pages - start, 0),
            lambda i: jnp.where(i < sinks, i, i - sinks + start))


def _flash_over_pages(blocks, kv_len, q_heads, key_ok, *, num_kv_heads, scale):
    """Online-softmax attention of each KV head's query rows over the pages ``blocks`` visits
    (keys below kv_len).

    q_heads[kh]: [R, H] query rows of KV head kh; key_ok(key, shape) -> bool mask [R, L] of the
    keys (positions ``key`` [1, L], L = P * block_size, of one block of pages) each row may see
    (only keys < kv_len). Returns per-head [R, H] float32 outputs.
    """
    _, p_blk, bs, _, _ = blocks.kbuf.shape
    h = q_heads[0].shape[1]
    length = p_blk * bs
    n_blk = _cdiv(blocks.n_pages, p_blk)

    def positions(b, shape, axis):  # key positions of block b's pages, along ``axis``
        lane = jax.lax.broadcasted_iota(jnp.int32, shape, axis)
        visit = b * p_blk + jax.lax.div(lane, bs)
        key = blocks.page_at(visit) * bs + jax.lax.rem(lane, bs)
        return key, visit < blocks.n_pages

    @pl.when(n_blk > 0)
    def _():
        blocks.start(0, 0)

    def body(b, carry):
        slot = jax.lax.rem(b, 2)

        @pl.when(b + 1 < n_blk)
        def _():
            blocks.start(b + 1, 1 - slot)

        blocks.wait(b, slot)
        out = []
        for kh in range(num_kv_heads):
            m, l, acc = carry[kh]
            qh = q_heads[kh]
            key, visited = positions(b, (qh.shape[0], length), 1)
            ok = key_ok(key, (qh.shape[0], length)) & visited & (key < kv_len)
            k, v = blocks.tiles(slot, kh, qh.dtype)
            key, visited = positions(b, (length, 1), 0)
            live = visited & (key < kv_len)
            v = jnp.where(live, v, 0)  # stale rows past the context: never NaN * 0
            s = jax.lax.dot_general(qh, k, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32) * scale
            s = jnp.where(ok, s, NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            p = jnp.exp(s - m_new)
            alpha = jnp.exp(m - m_new)
            l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
            acc = alpha * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            out.append((m_new, l, acc))
        return tuple(out)

    init = tuple((jnp.full((qh.shape[0], 1), NEG, jnp.float32),
                  jnp.zeros((qh.shape[0], 1), jnp.float32),
                  jnp.zeros((qh.shape[0], h), jnp.float32)) for qh in q_heads)
    carry = jax.lax.fori_loop(0, n_blk, body, init)
    return [acc / jnp.where(l == 0, 1.0, l) for _, l, acc in carry]


def _split(refs, n_arrays):
    """Kernel refs after q: (HBM page arrays, output ref, VMEM buffers, DMA semaphores)."""
    hbm, (o_ref,), bufs, (sems,) = (refs[:n_arrays], refs[n_arrays:n_arrays + 1],
                                    refs[n_arrays + 1:2 * n_arrays + 1], refs[2 * n_arrays + 1:])
    return hbm, o_ref, bufs, sems


def _decode_kernel(row_seq_ref, bt_ref, cl_ref, q_ref, *refs, group, num_kv_heads, scale,
                   n_arrays, sink_tokens, window):
    # q_ref, o_ref: [N, H] (this row); page arrays in HBM: k, v [num_blocks, block_size, K, H]
    # (+ k, v scales [num_blocks, block_size, K, 1] when quantized); their VMEM buffers.
    hbm, o_ref, bufs, sems = _split(refs, n_arrays)
    s = row_seq_ref[pl.program_id(0)]
    seq = jnp.maximum(s, 0)
    ctx = jnp.where(s >= 0, cl_ref[seq], 0)
    bs = bufs[0].shape[2]
    blocks = _PageBlocks(hbm, bufs, sems, bt_ref, seq,
                         *_visits(_cdiv(ctx, bs), ctx - 1, bs, sink_tokens, window))

    def key_ok(key, shape):
        return visible(key, ctx - 1, sink_tokens, window) & (key < ctx)

    q = q_ref[...]
    q_heads = [q[kh * group:(kh + 1) * group] for kh in range(num_kv_heads)]
    outs = _flash_over_pages(blocks, ctx, q_heads, key_ok, num_kv_heads=num_kv_heads,
                             scale=scale)
    o_ref[...] = jnp.concatenate(outs, axis=0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_block", "interpret",
                                             "sink_tokens", "window"))
def paged_decode_attention_tpu(q, k_pages, v_pages, block_tables, context_lens, query_start_loc,
                               *, scale: float, pages_per_block: int = 8, interpret=False,
                               sink_tokens: int = 0, window: int = 0):
    """Decode attention (every q_len 0 or 1) on a TPU. Shapes as in ``ragged_paged_attention``:
    q [T, N, H]; k_pages, v_pages [num_blocks, block_size, K, H] in q's dtype, raw fp8 or
    QuantizedPages; block_tables [S, W]; context_lens [S]; query_start_loc [S + 1].
    sink_tokens, window (static): the mask of ``reference.visible``; pages wholly outside it are
    not copied. Returns [T, N, H]."""
    t, n, h = q.shape
    _, bs, kh, _ = k_pages.shape
    s, w = block_tables.shape
    p_blk = max(1, min(pages_per_block, w))
    rows = jnp.arange(t, dtype=jnp.int32)
    row_seq = jnp.searchsorted(query_start_loc, rows, side="right").astype(jnp.int32) - 1
    row_seq = jnp.where(rows < query_start_loc[s], jnp.minimum(row_seq, s - 1), -1)
    arrays, scratch = _page_operands(k_pages, v_pages, p_blk)
    kernel = functools.partial(_decode_kernel, group=n // kh, num_kv_heads=kh, scale=scale,
                               n_arrays=len(arrays), sink_tokens=sink_tokens, window=window)
    row_spec = pl.BlockSpec((None, n, h), lambda i, *_: (i, 0, 0))
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(t,),
            in_specs=[row_spec] + [pl.BlockSpec(memory_space=pl.ANY)] * len(arrays),
            out_specs=row_spec, scratch_shapes=scratch),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=_interpret(interpret), name="paged_decode_tpu",
    )(row_seq, block_tables, context_lens, q, *arrays)


def _page_operands(k_pages, v_pages, p_blk):
    """(HBM operands, VMEM scratch): the K/V pages (+ their scales when quantized), a two-slot
    buffer of P pages for each, and one DMA semaphore per (operand, slot)."""
    arrays = ((k_pages.data, v_pages.data, k_pages.scale, v_pages.scale)
              if is_quantized(k_pages) else (k_pages, v_pages))
    bufs = [pltpu.VMEM((2, p_blk, *a.shape[1:]), a.dtype) for a in arrays]
    return arrays, bufs + [pltpu.SemaphoreType.DMA((len(arrays), 2))]


def _ragged_kernel(blk_lo_ref, blk_hi_ref, bt_ref, cl_ref, qsl_ref, q_ref, *refs, group,
                   num_kv_heads, scale, n_arrays, sink_tokens, window):
    # q_ref, o_ref: [N, block_q, H] (head-major rows t0 .. t0 + block_q); pages in HBM as in
    # _decode_kernel.
    hbm, o_ref, bufs, sems = _split(refs, n_arrays)
    b = pl.program_id(0)
    _, block_q, h = q_ref.shape
    bs = bufs[0].shape[2]
    t0 = b * block_q
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    def per_seq(seq, _):
        qs, qe = qsl_ref[seq], qsl_ref[seq + 1]
        r0, r1 = jnp.maximum(qs, t0), jnp.minimum(qe, t0 + block_q)

        @pl.when(r1 > r0)
        def _():
            first_pos = cl_ref[seq] - (qe - qs) - qs  # position of token row t: first_pos + t
            blocks = _PageBlocks(hbm, bufs, sems, bt_ref, seq,
                                 *_visits(_cdiv(first_pos + r1, bs), first_pos + r0, bs,
                                          sink_tokens, window))

            def key_ok(key, shape):  # rows are (head, token) pairs: token = row % block_q
                row_pos = first_pos + t0 + jax.lax.rem(
                    jax.lax.broadcasted_iota(jnp.int32, shape, 0), block_q)
                return visible(key, row_pos, sink_tokens, window)

            q_heads = [q_ref[kh * group:(kh + 1) * group].reshape(group * block_q, h)
                       for kh in range(num_kv_heads)]
            outs = _flash_over_pages(blocks, first_pos + r1, q_heads, key_ok,
                                     num_kv_heads=num_kv_heads, scale=scale)
            tok = t0 + jax.lax.broadcasted_iota(jnp.int32, (group, block_q, h), 1)
            mine = (tok >= r0) & (tok < r1)
            for kh, out in enumerate(outs):
                heads = slice(kh * group, (kh + 1) * group)
                o_ref[heads] = jnp.where(mine, out.reshape(group, block_q, h).astype(o_ref.dtype),
                                         o_ref[heads])
        return 0

    jax.lax.fori_loop(blk_lo_ref[b], blk_hi_ref[b] + 1, per_seq, 0)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "pages_per_block", "interpret",
                                             "sink_tokens", "window"))
def ragged_paged_attention_tpu(q, k_pages, v_pages, block_tables, context_lens, query_start_loc,
                               *, scale: float, block_q: int = 16, pages_per_block: int = 8,
                               interpret=False, sink_tokens: int = 0, window: int = 0):
    """Ragged (chunked-prefill / mixed) attention on a TPU; shapes as in
    ``ragged_paged_attention``; sink_tokens, window as in the decode kernel. Returns [T, N, H]
    with padding rows zero."""
    t, n, h = q.shape
    _, bs, kh, _ = k_pages.shape
    s, w = block_tables.shape
    p_blk = max(1, min(pages_per_block, w))
    n_qb = -(-t // block_q)
    tp = n_qb * block_q
    first = jnp.arange(n_qb, dtype=jnp.int32) * block_q
    last = jnp.minimum(first + block_q, t) - 1

    def seq_of(rows):
        return jnp.clip(jnp.searchsorted(query_start_loc, rows, side="right") - 1, 0,
                        s - 1).astype(jnp.int32)

    q_nth = jnp.pad(q.transpose(1, 0, 2), ((0, 0), (0, tp - t), (0, 0)))  # [N, Tp, H]
    arrays, scratch = _page_operands(k_pages, v_pages, p_blk)
    kernel = functools.partial(_ragged_kernel, group=n // kh, num_kv_heads=kh, scale=scale,
                               n_arrays=len(arrays), sink_tokens=sink_tokens, window=window)
    blk_spec = pl.BlockSpec((n, block_q, h), lambda i, *_: (0, i, 0))
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5, grid=(n_qb,),
            in_specs=[blk_spec] + [pl.BlockSpec(memory_space=pl.ANY)] * len(arrays),
            out_specs=blk_spec, scratch_shapes=scratch),
        out_shape=jax.ShapeDtypeStruct((n, tp, h), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=_interpret(interpret), name="ragged_paged_attention_tpu",
    )(seq_of(first), seq_of(last), block_tables, context_lens, query_start_loc, q_nth, *arrays)
    return out[:, :t].transpose(1, 0, 2)
