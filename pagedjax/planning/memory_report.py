"""Memory arithmetic shared by ``pagedjax plan`` and the engine's startup report.

One device's memory is split as vLLM splits it::

    device memory x gpu_memory_utilization = weights + profiling peak + KV pool (+ rounding)
    free = device memory - weights - profiling peak - KV pool

"Device memory" is the device's total (what CUDA reports: an "80 GB" H100 reports 79.18 GiB),
not JAX's allocator limit (75% of it unless configured; :mod:`pagedjax.worker.device_memory`).

Every figure is per device. Under tensor parallelism a device holds a slice of the model; that
slice is described by :func:`per_device_config`, a sizing view whose ``num_params()`` is the
device's share of the weights and whose KV heads are the heads one device stores. The pool is
always sized by :meth:`pagedjax.worker.kv_pool.KVPoolSpec.for_budget`, the rule the engine allocates
with, so the planner's prediction and the engine's pool cannot disagree.
"""
from __future__ import annotations

import dataclasses
import math
import re

from pagedjax.config import EngineConfig
from pagedjax.kernels import reference
from pagedjax.worker.kv_pool import GiB, KVPoolSpec, dtype_bytes
from pagedjax.models import ModelConfig, fp8

CPU_DEFAULT_KV_BYTES = 1 << 30  # without an accelerator to measure, the pool gets 1 GiB

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``"80GiB"``, ``"24GB"``, ``"81920MiB"`` -> bytes. A unit is required: a bare ``80`` is
    ambiguous between bytes and GiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read the size {text!r}: write a number and a unit, e.g. "
                         "80GiB, 24GB or 81920MiB (GiB/MiB are powers of 1024, GB/MB of 1000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def kv_heads_per_device(cfg: ModelConfig, tp: int) -> int:
    """max(1, K / tp): with more devices than KV heads each head is replicated tp / K times."""
    return max(1, cfg.num_key_value_heads // tp)


def per_device_config(cfg: ModelConfig, tp: int = 1) -> ModelConfig:
    """The shapes one device holds under tensor parallelism ``tp`` (a sizing view, not a model to
    run): query heads, KV heads, MLP columns and the vocabulary (embedding and LM head rows) are
    split over the devices; norms are replicated; KV heads are replicated when tp > K."""
    if tp == 1:
        return cfg
    n, k = cfg.num_attention_heads, cfg.num_key_value_heads
    if tp < 1 or n % tp:
        raise ValueError(f"--tensor-parallel-size {tp} must divide the number of attention heads "
                         f"({n}): use one of {[d for d in range(1, n + 1) if n % d == 0]}")
    if k % tp and tp % k:
        raise ValueError(f"--tensor-parallel-size {tp} must divide the number of KV heads ({k}) "
                         f"or be a multiple of it, so that KV heads split or replicate evenly")
    return dataclasses.replace(
        cfg, num_attention_heads=n // tp, num_key_value_heads=kv_heads_per_device(cfg, tp),
        intermediate_size=-(-cfg.intermediate_size // tp), vocab_size=-(-cfg.vocab_size // tp),
        name=f"{cfg.name} (1/{tp} per device)")


def weights_bytes(cfg: ModelConfig, dtype: str, tp: int = 1,
                  quantization: str | None = None) -> int:
    """Weights one device holds, computed from the config at ``dtype`` (for a GGUF file: the
    dequantised size the engine holds, not the file's quantised size). ``quantization`` "fp8":
    the linears at 1 byte a weight plus a float32 scale per output row (pagedjax/models/fp8.py)."""
    dev = per_device_config(cfg, tp)
    total = dev.num_params() * dtype_bytes(dtype)
    if quantization:
        weights, rows = fp8.linear_sizes(dev)
        total += weights * (1 - dtype_bytes(dtype)) + rows * 4
    return total


SAMPLER_ROW_ARRAYS = 6  # [S, V] float32 arrays live in the sampler's top-p/top-k/min-p path
XLA_WORKSPACE_BYTES = 512 << 20  # cuBLAS / autotuning workspaces and allocator fragmentation


def profile_peak_bytes_estimate(cfg: ModelConfig, max_num_batched_tokens: int, dtype: str,
                                max_num_seqs: int | None = None, kv_dtype: str | None = None,
                                block_size: int = 16) -> int:
    """Activation peak of one engine step at the full token budget, an estimate until the engine
    measures it (vLLM measures a profiling run at ``max_num_batched_tokens``).

    With T = max_num_batched_tokens rows and S = min(T, max_num_seqs) sampled rows::

        T x (2 D + (N + 2 K) H + 3 F) x dtype bytes   one layer: residual + normed input,
                                                      q/k/v, gate/up/act
      + 6 x S x V x 4                                 the sampler's float32 rows: logits, scaled,
                                                      sorted, softmax, cumsum, Gumbel noise
      + 512 MiB                                       XLA's workspaces and fragmentation
      + attention scratch                             the reference attention's per-chunk bound
      + the largest weight matrix                     XLA's GPU autotuner: while it compiles a
                                                      step it times each GEMM's candidates on
                                                      fresh buffers the size of its operands
                                                      (the lm_head's weight, 1 GiB for Qwen2.5-7B:
                                                      without room for it the first compile
                                                      after the pool is allocated fails)
      + int4 KV only: 4 x U x block_size x K x H x 4  the key write's float32 / int32 copies of
                                                      the U = ceil(T / block_size) + 2 S blocks
                                                      it re-quantizes (kernels.reference.
                                                      write_int4_keys; XLA's CPU compile of it for
                                                      Llama-2-7B shapes at T 2048, S 256 holds
                                                      3.6 such arrays)

    It must not fall short: JAX's allocator is capped at ``--gpu-memory-utilization`` of the
    device (:mod:`pagedjax.worker.device_memory`), so what the estimate misses the step cannot get.
    It assumes blockwise attention (no T x context score matrix: the Pallas kernels, and the
    reference path, which holds at most ``kernels.reference.SCRATCH_BYTES`` per KV chunk) and no
    cross-layer activations (inference keeps none). Pass a per-device config for tensor
    parallelism.
    """
    t = max_num_batched_tokens
    s = min(t, max_num_seqs or t)
    d, f, n, k, h = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                     cfg.num_key_value_heads, cfg.head_dim)
    layer = t * (2 * d + (n + 2 * k) * h + 3 * f) * dtype_bytes(dtype)
    largest_matrix = max(cfg.vocab_size * d, d * 2 * f, d * (n + 2 * k) * h) * dtype_bytes(dtype)
    int4_write = 0
    if kv_dtype == "int4":
        int4_write = 4 * reference.touched_blocks(t, block_size, s) * block_size * k * h * 4
    return (layer + SAMPLER_ROW_ARRAYS * s * cfg.vocab_size * 4 + XLA_WORKSPACE_BYTES
            + reference.SCRATCH_BYTES + largest_matrix + int4_write)


def kv_budget_bytes(total_bytes: int, gpu_memory_utilization: float, weights: int,
                    profile_peak: int) -> int:
    """Bytes left for the KV pool on one device; a clear error when nothing is left."""
    usable = int(total_bytes * gpu_memory_utilization)
    budget = usable - weights - profile_peak
    if budget <= 0:
        what = ("is smaller than the weights" if weights >= usable
                else "leaves no room for the KV cache after the weights")
        raise ValueError(
            f"{total_bytes / GiB:.2f} GiB x --gpu-memory-utilization {gpu_memory_utilization} = "
            f"{usable / GiB:.2f} GiB per device {what} ({weights / GiB:.2f} GiB) and the "
            f"profiling peak ({profile_peak / GiB:.2f} GiB): use a device with more memory, "
            f"raise --tensor-parallel-size, raise --gpu-memory-utilization, or lower "
            f"--max-num-batched-tokens")
    return budget


def plan_pool(config: EngineConfig, budget_bytes: int = 0) -> KVPoolSpec:
    """The pool one device allocates for ``budget_bytes`` (0: the shape alone, for per-token and
    per-block figures), on the per-device shapes."""
    return KVPoolSpec.for_budget(per_device_config(config.model, config.tp), budget_bytes,
                                 config.block_size, config.kv_dtype, config.sink_tokens,
                                 config.window)


def memory_report(config: EngineConfig, *, total_bytes: int | None = None,
                  weights: int | None = None, profile_peak: int | None = None) -> dict:
    """Weights / profiling peak / KV pool / free for one device, in GiB, and the pool it implies.

    The engine calls this at start-up and allocates ``report["num_blocks"]`` blocks:
    ``total_bytes`` is the device's memory (:func:`pagedjax.worker.device_memory.device_bytes`: its
    total on a GPU, None on the CPU),
    ``weights`` the measured bytes in use after loading and ``profile_peak`` the measured peak of
    a profiling step; either left None is computed from the config (weights at ``dtype``; the
    peak by :func:`profile_peak_bytes_estimate`). The pool's budget, in the engine's order:
    ``--num-gpu-blocks-override``, then ``--kv-cache-memory-bytes``, then ``total_bytes`` x
    ``--gpu-memory-utilization`` minus weights and peak, then 1 GiB on the CPU.
    """
    args, dtype = config.args, config.dtype
    dev = per_device_config(config.model, config.tp)
    tokens = config.max_num_batched_tokens
    peak_measured = profile_peak is not None
    if weights is None:
        weights = weights_bytes(config.model, dtype, config.tp, config.quantization)
    if profile_peak is None:
        profile_peak = profile_peak_bytes_estimate(dev, tokens, dtype, args.max_num_seqs,
                                                   config.kv_dtype, config.block_size)
    if args.num_gpu_blocks_override:
        spec = KVPoolSpec.for_model(dev, args.num_gpu_blocks_override, config.block_size,
                                    config.kv_dtype, config.sink_tokens, config.window)
        source = "--num-gpu-blocks-override"
    else:
        if args.kv_cache_memory_bytes:
            budget, source = args.kv_cache_memory_bytes, "--kv-cache-memory-bytes"
        elif total_bytes is not None:
            budget = kv_budget_bytes(total_bytes, args.gpu_memory_utilization, weights,
                                     profile_peak)
            source = "--gpu-memory-utilization"
        else:
            budget, source = CPU_DEFAULT_KV_BYTES, "CPU default (1 GiB)"
        spec = plan_pool(config, budget)
    free = None if total_bytes is None else total_bytes - weights - profile_peak - spec.total_bytes
    return {
        "device_memory_gib": None if total_bytes is None else total_bytes / GiB,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "weights_gib": weights / GiB,
        "profile_peak_gib": profile_peak / GiB,
        "profile_peak_source": "measured" if peak_measured else "estimate",
        "max_num_batched_tokens": tokens,
        "kv_pool_gib": spec.total_bytes / GiB,
        "free_gib": None if free is None else free / GiB,
        "kv_budget_source": source,
        "kv_dtype": spec.dtype,
        "kv_bytes_per_token": spec.bytes_per_token,
        "block_size": spec.block_size,
        "block_bytes": spec.bytes_per_block,
        "num_blocks": spec.num_blocks,
        "num_tokens": spec.num_tokens,
        "max_model_len": config.max_model_len,
        "max_concurrency": spec.max_concurrency(config.max_model_len),
        "kv_sink_tokens": spec.sink_tokens,
        "kv_window": spec.window,  # 0: full attention; else blocks per sequence are bounded
        "blocks_per_seq": spec.seq_blocks(config.max_model_len),
        "bytes": {"device": total_bytes, "weights": weights, "profile_peak": profile_peak,
                  "kv_pool": spec.total_bytes, "free": free},
    }


def format_memory_report(rep: dict) -> str:
    """One log line for the engine's start-up."""
    dev = ("" if rep["device_memory_gib"] is None else
           f"device {rep['device_memory_gib']:.2f} GiB x {rep['gpu_memory_utilization']}; ")
    free = "" if rep["free_gib"] is None else f", free {rep['free_gib']:.2f} GiB"
    return (f"memory per device: {dev}weights {rep['weights_gib']:.2f} GiB, profiling peak "
            f"{rep['profile_peak_gib']:.2f} GiB ({rep['profile_peak_source']}), KV pool "
            f"{rep['kv_pool_gib']:.2f} GiB ({rep['num_blocks']} blocks, {rep['kv_budget_source']})"
            f"{free}")


def min_device_bytes(config: EngineConfig, concurrency: int, weights: int,
                     profile_peak: int) -> int:
    """Smallest per-device memory whose pool holds ``concurrency`` sequences of
    ``config.max_model_len`` tokens, with the same weights, peak and utilization."""
    util, max_model_len = config.args.gpu_memory_utilization, config.max_model_len

    def fits(total: int) -> bool:
        budget = int(total * util) - weights - profile_peak
        return budget > 0 and plan_pool(config, budget).max_concurrency(max_model_len) >= concurrency

    need = concurrency * plan_pool(config).bytes_for(max_model_len)
    total = math.ceil((weights + profile_peak + need) / util)
    while not fits(total):  # float rounding of total x util: a step or two at most
        total += 1
    while fits(total - 1):
        total -= 1
    return total
