"""Prefill attention of one sequence chunk over its paged KV cache: Pallas on Mosaic GPU (Hopper).

What it computes: the rows ``q[qsl[0]:qsl[1]]`` of ONE sequence (a whole prompt, or one chunk of a
long prompt) sit at positions ``ctx - q_len .. ctx - 1`` (``ctx = context_lens[0]`` counts the
chunk's own tokens, already written to the pool) and attend causally to the sequence's whole
context in the paged pool ``[num_blocks, block_size, K, H]``. GQA: query head ``n`` reads KV head
``n // (N / K)``. Rows outside ``[qsl[0], qsl[1])`` come out as zeros. Same contract as
``dispatch.ragged_paged_attention`` with S == 1.

Design (an FA3-style kernel adapted from jax's ``pallas/ops/gpu/attention_mgpu.py``): one CTA per
(query head, tile of ``2 * block_q`` rows), three warpgroups: two compute warpgroups of ``block_q``
rows each (wgmma from swizzled shared memory, online softmax in exp2, the two warpgroups
ping-ponging the tensor cores through a schedule barrier) and one memory warpgroup that streams
K/V tiles with TMA into ``num_stages``-deep shared-memory buffers (mbarrier handshakes both ways).
Query tiles are launched longest first. Per warpgroup, key blocks wholly before its first row's
position run without a mask; the rest (the causal diagonal) are masked by position
(``row position = ctx - qsl[1] + row``). Both compute warpgroups of a CTA walk the same key blocks
(the later one's range), so they issue the same barrier sequence; the earlier one sees at most one
fully masked block.

Two ways to feed K/V (``paged_tma``):
  * True (default): no gather. A key block of ``block_kv`` rows is ``block_kv / block_size`` pages;
    the memory warpgroup reads the pages' ids from the block table (before waiting for a free
    slot, so the reads' latency hides behind the wait) and issues one TMA box (``block_size`` x H
    of one KV head: 16 rows of 256 B at a fixed stride) per page into the block's slot, all
    completing on one mbarrier (``num_arrivals = pages per block``). Pages past the context
    re-read the sequence's last page (finite data, masked), never the table's padding. Cost
    independent of the block-table width; no extra memory.
  * False: an XLA gather of the table's pages into a contiguous ``[W * block_size, K, H]`` K and V
    (rows past ``ctx`` zeroed), then one TMA box per key block. Costs a pass over the table
    WIDTH and that much transient memory per call.

Limits: one sequence per call (S == 1; ragged multi-sequence batches stay on the Triton kernel in
``ragged_attention_gpu.py``); bf16/f16; head_dim a multiple of 64; ``block_q`` a multiple of 64,
``block_kv`` a multiple of 64 and (paged_tma) of the page size; Hopper only (wgmma, TMA,
setmaxnreg: Mosaic GPU's sm90 path; not Blackwell). T is padded up to a multiple of
``2 * block_q`` inside (a copy of q when it is not one already). Short chunks fill few SMs (one
CTA per head per 128 rows: 28 CTAs at q_len 128). jax 0.10.2's Mosaic GPU interpret mode cannot
run it (single grid block only; no ``run_state``/``layout_cast``), so the CPU tests check the
index/mask/range logic through ``prefill_attention_twin`` (built from the same helpers) and that
the kernel lowers to wgmma/TMA for CUDA; ``benchmarks/experiments/prefill_mgpu_probe.py`` (at commit
92b5fbb) checked the real kernel on the GPU.

Measured against the Triton kernel and cuDNN: ``benchmarks/KERNEL_NOTES.md`` ("Prefill with
Mosaic GPU" and "Figures moved out of the product docstrings").
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)


def cdiv(a, b):
    return lax.div(a + (b - 1), b) if not isinstance(a, int) else -(-a // b)


# ---- index logic shared by the kernel and its jnp twin -----------------------------------------
def make_meta(context_lens, query_start_loc, block_size: int):
    """int32[4]: (off, q_start, q_end, last_page). Row r of q sits at position ``off + r``;
    rows in [q_start, q_end) are real; ``last_page`` is the table index of the context's last page
    (pages past it are never read)."""
    ctx = context_lens[0]
    q_start, q_end = query_start_loc[0], query_start_loc[1]
    last_page = jnp.maximum(cdiv(ctx, block_size) - 1, 0)
    return jnp.stack([ctx - q_end, q_start, q_end, last_page]).astype(jnp.int32)


def tile_kv_steps(qi, off, q_start, q_end, *, block_q: int, block_kv: int):
    """Key blocks [0, ub) a CTA (query tile qi: rows [2*block_q*qi, 2*block_q*(qi+1))) streams:
    up to the last real row's position; 0 when the tile holds no real row."""
    lo = qi * (2 * block_q)
    hi = jnp.minimum(lo + 2 * block_q, q_end)
    live = (lo < q_end) & (hi > q_start)
    return jnp.where(live, cdiv(jnp.maximum(off + hi, 1), block_kv), 0)


