"""Quantized KV pages (``--kv-cache-dtype fp8_e4m3 | fp8_e5m2 | int8``): the storage formats, and
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
  power-of-two scale derived from the weights (models/kv_scales.py), folded in by the model
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
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# --kv-cache-dtype name -> storage dtype of the quantized values
QUANTIZED_DTYPES = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2, "int8": jnp.int8}
# Cache dtypes stored as QuantizedPages (values + a scale per token and KV head). The fp8 ones
# are stored as plain 1-byte pages instead: their scale is static, one power of two per layer and
# KV head, applied by the model to q, k, v and the attention output (models/kv_scales.py).
PER_TOKEN_SCALED = ("int8",)
SCALE_DTYPE = jnp.bfloat16
SCALE_BYTES = 2  # per token and KV head


class QuantizedPages(NamedTuple):
    """One layer's K or V pages in a 1-byte dtype with a scale per token and KV head.

    data: [num_blocks, block_size, K, H] (float8_e4m3fn, float8_e5m2 or int8);
    scale: [num_blocks, block_size, K, 1] bfloat16. value = data * scale.
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


def has_token_scales(name: str) -> bool:
    """Whether cache dtype ``name`` stores a scale per token and KV head (QuantizedPages)."""
    return name in PER_TOKEN_SCALED


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


def row_scale(absmax, dtype):
    """Scale (float32 values of the stored bfloat16) for rows of this absmax: absmax / qmax,
    rounded up to bfloat16 (x (1 + 2^-8) before round-to-nearest: never below absmax / qmax), and
    1 for all-zero rows. Multiplications only, so a kernel computes the same bits as XLA."""
    s = absmax.astype(jnp.float32) * (1.0 / qmax(dtype))
    s = (s * (1.0 + 2.0 ** -8)).astype(SCALE_DTYPE).astype(jnp.float32)
    return jnp.where(s == 0, 1.0, s)


def quantize_values(x, scale, dtype):
    """x [..., H] (any float) / scale [..., 1] float32 -> values in ``dtype`` (int8: clipped to
    +-127, rounded half away from zero; fp8: saturated to +-qmax, then round-to-nearest-even).
    int8 rounds by adding +-0.5 and truncating because the Triton lowering has no ``round``."""
    m = qmax(dtype)
    y = jnp.clip(x.astype(jnp.float32) / scale, -m, m)
    if jnp.dtype(dtype) == jnp.int8:
        return (y + jnp.where(y >= 0, 0.5, -0.5)).astype(dtype)
    return y.astype(dtype)


def quantize(x, dtype) -> tuple[jax.Array, jax.Array]:
    """x [..., H] -> (values [..., H] in ``dtype``, scale [..., 1] bfloat16), one scale per row."""
    scale = row_scale(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True), dtype)
    return quantize_values(x, scale, dtype), scale.astype(SCALE_DTYPE)


def dequantize(data, scale, dtype=jnp.float32):
    """values [..., H] x scale [..., 1] -> [..., H] in ``dtype`` (products formed in float32)."""
    return (data.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)


def quantize_pages(pages: jax.Array, name: str) -> QuantizedPages:
    """Plain pages [num_blocks, block_size, K, H] -> QuantizedPages of cache dtype ``name``."""
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
