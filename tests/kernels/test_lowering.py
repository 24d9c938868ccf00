"""The kernels lower for the hardware they are written for, checked on the CPU: Pallas -> Triton IR
for CUDA, Pallas -> Mosaic for TPU, at the Qwen2.5-7B shapes the engine runs (28 q / 4 kv heads,
head_dim 128, bf16, block 16), with every cache dtype's pages: bf16, raw fp8, int8 and int4
QuantizedPages (and fp8 QuantizedPages, still accepted). This catches a kernel that runs in interpret mode but uses
an op the real lowering lacks; the Triton / Mosaic compilers themselves run only on the device."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from pagedjax.kernels import QuantizedPages
from pagedjax.kernels.dispatch import ragged_paged_attention, write_kv
from pagedjax.kernels.quantization import QUANTIZED_DTYPES, has_token_scales

T, S, W, NB = 64, 8, 32, 300
SD = jax.ShapeDtypeStruct


def pages(kv_dtype: str):
    """One layer's (K, V) pages as the engine holds them: bf16 or raw fp8 arrays, or quantized
    values + bf16 scales (int8; int4: two codes a byte, K with an fp8 scale and zero point per
    channel of a block;
    ``-scaled``: fp8 in the per-token format)."""
    if kv_dtype == "bfloat16":
        return (SD((NB, 16, 4, 128), jnp.bfloat16),) * 2
    name = kv_dtype.removesuffix("-scaled")
    if name == "int4":
        codes = SD((NB, 16, 4, 64), QUANTIZED_DTYPES[name])
        return (QuantizedPages(codes, SD((NB, 2, 4, 128), jnp.float8_e4m3fn)),
                QuantizedPages(codes, SD((NB, 16, 4, 1), jnp.bfloat16)))
    values = SD((NB, 16, 4, 128), QUANTIZED_DTYPES[name])
    if name == kv_dtype and not has_token_scales(name):
        return values, values
    return (QuantizedPages(values, SD((NB, 16, 4, 1), jnp.bfloat16)),) * 2


@pytest.mark.parametrize("kv_dtype", ["bfloat16", *QUANTIZED_DTYPES, "fp8_e4m3-scaled"])
@pytest.mark.parametrize("platform,backend,kwargs,marker", [
    ("cuda", "pallas-gpu", {"decode_only": True, "num_splits": 1}, "paged_decode"),
    ("cuda", "pallas-gpu", {"decode_only": True, "num_splits": 8}, "paged_decode_combine"),
    ("cuda", "pallas-gpu", {"decode_only": True, "num_splits": 33, "kv_heads_per_program": 2},
     "paged_decode_split"),
    ("cuda", "pallas-gpu", {}, "ragged_paged_attention"),
    ("cuda", "write_kv", {}, "write_kv"),
    ("tpu", "pallas-tpu", {"decode_only": True}, "paged_decode_tpu"),
    ("tpu", "pallas-tpu", {}, "ragged_paged_attention_tpu"),
])
def test_lowers_for_device(kv_dtype, platform, backend, kwargs, marker):
    k, v = pages(kv_dtype)
    if kv_dtype == "int4" and kwargs.get("kv_heads_per_program", 1) > 1:
        kwargs = {**kwargs, "kv_heads_per_program": 1}  # int4 pages take one KV head a program
    if backend == "write_kv":
        fn = jax.jit(functools.partial(write_kv, backend="pallas-gpu"))
        args = (k, v, SD((T, 4, 128), jnp.bfloat16), SD((T, 4, 128), jnp.bfloat16),
                SD((T,), jnp.int32))
    else:
        fn = jax.jit(functools.partial(ragged_paged_attention, backend=backend, **kwargs))
        args = (SD((T, 28, 128), jnp.bfloat16), k, v, SD((S, W), jnp.int32),
                SD((S,), jnp.int32), SD((S + 1,), jnp.int32))
    text = fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert marker in text


WINDOW = {"sink_tokens": 4, "window": 128}  # bounded KV: the sink and window loops lower too


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8", "int4"])
@pytest.mark.parametrize("platform,backend,kwargs,marker", [
    ("cuda", "pallas-gpu", {"decode_only": True, "num_splits": 1}, "paged_decode"),
    ("cuda", "pallas-gpu", {"decode_only": True, "num_splits": 4}, "paged_decode_combine"),
    ("cuda", "pallas-gpu", {}, "ragged_paged_attention"),
    ("tpu", "pallas-tpu", {"decode_only": True}, "paged_decode_tpu"),
    ("tpu", "pallas-tpu", {}, "ragged_paged_attention_tpu"),
])
def test_windowed_kernels_lower_for_device(kv_dtype, platform, backend, kwargs, marker):
    k, v = pages(kv_dtype)
    fn = jax.jit(functools.partial(ragged_paged_attention, backend=backend, **kwargs, **WINDOW))
    args = (SD((T, 28, 128), jnp.bfloat16), k, v, SD((S, W), jnp.int32), SD((S,), jnp.int32),
            SD((S + 1,), jnp.int32))
    assert marker in fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