def unmasked_steps(q_base, off, ub, *, block_kv: int):
    """Key blocks [0, n) that every row of the warpgroup starting at row ``q_base`` sees whole
    (block ki is unmasked iff its last key ``(ki+1)*block_kv - 1 <= off + q_base``)."""
    return jnp.clip(lax.div(jnp.maximum(off + q_base + 1, 0), block_kv), 0, ub)


def page_row(bt, ki, p, last_page, *, pages_per_block: int, block_size: int):
    """First pool row (in the ``[num_blocks * block_size, K, H]`` view) of page ``p`` of key block
    ``ki``; pages past the context re-read the last page."""
    j = jnp.minimum(ki * pages_per_block + p, last_page)
    return bt[j] * block_size


def gather_context(k_pages, v_pages, table, ctx, length: int):
    """Contiguous [length, K, H] K and V of one sequence (rows >= ctx zeroed): one XLA gather."""
    nb, bs, kh, h = k_pages.shape
    w = length // bs
    idx = jnp.clip(table[:w], 0, nb - 1)
    live = (jnp.arange(length, dtype=jnp.int32) < ctx)[:, None, None]
    k = jnp.where(live, k_pages[idx].reshape(length, kh, h), 0)
    v = jnp.where(live, v_pages[idx].reshape(length, kh, h), 0)
    return k, v


# ---- checks --------------------------------------------------------------------------------------
def check_args(q, k_pages, v_pages, block_tables, context_lens, query_start_loc, *, block_q,
               block_kv, num_stages, paged_tma) -> None:
    """Raise ValueError naming what does not fit this kernel: the step's shapes first (the checks
    every backend shares), then this kernel's own limits."""
    from .dispatch import check_shapes

    check_shapes(q, k_pages, v_pages, block_tables, context_lens, query_start_loc)
    _, _, h = q.shape
    bs = k_pages.shape[1]
    if block_tables.shape[0] != 1:
        raise ValueError(f"ragged_prefill_mgpu takes one sequence: block_tables must be [1, W], "
                         f"got {block_tables.shape} (ragged batches: the Triton kernel)")
    if q.dtype != k_pages.dtype or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"q, k_pages, v_pages dtypes must match: {q.dtype}, {k_pages.dtype}, "
                         f"{v_pages.dtype}")
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"Mosaic GPU prefill takes bf16 or f16, got {q.dtype}")
    if h % 64:
        raise ValueError(f"head_dim must be a multiple of 64, got {h}")
    if block_q % 64 or block_q <= 0:
        raise ValueError(f"block_q must be a positive multiple of 64 (one wgmma M), got {block_q}")
    if block_kv % 64 or block_kv <= 0:
        raise ValueError(f"block_kv must be a positive multiple of 64, got {block_kv}")
    if paged_tma and block_kv % bs:
        raise ValueError(f"paged_tma needs block_kv ({block_kv}) to be a multiple of the page "
                         f"size ({bs})")
    if paged_tma and bs % 8:
        raise ValueError(f"paged_tma needs a page size that is a multiple of 8 (the smem tile), "
                         f"got {bs}")
    if num_stages < 2:
        raise ValueError(f"num_stages must be >= 2, got {num_stages}")


