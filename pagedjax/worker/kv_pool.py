"""The device KV pool: the only place that knows its layout, dtype and size.

Layout: one ``(k_pages, v_pages)`` pair per layer, each ``[num_blocks, block_size, K, H]``. A
token's K/V for one layer is one contiguous ``K*H`` row at slot ``block * block_size + offset``,
so the step's KV write is a single row scatter, and a page of one KV head is ``block_size`` rows
of ``H`` contiguous elements (256 B at H=128 bf16: full-width loads for the kernels). Per-layer
arrays, not one stacked array, so each layer's pages are a separate donated buffer that kernels
read without a slice copy.

Quantized cache (``--kv-cache-dtype fp8_e4m3 | fp8_e5m2 | int8``): fp8 pages are plain
``[num_blocks, block_size, K, H]`` arrays in the 1-byte dtype, holding ``k / s_k`` and ``v / s_v``
with static power-of-two scales per layer and KV head that the model applies
(``pagedjax/models/kv_scales.py``): half of bf16's bytes, exactly 2x the tokens. int8 keeps a scale
per token and KV head: each of a layer's K and V is a ``QuantizedPages(data, scale)`` pytree,
``data`` [num_blocks, block_size, K, H] int8 and ``scale`` [num_blocks, block_size, K, 1] bfloat16
(why per token for int8: ``pagedjax/kernels/quantization.py``), ``H + 2`` bytes per token and KV
head. int4 packs two codes a byte, ``data`` [num_blocks, block_size, K, H / 2] uint8; V's scale is
per token as int8's, K has a float8_e4m3fn scale and zero point per channel within a block,
``[num_blocks, 2, K, H]``: a block of one KV head takes ``block_size * (H + 2) + 2 * H`` bytes of
K and V (3.51x bf16's tokens at H = 128, block size 16).
Block moves (copy-on-write, swap) treat the scale as one more page array: same block index,
same bits.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

from pagedjax.kernels.quantization import (KEY_PARAM_DTYPE, QUANTIZED_DTYPES, SCALE_BYTES,
                                          QuantizedPages, has_token_scales, qmax, storage_dtype)
from pagedjax.models import ModelConfig
from pagedjax.models.kv_scales import with_kv_scales

logger = logging.getLogger(__name__)

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class KVPoolSpec:
    """The pool's shape and dtype, and the one owner of its arithmetic: bytes per token and per
    block (int8's scales included), blocks per sequence, sequences that fit. A spec with 0
    blocks describes the shape alone (the planner's per-sequence figures)."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"  # the cache dtype: a jnp dtype name or fp8_e4m3 / fp8_e5m2 / int8
    # bounded KV (--kv-sink-tokens / --kv-window, or the model's sliding window): a sequence
    # holds its sink blocks and its window's, whatever its length; 0, 0: off
    sink_tokens: int = 0
    window: int = 0

    @classmethod
    def for_model(cls, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: str,
                  sink_tokens: int = 0, window: int = 0):
        return cls(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                   cfg.head_dim, dtype, sink_tokens, window)

    @classmethod
    def for_budget(cls, cfg: ModelConfig, budget_bytes: int, block_size: int, dtype: str,
                   sink_tokens: int = 0, window: int = 0):
        """As many whole blocks as ``budget_bytes`` holds (the engine's and the planner's rule)."""
        shape = cls.for_model(cfg, 0, block_size, dtype, sink_tokens, window)
        return dataclasses.replace(shape, num_blocks=max(int(budget_bytes // shape.bytes_per_block),
                                                         0))

    @property
    def page_shape(self) -> tuple[int, int, int, int]:
        return (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def quantized(self) -> bool:
        """A 1-byte cache dtype (fp8_e4m3, fp8_e5m2, int8)."""
        return is_quantized_dtype(self.dtype)

    @property
    def token_scales(self) -> bool:
        """int8, int4: pages are QuantizedPages (scales per token and KV head; int4's K per
        channel within a block)."""
        return has_token_scales(self.dtype)

    @property
    def int4(self) -> bool:
        return self.dtype == "int4"

    @property
    def static_scales(self) -> bool:
        """fp8: plain 1-byte pages, the model applies static per-KV-head scales."""
        return self.quantized and not self.token_scales

    @property
    def qmax(self) -> float:
        return qmax(storage_dtype(self.dtype))

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def row_bytes(self) -> int:
        """Bytes one token's K (or V) takes per KV head and layer: the values, plus the scale
        (int8). int4: the packed values alone (its scales are counted per block)."""
        if self.int4:
            return self.head_dim // 2
        return self.head_dim * dtype_bytes(self.dtype) + (SCALE_BYTES if self.token_scales else 0)

    @property
    def bytes_per_token(self) -> int | float:
        """K and V bytes one token takes across all layers (scales included). int4's K scales
        are per block, so this is the block's bytes / block_size: fractional only where
        2 H < block_size."""
        per_block = self.bytes_per_block
        return per_block // self.block_size if per_block % self.block_size == 0 else \
            per_block / self.block_size

    @property
    def bytes_per_block(self) -> int:
        """K and V bytes of one block across all layers: int4 adds, per KV head and layer, a bf16
        scale per token for V and two fp8 numbers per channel for K (its scale and zero
        point)."""
        per_head = 2 * self.block_size * self.row_bytes
        if self.int4:
            per_head += SCALE_BYTES * (self.block_size + self.head_dim)
        return self.num_layers * self.num_kv_heads * per_head

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks of ``num_tokens`` positions (the last one partly filled): a block table's
        length, released entries included."""
        return -(-num_tokens // self.block_size)

    def seq_blocks(self, num_tokens: int, chunk: int = 1) -> int:
        """Blocks a sequence of up to ``num_tokens`` tokens holds at once, computing ``chunk``
        tokens a step: all of them, or with a window at most its sink blocks, the window's and
        the chunk's (core.block_manager.release_outside_window frees the rest)."""
        n = self.blocks_for(num_tokens)
        if not self.window:
            return n
        bs = self.block_size
        return min(n, -(-self.sink_tokens // bs) + -(-(self.window + chunk - 1) // bs) + 1)

    def bytes_for(self, num_tokens: int) -> int:
        """KV bytes a sequence of ``num_tokens`` tokens holds at most, in whole blocks."""
        return self.seq_blocks(num_tokens) * self.bytes_per_block

    def max_concurrency(self, max_model_len: int) -> int:
        """Sequences of ``max_model_len`` tokens that fit in the pool at once (whole blocks)."""
        return self.num_blocks // self.seq_blocks(max_model_len)


def is_quantized_dtype(dtype: str) -> bool:
    return dtype in QUANTIZED_DTYPES


def dtype_bytes(dtype: str) -> int:
    """Bytes of one stored value (a quantized cache's scales not included)."""
    return storage_dtype(dtype).itemsize


def allocate(spec: KVPoolSpec, sharding=None) -> list:
    """Zero-filled pages, one (k, v) pair per layer; for an int8 cache each of k and v is a
    ``QuantizedPages`` (values and a [.., K, 1] scale, both split by KV head like the pages);
    int4 as in the module docstring."""
    def zeros(shape, dtype):
        return jnp.zeros(shape, dtype=dtype, device=sharding)

    nb, bs, kh, h = spec.page_shape

    def pages(keys: bool):
        if spec.int4:
            scale = (nb, 2, kh, h, KEY_PARAM_DTYPE) if keys else (nb, bs, kh, 1, jnp.bfloat16)
            return QuantizedPages(zeros((nb, bs, kh, h // 2), jnp.uint8),
                                  zeros(scale[:4], scale[4]))
        if spec.token_scales:
            return QuantizedPages(zeros(spec.page_shape, storage_dtype(spec.dtype)),
                                  zeros((*spec.page_shape[:3], 1), jnp.bfloat16))
        return zeros(spec.page_shape, storage_dtype(spec.dtype))

    return [(pages(True), pages(False)) for _ in range(spec.num_layers)]


def params_for_pool(spec: KVPoolSpec, cfg: ModelConfig, params):
    """The parameters a step runs with over this pool: an fp8 pool's static scales added (the
    weights are shared, not copied); other pools take ``params`` as they are."""
    if spec.static_scales and params is not None:
        return with_kv_scales(cfg, params, spec.qmax)
    return params


def check_fits(spec: KVPoolSpec, max_model_len: int, chunk: int = 1) -> None:
    """vLLM's start-up check, with what to change. With a window a sequence holds a bounded
    number of blocks, its step's ``chunk`` of tokens (max_num_batched_tokens) included."""
    if spec.window:
        need = spec.seq_blocks(max_model_len, chunk)
        if spec.num_blocks < need:
            raise ValueError(
                f"one sequence with --kv-sink-tokens {spec.sink_tokens} --kv-window "
                f"{spec.window} holds up to {need} blocks of {spec.block_size} tokens (its sinks, "
                f"its window and a step's {chunk} tokens) and the pool has {spec.num_blocks}: "
                "lower --max-num-batched-tokens or --kv-window, or give the KV cache more memory")
        return
    if spec.num_tokens < max_model_len:
        need = spec.bytes_for(max_model_len)
        raise ValueError(
            f"The model's max seq len ({max_model_len}) is larger than the maximum number of "
            f"tokens that can be stored in KV cache ({spec.num_tokens}): one sequence of "
            f"{max_model_len} tokens needs {need / GiB:.2f} GiB of KV cache and the pool holds "
            f"{spec.total_bytes / GiB:.2f} GiB. Lower --max-model-len, or raise "
            f"--gpu-memory-utilization (or --num-gpu-blocks-override / the KV budget).")


def log_capacity(spec: KVPoolSpec, max_model_len: int) -> None:
    logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %s%s)", spec.num_blocks,
                spec.block_size, spec.num_tokens, spec.total_bytes / GiB, spec.dtype,
                ", V: a bf16 scale per token; K: an fp8 scale and zero point per channel of a "
                "block" if spec.int4 else
                ", bf16 scale per token and KV head" if spec.token_scales else
                ", static scale per layer and KV head" if spec.static_scales else "")
    where = "GPU " if jax.local_devices()[0].platform == "gpu" else ""  # vLLM's line, on a GPU
    logger.info("%sKV cache size: %d tokens", where, spec.num_tokens)
    if spec.window:
        logger.info("KV window: %d sink tokens + the last %d, at most %d blocks per sequence",
                    spec.sink_tokens, spec.window, spec.seq_blocks(max_model_len))
    logger.info("Maximum concurrency for %d tokens per request: %.2fx", max_model_len,
                spec.num_blocks / spec.seq_blocks(max_model_len) if spec.window
                else spec.num_tokens / max_model_len)


def _num_blocks(pool) -> int:
    return jax.tree.leaves(pool)[0].shape[0]


def copy_blocks(pool, src: jax.Array, dst: jax.Array):
    """Copy pages src[i] -> dst[i] in every layer (copy-on-write), scales with their values.
    Negative dst entries are padding and copy nothing. One gather + one scatter per pool array,
    on the raw bits (bit-exact for every dtype), inside the caller's jit."""
    nb = _num_blocks(pool)
    dst = jnp.where(dst < 0, nb, dst)
    src = jnp.clip(src, 0, nb - 1)

    def copy(pages):
        bits = _bits(pages)
        return jax.lax.bitcast_convert_type(bits.at[dst].set(bits[src], mode="drop"), pages.dtype)

    return jax.tree.map(copy, pool)


def _bits(x: jax.Array) -> jax.Array:
    # Block moves work on the raw bits: XLA on the CPU computes bf16 in f32 and would
    # canonicalise NaN payloads in a stack or scatter; a same-width bitcast costs nothing.
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))


def gather_blocks(pool, ids: jax.Array):
    """Blocks ``ids`` [P] of every layer, stacked: [2L, P, block_size, K, H] (K and V of layer l
    at 2l and 2l + 1): one staging array for one host transfer (swap-out). Bit-exact. For an
    int8 pool a ``QuantizedPages`` of two staging arrays: values [2L, P, block_size, K, H]
    and scales [2L, P, block_size, K, 1]; for int4, whose K and V scales differ in shape, the
    scales are a pair (K's [L, P, 2, K, H] float8_e4m3fn, V's [L, P, block_size, K, 1])."""
    def stack(arrays):
        staging = jnp.stack([_bits(pages)[ids] for pages in arrays])
        return jax.lax.bitcast_convert_type(staging, arrays[0].dtype)

    pages = [pages for kv in pool for pages in kv]
    if isinstance(pages[0], QuantizedPages):
        scales = [p.scale for p in pages]
        if scales[0].shape != scales[1].shape:
            return QuantizedPages(stack([p.data for p in pages]),
                                  (stack(scales[0::2]), stack(scales[1::2])))
        return QuantizedPages(stack([p.data for p in pages]), stack(scales))
    return stack(pages)


def scatter_blocks(pool, staging, ids: jax.Array):
    """Inverse of ``gather_blocks`` (swap-in): row i of ``staging`` [2L, P, ...] goes to block
    ids[i]; negative ids are padding and write nothing. Bit-exact."""
    ids = jnp.where(ids < 0, _num_blocks(pool), ids)

    def put(pages, rows):
        return jax.lax.bitcast_convert_type(_bits(pages).at[ids].set(_bits(rows), mode="drop"),
                                            pages.dtype)

    def layer(i, pages, which):
        if isinstance(pages, QuantizedPages):
            scale = (staging.scale[which][i] if isinstance(staging.scale, tuple)
                     else staging.scale[2 * i + which])
            return QuantizedPages(put(pages.data, staging.data[2 * i + which]),
                                  put(pages.scale, scale))
        return put(pages, staging[2 * i + which])

    return [(layer(i, k, 0), layer(i, v, 1)) for i, (k, v) in enumerate(pool)]
