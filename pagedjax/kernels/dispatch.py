"""One entry point for paged attention over a ragged batch: shape checks, then the kernel of the
chosen backend (Pallas GPU, Pallas TPU, or the pure-jnp reference)."""
from __future__ import annotations

import jax.numpy as jnp

from .quantization import KEY_PARAM_DTYPE, is_int4, is_quantized, is_raw_fp8
from .reference import paged_attention_ref, write_kv_ref

BACKENDS = ("pallas-gpu", "pallas-tpu", "reference")
_TUNING = {
    ("pallas-gpu", True): {"num_splits", "block_kv", "num_warps", "num_stages",
                            "kv_heads_per_program", "merge_chunk", "int4_dtype",
                            "int4_asm"},
    ("pallas-gpu", False): {"block_m", "block_n", "num_warps", "num_stages"},
    ("pallas-tpu", True): {"pages_per_block"},
    ("pallas-tpu", False): {"block_q", "pages_per_block"},
    ("reference", True): set(),
    ("reference", False): set(),
}


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_pages(k_pages, v_pages) -> None:
    """Both plain [num_blocks, block_size, K, H] arrays of one dtype, or both QuantizedPages with
    a [num_blocks, block_size, K, 1] bfloat16 scale each (int4: K's [num_blocks, 2, K, H]
    float8_e4m3fn scale and zero point, per channel within a block). Plain 1-byte pages must be
    fp8 (raw values, the static scale applied by the model): int8 has no such scale, its values
    mean nothing without their scales."""
    if is_quantized(k_pages) != is_quantized(v_pages):
        raise ValueError("k_pages and v_pages must both be quantized (QuantizedPages) or neither")
    if len(k_pages.shape) != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages/v_pages must both be [num_blocks, block_size, K, H], got "
                         f"{k_pages.shape} and {v_pages.shape}")
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages and v_pages dtypes differ: {k_pages.dtype} vs {v_pages.dtype}")
    if (not is_quantized(k_pages) and jnp.dtype(k_pages.dtype).itemsize == 1
            and not is_raw_fp8(k_pages)):
        raise ValueError(f"plain {k_pages.dtype} pages have no scale: an int8 cache must be "
                         "QuantizedPages (per-token scales, pagedjax/kernels/quantization.py); "
                         "only fp8 pages are taken raw")
    if is_quantized(k_pages):
        want = (*k_pages.shape[:3], 1), "[num_blocks, block_size, K, 1]", jnp.bfloat16
        nb, _, kh, h = k_pages.shape
        k_want = ((nb, 2, kh, h), "[num_blocks, 2, K, H] (int4 keys: a scale and a zero point "
                  "per channel of a block)", KEY_PARAM_DTYPE) if is_int4(k_pages) else want
        for name, pages, (shape, what, dtype) in (("k_pages", k_pages, k_want),
                                                  ("v_pages", v_pages, want)):
            if pages.scale.shape != shape:
                raise ValueError(f"{name}.scale must be {what} = {shape}, "
                                 f"got {pages.scale.shape}")
            if pages.scale.dtype != dtype:
                raise ValueError(f"{name}.scale must be {jnp.dtype(dtype).name}, "
                                 f"got {pages.scale.dtype}")