# ---- the kernel ----------------------------------------------------------------------------------
def _kernel(meta_ref, bt_ref, q_ref, k_ref, v_ref, out_ref, scoped, *, num_q_tiles, group,
            block_q, block_kv, num_stages, head_dim, block_size, paged_tma, scale_log2, dtype):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    (qo_smems, k_smems, v_smems), (k_bars, v_bars, q_bars), (k_used, v_used), sched = scoped
    hi = lax.axis_index("heads")
    qi = num_q_tiles - 1 - lax.axis_index("q_tiles")  # longest tiles first
    wg = lax.axis_index("wg")
    off, q_start, q_end, last_page = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]
    ub = tile_kv_steps(qi, off, q_start, q_end, block_q=block_q, block_kv=block_kv)

    def sched_sync():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    def kt(ref):  # K tile transposed for q @ k.T (ref.T on jax >= 0.10, transpose_ref before)
        return ref.T if hasattr(ref, "T") else plgpu.transpose_ref(ref, (1, 0))

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        qo = qo_smems.at[wg]
        q_base = (2 * qi + wg) * block_q
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q_base, block_q), hi], qo, q_bars.at[wg])
        m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), row_layout)
        l_i = plgpu.layout_cast(jnp.full((block_q,), 0, jnp.float32), row_layout)
        acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0, jnp.float32), wgmma_layout)
        plgpu.barrier_wait(q_bars.at[wg])

        @pl.when(ub > 0)
        def _():
            plgpu.barrier_wait(k_bars.at[0])

        pl.when(wg == 1)(sched_sync)

        def step(ki, carry, masked):
            acc, m_i, l_i = carry
            si = lax.rem(ki, num_stages)

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, qo, kt(k_smems.at[si]))
                sched_sync()
                return acc_ref[...]
            s = pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_used.at[si])
            if masked:
                rows = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 0,
                                              layout=wgmma_layout)
                cols = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1,
                                              layout=wgmma_layout)
                s = jnp.where(rows + (off + q_base) >= cols + ki * block_kv, s, -jnp.inf)
            # m is kept in log2 units (scaled by scale * log2 e) so p = exp2(s * c - m) is an FMA
            m_new = jnp.maximum(m_i, s.max(axis=1) * scale_log2)
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s * scale_log2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i = l_i * alpha
            p16 = p.astype(dtype)
            if head_dim <= 128:  # jax's measured ordering (attention_mgpu.py)
                l_i = l_i + p.sum(axis=1)
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_bars.at[si])
                plgpu.barrier_wait(sched)
            else:
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_bars.at[si])
                plgpu.barrier_wait(sched)
                l_i = l_i + p.sum(axis=1)

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smems.at[si])

                @pl.when(ki + 1 < ub)
                def _():
                    plgpu.barrier_wait(k_bars.at[lax.rem(ki + 1, num_stages)])
            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_used.at[si])
            return acc, m_new, l_i

        n_full = unmasked_steps(q_base, off, ub, block_kv=block_kv)
        carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), (acc, m_i, l_i))
        acc, m_i, l_i = lax.cond(
            n_full < ub,
            lambda: lax.fori_loop(n_full, ub, functools.partial(step, masked=True), carry),
            lambda: carry)
        pl.when(wg == 0)(sched_sync)

        rows = plgpu.broadcasted_iota(jnp.int32, (block_q, head_dim), 0, layout=wgmma_layout)
        live = (rows + q_base >= q_start) & (rows + q_base < q_end)
        inv = 1.0 / jnp.where(l_i == 0, 1.0, l_i)
        out = jnp.where(live, acc * lax.broadcast_in_dim(inv, acc.shape, [0]), 0.0)
        qo[...] = out.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo, out_ref.at[pl.ds(q_base, block_q), hi])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        hk = lax.div(hi, group)
        ppb = block_kv // block_size

        def rows_of(ki):  # the block's page rows: table reads issued before any wait
            if not paged_tma:
                return None
            return [page_row(bt_ref, ki, p, last_page, pages_per_block=ppb,
                             block_size=block_size) for p in range(ppb)]

        def load(ref, smems, bars, ki, si, rows):
            if paged_tma:
                for p, row in enumerate(rows):
                    plgpu.copy_gmem_to_smem(ref.at[pl.ds(row, block_size), hk],
                                            smems.at[si, pl.ds(p * block_size, block_size)],
                                            bars.at[si])
            else:
                plgpu.copy_gmem_to_smem(ref.at[pl.ds(ki * block_kv, block_kv), hk],
                                        smems.at[si], bars.at[si])

        for i in range(num_stages):
            @pl.when(i < ub)
            def _():
                rows = rows_of(i)
                load(k_ref, k_smems, k_bars, i, i, rows)
                load(v_ref, v_smems, v_bars, i, i, rows)

        @pl.loop(0, jnp.maximum(ub - num_stages, 0))
        def _(ki):
            si = lax.rem(ki, num_stages)
            rows = rows_of(ki + num_stages)  # table latency overlaps the wait for a free slot
            plgpu.barrier_wait(k_used.at[si])
            load(k_ref, k_smems, k_bars, ki + num_stages, si, rows)
            plgpu.barrier_wait(v_used.at[si])
            load(v_ref, v_smems, v_bars, ki + num_stages, si, rows)


