"""The device KV pool: the only place that knows its layout, dtype and size.

Layout: one ``(k_pages, v_pages)`` pair per layer, each ``[num_blocks, block_size, K, H]``. A
token's K/V for one layer is one contiguous ``K*H`` row at slot ``block * block_size + offset``,
so the step's KV write is a single row scatter, and a page of one KV head is ``block_size`` rows
of ``H`` contiguous elements (256 B at H=128 bf16: full-width loads for the kernels). Per-layer
arrays, not one stacked array, so each layer's pages are a separate donated buffer that kernels
read without a slice copy.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.models import ModelConfig

logger = logging.getLogger(__name__)

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class KVPoolSpec:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"

    @classmethod
    def for_model(cls, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: str):
        return cls(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                   cfg.head_dim, dtype)

    @property
    def page_shape(self) -> tuple[int, int, int, int]:
        return (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes_per_block(self) -> int:
        return block_bytes(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim,
                           self.dtype)

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def dtype_bytes(dtype: str) -> int:
    return jnp.dtype(dtype).itemsize


def block_bytes(num_layers, block_size, num_kv_heads, head_dim, dtype) -> int:
    """Bytes of one block across all layers, K and V."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes(dtype)


def num_blocks_for_budget(budget_bytes: int, cfg: ModelConfig, block_size: int, dtype: str) -> int:
    per_block = block_bytes(cfg.num_hidden_layers, block_size, cfg.num_key_value_heads,
                            cfg.head_dim, dtype)
    return max(int(budget_bytes // per_block), 0)


def allocate(spec: KVPoolSpec, sharding=None) -> list[tuple[jax.Array, jax.Array]]:
    """Zero-filled pages, one (k, v) pair per layer."""
    def zeros():
        return jnp.zeros(spec.page_shape, dtype=spec.dtype, device=sharding)

    return [(zeros(), zeros()) for _ in range(spec.num_layers)]


def check_fits(spec: KVPoolSpec, max_model_len: int) -> None:
    """vLLM's start-up check, with what to change."""
    if spec.num_tokens < max_model_len:
        need = -(-max_model_len // spec.block_size) * spec.bytes_per_block
        raise ValueError(
            f"The model's max seq len ({max_model_len}) is larger than the maximum number of "
            f"tokens that can be stored in KV cache ({spec.num_tokens}): one sequence of "
            f"{max_model_len} tokens needs {need / GiB:.2f} GiB of KV cache and the pool holds "
            f"{spec.total_bytes / GiB:.2f} GiB. Lower --max-model-len, or raise "
            f"--gpu-memory-utilization (or --num-gpu-blocks-override / the KV budget).")


def log_capacity(spec: KVPoolSpec, max_model_len: int) -> None:
    logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %s)", spec.num_blocks,
                spec.block_size, spec.num_tokens, spec.total_bytes / GiB, spec.dtype)
    logger.info("GPU KV cache size: %d tokens", spec.num_tokens)
    logger.info("Maximum concurrency for %d tokens per request: %.2fx", max_model_len,
                spec.num_tokens / max_model_len)


def copy_blocks(pool, src: jax.Array, dst: jax.Array):
    """Copy pages src[i] -> dst[i] in every layer (copy-on-write). Negative dst entries are
    padding and copy nothing. One gather + one scatter per layer array, inside the caller's jit."""
    nb = pool[0][0].shape[0]
    dst = jnp.where(dst < 0, nb, dst)
    src = jnp.clip(src, 0, nb - 1)
    return [(k.at[dst].set(k[src], mode="drop"), v.at[dst].set(v[src], mode="drop"))
            for k, v in pool]


def host_bytes_per_layer(spec: KVPoolSpec) -> int:
    return int(np.prod(spec.page_shape)) * dtype_bytes(spec.dtype) * 2


def _bits(x: jax.Array) -> jax.Array:
    # Block moves work on the raw bits: XLA on the CPU computes bf16 in f32 and would
    # canonicalise NaN payloads in a stack or scatter; a same-width bitcast costs nothing.
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))


def gather_blocks(pool, ids: jax.Array) -> jax.Array:
    """Blocks ``ids`` [P] of every layer, stacked: [2L, P, block_size, K, H] (K and V of layer l
    at 2l and 2l + 1): one staging array for one host transfer (swap-out). Bit-exact."""
    staging = jnp.stack([_bits(pages)[ids] for kv in pool for pages in kv])
    return jax.lax.bitcast_convert_type(staging, pool[0][0].dtype)


def scatter_blocks(pool, staging: jax.Array, ids: jax.Array):
    """Inverse of ``gather_blocks`` (swap-in): row i of ``staging`` [2L, P, ...] goes to block
    ids[i]; negative ids are padding and write nothing. Bit-exact."""
    ids = jnp.where(ids < 0, pool[0][0].shape[0], ids)
    rows = _bits(staging)

    def put(pages, row):
        return jax.lax.bitcast_convert_type(_bits(pages).at[ids].set(row, mode="drop"), pages.dtype)

    return [(put(k, rows[2 * i]), put(v, rows[2 * i + 1])) for i, (k, v) in enumerate(pool)]