def check_shapes(q, k_pages, v_pages, block_tables, context_lens, query_start_loc) -> None:
    """Raise ValueError naming the offending argument unless the shapes form a valid step."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, N, H], got shape {q.shape}")
    check_pages(k_pages, v_pages)
    t, n, h = q.shape
    _, _, kh, h2 = k_pages.shape
    if h2 != h:
        raise ValueError(f"head_dim of q ({h}) and of the pages ({h2}) differ")
    if n % kh:
        raise ValueError(f"query heads ({n}) must be a multiple of KV heads ({kh})")
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be [S, W], got shape {block_tables.shape}")
    s = block_tables.shape[0]
    if context_lens.shape != (s,):
        raise ValueError(f"context_lens must be [S] = [{s}], got {context_lens.shape}")
    if query_start_loc.shape != (s + 1,):
        raise ValueError(f"query_start_loc must be [S + 1] = [{s + 1}], got "
                         f"{query_start_loc.shape}")
    for name, a in (("block_tables", block_tables), ("context_lens", context_lens),
                    ("query_start_loc", query_start_loc)):
        if a.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {a.dtype}")


def ragged_paged_attention(q, k_pages, v_pages, block_tables, context_lens, query_start_loc, *,
                           scale: float | None = None, backend: str = "pallas-gpu",
                           interpret: bool = False, decode_only: bool = False,
                           sink_tokens: int = 0, window: int = 0, **tuning):
    """Attention of a packed ragged batch over its paged KV cache (this step's K/V already written).

    Letters: T token rows, S sequence rows, W block-table width, N query heads, K KV heads,
    H head dim.

    q: [T, N, H]. Sequence ``s`` owns rows ``q[qsl[s]:qsl[s+1]]``; rows from ``qsl[S]`` on are
        padding and come out as zeros.
    k_pages, v_pages: [num_blocks, block_size, K, H], one layer of the pool
        (``pagedjax.worker.kv_pool``); same dtype as q on the Pallas backends, or raw fp8 (an fp8 cache:
        float8_e4m3fn / float8_e5m2 values attended as they are, converted in registers; the
        model applies the static scale). Or, for an int8 cache, ``QuantizedPages(data, scale)``
        (``pagedjax/kernels/quantization.py``): 1-byte values and a bfloat16 scale per token and KV
        head, dequantized inside the kernels on load (fp8 QuantizedPages are accepted too).
    block_tables: [S, W] int32; entries past a sequence's last block are never read.
    context_lens: [S] int32, tokens in the cache per sequence *including* this step's; the q rows
        of sequence s sit at positions ``context_lens[s] - q_len .. context_lens[s] - 1``.
    query_start_loc: [S + 1] int32, non-decreasing, ``qsl[0] == 0``, ``qsl[S] <= T``. A padded
        sequence has q_len 0 (any context_lens, any block table).
    scale: softmax scale, default ``H ** -0.5``.
    backend: "pallas-gpu" (Triton-lowered Pallas), "pallas-tpu" (Mosaic TPU Pallas) or
        "reference" (pure jnp).
    interpret: run the Pallas kernel in interpret mode (CPU tests). For "pallas-tpu" True means
        ``pltpu.InterpretParams()``; an InterpretParams object is passed through.
    decode_only: static promise that every q_len is 0 or 1 (a pure decode step); picks the
        split-K flash-decoding kernel. Breaking the promise gives wrong rows, not an error.
    sink_tokens, window: static ints, StreamingLLM's bounded attention: a query at position i
        sees key j iff ``j <= i and (j < sink_tokens or j > i - window)``
        (``reference.visible``); window 0 (the default) is plain causal attention. Blocks wholly
        outside every query's view are never read, so their block-table entries may be
        anything (the engine frees them: pagedjax.core.block_manager).
    tuning: kernel knobs, all static. pallas-gpu decode: num_splits (positive int), block_kv,
        num_warps, num_stages, kv_heads_per_program (power of two dividing K, default 2 on raw
        fp8 pages when K is even, else 1; see ``paged_decode_attention``), merge_chunk,
        int4_dtype, int4_asm;
        pallas-gpu ragged:
        block_m, block_n, num_warps, num_stages;
        pallas-tpu decode: pages_per_block; pallas-tpu ragged: block_q, pages_per_block.

    Returns [T, N, H] in q's dtype.
    Raises ValueError on inconsistent shapes or dtypes, an unknown backend or tuning knob.
    """
    check_shapes(q, k_pages, v_pages, block_tables, context_lens, query_start_loc)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    known = _TUNING[(backend, bool(decode_only))]
    unknown = set(tuning) - known
    if unknown:
        raise ValueError(f"unknown tuning knobs for {backend} (decode_only={decode_only}): "
                         f"{sorted(unknown)}; known: {sorted(known)}")
    if sink_tokens < 0 or window < 0 or (sink_tokens and not window):
        raise ValueError(f"sink_tokens {sink_tokens} and window {window} must be >= 0, and sink "
                         "tokens need a window (window 0: full causal attention)")
    mask = {"sink_tokens": int(sink_tokens), "window": int(window)}
    h = q.shape[2]
    scale = float(h ** -0.5 if scale is None else scale)
    if backend == "reference":
        return paged_attention_ref(q, k_pages, v_pages, block_tables, context_lens,
                                   query_start_loc, scale=scale, **mask)
    if is_raw_fp8(k_pages):
        if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
            raise ValueError(f"q dtype {q.dtype} over {k_pages.dtype} pages must be bfloat16, "
                             "float16 or float32 (the matmul dtype the fp8 values convert to)")
    elif q.dtype != k_pages.dtype and not is_quantized(k_pages):
        raise ValueError(f"q dtype {q.dtype} must match the pages' {k_pages.dtype} on {backend} "
                         "(or the pages be fp8 or QuantizedPages)")
    args = (q, k_pages, v_pages, block_tables, context_lens, query_start_loc)
    if backend == "pallas-gpu":
        if decode_only:
            tuning = {**decode_defaults(k_pages), **tuning}
        _check_gpu(q, k_pages, decode_only, tuning)
        if decode_only:
            from .decode_attention_gpu import paged_decode_attention
            return paged_decode_attention(*args, scale=scale, interpret=interpret, **mask,
                                          **tuning)
        if not tuning and not window and _mosaic_prefill_applies(q, k_pages, block_tables,
                                                                 interpret):
            from .ragged_prefill_mgpu import ragged_prefill_mgpu  # causal only
            return ragged_prefill_mgpu(*args, scale=scale)
        from .ragged_attention_gpu import ragged_paged_attention_gpu
        return ragged_paged_attention_gpu(*args, scale=scale, interpret=interpret, **mask,
                                          **tuning)
    from . import paged_attention_tpu as tpu
    tpu.check_shapes(q, k_pages, tuning)
    if decode_only:
        return tpu.paged_decode_attention_tpu(*args, scale=scale, interpret=interpret, **mask,
                                              **tuning)
    return tpu.ragged_paged_attention_tpu(*args, scale=scale, interpret=interpret, **mask,
                                          **tuning)


def decode_defaults(k_pages) -> dict:
    """Decode knobs that depend on the pages: raw fp8 pages read two KV heads per program (one
    [block_kv, 2H] gather per token) through a 5-stage pipeline; bf16 and QuantizedPages keep the
    kernel's defaults (the measurements: benchmarks/KERNEL_NOTES.md)."""
    if is_raw_fp8(k_pages) and k_pages.shape[2] % 2 == 0:
        return {"kv_heads_per_program": 2, "num_stages": 5}
    return {}


def _mosaic_prefill_applies(q, k_pages, block_tables, interpret) -> bool:
    """One sequence of >= 128 rows on a Hopper GPU: the Mosaic GPU prefill kernel (wgmma + TMA,
    0.97x cuDNN at 8K, 1.9x the Triton kernel: benchmarks/KERNEL_NOTES.md) takes it; ragged
    batches of several sequences, 1-byte pages (fp8 or QuantizedPages: the kernel is bf16/f16
    only) and other GPUs keep the Triton kernel."""
    if interpret is not False or block_tables.shape[0] != 1 or q.shape[0] < 128:
        return False
    if k_pages.dtype != q.dtype or q.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    if q.shape[2] % 64 or 128 % k_pages.shape[1]:
        return False
    import jax

    dev = jax.devices()[0]
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"


def _check_gpu(q, k_pages, decode_only, tuning) -> None:
    _, n, h = q.shape
    group = n // k_pages.shape[2]
    if not _is_pow2(h) or h < 16:
        raise ValueError(f"pallas-gpu needs a power-of-two head_dim >= 16, got {h}; use "
                         f"backend='reference' or pad the heads")
    if is_int4(k_pages) and h < 32:
        raise ValueError(f"pallas-gpu on int4 pages needs head_dim >= 32 (two halves of >= 16, "
                         f"the smallest tile tl.dot takes), got {h}; use backend='reference'")
    for knob in ("block_kv", "block_m", "block_n"):
        if knob in tuning and not _is_pow2(int(tuning[knob])):
            raise ValueError(f"{knob} must be a power of two, got {tuning[knob]}")
    if tuning.get("num_splits") is not None and int(tuning["num_splits"]) < 1:
        raise ValueError(f"num_splits must be a positive int, got {tuning['num_splits']}")
    kvp = int(tuning.get("kv_heads_per_program", 1))
    if not _is_pow2(kvp) or k_pages.shape[2] % kvp:
        raise ValueError(f"kv_heads_per_program must be a power of two dividing the "
                         f"{k_pages.shape[2]} KV heads, got {kvp}")
    if not decode_only and tuning.get("block_m", 128) < group:
        raise ValueError(f"block_m ({tuning['block_m']}) must hold one token's {group} query heads")
    if not decode_only and tuning.get("block_m", 128) < 16 or tuning.get("block_n", 16) < 16:
        raise ValueError("block_m and block_n must be >= 16 (the smallest tile tl.dot takes)")


def write_kv(k_pages, v_pages, k_new, v_new, slot_mapping, *, backend: str = "reference",
             interpret: bool = False):
    """Write this step's K/V rows into their pool slots; returns the updated (k_pages, v_pages).

    k_pages, v_pages: [num_blocks, block_size, K, H] (raw fp8 pages: the rows saturate to the
    format's +-qmax), or QuantizedPages (the rows are quantized per token and KV head on the way
    in); k_new, v_new: [T, K, H];
    slot_mapping: [T] int32, slot = block * block_size + offset, negative for padding rows.
    backend "pallas-gpu": one fused Pallas launch writing K and V in place (needs K * H a power of
    two, else falls back); anything else, and int4 pages on every backend: the XLA scatter of
    ``write_kv_ref`` (int4 re-quantizes K's whole blocks as their channel ranges grow: a gather
    and a scatter of the touched blocks, ``reference.write_int4_keys``). Which is faster on
    the GPU is measured by ``python -m benchmarks kernel`` (figures["kv_write_us"]).
    """
    check_pages(k_pages, v_pages)
    t = k_new.shape[0]
    if k_new.shape != (t, *k_pages.shape[2:]) or v_new.shape != k_new.shape:
        raise ValueError(f"k_new/v_new must be [T, K, H] = [T, {k_pages.shape[2]}, "
                         f"{k_pages.shape[3]}], got {k_new.shape} and {v_new.shape}")
    if slot_mapping.shape != (t,) or slot_mapping.dtype != jnp.int32:
        raise ValueError(f"slot_mapping must be int32 [{t}], got {slot_mapping.dtype} "
                         f"{slot_mapping.shape}")
    if backend == "pallas-gpu" and _is_pow2(k_pages.shape[2] * k_pages.shape[3]) and (
            not is_quantized(k_pages) or _is_pow2(k_pages.shape[3])) and not is_int4(k_pages):
        from .kv_write_gpu import write_kv_gpu
        return write_kv_gpu(k_pages, v_pages, k_new, v_new, slot_mapping, interpret=interpret)
    return write_kv_ref(k_pages, v_pages, k_new, v_new, slot_mapping)
