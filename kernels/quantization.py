"""Quantized KV pages (``--kv-cache-dtype fp8_e4m3 | fp8_e5m2 | int8``): the storage format, and
quantize / dequantize exactly as the KV write and the attention kernels apply them.

Format: one scale per token and KV head. A layer's K (or V) is a ``QuantizedPages(data, scale)``:
``data`` [num_blocks, block_size, K, H] in the 1-byte dtype and ``scale`` [num_blocks, block_size,
K, 1] bfloat16, with ``value = data * scale``. The scale is ``absmax(row) / qmax`` (qmax 448 for
e4m3, 57344 for e5m2, 127 for int8), rounded *up* to bfloat16 so the row's largest element never
clips. The trailing 1 keeps the scale 4-D like the pages, so every per-page operation (block
copies, swap gathers, the KV-head sharding ``P(None, None, "tp", None)``) applies to it unchanged.

Why per token, measured on SmolLM2-135M (tests/data/paragraph.txt, 175 tokens, model in float32 so
that the KV cache is the only perturbation; mean KL to bf16 KV in nats/token, and the perplexity
change). Rows 1-2 simulate the alternatives on the dense model; row 3 is this module through the
engine's paged path, as tests/models/test_kv_cache_dtype_ppl.py prints it:

| scheme | fp8_e4m3 | fp8_e5m2 | int8 |
| --- | --- | --- | --- |
| static per-tensor scale 1.0 (vLLM's default) | 5.2e-3, +1.18% | 1.9e-2, +2.19% | - |
| per 16-token block and KV head | 4.8e-3, -0.74% | 2.0e-2, -2.64% | 2.1e-3, -0.08% |
| per token and KV head, bf16 scale rounded up | **3.3e-3, -0.72%** | 1.8e-2, +0.26% | **6.9e-4, -0.15%** |

A static scale puts layer 0's small V values (mean |v| 0.026) in e4m3's subnormal range and misses
the 1% perplexity bar; a per-block scale is set by the block's largest token (and would need the
block re-quantized as decode grows it). Per token costs 2 bytes per H values (1.5% at H = 128: the
pool holds 1.97x the tokens of bf16, not 2x) and one small gather per KV tile in the kernels.
Perplexity moves by ~0.5% between near-identical schemes on 175 tokens (noise); the KL column is
the stable one: per token is the best of the three for every dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# --kv-cache-dtype name -> storage dtype of the quantized values
QUANTIZED_DTYPES = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2, "int8": jnp.int8}
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
