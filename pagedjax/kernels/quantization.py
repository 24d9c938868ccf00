"""Quantized KV pages (``--kv-cache-dtype fp8_e4m3 | fp8_e5m2 | int8 | int4``): the storage formats, and
quantize / dequantize exactly as the KV write and the attention kernels apply them.

Format, per cache dtype:

- int8: one scale per token and KV head. A layer's K (or V) is a ``QuantizedPages(data, scale)``:
  ``data`` [num_blocks, block_size, K, H] int8 and ``scale`` [num_blocks, block_size, K, 1]
  bfloat16, with ``value = data * scale``. The scale is ``absmax(row) / qmax`` (qmax 127),
  rounded *up* to bfloat16 so the row's largest element never clips. The trailing 1 keeps the
  scale 4-D like the pages, so every per-page operation (block copies, swap gathers, the KV-head
  sharding ``P(None, None, "tp", None)``) applies to it unchanged.
- fp8 (e4m3, e5m2): plain 1-byte pages [num_blocks, block_size, K, H] in float8_e4m3fn /
  float8_e5m2 holding raw values (``is_raw_fp8``). Each layer and KV head has one static
  power-of-two scale derived from the weights (pagedjax/models/kv_scales.py), folded in by the model
  outside the kernels: q multiplied by it, k and v divided by it before the write (which
  saturates beyond qmax 448 / 57344, ``saturate``), the attention output multiplied. Kernels
  attend over these pages as over bf16 ones, converting the values in registers; a power of two
  makes the folding exact.

``QuantizedPages`` of fp8 data (``quantize_pages``) stay accepted by every kernel: the per-token
fp8 format measured below.

Measured on SmolLM2-135M (tests/data/paragraph.txt, 175 tokens, model in float32 so that the KV
cache is the only perturbation; mean KL to bf16 KV in nats/token, and the perplexity change).
Rows 1, 2 and 4 simulate the schemes on the dense model; rows 3 and 5 are the engine's paged path,
as tests/models/test_kv_cache_dtype_ppl.py printed it (row 5: what the engine does now):

| scheme | fp8_e4m3 | fp8_e5m2 | int8 |
| --- | --- | --- | --- |
| static per-tensor scale 1.0 (vLLM's default) | 5.2e-3, +1.18% | 1.9e-2, +2.19% | - |
| per 16-token block and KV head | 4.8e-3, -0.74% | 2.0e-2, -2.64% | 2.1e-3, -0.08% |
| per token and KV head, bf16 scale rounded up | 3.3e-3, -0.72% | 1.8e-2, +0.26% | **6.9e-4, -0.15%** |
| static pow2 scale per layer and KV head from a weight bound | 5.1e-3, +0.79% | 1.85e-2, +1.73% | - |
| the same, engine path (fp8 now) | **5.0e-3, -0.03%** | 1.9e-2, +1.27% | - |

Scale 1.0 puts layer 0's small V values (mean |v| 0.026) in e4m3's subnormal range and misses
the 1% perplexity bar; a per-block scale is set by the block's largest token (and would need the
block re-quantized as decode grows it). Per token costs 2 bytes per H values (1.5% at H = 128:
the pool holds 1.97x the tokens of bf16, not 2x) and a scale gather per KV tile in the kernels.
Perplexity moves by ~0.5% between near-identical schemes on 175 tokens (noise); the KL column is
the stable one: per token has the lowest for every dtype.

Why fp8 is static per layer and KV head anyway: the pool holds exactly 2x bf16's tokens, the
kernels do no work for the scale, and decode is faster than with per-token scales
(benchmarks/KERNEL_NOTES.md). The
price is accuracy: KL 5.0e-3 against 3.3e-3 with per-token scales, within the 1% perplexity bar.
int8 keeps its per-token scales.

int4 (``--kv-cache-dtype int4``), KIVI's grouping: K asymmetric per channel within a block, V
symmetric per token.

- codes (K and V): ``QuantizedPages(data, scale)`` with ``data`` [num_blocks, block_size, K, H / 2]
  uint8, two nibbles a byte: byte ``j`` of a head's row holds channel ``j`` in its low nibble and
  channel ``j + H / 2`` in its high nibble. Halves, not adjacent pairs: a kernel turns a
  [rows, H / 2] byte tile into the two halves of the head dim with a mask and a shift, and
  multiplies each half by its half of q (or adds it into its half of the output), with no
  interleave of columns, which Triton cannot do cheaply.
- V: nibble = code + 8 with code in [-7, 7], value = code * scale, one scale per token and KV
  head, [num_blocks, block_size, K, 1] bfloat16 (absmax / 7 rounded up), as int8's.
- K: value = nibble * scale + zero with nibble in [0, 15], a scale and a zero point per *channel*
  and KV head within a block: ``scale`` [num_blocks, 2, K, H] float8_e4m3fn, row 0 the scale,
  row 1 the zero point (``key_params``: the zero point is the block's minimum rounded down, the
  scale (max - zero) / 15 rounded up, so no key clips; keys beyond e4m3's +-448 would).
  Per channel because keys have outlier channels (KIVI), asymmetric because a key channel often
  sits around an offset of one sign within a block, which leaves half of a symmetric range
  unused. Block first and KV head third in both scale layouts, so block copies, swaps and the
  KV-head sharding treat them as pages.
- ``QuantizedPages.shape`` is the logical ``[num_blocks, block_size, K, H]``; the stored dtype,
  uint8, marks the packing (``is_int4``).

Bytes: at H = 128 and block size 16 a token and KV head takes 64 + 16 bytes of K (two fp8 numbers
per channel of the block, over its 16 tokens) and 64 + 2 of V, 146 against bf16's 512: the pool
holds 3.51x the tokens. A bf16 scale and zero point would give 3.16x.

Measured on SmolLM2-135M, perplexity of alice29.txt's first 4,096 tokens with K (after RoPE) and
V fake-quantized in every layer of a dense forward (benchmarks/experiments/int4_schemes.py at
99c0d62; benchmarks/KERNEL_NOTES.md has every row):

| K (groups of 16 tokens); V | ppl | vs bf16 |
| --- | --- | --- |
| bf16 KV | 18.14 | - |
| symmetric K per channel, bf16 scale, written a token at a time; V per token | 20.70 | +14.1% |
| symmetric K per channel, the whole block's absmax; V per token | 20.08 | +10.7% |
| asymmetric K, whole block, bf16 scale + zero; V per token | 18.60 | +2.6% |
| **asymmetric K, whole block, fp8 scale + zero; V per token** (this format) | 18.60 | +2.6% |
| asymmetric K, fp8 scale + zero re-derived every token; V per token | 18.83 | +3.8% |

The write (``reference.write_int4_keys``) sets a block's scale and zero point from the min and
max over its earlier keys (dequantized) and all of the step's rows for it, re-rounds the earlier
codes once and quantizes the new rows; when every new row fits the block's current range the
parameters and the earlier codes stay as they are. A prefill, or a chunk that starts on a block
boundary, therefore stores each full block from its own range; decode steps re-round a block's
codes only when a token leaves its range. The stored bits depend on the chunking: the engine's
greedy tokens equal a reference that chunks the same way (tests/engine/test_kv_cache_dtype.py),
and a recompute after preemption may store its last block's keys slightly differently.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# --kv-cache-dtype name -> storage dtype of the quantized values
# (int4: two codes packed in each uint8)
QUANTIZED_DTYPES = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2, "int8": jnp.int8,
                    "int4": jnp.uint8}
# Cache dtypes stored as QuantizedPages (values + scales). The fp8 ones are stored as plain
# 1-byte pages instead: their scale is static, one power of two per layer and KV head, applied by
# the model to q, k, v and the attention output (pagedjax/models/kv_scales.py).
PER_TOKEN_SCALED = ("int8", "int4")
SCALE_DTYPE = jnp.bfloat16
# per scale: a token and KV head (int8, int4's V), or a channel of a block (int4's K: two fp8
# numbers, its scale and zero point)
SCALE_BYTES = 2
INT4_QMAX = 7.0
KEY_PARAM_DTYPE = jnp.float8_e4m3fn  # int4 K's scale and zero point
KEY_PARAM_MAX = 448.0


class QuantizedPages(NamedTuple):
    """One layer's K or V pages in a 1-byte dtype with a scale per token and KV head, or int4.

    data: [num_blocks, block_size, K, H] (float8_e4m3fn, float8_e5m2 or int8), or
    [num_blocks, block_size, K, H / 2] uint8 (int4, two nibbles a byte);
    scale: [num_blocks, block_size, K, 1] bfloat16 (per token: value = codes * scale), or
    [num_blocks, 2, K, H] float8_e4m3fn (int4 keys, per channel within a block: value =
    nibble * scale[:, 0] + scale[:, 1]).
    ``shape`` is the logical [num_blocks, block_size, K, H].
    """

    data: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        if self.data.dtype == jnp.uint8:
            return (*self.data.shape[:3], 2 * self.data.shape[3])
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype


def qmax(dtype) -> float:
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8:
        return 127.0
    if dtype == jnp.uint8:  # the storage of packed int4 codes
        return INT4_QMAX
    return float(jnp.finfo(dtype).max)


def is_quantized(pages) -> bool:
    return isinstance(pages, QuantizedPages)


def has_token_scales(name: str) -> bool:
    """Whether cache dtype ``name`` is stored as QuantizedPages (int8, int4: scales beside the
    values) rather than raw pages."""
    return name in PER_TOKEN_SCALED


def is_int4(pages) -> bool:
    """QuantizedPages of packed int4 codes."""
    return is_quantized(pages) and pages.data.dtype == jnp.uint8


def has_channel_scales(pages) -> bool:
    """int4 keys: a scale and zero point per channel within a block ([num_blocks, 2, K, H]),
    not a scale per token."""
    return is_quantized(pages) and pages.scale.shape[-1] != 1


def is_raw_fp8(pages) -> bool:
    """Plain 1-byte float pages (a static-scale fp8 cache: value = stored number)."""
    dtype = getattr(pages, "dtype", None)
    return (not is_quantized(pages) and dtype is not None
            and jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 1)


def saturate(x, dtype):
    """x -> ``dtype``; for fp8, values beyond +-qmax saturate (a plain cast would give NaN for
    e4m3fn, inf for e5m2). Other dtypes: a plain cast."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 1:
        m = qmax(dtype)
        return jnp.clip(x.astype(jnp.float32), -m, m).astype(dtype)
    return x.astype(dtype)


