"""Quantized KV pages (``--kv-cache-dtype fp8_e4m3 | fp8_e5m2 | int8``): the storage format, the
write rule, and quantize / dequantize exactly as the KV write and the attention kernels apply them.

Format: one float32 scale per (block, KV head). A layer's K (or V) is a ``QuantizedPages(data,
scale)``: ``data`` [num_blocks, block_size, K, H] in the 1-byte dtype and ``scale`` [num_blocks, 1,
K, 1] float32, with ``value = data * scale`` (the scale broadcasts over the block's tokens and the
head's H values). The 1s keep the scale 4-D like the pages, so every per-page operation (block
copies, swap gathers, the KV-head sharding ``P(None, None, "tp", None)``) applies to it unchanged.
A block costs ``block_size * H + 4`` bytes per KV head instead of ``2 * block_size * H``: the pool
holds 1.996x the tokens of bf16 at block 16 and H = 128 (per token: 1.969x).

Scale of new rows (``absmax_scale``): ``absmax / qmax`` (qmax 448 for e4m3, 57344 for e5m2, 127
for int8), at least ``SCALE_FLOOR``; for the fp8 dtypes rounded *up* to a power of two
(``pow2_ceil``: integer ops on the float32 bits, exact), so a block's largest element never clips.

Write rule (``write_quantized``; the engine writes through it on every backend). Per block touched
by the step, per KV head, with ``o`` the lowest offset the step writes in it:
  1. a block's scale only grows: new = max(old, absmax_scale of each new row in it); the old scale
     is ignored when the step starts the block (o == 0: a freed block's stale scale);
  2. if the scale grew, the block's old rows [0, o) are re-quantized to it (dequantize, quantize);
  3. the new rows are quantized with the block's new scale; slots < 0 write nothing; blocks the
     step does not touch keep every bit.
For fp8 step 2 is a multiplication by a power of two: exact unless a stored value drops below
the dtype's smallest normal (2^-6 e4m3, 2^-14 e5m2) and loses mantissa bits as a subnormal, so a
token is rounded once however often its block grows (up to that underflow). int8 keeps the float scale (a power of two would waste up to half its 8
bits), and each growth rounds its old values again (error <= 0.5 step of the new scale).

Measured on SmolLM2-135M (tests/data/paragraph.txt, 175 tokens, model in float32 so that the KV
cache is the only perturbation; mean KL to bf16 KV in nats/token, and the perplexity change vs bf16
KV). Rows 1-3: the earlier choice and its alternatives, simulated on the dense model (rows 1-2) or
through the paged path with one prefill chunk (row 3, the per-token format this replaced). Rows
4-7: block scales through the engine's paged path (tests/models/test_kv_cache_dtype_ppl.py), with
the whole paragraph as one prefill chunk, or fed one token per step (decode: every block's scale
grows token by token, its old rows re-quantized):

| scheme | fp8_e4m3 | fp8_e5m2 | int8 |
| --- | --- | --- | --- |
| static per-tensor scale 1.0 (vLLM's default) | 5.2e-3, +1.18% | 1.9e-2, +2.19% | - |
| per 16-token block and KV head, dense simulation | 4.8e-3, -0.74% | 2.0e-2, -2.64% | 2.1e-3, -0.08% |
| per token and KV head, bf16 scale rounded up (before) | 3.3e-3, -0.72% | 1.8e-2, +0.26% | 6.9e-4, -0.15% |
| block, float growth, one prefill chunk | 4.25e-3, +0.53% | 2.03e-2, -0.39% | 2.38e-3, -0.24% |
| block, float growth, one token per step | 1.11e-2, **-1.08%** | 4.36e-2, +5.31% | 2.34e-3, +0.29% |
| **block, pow2 for fp8, one prefill chunk** | **4.71e-3, +0.13%** | 1.88e-2, +1.27% | **2.38e-3, -0.24%** |
| **block, pow2 for fp8, one token per step** | **4.65e-3, +0.22%** | 1.80e-2, +1.56% | **2.34e-3, +0.29%** |

(int8 with power-of-two scales, one token per step: +2.33%, which is why int8 keeps float growth.)

Why per block, power of two for fp8: the per-token scales cost the decode kernel one 2-byte
gather per token and KV head beside the 1-byte values; on the H100 fp8 decode at 64 x 4096 ran
134.7 us against 114 us for the same kernel with no scale loads (bf16: 194 us), and they held the
pool at 1.969x bf16. One scale per block is one load per page of a tile and 4 bytes per 2048
values (pool 1.996x). Its price is accuracy: a block's scale is set by its largest token, and
decode grows it token by token. With float growth every growth re-rounds the block's old fp8
values (2 or 3 mantissa bits), which fails the 1% bar for e4m3 (-1.08%, KL 1.1e-2); a power-of-two
scale makes that growth exact, and e4m3 stays at the prefill figure (KL 4.7e-3) however the block
was written. Against per token the KL to bf16 KV is ~1.4x (e4m3, 4.7e-3 vs 3.3e-3) and ~3.4x
(int8, 2.4e-3 vs 6.9e-4), all within 0.3% perplexity. Perplexity moves by ~0.5% between
near-identical schemes on 175 tokens (noise); the KL column is the stable one. e5m2 (2 mantissa
bits) stays outside the 1% acceptance as before.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# --kv-cache-dtype name -> storage dtype of the quantized values
QUANTIZED_DTYPES = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2, "int8": jnp.int8}
SCALE_DTYPE = jnp.float32
SCALE_BYTES = 4  # per block and KV head
SCALE_FLOOR = 2.0 ** -100  # the smallest scale a block gets: all-zero blocks never divide by 0


class QuantizedPages(NamedTuple):
    """One layer's K or V pages in a 1-byte dtype with one scale per (block, KV head).

    data: [num_blocks, block_size, K, H] (float8_e4m3fn, float8_e5m2 or int8);
    scale: [num_blocks, 1, K, 1] float32. value = data * scale (the scale broadcasts over the
    block's tokens and the head's H values).
    """

    data: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype


def qmax(dtype) -> float:
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8:
        return 127.0
    return float(jnp.finfo(dtype).max)


def is_quantized(pages) -> bool:
    return isinstance(pages, QuantizedPages)


def storage_dtype(name: str):
    """The jnp dtype of the stored values: ``fp8_e4m3`` -> float8_e4m3fn, ``bfloat16`` -> itself."""
    return jnp.dtype(QUANTIZED_DTYPES.get(name, name))


def is_float8(dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


def pow2_ceil(s):
    """The smallest power of two >= ``s`` (positive normal float32), exactly: integer arithmetic
    on the bits (keep the exponent field, +1 if any mantissa bit is set, clear the mantissa)."""
    bits = jax.lax.bitcast_convert_type(s.astype(jnp.float32), jnp.int32)
    exp = bits & jnp.int32(0x7F800000)
    exp = exp + jnp.where((bits & jnp.int32(0x007FFFFF)) != 0, jnp.int32(1 << 23), jnp.int32(0))
    return jax.lax.bitcast_convert_type(exp, jnp.float32)


def absmax_scale(absmax, dtype):
    """The float32 scale for a block whose largest |value| is ``absmax``: absmax * (1 / qmax), at
    least ``SCALE_FLOOR`` (all-zero blocks keep a positive scale), and for the fp8 dtypes rounded
    up to a power of two (``pow2_ceil``) so that growing a block's scale re-quantizes its old
    values exactly (module docstring). One multiplication and integer ops: every implementation
    computes the same bits."""
    s = jnp.maximum(absmax.astype(jnp.float32) * (1.0 / qmax(dtype)), SCALE_FLOOR)
    return pow2_ceil(s) if is_float8(dtype) else s


def quantize_values(x, scale, dtype):
    """x [..., H] (any float) / scale [..., 1] float32 -> values in ``dtype`` (int8: clipped to
    +-127, rounded half away from zero; fp8: saturated to +-qmax, then round-to-nearest-even).
    int8 rounds by adding +-0.5 and truncating because the Triton lowering has no ``round``."""
    m = qmax(dtype)
    y = jnp.clip(x.astype(jnp.float32) / scale, -m, m)
    if jnp.dtype(dtype) == jnp.int8:
        return (y + jnp.where(y >= 0, 0.5, -0.5)).astype(dtype)
    return y.astype(dtype)


def dequantize(data, scale, dtype=jnp.float32):
    """values [..., H] x scale (broadcastable) -> [..., H] in ``dtype`` (products in float32)."""
    return (data.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)


def requantize(data, old_scale, new_scale):
    """Stored values at ``old_scale`` -> the same values at ``new_scale`` (dequantize in float32,
    quantize_values): the re-quantization a block's existing tokens get when its scale grows."""
    return quantize_values(dequantize(data, old_scale), new_scale, data.dtype)


