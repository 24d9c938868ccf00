"""This step's K/V into their pool slots in one Pallas (Triton) launch, in place.

The XLA path (``write_kv_ref``: two scatters) measured 13.9 us per layer for 64 decode rows on an
H100 (benchmarks/results/gpu-nvidia_h100_80gb_hbm3/kernel.json), several times what 64 KiB of
writes cost; one launch that writes K and V rows together should take ~3-4 us. Not yet measured
on the device: ``python -m benchmarks kernel`` times both (figures ``kv_write_us``:
``xla_T64_us``, ``pallas_T64_us``, ...) and the engine should keep whichever is faster.

A quantized pool (``QuantizedPages``) is NOT written by this kernel: ``write_kv_gpu`` hands it to
the XLA path (``write_quantized`` in kernels/quantization.py). With one scale per (block, KV head)
a write is no longer row-local: the rows of one step that land in the same block share a scale
(a segment max across rows, hence across this kernel's programs), and a block whose scale grows
must have its *old* rows re-quantized before the new ones are stored. A fused kernel would need a
grid over touched blocks plus a pre-pass grouping rows by block (what the XLA sort does), i.e.
the XLA pass anyway, and the engine's step (pagedjax/attention.py) writes through
``write_kv_ref`` on every backend: the quantizing Pallas write was only ever a benchmark figure
(9.0 us vs 9.7 us for 64 rows). Plain pages keep the fused launch.

The pool arrays are aliased to the outputs (``input_output_aliases``): inside a jitted step that
donates the pool the write is in place; called on a non-donated pool XLA first copies it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .quantization import is_quantized, write_quantized


def _write_kernel(k_ref, v_ref, kn_ref, vn_ref, slot_ref, *outs, num_rows, num_slots,
                  rows_per_prog, width):
    # k_ref, v_ref (aliased to the outputs) [num_blocks*block_size, K*H]; kn_ref, vn_ref:
    # [T, K*H]; slot_ref [T].
    del k_ref, v_ref
    t = pl.program_id(0) * rows_per_prog + jnp.arange(rows_per_prog, dtype=jnp.int32)
    in_range = t < num_rows
    slot = plgpu.load(slot_ref.at[t], mask=in_range, other=-1)
    live = in_range & (slot >= 0)
    # Masked lanes store nothing on the GPU; in interpret mode they write back what they read, so
    # point them past the end (dropped) rather than at a row a live lane may write.
    slot = jnp.where(live, slot, num_slots)
    cols = jnp.arange(width, dtype=jnp.int32)[None, :]
    mask = jnp.broadcast_to(live[:, None], (rows_per_prog, width))
    for new_ref, out_ref in ((kn_ref, outs[0]), (vn_ref, outs[1])):
        rows = plgpu.load(new_ref.at[t[:, None], cols], mask=mask, other=0)
        plgpu.store(out_ref.at[slot[:, None], cols], rows.astype(out_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("rows_per_prog", "interpret"))
def write_kv_gpu(k_pages, v_pages, k_new, v_new, slot_mapping, *, rows_per_prog: int = 4,
                 interpret: bool = False):
    """Same contract as ``write_kv_ref``: k_pages, v_pages [num_blocks, block_size, K, H] (or
    QuantizedPages: written by the XLA path, see the module docstring); k_new, v_new [T, K, H];
    slot_mapping [T] int32 (negative: padding, nothing written). K * H must be a power of two.
    Returns the updated (k_pages, v_pages)."""
    if is_quantized(k_pages):
        return (write_quantized(k_pages, k_new, slot_mapping),
                write_quantized(v_pages, v_new, slot_mapping))
    nb, bs, kh, h = k_pages.shape
    t = k_new.shape[0]
    width = kh * h
    flat = [x.reshape(nb * bs, width) for x in (k_pages, v_pages)]
    kernel = functools.partial(_write_kernel, num_rows=t, num_slots=nb * bs,
                               rows_per_prog=rows_per_prog, width=width)
    outs = pl.pallas_call(
        kernel, grid=(pl.cdiv(t, rows_per_prog),),
        out_shape=tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat),
        input_output_aliases={0: 0, 1: 1},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret, name="write_kv")(
        *flat, k_new.reshape(t, width), v_new.reshape(t, width), slot_mapping)
    return outs[0].reshape(k_pages.shape), outs[1].reshape(v_pages.shape)