def storage_dtype(name: str):
    """The jnp dtype of the stored values: ``fp8_e4m3`` -> float8_e4m3fn, ``bfloat16`` -> itself."""
    return jnp.dtype(QUANTIZED_DTYPES.get(name, name))


def scale_up(absmax, dtype):
    """absmax / qmax rounded up to bfloat16 (x (1 + 2^-8) before round-to-nearest: never below
    absmax / qmax), as float32; 0 for 0. Multiplications only, so a kernel computes the same bits
    as XLA."""
    s = absmax.astype(jnp.float32) * (1.0 / qmax(dtype))
    return (s * (1.0 + 2.0 ** -8)).astype(SCALE_DTYPE).astype(jnp.float32)


def row_scale(absmax, dtype):
    """Scale (float32 values of the stored bfloat16) for rows of this absmax: ``scale_up``, and 1
    for all-zero rows."""
    s = scale_up(absmax, dtype)
    return jnp.where(s == 0, 1.0, s)


def quantize_values(x, scale, dtype):
    """x [..., H] (any float) / scale [..., 1] float32 -> values in ``dtype`` (int8: clipped to
    +-127, rounded half away from zero; fp8: saturated to +-qmax, then round-to-nearest-even).
    int8 rounds by adding +-0.5 and truncating because the Triton lowering has no ``round``."""
    m = qmax(dtype)
    y = jnp.clip(x.astype(jnp.float32) / scale, -m, m)
    if jnp.dtype(dtype) in (jnp.int8, jnp.uint8):  # uint8: int4 codes, still unpacked, as int8
        return (y + jnp.where(y >= 0, 0.5, -0.5)).astype(jnp.int8)
    return y.astype(dtype)