def quantize_pages(pages: jax.Array, name: str) -> QuantizedPages:
    """Plain pages [num_blocks, block_size, K, H] -> QuantizedPages of cache dtype ``name``, each
    (block, KV head) scaled by its own absmax (what writing the whole block in one step gives)."""
    dtype = QUANTIZED_DTYPES[name]
    absmax = jnp.max(jnp.abs(pages.astype(jnp.float32)), axis=(1, 3), keepdims=True)
    scale = absmax_scale(absmax, dtype)
    return QuantizedPages(quantize_values(pages, scale, dtype), scale)


def dequantize_pages(pages, dtype=jnp.float32):
    """QuantizedPages -> plain [num_blocks, block_size, K, H] in ``dtype``; plain pages pass."""
    if not is_quantized(pages):
        return pages
    return dequantize(pages.data, pages.scale, dtype)


def write_quantized(pages: QuantizedPages, new, slot_mapping,
                    max_continued: int | None = None) -> QuantizedPages:
    """Write this step's rows ``new`` [T, K, H] into slots ``slot_mapping`` [T] (negative: nothing
    written) of a quantized layer, applying the block-scale rule (module docstring).

    Vectorised over the step's *touched* blocks only: the rows are grouped by block with a sort of
    the T slots (segments), so every per-block quantity is a [T, ...] segment reduction, the scale
    array gets one gather and one scatter of T entries, and the pages one gather / scatter of the
    blocks the step *continues* (offset > 0: the only ones with old rows to re-quantize) plus the
    row scatter of the new rows. ``max_continued`` (static) bounds how many blocks a step can
    continue: a sequence's rows of one step are consecutive positions, so at most its first block
    is continued, and the engine passes its number of sequences; the gather is then
    [max_continued, block_size, K, H] instead of [T, ...] (a 2048-row prefill chunk of one
    sequence gathers 1 block, not 2048). It must be at least the true count (None: T, always).
    """
    data, scale = pages
    nb, bs, kh, h = data.shape
    t = new.shape[0]
    dtype = data.dtype
    valid = slot_mapping >= 0
    blk = jnp.where(valid, slot_mapping // bs, nb)  # nb: a sentinel block (dropped on writes)
    off = jnp.where(valid, slot_mapping % bs, bs)
    x = new.astype(jnp.float32)
    tok_scale = absmax_scale(jnp.max(jnp.abs(x), axis=-1), dtype)  # [T, K]

    order = jnp.argsort(blk, stable=True)
    sblk = blk[order]
    first = jnp.concatenate([jnp.ones((1,), bool), sblk[1:] != sblk[:-1]])
    seg_sorted = jnp.cumsum(first.astype(jnp.int32)) - 1
    seg = jnp.zeros((t,), jnp.int32).at[order].set(seg_sorted)  # each row's segment
    seg_blk = jnp.full((t,), nb, jnp.int32).at[seg_sorted].set(sblk)  # [T]: nb = unused
    seg_off = jax.ops.segment_min(off, seg, num_segments=t)  # o: first offset written
    seg_new = jax.ops.segment_max(tok_scale, seg, num_segments=t)  # [T, K]
    live = seg_blk < nb
    gblk = jnp.minimum(seg_blk, nb - 1)  # (unused segments read block nb - 1, never written)
    flat_scale = scale.reshape(nb, kh)
    old = jnp.where((seg_off == 0)[:, None], 0.0, flat_scale[gblk])  # a starting block: 0
    new_scale = jnp.maximum(old, seg_new)  # [T, K]; only grows; >= SCALE_FLOOR (absmax_scale)
    scale = flat_scale.at[seg_blk].set(new_scale, mode="drop").reshape(scale.shape)

    # Re-quantize the old rows [0, o) of continued blocks whose scale grew (per KV head): the
    # continued segments first (a stable sort on "not continued"), the first c of them gathered.
    cont = live & (seg_off > 0)  # [T]
    c = t if max_continued is None else max(1, min(t, int(max_continued)))
    sel = jnp.argsort(jnp.logical_not(cont), stable=True)[:c]  # [C]
    c_blk = jnp.where(cont[sel], seg_blk[sel], nb)
    c_old, c_new, c_off = old[sel], new_scale[sel], seg_off[sel]
    grow = (c_new > c_old) & cont[sel][:, None]  # [C, K]
    blocks = data[jnp.minimum(c_blk, nb - 1)]  # [C, bs, K, H]
    old_rows = jnp.arange(bs, dtype=jnp.int32)[None, :] < c_off[:, None]  # [C, bs]
    redo = old_rows[:, :, None, None] & grow[:, None, :, None]
    blocks = jnp.where(redo, requantize(blocks, c_old[:, None, :, None],
                                        c_new[:, None, :, None]), blocks)
    dst = jnp.where(jnp.any(grow, axis=1), c_blk, nb)
    data = data.at[dst].set(blocks, mode="drop")

    # Then the new rows at their block's new scale.
    rows = quantize_values(x, new_scale[seg][:, :, None], dtype)
    idx = jnp.where(valid, slot_mapping, nb * bs)
    flat = data.reshape(nb * bs, kh, h).at[idx].set(rows, mode="drop")
    return QuantizedPages(flat.reshape(data.shape), scale)


def to_compute(x, dtype):
    """Stored values -> the matmul dtype inside a kernel. fp8 goes through float16 (exact for both
    fp8 formats; the upcast Triton lowers on every GPU with fp8, sm >= 89), int8 converts direct."""
    if x.dtype == dtype:
        return x
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 1:
        x = x.astype(jnp.float16)
    return x.astype(dtype)
