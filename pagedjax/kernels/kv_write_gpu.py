"""This step's K/V into their pool slots in one Pallas (Triton) launch, in place.

One launch that writes K and V rows together instead of the XLA path's two scatters
(``write_kv_ref``); ``python -m benchmarks kernel`` times both (benchmarks/KERNEL_NOTES.md).

A quantized pool (``QuantizedPages``, int8) is quantized here, per token and KV head, with the
same float32 arithmetic as ``pagedjax/kernels/quantization.py`` (so in interpret mode the bits equal
the reference's): each head's row of ``H`` values, its absmax, the bf16 scale, the 1-byte values.
Raw fp8 pages (the fp8 cache: the model has already divided k and v by their static scale) take the
rows through ``saturate``, clipped to +-qmax in float32 and cast, the reference's bits too: a
plain cast would store NaN (e4m3fn) or inf (e5m2) for an outlier beyond the format's range.

The pool arrays are aliased to the outputs (``input_output_aliases``): inside a jitted step that
donates the pool the write is in place; called on a non-donated pool XLA first copies it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .quantization import QuantizedPages, is_quantized, quantize_values, row_scale, saturate


def _write_kernel(*refs, num_rows, num_slots, rows_per_prog, num_kv_heads, head_dim, quantized):
    # plain: k_ref, v_ref (aliased to k_out, v_out) [num_blocks*block_size, K*H];
    # quantized: also ks_ref, vs_ref (aliased) [num_blocks*block_size, K] bf16.
    # kn_ref, vn_ref: [T, K*H]; slot_ref [T].
    n_pool = 4 if quantized else 2
    kn_ref, vn_ref, slot_ref = refs[n_pool:n_pool + 3]
    outs = refs[n_pool + 3:]
    t = pl.program_id(0) * rows_per_prog + jnp.arange(rows_per_prog, dtype=jnp.int32)
    in_range = t < num_rows
    slot = plgpu.load(slot_ref.at[t], mask=in_range, other=-1)
    live = in_range & (slot >= 0)
    # Masked lanes store nothing on the GPU; in interpret mode they write back what they read, so
    # point them past the end (dropped) rather than at a row a live lane may write.
    slot = jnp.where(live, slot, num_slots)
    width = num_kv_heads * head_dim
    if not quantized:
        cols = jnp.arange(width, dtype=jnp.int32)[None, :]
        mask = jnp.broadcast_to(live[:, None], (rows_per_prog, width))
        for new_ref, out_ref in ((kn_ref, outs[0]), (vn_ref, outs[1])):
            rows = plgpu.load(new_ref.at[t[:, None], cols], mask=mask, other=0)
            plgpu.store(out_ref.at[slot[:, None], cols], saturate(rows, out_ref.dtype),
                        mask=mask)
        return
    dims = jnp.arange(head_dim, dtype=jnp.int32)
    mask = jnp.broadcast_to(live[:, None], (rows_per_prog, head_dim))
    for new_ref, out_ref, scale_ref in ((kn_ref, outs[0], outs[2]), (vn_ref, outs[1], outs[3])):
        for kh in range(num_kv_heads):
            cols = (kh * head_dim + dims)[None, :]
            x = plgpu.load(new_ref.at[t[:, None], cols], mask=mask, other=0).astype(jnp.float32)
            scale = row_scale(jnp.max(jnp.abs(x), axis=1), out_ref.dtype)  # [rows_per_prog]
            values = quantize_values(x, scale[:, None], out_ref.dtype)
            plgpu.store(out_ref.at[slot[:, None], cols], values, mask=mask)
            plgpu.store(scale_ref.at[slot, kh], scale.astype(scale_ref.dtype), mask=live)


@functools.partial(jax.jit, static_argnames=("rows_per_prog", "interpret"))
def write_kv_gpu(k_pages, v_pages, k_new, v_new, slot_mapping, *, rows_per_prog: int = 4,
                 interpret: bool = False):
    """Same contract as ``write_kv_ref``: k_pages, v_pages [num_blocks, block_size, K, H] (raw
    fp8 pages included, or QuantizedPages); k_new, v_new [T, K, H]; slot_mapping [T] int32
    (negative: padding, nothing written). K * H must be a power of two (H too when quantized).
    Returns the updated (k_pages, v_pages)."""
    nb, bs, kh, h = k_pages.shape
    t = k_new.shape[0]
    width = kh * h
    quantized = is_quantized(k_pages)
    pool = ((k_pages.data, v_pages.data, k_pages.scale, v_pages.scale) if quantized
            else (k_pages, v_pages))
    flat = [x.reshape(nb * bs, x.shape[2] * x.shape[3]) for x in pool]
    kernel = functools.partial(_write_kernel, num_rows=t, num_slots=nb * bs,
                               rows_per_prog=rows_per_prog, num_kv_heads=kh, head_dim=h,
                               quantized=quantized)
    outs = pl.pallas_call(
        kernel, grid=(pl.cdiv(t, rows_per_prog),),
        out_shape=tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat),
        input_output_aliases={i: i for i in range(len(flat))},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret, name="write_kv")(
        *flat, k_new.reshape(t, width), v_new.reshape(t, width), slot_mapping)
    outs = [o.reshape(x.shape) for o, x in zip(outs, pool)]
    if quantized:
        return QuantizedPages(outs[0], outs[2]), QuantizedPages(outs[1], outs[3])
    return outs[0], outs[1]