def pack_nibbles(nibbles):
    """Nibbles [..., H] (integers in [0, 15]) -> [..., H / 2] uint8: byte j holds channel j in
    its low nibble and channel j + H / 2 in its high one."""
    h = nibbles.shape[-1] // 2
    c = nibbles.astype(jnp.int32)
    return (c[..., :h] | (c[..., h:] << 4)).astype(jnp.uint8)


def pack_int4(codes):
    """Symmetric int4 codes [..., H] (integers in [-8, 7]) -> [..., H / 2] uint8, each stored as
    code + 8 (``pack_nibbles``)."""
    return pack_nibbles(codes.astype(jnp.int32) + 8)


def unpack_nibbles(data):
    """[..., H / 2] uint8 -> (low, high) int32 nibbles [..., H / 2] each, in [0, 15]: channels
    0 .. H/2 - 1 and H/2 .. H - 1. Integer ops only, so the kernels unpack a byte tile in
    registers with it."""
    x = data.astype(jnp.int32)
    return x & 15, x >> 4


def unpack_int4(data):
    """[..., H / 2] uint8 -> (low, high) symmetric int32 codes (nibble - 8) [..., H / 2] each."""
    lo, hi = unpack_nibbles(data)
    return lo - 8, hi - 8


def unpack_codes(data):
    """[..., H / 2] uint8 -> symmetric int32 codes [..., H]."""
    return jnp.concatenate(unpack_int4(data), axis=-1)


def quantize(x, dtype) -> tuple[jax.Array, jax.Array]:
    """x [..., H] -> (values [..., H] in ``dtype``, scale [..., 1] bfloat16), one scale per row
    (uint8: int4 codes packed to [..., H / 2])."""
    scale = row_scale(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True), dtype)
    values = quantize_values(x, scale, dtype)
    if jnp.dtype(dtype) == jnp.uint8:
        values = pack_int4(values)
    return values, scale.astype(SCALE_DTYPE)