def _mgpu_call(meta, table, q, k, v, *, group, block_q, block_kv, num_stages, block_size,
               paged_tma, scale, interpret):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    t, n, h = q.shape
    num_q_tiles = t // (2 * block_q)
    ppb = block_kv // block_size if paged_tma else 1
    kernel = functools.partial(
        _kernel, num_q_tiles=num_q_tiles, group=group, block_q=block_q, block_kv=block_kv,
        num_stages=num_stages, head_dim=h, block_size=block_size, paged_tma=paged_tma,
        scale_log2=scale * LOG2E, dtype=q.dtype)
    tiling, swizzle = plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)

    def entry(meta_ref, bt_ref, q_ref, k_ref, v_ref, out_ref):
        smem = lambda shape: plgpu.SMEM(shape, q.dtype, transforms=(tiling, swizzle))  # noqa: E731
        pl.run_scoped(
            lambda *scoped: kernel(meta_ref, bt_ref, q_ref, k_ref, v_ref, out_ref, scoped),
            (smem((2, block_q, h)), smem((num_stages, block_kv, h)),
             smem((num_stages, block_kv, h))),
            (plgpu.Barrier(num_arrivals=ppb, num_barriers=num_stages),
             plgpu.Barrier(num_arrivals=ppb, num_barriers=num_stages),
             plgpu.Barrier(num_barriers=2)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg")

    kw = {} if interpret is False else {"interpret": interpret}
    return plgpu.kernel(
        entry, out_type=jax.ShapeDtypeStruct((t, n, h), q.dtype), grid=(n, num_q_tiles),
        grid_names=("heads", "q_tiles"), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True), **kw)(meta, table, q, k, v)


def _prepare(q, k_pages, v_pages, block_tables, context_lens, query_start_loc, *, block_q,
             block_kv, paged_tma):
    """Padding and the per-call metadata (tiny XLA ops), shared with the twin."""
    t = q.shape[0]
    nb, bs, kh, h = k_pages.shape
    tp = -(-t // (2 * block_q)) * (2 * block_q)
    if tp != t:
        q = jnp.pad(q, ((0, tp - t), (0, 0), (0, 0)))
    w = block_tables.shape[1]
    length = -(-(w * bs) // block_kv) * block_kv  # keys the kernel may address
    table = jnp.pad(block_tables[0], (0, length // bs - w))
    meta = make_meta(context_lens, query_start_loc, bs)
    return q, table, meta, length


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_kv", "num_stages",
                                             "paged_tma", "interpret"))
def ragged_prefill_mgpu(q, k_pages, v_pages, block_tables, context_lens, query_start_loc, *,
                        scale: float | None = None, block_q: int = 64, block_kv: int = 128,
                        num_stages: int = 2, paged_tma: bool = True, interpret=False):
    """Causal prefill attention of one sequence chunk over its paged KV (Mosaic GPU, sm90).

    q: [T, N, H]; k_pages, v_pages: [num_blocks, block_size, K, H] (this chunk's K/V already
    written); block_tables: [1, W] int32; context_lens: [1] int32 (tokens in the cache including
    the chunk); query_start_loc: [2] int32 (the chunk's rows, normally [0, q_len]).
    Returns [T, N, H] in q's dtype; rows outside [qsl[0], qsl[1]) are zero.
    Raises ValueError for shapes/dtypes/tiles it does not take (see ``check_args``).
    ``interpret``: Mosaic GPU interpret params (CPU; single grid block only), else False.
    """
    check_args(q, k_pages, v_pages, block_tables, context_lens, query_start_loc, block_q=block_q,
               block_kv=block_kv, num_stages=num_stages, paged_tma=paged_tma)
    t, n, h = q.shape
    nb, bs, kh, _ = k_pages.shape
    scale = float(h ** -0.5 if scale is None else scale)
    qp, table, meta, length = _prepare(q, k_pages, v_pages, block_tables, context_lens,
                                       query_start_loc, block_q=block_q, block_kv=block_kv,
                                       paged_tma=paged_tma)
    if paged_tma:
        k = k_pages.reshape(nb * bs, kh, h)
        v = v_pages.reshape(nb * bs, kh, h)
    else:
        k, v = gather_context(k_pages, v_pages, table, context_lens[0], length)
    out = _mgpu_call(meta, table, qp, k, v, group=n // kh, block_q=block_q, block_kv=block_kv,
                     num_stages=num_stages, block_size=bs, paged_tma=paged_tma, scale=scale,
                     interpret=interpret)
    return out[:t]


# ---- the jnp twin (CPU tests) --------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_kv", "paged_tma"))
def prefill_attention_twin(q, k_pages, v_pages, block_tables, context_lens, query_start_loc, *,
                           scale: float | None = None, block_q: int = 64, block_kv: int = 128,
                           paged_tma: bool = True):
    """The kernel's algorithm in plain jnp, block for block: the same metadata, the same dynamic
    per-tile key ranges and unmasked/masked split (``fori_loop`` over the same bounds), the same
    page addressing (or gather), exp2 online softmax with p rounded to q's dtype before P @ V,
    and row zeroing. Any float dtype (float32 accumulation). For tests: one CTA's two warpgroups
    at a time, all heads together."""
    t, n, h = q.shape
    nb, bs, kh, _ = k_pages.shape
    group = n // kh
    scale = float(h ** -0.5 if scale is None else scale)
    c = scale * LOG2E
    qp, table, meta, length = _prepare(q, k_pages, v_pages, block_tables, context_lens,
                                       query_start_loc, block_q=block_q, block_kv=block_kv,
                                       paged_tma=paged_tma)
    off, q_start, q_end, last_page = meta[0], meta[1], meta[2], meta[3]
    ppb = block_kv // bs
    if paged_tma:
        kf, vf = k_pages.reshape(nb * bs, kh, h), v_pages.reshape(nb * bs, kh, h)
    else:
        kc, vc = gather_context(k_pages, v_pages, table, context_lens[0], length)

    def key_block(ki):
        if paged_tma:  # the memory warpgroup's p loop, all pages at once
            first = page_row(table, ki, jnp.arange(ppb), last_page, pages_per_block=ppb,
                             block_size=bs)
            rows = (first[:, None] + jnp.arange(bs)[None, :]).reshape(-1)
            return kf[rows], vf[rows]
        return (lax.dynamic_slice_in_dim(kc, ki * block_kv, block_kv),
                lax.dynamic_slice_in_dim(vc, ki * block_kv, block_kv))

    tiles = []
    for qi in range(qp.shape[0] // (2 * block_q)):
        ub = tile_kv_steps(qi, off, q_start, q_end, block_q=block_q, block_kv=block_kv)
        for wg in range(2):
            q_base = (2 * qi + wg) * block_q
            qb = qp[q_base:q_base + block_q].astype(jnp.float32).reshape(block_q, kh, group, h)

            def step(ki, carry, masked, q_base=q_base, qb=qb):
                acc, m, l = carry
                kb, vb = key_block(ki)
                s = jnp.einsum("qkgh,skh->qkgs", qb, kb.astype(jnp.float32))
                if masked:  # the kernel's mask: row + off + q_base >= col + ki * block_kv
                    rows = jnp.arange(block_q)[:, None] + (off + q_base)
                    cols = jnp.arange(block_kv)[None, :] + ki * block_kv
                    s = jnp.where((rows >= cols)[:, None, None, :], s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1) * c)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * c - m_new[..., None])
                acc = acc * alpha[..., None] + jnp.einsum(
                    "qkgs,skh->qkgh", p.astype(q.dtype).astype(jnp.float32),
                    vb.astype(jnp.float32))
                return acc, m_new, l * alpha + p.sum(-1)

            carry = (jnp.zeros((block_q, kh, group, h), jnp.float32),
                     jnp.full((block_q, kh, group), -jnp.inf, jnp.float32),
                     jnp.zeros((block_q, kh, group), jnp.float32))
            n_full = unmasked_steps(q_base, off, ub, block_kv=block_kv)
            carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
            acc, _, l = lax.fori_loop(n_full, ub, functools.partial(step, masked=True), carry)
            row = q_base + jnp.arange(block_q)
            live = ((row >= q_start) & (row < q_end))[:, None, None, None]
            out = jnp.where(live, acc / jnp.where(l == 0, 1.0, l)[..., None], 0.0)
            tiles.append(out.reshape(block_q, n, h))
    return jnp.concatenate(tiles)[:t].astype(q.dtype)
