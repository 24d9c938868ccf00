"""Engine, cache and scheduler configuration with vLLM's names and defaults.

``EngineArgs`` is what a user passes to ``LLM(...)`` or on the command line; ``validate`` checks
each value on its own and says what to change. ``EngineConfig`` is those arguments resolved once
against the model (vLLM's ``VllmConfig``): the engine and the planner both build it, and pass it
whole. The check of the pool against one sequence happens when the pool is sized
(``kv_pool.check_fits``).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedjax.models import ModelConfig

DTYPES = ("auto", "bfloat16", "float16", "float32")
# auto: the model's dtype. fp8: 1-byte values with static scales; int8: with a bf16 scale per token
# and KV head; int4: two values a byte, K scaled per channel within a block, V per token
# (pagedjax/kernels/quantization.py says why); "fp8" is vLLM's name for fp8_e4m3.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "int8", "int4")
LOAD_FORMATS = ("auto", "hf", "gguf", "dummy", "orbax")
ATTENTION_BACKENDS = ("auto", "reference", "pallas-gpu", "pallas-tpu")
PREEMPTION_MODES = ("recompute", "swap")
QUANTIZATIONS = ("fp8",)  # vLLM's --quantization; None: the checkpoint's own weights


@dataclasses.dataclass(frozen=True)
class EngineArgs:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    tokenizer: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"
    # "fp8": float8 linear weights with per-channel scales, activations per token
    # (pagedjax/models/fp8.py)
    quantization: str | None = None
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int | None = None  # CPU / explicit budget for the pool
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    preemption_mode: str = "recompute"
    swap_space: float = 0.0  # GiB of host memory for swapped-out blocks
    num_cpu_blocks_override: int | None = None  # host swap pool in blocks (tests), over swap_space
    # GiB of host memory for prefix blocks evicted from the GPU (0: off); one host tier with the
    # swap space (pagedjax.core.host_cache)
    kv_offloading_size: float = 0.0
    attention_backend: str = "auto"
    seed: int = 0
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = False
    # StreamingLLM's bounded KV (arXiv 2309.17453): a query at position i sees key j iff j <= i and
    # (j < kv_sink_tokens or j > i - kv_window); whole blocks that no later query sees are freed.
    # 0, 0: off (full causal attention), unless the model's config declares a sliding window.
    kv_sink_tokens: int = 0
    kv_window: int = 0
    # schedule and dispatch step k+1 while step k runs (its sampled tokens stay on the device)
    async_scheduling: bool = True
    # compile every step shape, sampler variant and copy program when the engine is built, so
    # that no request ever waits for a compile (vLLM captures CUDA graphs / precompiles on TPU
    # at start the same way). None: on where the step buckets are coarse (the Pallas backends)
    # and the kernels are compiled for real (not interpreted on the CPU), off elsewhere.
    precompile: bool | None = None
    # keep compiled programs on disk between runs (pagedjax.worker.compile_cache); None: on with
    # a GPU or TPU, off on the CPU. The directory: None is ~/.cache/pagedjax/jax.
    compilation_cache: bool | None = None
    compilation_cache_dir: str | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        need(self.dtype in DTYPES, f"--dtype {self.dtype!r} is not one of {DTYPES}")
        need(self.quantization is None or self.quantization in QUANTIZATIONS,
             f"--quantization {self.quantization!r} is not supported; use one of "
             f"{QUANTIZATIONS} or leave it unset")
        need(self.load_format in LOAD_FORMATS,
             f"--load-format {self.load_format!r} is not one of {LOAD_FORMATS}")
        need(self.kv_cache_dtype in KV_CACHE_DTYPES,
             f"--kv-cache-dtype {self.kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES} (auto "
             "keeps the model's dtype; fp8_e4m3, fp8_e5m2 and int8 hold ~2x the tokens, int4 "
             "~3.5x)")
        need(self.attention_backend in ATTENTION_BACKENDS,
             f"--attention-backend {self.attention_backend!r} is not one of {ATTENTION_BACKENDS}")
        need(self.preemption_mode in PREEMPTION_MODES,
             f"--preemption-mode {self.preemption_mode!r} is not one of {PREEMPTION_MODES}")
        need(self.block_size in (8, 16, 32, 64, 128),
             f"--block-size {self.block_size} must be one of 8, 16, 32, 64, 128")
        need(0.0 < self.gpu_memory_utilization <= 1.0,
             f"--gpu-memory-utilization {self.gpu_memory_utilization} must be in (0, 1]")
        need(self.max_model_len is None or self.max_model_len >= 1,
             f"--max-model-len {self.max_model_len} must be a positive number of tokens")
        need(self.max_num_seqs >= 1, f"--max-num-seqs {self.max_num_seqs} must be >= 1")
        need(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
             f"--max-num-batched-tokens {self.max_num_batched_tokens} must be >= 1")
        need(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
             f"--num-gpu-blocks-override {self.num_gpu_blocks_override} must be >= 1")
        need(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
             f"kv_cache_memory_bytes {self.kv_cache_memory_bytes} must be > 0")
        need(self.swap_space >= 0, f"--swap-space {self.swap_space} GiB must be >= 0")
        need(self.num_cpu_blocks_override is None or self.num_cpu_blocks_override >= 1,
             f"--num-cpu-blocks-override {self.num_cpu_blocks_override} must be >= 1")
        need(self.kv_offloading_size >= 0,
             f"--kv-offloading-size {self.kv_offloading_size} GiB must be >= 0 (0 turns it off)")
        need(not self.kv_offloading_size or self.enable_prefix_caching,
             "--kv-offloading-size keeps evicted prefix-cache blocks in host memory: it needs "
             "--enable-prefix-caching")
        need(self.preemption_mode != "swap" or self.swap_space > 0 or self.num_cpu_blocks_override,
             "--preemption-mode swap needs host memory to swap into: set --swap-space (GiB), "
             "e.g. --swap-space 4")
        need(self.kv_sink_tokens >= 0 and self.kv_window >= 0,
             f"--kv-sink-tokens {self.kv_sink_tokens} and --kv-window {self.kv_window} must be "
             ">= 0 (0: off)")
        need(not self.kv_sink_tokens or self.kv_window,
             f"--kv-sink-tokens {self.kv_sink_tokens} needs a window to go with the sinks: set "
             "--kv-window W (the last W tokens are attended besides the sinks)")
        need(not self.kv_window or self.kv_window >= self.block_size,
             f"--kv-window {self.kv_window} must be at least --block-size {self.block_size} "
             "tokens (memory is released in whole blocks): raise --kv-window or lower "
             "--block-size")
        need(self.tensor_parallel_size >= 1,
             f"--tensor-parallel-size {self.tensor_parallel_size} must be >= 1")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; known: {sorted(names)}")
        return cls(**kwargs)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)
                      if hasattr(ns, f.name)})


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """``EngineArgs`` resolved against the model, once: every value a part of the engine (or the
    planner) reads that depends on the model is here, so no two places resolve it differently."""

    args: EngineArgs
    model: "ModelConfig"  # the whole model (per-device shapes: memory_report.per_device_config)
    dtype: str  # the weights' dtype, resolved (models.loader.resolve_dtype)
    quantization: str | None  # "fp8": the linears are float8 (asked for, or the checkpoint's)
    kv_dtype: str  # the cache's: the model's dtype for "auto"; "fp8" is fp8_e4m3
    max_model_len: int
    max_num_batched_tokens: int  # the step's token budget
    # bounded KV (StreamingLLM's sinks + window, or the model's sliding window): 0, 0 is off
    sink_tokens: int = 0
    window: int = 0

    @classmethod
    def resolve(cls, args: EngineArgs, model: "ModelConfig", dtype: str,
                quantization: str | None = None) -> "EngineConfig":
        """``quantization``: the loaded weights' (an FP8 checkpoint is fp8 unasked); None
        takes ``args.quantization``."""
        max_model_len = args.max_model_len or model.max_position_embeddings
        if max_model_len > model.max_position_embeddings:
            raise ValueError(
                f"--max-model-len {max_model_len} is larger than the model's maximum "
                f"({model.max_position_embeddings} positions): lower --max-model-len")
        # vLLM's default budget: 2048 with chunked prefill, else room for a whole prompt
        tokens = args.max_num_batched_tokens or max(
            2048, args.max_num_seqs if args.enable_chunked_prefill else max_model_len)
        if not args.enable_chunked_prefill and tokens < max_model_len:
            raise ValueError(
                f"--max-num-batched-tokens {tokens} is smaller than --max-model-len "
                f"{max_model_len} with chunked prefill off: a long prompt could never be "
                "scheduled; raise it or enable chunked prefill")
        kv_dtype = {"auto": dtype, "fp8": "fp8_e4m3"}.get(args.kv_cache_dtype, args.kv_cache_dtype)
        if kv_dtype == "int4" and model.head_dim % 2:
            raise ValueError(f"--kv-cache-dtype int4 packs two values a byte and needs an even "
                             f"head_dim; this model's is {model.head_dim}: use int8 or fp8")
        sink_tokens, window = resolve_window(args, model)
        return cls(args, model, dtype, quantization or args.quantization, kv_dtype,
                   max_model_len, tokens, sink_tokens, window)

    @property
    def block_size(self) -> int:
        return self.args.block_size

    @property
    def tp(self) -> int:
        return self.args.tensor_parallel_size


def resolve_window(args: EngineArgs, model: "ModelConfig") -> tuple[int, int]:
    """(sink tokens, window) the engine attends with: the flags, or the model's own sliding
    window (no sinks: the model was trained without them) when the flags leave it unset."""
    declared = model.sliding_window or 0
    if not declared:
        return args.kv_sink_tokens, args.kv_window
    if args.kv_sink_tokens or args.kv_window not in (0, declared):
        raise ValueError(
            f"this model attends over a sliding window of {declared} tokens (its config.json); "
            f"--kv-window {args.kv_window} / --kv-sink-tokens {args.kv_sink_tokens} would attend "
            "differently from how it was trained: drop both flags")
    if declared < args.block_size:
        raise ValueError(f"the model's sliding window ({declared} tokens) is smaller than "
                         f"--block-size {args.block_size}: lower --block-size")
    return 0, declared


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """vLLM's flags, same names and defaults."""
    d = EngineArgs()
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="HF folder or hub id, a .gguf file, or a shipped config name with "
                        "--load-format dummy (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--dtype", default=d.dtype, choices=DTYPES)
    g.add_argument("--load-format", default=d.load_format, choices=LOAD_FORMATS)
    g.add_argument("--quantization", "-q", default=d.quantization, choices=QUANTIZATIONS,
                   help="fp8: linear weights quantised to float8_e4m3 at load with a scale per "
                        "output channel, activations per token: half the weight bytes, FP8 "
                        "matmuls on Hopper (default: the checkpoint's own weights; an FP8 "
                        "checkpoint is read as fp8 either way)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=d.block_size)
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    g.add_argument("--num-gpu-blocks-override", type=int, default=None)
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="explicit KV pool budget in bytes (default on the CPU: 1 GiB)")
    g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=KV_CACHE_DTYPES,
                   help="KV cache storage: auto (the model's dtype) or 1 byte per value: fp8 "
                        "(= fp8_e4m3) / fp8_e5m2 with static per-layer, per-KV-head scales "
                        "derived from the weights (2x the tokens), int8 with a bf16 scale per "
                        "token and KV head; or int4, two values a byte, K scaled per channel "
                        "within a block and V per token (3.5x the tokens)")
    g.add_argument("--kv-sink-tokens", type=int, default=d.kv_sink_tokens, metavar="S",
                   help="with --kv-window: always attend to the first S tokens (StreamingLLM's "
                        "attention sinks); their ceil(S / block_size) blocks stay")
    g.add_argument("--kv-window", type=int, default=d.kv_window, metavar="W",
                   help="attend to the sink tokens and the last W tokens only (RoPE positions "
                        "unchanged); blocks that leave the window are freed, so a sequence holds "
                        "at most ceil(S / block_size) + ceil(W / block_size) + 1 blocks however "
                        "long it runs (default 0: full attention, or the model's sliding window)")
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--preemption-mode", default=d.preemption_mode, choices=PREEMPTION_MODES)
    g.add_argument("--swap-space", type=float, default=d.swap_space,
                   help="GiB of host memory for KV blocks swapped out (--preemption-mode swap)")
    g.add_argument("--num-cpu-blocks-override", type=int, default=None,
                   help="host KV tier size in KV blocks (overrides --swap-space and "
                        "--kv-offloading-size)")
    g.add_argument("--kv-offloading-size", type=float, default=d.kv_offloading_size,
                   help="GiB of host memory that keeps the prefix-cache blocks evicted from the "
                        "GPU, found again by their hash and copied back instead of recomputed "
                        "(needs --enable-prefix-caching; 0: off). One host tier with "
                        "--swap-space: the tier holds both, and a swapped-out sequence may take "
                        "the room of cached blocks, least recently used first")
    g.add_argument("--attention-backend", default=d.attention_backend, choices=ATTENTION_BACKENDS)
    g.add_argument("--enable-prefix-caching", action="store_true",
                   help="reuse the KV blocks of prompt prefixes seen before")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                   default=d.async_scheduling,
                   help="prepare and dispatch the next step while the device runs this one "
                        "(--no-async-scheduling: one step at a time)")
    g.add_argument("--precompile", action=argparse.BooleanOptionalAction, default=d.precompile,
                   help="compile every step shape at start-up, so that no request waits for a "
                        "compile (default: on with the Pallas kernels on a GPU or TPU, off on "
                        "the CPU and with --attention-backend reference)")
    g.add_argument("--compilation-cache", action=argparse.BooleanOptionalAction,
                   default=d.compilation_cache,
                   help="keep compiled step programs on disk, so the next start loads them "
                        "instead of compiling (default: on with a GPU or TPU, off on the CPU)")
    g.add_argument("--compilation-cache-dir", default=None,
                   help="where (default $PAGEDJAX_CACHE_DIR, else ~/.cache/pagedjax/jax)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size)
    from pagedjax.worker.distributed import add_distributed_arguments

    add_distributed_arguments(parser)