def fp8_round(x, *, up: bool):
    """x (float) -> float32 value of the nearest float8_e4m3fn at or above x (``up``) or at or
    below it, saturating at +-448. A rounded-to-nearest value on the wrong side of x moves one
    step (the step of x's binade, 2^-9 among the subnormals), which is exact in e4m3."""
    x = jnp.clip(x.astype(jnp.float32), -KEY_PARAM_MAX, KEY_PARAM_MAX)
    r = x.astype(KEY_PARAM_DTYPE).astype(jnp.float32)
    _, e = jnp.frexp(x)
    step = jnp.exp2(jnp.maximum(e - 4, -9).astype(jnp.float32))
    return jnp.where(r < x, r + step, r) if up else jnp.where(r > x, r - step, r)


def key_params(lo, hi):
    """(scale, zero) of int4 keys whose channel spans [lo, hi], as float32 values of
    float8_e4m3fn: zero is lo rounded down, scale (hi - zero) / 15 rounded up, so every value of
    the span maps into nibbles 0..15 (scale 0 for a constant channel equal to its zero)."""
    zero = fp8_round(lo, up=False)
    return fp8_round((hi.astype(jnp.float32) - zero) * (1.0 / 15.0), up=True), zero


def quantize_keys(x, scale, zero):
    """x [..., H] (float) -> int4 key nibbles int32 [..., H] in [0, 15]: (x - zero) / scale
    rounded half up and clipped; 0 where scale is 0."""
    y = (x.astype(jnp.float32) - zero) / jnp.where(scale == 0, 1.0, scale)
    return jnp.clip(jnp.floor(y + 0.5), 0, 15).astype(jnp.int32)


def quantize_channels(x):
    """int4 keys of whole blocks: x [num_blocks, block_size, K, H] -> (packed nibbles
    [num_blocks, block_size, K, H / 2], params [num_blocks, 2, K, H] float8_e4m3fn: the scale and
    zero point of each channel of each block and KV head, ``key_params`` of its min and max)."""
    x = x.astype(jnp.float32)
    scale, zero = key_params(jnp.min(x, axis=1, keepdims=True), jnp.max(x, axis=1, keepdims=True))
    params = jnp.concatenate([scale, zero], axis=1).astype(KEY_PARAM_DTYPE)
    return pack_nibbles(quantize_keys(x, scale, zero)), params


def dequantize_keys(data, params, dtype=jnp.float32):
    """int4 keys: nibbles [..., block_size, K, H / 2] uint8 and params [..., 2, K, H] -> values
    nibble * scale + zero [..., block_size, K, H] in ``dtype`` (float32 arithmetic)."""
    nibbles = jnp.concatenate(unpack_nibbles(data), axis=-1).astype(jnp.float32)
    params = params.astype(jnp.float32)
    return (nibbles * params[..., 0:1, :, :] + params[..., 1:2, :, :]).astype(dtype)


def dequantize(data, scale, dtype=jnp.float32):
    """values [..., H] (or int4's packed [..., H / 2]) x scale [..., 1] (per token, broadcast)
    -> [..., H] in ``dtype`` (products in float32). int4 keys' params ([..., 2, K, H], per
    channel of a block): ``dequantize_keys``."""
    if scale.shape[-1] != 1:
        return dequantize_keys(data, scale, dtype)
    if data.dtype == jnp.uint8:
        data = unpack_codes(data)
    return (data.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)


def quantize_pages(pages: jax.Array, name: str, *, keys: bool = False) -> QuantizedPages:
    """Plain pages [num_blocks, block_size, K, H] -> QuantizedPages of cache dtype ``name``.
    ``keys``: int4 keys take a scale and zero point per channel within each block (the other
    formats ignore it)."""
    if name == "int4" and keys:
        return QuantizedPages(*quantize_channels(pages))
    data, scale = quantize(pages, QUANTIZED_DTYPES[name])
    return QuantizedPages(data, scale)


def dequantize_pages(pages, dtype=jnp.float32):
    """QuantizedPages -> plain [num_blocks, block_size, K, H] in ``dtype``; plain pages pass."""
    if not is_quantized(pages):
        return pages
    return dequantize(pages.data, pages.scale, dtype)


def to_compute(x, dtype):
    """Stored values -> the matmul dtype inside a kernel. fp8 goes through float16 (exact for both
    fp8 formats; the upcast Triton lowers on every GPU with fp8, sm >= 89), int8 converts direct."""
    if x.dtype == dtype:
        return x
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 1:
        x = x.astype(jnp.float16)
    return x.astype(dtype)
