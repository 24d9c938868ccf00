"""Paged decode attention for GPUs: Pallas with the Triton lowering, split-K flash-decoding.

One program per (row slot, KV head, split): it owns all ``G = N / K`` query heads of its KV head
(padded to ``G_pad`` rows, the smallest tile ``tl.dot`` takes), so each K/V page row is read once
for the whole group. It walks its split of the sequence's context ``block_kv`` tokens at a time,
reading the block-table entry of every token (a gather of int32s that hits L1) and gathering the
page rows ``[block_kv, H]`` straight out of the pool with an online softmax. With one split the
kernel writes the output rows; with several it writes per-split partials (unnormalised output,
running max, running sum) and a second small kernel merges them and writes the rows, reading
every partial of its row in one round trip (benchmarks/KERNEL_NOTES.md, session 5).

Row slots: the step's rows are ragged (``query_start_loc``), and every output row must be written
(padding rows as zeros) without an extra XLA pass. In a decode step each q_len is 0 or 1, so slot
``i < S`` owns row ``qsl[i]`` when sequence ``i`` decodes, and row ``qsl[S] + i - qsl[i]`` (one of
the padding rows, counted by the padded sequences before it) when it does not; slots ``i >= S`` own
row ``i``. That maps ``max(S, T)`` slots one-to-one onto the ``T`` rows (slots past ``T`` store
nothing), so every row is written exactly once.

fp8 KV (raw fp8 pages, pagedjax/kernels/quantization.py): the 1-byte values are gathered like bf16
ones (half the bytes) and converted to q's dtype in registers (``to_compute``); the static scale is
the model's business, outside the kernel (measured: benchmarks/KERNEL_NOTES.md).

Quantized KV (``QuantizedPages``: int8, or fp8 with scales): the values are converted the same way
and the bfloat16 scale per token and KV head is gathered beside them ([block_kv] per tile): K's
scales multiply the score columns, V's the probabilities before the PV matmul, so no dequantized
tile is materialised (the variants measured: benchmarks/KERNEL_NOTES.md).

int4 KV (``QuantizedPages`` of packed codes, pagedjax/kernels/quantization.py): each token's [H / 2]
bytes are gathered (a quarter of bf16's) and unpacked in registers into the low and high halves of
the head dim (``pagedjax/kernels/int4_gpu.py``, shared with the ragged kernel); K's halves are dequantized with their block's
channel scale and zero point (nibble * scale + zero: two fp8 rows per page, gathered per token of
the tile: the tile's 16-token pages share their cache lines) and V's per-token scales go on the
probabilities, as int8's. Scores are two matmuls over the halves (q's low half against the low
nibbles), the output two accumulators of H / 2 columns each: no dequantized tile in memory, no
interleave of columns.

Why Triton and not Mosaic GPU: the Triton lowering runs in CPU interpret mode with real grids (the
tests run this very kernel), and decode is a bandwidth problem that Triton's pipelined gathers
serve; see benchmarks/KERNEL_NOTES.md for the measurements.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .int4_gpu import INT4_ASM, load_int4
from .quantization import is_int4, is_quantized, to_compute

NEG = -1e30  # finite "minus infinity": exp2(NEG - NEG) stays 1, never NaN
LOG2E = math.log2(math.e)


def cdiv(a, b: int):
    """Ceil division of a non-negative int32 (lax.div: no sign fix-up ops in the kernel)."""
    return jax.lax.div(a + (b - 1), b)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def slot_row(slot, qsl_ref, num_seqs):
    """(sequence index, output row, decodes?) of a row slot; see the module docstring."""
    s = jnp.minimum(slot, num_seqs - 1)
    is_seq = slot < num_seqs
    qs = qsl_ref[s]
    q_len = qsl_ref[s + 1] - qs
    decodes = is_seq & (q_len == 1)
    row = jnp.where(is_seq, jnp.where(q_len == 1, qs, qsl_ref[num_seqs] + s - qs), slot)
    return s, row, decodes


def window_span(ctx, sink_tokens: int, window: int):
    """The keys a decode query at position ``ctx - 1`` sees (``reference.visible``), as a count
    ``n`` and a map from their index ``v`` in [0, n) to the position: the first ``sinks`` keys,
    then the window from ``start``. Returns (n, to_position); window 0: all ``ctx`` keys."""
    if not window:
        return ctx, lambda v: v
    sinks = jnp.minimum(ctx, sink_tokens)
    start = jnp.maximum(ctx - window, sink_tokens)
    n = sinks + jnp.maximum(ctx - start, 0)
    return n, lambda v: jnp.where(v < sinks, v, v - sinks + start)


def load_kv(ref, idx, mask):
    """Masked gather of K/V values; masked lanes read 0 (as a constant of the pool's dtype: the
    Triton lowering cannot cast an int 0 to fp8)."""
    zero = jnp.zeros((), ref.dtype) if jnp.dtype(ref.dtype).itemsize == 1 else 0
    return plgpu.load(ref.at[idx], mask=mask, other=zero)


def split_refs(refs, quantized: bool):
    """(ks_ref, vs_ref, rest) from a kernel's trailing refs: the scale refs [num_blocks *
    block_size, K] come first when the pool is quantized."""
    return (refs[0], refs[1], refs[2:]) if quantized else (None, None, refs)


def _decode_kernel(q_ref, k_ref, v_ref, bt_ref, cl_ref, qsl_ref, *refs, num_seqs, num_rows,
                   num_heads, group, group_pad, head_dim, block_size, block_kv, split_tokens,
                   num_splits, scale_log2, quantized, packed, kv_per_prog, interpret,
                   sink_tokens, window, int4_dtype, int4_asm):
    # q_ref [T*N, H]; k_ref, v_ref [num_blocks*block_size, K*H]; bt_ref [S, W]; cl_ref [S];
    # qsl_ref [S+1]; quantized: ks_ref, vs_ref [num_blocks*block_size, K] bf16;
    # packed (int4): k_ref, v_ref [num_blocks*block_size, K*H/2] uint8, ks_ref [num_blocks*2, K*H]
    # float8_e4m3fn (each block's scale row, then its zero-point row);
    # outputs: o [T*N, H] (one split); o_part [S*N*P, H], m, l [S*N*P] (partials, merged by
    # _combine_kernel).
    # The tile's rows are the kv_per_prog * group query heads of kv_per_prog adjacent KV heads
    # (row r belongs to KV head kh0 + r // group, query head kh0 * group + r), padded to
    # group_pad; its columns are those KV heads' [kv_per_prog * H] contiguous values of a token.
    # With several KV heads per tile, row r uses only the H columns of its own KV head: q is
    # zero elsewhere (so one dot gives each row its own head's scores), and of the [group_pad,
    # kv_per_prog * H] accumulator each row keeps only its own head's H columns (``narrow``,
    # once per program: a select and a reshape-sum, not masked stores to duplicate addresses,
    # which interpret mode would write back as the poisoned old values).
    ks_ref, vs_ref, out_refs = split_refs(refs, quantized)
    slot, khp, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kh0 = khp * kv_per_prog if kv_per_prog > 1 else khp
    s, row, decodes = slot_row(slot, qsl_ref, num_seqs)
    ctx = jnp.where(decodes, cl_ref[s], 0)
    width = kv_per_prog * head_dim

    heads = jnp.arange(group_pad, dtype=jnp.int32)
    dims = jnp.arange(head_dim, dtype=jnp.int32)
    head_ok = heads < kv_per_prog * group
    q_rows = row * num_heads + kh0 * group + heads
    if kv_per_prog == 1:
        wide, qcols, owner, own = dims, dims, None, None
    else:
        wide = jnp.arange(width, dtype=jnp.int32)
        qcols = jax.lax.rem(wide, head_dim)
        owner = jax.lax.div(heads, group)  # KV head (offset from kh0) of each tile row
        own = owner[:, None] == jax.lax.div(wide, head_dim)[None, :]

    def narrow(x):
        """[G_pad, width] -> [G_pad, H]: each row's own KV head's columns (once, at the end)."""
        if own is None:
            return x
        x = jnp.where(own, x, 0.0).reshape(group_pad, kv_per_prog, head_dim)
        return jnp.sum(x, axis=1)

    # The head dim in parts: one, or int4's low and high halves ([G_pad, H / 2] each).
    # (two iotas, not slices of one: Triton's lowering has no slice)
    halves = [jnp.arange(h, h + head_dim // 2, dtype=jnp.int32) for h in (0, head_dim // 2)]
    out_cols = halves if packed else [dims]
    q_parts = []
    for c in (out_cols if packed else [qcols]):
        q_mask = jnp.broadcast_to((head_ok & decodes)[:, None], (group_pad, c.shape[0]))
        q_mask = q_mask if own is None else q_mask & own
        q_parts.append(plgpu.load(q_ref.at[q_rows[:, None], c[None, :]], mask=q_mask,
                                  other=0))  # [G_pad, width], zero outside the row's KV head
    if packed and int4_dtype is not None:  # q, K, V and the probabilities meet in this dtype
        q_parts = [qp.astype(int4_dtype) for qp in q_parts]
    dt = q_parts[0].dtype

    # Splits divide the keys the query sees (with a window: its sinks and its window, no
    # position between them is ever read), indexed 0 .. n_keys - 1.
    n_keys, position = window_span(ctx, sink_tokens, window)
    lo = split * split_tokens
    hi = jnp.minimum(n_keys, lo + split_tokens)
    n_iter = cdiv(jnp.maximum(hi - lo, 0), block_kv)
    cols = (kh0 * head_dim + wide)[None, :]

    def row_scales(ref, rows, valid):
        """The tile's per-(row, token) dequantization scales, broadcastable to [G_pad, block_kv]."""
        per_head = [plgpu.load(ref.at[rows, kh0 + c if c else kh0], mask=valid,
                               other=0).astype(jnp.float32) for c in range(kv_per_prog)]
        out = per_head[0][None, :]
        for c in range(1, kv_per_prog):
            out = jnp.where((owner == c)[:, None], per_head[c][None, :], out)
        return out

    def body(i, carry):
        acc, m, l = carry
        key = lo + i * block_kv + jnp.arange(block_kv, dtype=jnp.int32)  # visible key indices
        valid = key < hi
        j = position(key)  # token positions
        page = plgpu.load(bt_ref.at[s, jax.lax.div(j, block_size)], mask=valid, other=0)
        rows = page * block_size + jax.lax.rem(j, block_size)
        if packed:
            k_parts, v_parts = load_int4(k_ref, v_ref, ks_ref, rows, page, kh0, head_dim,
                                         valid, dt, asm="none" if interpret or int4_dtype is None
                                         else int4_asm)
        else:
            kv_mask = jnp.broadcast_to(valid[:, None], (block_kv, width))
            k = load_kv(k_ref, (rows[:, None], cols), kv_mask)  # [block_kv, width]
            v = load_kv(v_ref, (rows[:, None], cols), kv_mask)
            k_parts, v_parts = [to_compute(k, dt)], [to_compute(v, dt)]
        sc = sum(jax.lax.dot_general(qp, kp, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)
                 for qp, kp in zip(q_parts, k_parts)) * scale_log2
        if quantized and not packed:
            sc = sc * row_scales(ks_ref, rows, valid)
        sc = jnp.where(valid[None, :], sc, NEG)  # [G_pad, block_kv], log2 domain
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(sc - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        pv = p
        if quantized:
            pv = p * row_scales(vs_ref, rows, valid)
        acc = tuple(a * alpha[:, None] + jnp.dot(pv.astype(dt), vp,
                                                 preferred_element_type=jnp.float32)
                    for a, vp in zip(acc, v_parts))
        return acc, m_new, l

    acc = tuple(jnp.zeros((group_pad, qp.shape[1]), jnp.float32) for qp in q_parts)
    m = jnp.full((group_pad,), NEG, jnp.float32)
    l = jnp.zeros((group_pad,), jnp.float32)
    acc, m, l = jax.lax.fori_loop(0, n_iter, body, (acc, m, l))

    if num_splits == 1:
        (o_ref,) = out_refs
        ok = head_ok & (row < num_rows)
        for a, c in zip(acc, out_cols):
            out = a / jnp.where(l == 0, 1.0, l)[:, None]  # ctx 0 (padding): l == 0, acc == 0
            plgpu.store(o_ref.at[q_rows[:, None], c[None, :]], narrow(out).astype(o_ref.dtype),
                        mask=jnp.broadcast_to(ok[:, None], (group_pad, c.shape[0])))
        return
    o_part_ref, m_ref, l_ref = out_refs
    part = (s * num_heads + kh0 * group + heads) * num_splits + split  # each row's head's partial
    ok = head_ok & (slot < num_seqs)
    for a, c in zip(acc, out_cols):
        plgpu.store(o_part_ref.at[part[:, None], c[None, :]], narrow(a),
                    mask=jnp.broadcast_to(ok[:, None], (group_pad, c.shape[0])))
    plgpu.store(m_ref.at[part], m, mask=ok)
    plgpu.store(l_ref.at[part], l, mask=ok)


def _combine_kernel(o_part_ref, m_ref, l_ref, cl_ref, qsl_ref, o_ref, *, num_seqs, num_rows,
                    num_heads, head_dim, split_tokens, num_splits, chunk, sink_tokens, window):
    # o_part_ref [S*N*P, H] f32; m_ref, l_ref [S*N*P]; o_ref [T*N, H]. One program per (slot, head).
    # chunk >= P (rounded up to a power of two; the default up to 64 splits): the partials are
    # loaded before the row's context is known (masked by the static split count only, so the
    # loads leave with the sequence metadata's, one round trip), the dead splits dropped after;
    # else a loop of chunks after a first load of the maxima.
    slot, n = pl.program_id(0), pl.program_id(1)
    s = jnp.minimum(slot, num_seqs - 1)
    base = (s * num_heads + n) * num_splits
    dims = jnp.arange(head_dim, dtype=jnp.int32)

    def load_chunk(idx, live):
        m = plgpu.load(m_ref.at[base + idx], mask=live, other=NEG)
        o = plgpu.load(o_part_ref.at[(base + idx)[:, None], dims[None, :]],
                       mask=jnp.broadcast_to(live[:, None], (idx.shape[0], head_dim)), other=0.0)
        return m, o

    idx = jnp.arange(_pow2(num_splits), dtype=jnp.int32)  # Triton tiles are powers of two
    if chunk >= _pow2(num_splits):
        exists = idx < num_splits
        m, o = load_chunk(idx, exists)
        l = plgpu.load(l_ref.at[base + idx], mask=exists, other=0.0)
    _, row, decodes = slot_row(slot, qsl_ref, num_seqs)
    ctx = jnp.where(decodes, cl_ref[s], 0)
    n_act = cdiv(window_span(ctx, sink_tokens, window)[0], split_tokens)  # splits that wrote
    live = idx < n_act
    if chunk >= _pow2(num_splits):
        m = jnp.where(live, m, NEG)  # a dead split's partials were never written
        w = jnp.where(live, jnp.exp2(m - jnp.max(m)), 0.0)
        acc = jnp.sum(jnp.where(live[:, None], w[:, None] * o, 0.0), axis=0)
        denom = jnp.sum(jnp.where(live, w * l, 0.0))
    else:
        m = plgpu.load(m_ref.at[base + idx], mask=live, other=NEG)
        l = plgpu.load(l_ref.at[base + idx], mask=live, other=0.0)
        m_max = jnp.max(m)
        denom = jnp.sum(jnp.where(live, jnp.exp2(m - m_max), 0.0) * l)

        def body(c, acc):
            cidx = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
            clive = cidx < n_act
            mc, oc = load_chunk(cidx, clive)
            w = jnp.where(clive, jnp.exp2(mc - m_max), 0.0)
            return acc + jnp.sum(w[:, None] * oc, axis=0)

        acc = jax.lax.fori_loop(0, cdiv(n_act, chunk), body,
                                jnp.zeros((head_dim,), jnp.float32))
    out = acc / jnp.where(denom == 0, 1.0, denom)
    mask = jnp.broadcast_to(row < num_rows, (head_dim,))
    plgpu.store(o_ref.at[row * num_heads + n + 0 * dims, dims], out.astype(o_ref.dtype),
                mask=mask)


def default_num_splits(num_seqs: int, num_kv_heads: int, max_tokens: int, block_kv: int,
                       num_sms: int = 132, min_split_tokens: int = 512) -> int:
    """Fewest power-of-two splits that give about two programs per SM, each split at least
    ``min_split_tokens`` long (why 512: benchmarks/KERNEL_NOTES.md)."""
    p = 1
    while (num_seqs * num_kv_heads * p < 2 * num_sms and 2 * p * max(min_split_tokens, block_kv)
           <= max_tokens):
        p *= 2
    return p


def split_tokens_of(max_tokens: int, num_splits: int, block_kv: int) -> int:
    """Tokens per split: ``max_tokens / num_splits`` rounded up to whole ``block_kv`` tiles, so
    only the ``ceil(max_tokens / split_tokens)`` first splits can see tokens (33 splits of a 32K
    table at block_kv 64 are 32 splits of 1,024 tokens and an empty one)."""
    split_tokens = -(-max_tokens // num_splits)
    return -(-split_tokens // block_kv) * block_kv




@functools.partial(jax.jit, static_argnames=(
    "scale", "num_splits", "block_kv", "num_warps", "num_stages", "kv_heads_per_program",
    "merge_chunk", "interpret", "sink_tokens", "window", "int4_dtype", "int4_asm"))
def paged_decode_attention(q, k_pages, v_pages, block_tables, context_lens, query_start_loc, *,
                           scale: float, num_splits: int | None = None, block_kv: int | None = None,
                           num_warps: int = 4, num_stages: int = 3, kv_heads_per_program: int = 1,
                           merge_chunk: int = 64, interpret: bool = False, sink_tokens: int = 0,
                           window: int = 0, int4_dtype: str | None = None,
                           int4_asm: str = "dequant"):
    """Decode attention (every q_len is 0 or 1) over a paged KV cache.

    q: [T, N, H]; k_pages, v_pages: [num_blocks, block_size, K, H] in q's dtype or raw fp8
    (value = stored number), or QuantizedPages (pagedjax/kernels/quantization.py);
    block_tables: [S, W] int32; context_lens: [S] int32; query_start_loc: [S + 1] int32. Returns
    [T, N, H] in q's dtype, rows not owned by a decoding sequence are zero. H and block_kv must be
    powers of two.

    Tuning (static): num_splits, any positive int (default ``default_num_splits``; splits are
    whole block_kv tiles, see ``split_tokens_of``); block_kv; num_warps; num_stages;
    kv_heads_per_program, a power of two dividing K (``dispatch.decode_defaults`` picks 2 for raw
    fp8 pages): one program reads that many adjacent KV heads per token (one [block_kv,
    kv_heads_per_program * H] tile) for all their query heads in one tile of
    max(16, kv_heads_per_program * G) rows. Splits are merged by a second Pallas
    launch (a merge fused into the split programs through an arrival counter measured 5-7 us
    slower on the H100: benchmarks/KERNEL_NOTES.md, session 3); merge_chunk, a power of two: the
    merge reads up to that many splits' partials at once (all of them in one round trip when the
    split count, rounded up to a power of two, fits).
    int4_dtype (static, int4 pages only): the dtype q, the dequantized K/V and the
    probabilities take for the two matmuls ("float16": the dequantization runs in float16 from
    the nibbles' bit patterns, ``int4_gpu.load_int4``); None: q's dtype. int4_asm (with int4_dtype
    "float16"): "none", "unpack" or "dequant", how much of that runs as PTX (``int4_gpu.int4_f16_asm``;
    interpret mode runs the jnp form).
    sink_tokens, window (static): attend only to the first sink_tokens keys and the last window
    (``reference.visible``; window 0: all). Splits then divide those keys only: the positions
    between are never read, whatever their block-table entries hold.
    Shapes are checked by ``pagedjax.kernels.dispatch.ragged_paged_attention``.
    """
    t, n, h = q.shape
    _, bs, kh, _ = k_pages.shape
    s, w = block_tables.shape
    group = n // kh
    kvp = int(kv_heads_per_program)
    if kvp < 1 or kvp & (kvp - 1) or kh % kvp:
        raise ValueError(f"kv_heads_per_program must be a power of two dividing the {kh} KV "
                         f"heads, got {kv_heads_per_program}")
    packed = is_int4(k_pages)
    if int4_asm not in INT4_ASM:
        raise ValueError(f"int4_asm must be one of {INT4_ASM}, got {int4_asm!r}")
    if int4_dtype is not None and jnp.dtype(int4_dtype) not in (jnp.float16, jnp.bfloat16,
                                                                jnp.float32):
        raise ValueError(f"int4_dtype must be float16, bfloat16 or float32, got {int4_dtype!r}")
    if packed and kvp != 1:
        raise ValueError(f"int4 pages take kv_heads_per_program 1, got {kv_heads_per_program}")
    group_pad = max(16, _pow2(kvp * group))
    max_tokens = min(w * bs, sink_tokens + window) if window else w * bs  # keys a query sees
    if block_kv is None:
        block_kv = min(64, max(16, _pow2(max_tokens)))
    if num_splits is None:
        num_splits = default_num_splits(s, kh, max_tokens, block_kv, _num_sms())
    if num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits}")
    split_tokens = split_tokens_of(max_tokens, num_splits, block_kv)
    rows = max(s, t)
    kh_progs = kh // kvp
    params = dict(num_seqs=s, num_rows=t, num_heads=n, head_dim=h, split_tokens=split_tokens,
                  num_splits=num_splits, sink_tokens=sink_tokens, window=window)
    quantized = is_quantized(k_pages)
    inputs = (q.reshape(t * n, h), *flat_pages(k_pages, v_pages), block_tables, context_lens,
              query_start_loc, *flat_scales(k_pages, v_pages))
    cp = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    kernel = functools.partial(_decode_kernel, group=group, group_pad=group_pad, block_size=bs,
                               block_kv=block_kv, scale_log2=scale * LOG2E, quantized=quantized,
                               packed=packed, kv_per_prog=kvp, interpret=interpret,
                               int4_dtype=None if int4_dtype is None else jnp.dtype(int4_dtype),
                               int4_asm=int4_asm,
                               **params)
    if num_splits == 1:
        out = pl.pallas_call(kernel, grid=(rows, kh_progs, 1),
                             out_shape=jax.ShapeDtypeStruct((t * n, h), q.dtype),
                             compiler_params=cp, interpret=interpret, name="paged_decode")(*inputs)
        return out.reshape(t, n, h)
    parts = s * n * num_splits
    partials = (jax.ShapeDtypeStruct((parts, h), jnp.float32),
                jax.ShapeDtypeStruct((parts,), jnp.float32),
                jax.ShapeDtypeStruct((parts,), jnp.float32))
    o_part, m, l = pl.pallas_call(
        kernel, grid=(s, kh_progs, num_splits), out_shape=partials,
        compiler_params=cp, interpret=interpret, name="paged_decode_split")(*inputs)
    if merge_chunk < 1 or merge_chunk & (merge_chunk - 1):
        raise ValueError(f"merge_chunk must be a power of two, got {merge_chunk}")
    combine = functools.partial(_combine_kernel, chunk=merge_chunk, **params)
    out = pl.pallas_call(combine, grid=(rows, n),
                         out_shape=jax.ShapeDtypeStruct((t * n, h), q.dtype),
                         compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
                         interpret=interpret, name="paged_decode_combine")(
        o_part, m, l, context_lens, query_start_loc)
    return out.reshape(t, n, h)


def flat_pages(k_pages, v_pages):
    """The pool's values as [num_blocks * block_size, K * H] views (free reshapes)."""
    if is_quantized(k_pages):
        k_pages, v_pages = k_pages.data, v_pages.data
    nb, bs, kh, h = k_pages.shape
    return k_pages.reshape(nb * bs, kh * h), v_pages.reshape(nb * bs, kh * h)


def flat_scales(k_pages, v_pages):
    """() for plain pages; the scales as [num_blocks * block_size, K] for QuantizedPages (int4's
    K parameters, a scale and a zero point per channel of a block: [num_blocks * 2, K * H])."""
    if not is_quantized(k_pages):
        return ()
    return tuple(p.scale.reshape(p.scale.shape[0] * p.scale.shape[1], -1)
                 for p in (k_pages, v_pages))


def _num_sms() -> int:
    d = jax.devices()[0]
    return int(getattr(d, "core_count", 0) or 132) if d.platform == "gpu" else 8
