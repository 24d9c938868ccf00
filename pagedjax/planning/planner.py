"""``pagedjax plan``: how many sequences of which length fit, from the code that sizes the pool.

    pagedjax plan --model Qwen2.5-7B-Instruct --gpu-memory 80GiB
    pagedjax plan --model ./Qwen2.5-7B-Instruct --gpu-memory 24GiB --requests log.jsonl --json

The model's shape comes from its config alone (:mod:`pagedjax.planning.model_source`: no weights
are read). The arithmetic is :mod:`pagedjax.planning.memory_report`, the same the engine's
start-up uses; :mod:`pagedjax.planning.render` prints the report as tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from pagedjax.config import EngineArgs, EngineConfig, add_engine_arguments
from pagedjax.models.loader import resolve_dtype
from pagedjax.planning import memory_report as mr, request_log
from pagedjax.planning.model_source import LazyTokenizer, ResolvedModel, resolve_model
from pagedjax.planning.render import render
from pagedjax.worker.kv_pool import GiB, KVPoolSpec

CONTEXT_LENGTHS = (2048, 4096, 8192, 16384, 32768)


def device_memory_bytes(gpu_memory_utilization: float) -> int:
    """The first JAX device's memory, as the engine reads it (its total on a GPU:
    :func:`pagedjax.worker.device_memory.device_bytes`). JAX is told not to preallocate, so that
    planning on a busy GPU takes nothing from the server running there."""
    from pagedjax.worker import device_memory

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    device_memory.configure_allocator(gpu_memory_utilization)
    import jax

    d = jax.devices()[0]
    total = device_memory.device_bytes(d)
    if total is None:
        raise ValueError(f"--device: the first JAX device is a {d.platform}, which has no "
                         "device memory to read; give the device's memory with --gpu-memory, "
                         "e.g. --gpu-memory 80GiB")
    return total


def _size_arg(text: str) -> int:
    try:
        return mr.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# A nominal card size -> (the card, the total it reports to CUDA, which the engine sizes the KV
# pool from). Measured on the lent cards: benchmarks/results/<device>/capacity.json,
# "device_memory_gib".
NOMINAL_CARDS = {80 * GiB: ("an H100 80GB HBM3", 81080 << 20)}


def reported_total(size: int) -> tuple[int, str]:
    """The device total the engine would size from, for ``--gpu-memory size``, and a note: a
    card's nominal size (NOMINAL_CARDS) becomes what that card reports to CUDA; any other size is
    taken as the reported total."""
    if size in NOMINAL_CARDS:
        card, total = NOMINAL_CARDS[size]
        return total, (f"--gpu-memory {size / GiB:g}GiB: planned as {card}, which reports "
                       f"{total / GiB:.2f} GiB to CUDA, the total the engine sizes from (give an "
                       "exact size such as 81000MiB to plan for another total)")
    return size, ("--gpu-memory is the device's total memory as CUDA reports it, a little less "
                  "than a card's nominal size")


def _device_total(args: argparse.Namespace, gpu_memory_utilization: float
                  ) -> tuple[int | None, str | None]:
    """The device total to plan for (--device, --gpu-memory or none) and a note on it."""
    if args.device:
        total = device_memory_bytes(gpu_memory_utilization)
        return total, (f"--device read {total / GiB:.2f} GiB: the device's total memory, which "
                       "the engine takes --gpu-memory-utilization of")
    if args.gpu_memory is None:
        return None, None
    size = args.gpu_memory
    return reported_total(mr.parse_size(size) if isinstance(size, str) else size)


def _kv_dtype_note(shape: KVPoolSpec) -> str:
    """What a quantized cache stores per token, against bf16's bytes."""
    bs, h = shape.block_size, shape.head_dim
    if shape.int4:
        per_token_head = shape.bytes_per_block // (bs * shape.num_layers * shape.num_kv_heads)
        return (f"KV cache int4: half a byte per value, a bf16 scale per token and KV head for V, "
                f"an fp8 scale and zero point per channel of each {bs}-token block for K "
                f"({per_token_head} B of K and V per token and KV head against {4 * h} in bf16)")
    if shape.token_scales:
        return (f"KV cache {shape.dtype}: 1 byte per value plus a bf16 scale per token and KV "
                f"head ({shape.row_bytes} B per {h} values; {2 * h} in bf16)")
    return (f"KV cache {shape.dtype}: 1 byte per value, static power-of-two scales per layer and "
            "KV head from the weights (pagedjax/models/kv_scales.py)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    g = parser.add_argument_group("plan")
    mem = g.add_mutually_exclusive_group()
    mem.add_argument("--gpu-memory", type=_size_arg, default=None, metavar="SIZE",
                     help="memory of one device, e.g. 80GiB, 24GB, 81920MiB")
    mem.add_argument("--device", action="store_true",
                     help="read the first JAX device's memory limit instead")
    g.add_argument("--target-concurrency", type=int, default=None, metavar="C",
                   help="report the smallest device memory for C sequences of --max-model-len "
                        "tokens (default: the model's maximum)")
    g.add_argument("--requests", default=None, metavar="LOG.jsonl",
                   help="a request log, one JSON object per line: OpenAI completion or chat "
                        'bodies (text needs a tokenizer), or {"prompt_tokens": N, '
                        '"max_tokens": M} / an OpenAI response with "usage" (no tokenizer)')
    g.add_argument("--max-tokens", type=int, default=512,
                   help="new tokens to budget per request for --requests (default 512)")
    g.add_argument("--json", action="store_true", help="print JSON instead of tables")


def plan(args: argparse.Namespace) -> dict:
    """The whole report as a dict (what ``--json`` prints)."""
    if not args.model:
        raise ValueError("--model is required: a shipped config name, an HF folder or "
                         "config.json, a .gguf file, or a hub id")
    res = resolve_model(args.model)
    cfg = res.cfg
    eargs = EngineArgs.from_namespace(args)
    for flag, v in (("--target-concurrency", args.target_concurrency),
                    ("--max-tokens", args.max_tokens)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} {v} must be >= 1")
    # the planner plans for an accelerator: "auto" is what the loader picks on one
    config = EngineConfig.resolve(eargs, cfg, resolve_dtype(args.dtype, platform="gpu"),
                                  res.quantization)
    dtype, kv_dtype, tp, max_len = config.dtype, config.kv_dtype, config.tp, config.max_model_len
    dev = mr.per_device_config(cfg, tp)
    model_max = cfg.max_position_embeddings
    total, memory_note = _device_total(args, eargs.gpu_memory_utilization)
    notes = [n for n in (res.note, memory_note) if n]
    weights = mr.weights_bytes(cfg, dtype, tp, config.quantization)
    tokens = config.max_num_batched_tokens
    peak = mr.profile_peak_bytes_estimate(dev, tokens, dtype, eargs.max_num_seqs,
                                          config.kv_dtype, config.block_size)
    shape = mr.plan_pool(config)
    notes.append(f"profiling peak is an estimate (profile_peak_bytes_estimate at {tokens} batched "
                 "tokens), the same the engine sizes its pool with")
    if tp > cfg.num_key_value_heads:
        notes.append(f"--tensor-parallel-size {tp} > {cfg.num_key_value_heads} KV heads: each KV "
                     f"head is replicated on {tp // cfg.num_key_value_heads} devices, so each "
                     "device stores 1 KV head and the KV cache does not shrink further")
    if shape.quantized:
        notes.append(_kv_dtype_note(shape))
    if config.window:
        notes.append(f"KV window: {config.sink_tokens} sink tokens + the last {config.window} "
                     f"attended, so a sequence holds at most {shape.seq_blocks(model_max)} blocks "
                     "however long it is (KV/seq and concurrency below count that bound)")
    if res.gguf_tensor_bytes is not None:
        notes.append(f"weights are the dequantised size at {dtype} (what the engine holds); the "
                     f"GGUF file stores {res.gguf_tensor_bytes / GiB:.2f} GiB of tensors")
    report = {
        "model": {"name": cfg.name, "source": res.source, "kind": res.kind, "family": cfg.family,
                  "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                  "attention_heads": cfg.num_attention_heads,
                  "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
                  "vocab_size": cfg.vocab_size, "max_position_embeddings": model_max,
                  "params": cfg.num_params()},
        "dtype": dtype, "quantization": config.quantization, "kv_cache_dtype": kv_dtype,
        "block_size": config.block_size, "kv_sink_tokens": config.sink_tokens,
        "kv_window": config.window,
        "tensor_parallel_size": tp, "kv_heads_per_device": dev.num_key_value_heads,
        "kv_heads_replicated": tp > cfg.num_key_value_heads,
        "weights_bytes_per_device": weights,
        "weights_bytes_total": mr.weights_bytes(cfg, dtype, 1, config.quantization),
        "gguf_stored_tensor_bytes": res.gguf_tensor_bytes,
        "profile_peak_bytes_estimate": peak, "max_num_batched_tokens": tokens,
        "kv_bytes_per_token": shape.bytes_per_token,
        "block_bytes": shape.bytes_per_block, "memory": None, "concurrency": [], "target": None,
        "requests": None, "notes": notes, "host_tier": host_tier(eargs, shape, tp),
    }
    spec = None
    if total is not None or eargs.kv_cache_memory_bytes or eargs.num_gpu_blocks_override:
        report["memory"] = mr.memory_report(config, total_bytes=total)
        spec = dataclasses.replace(shape, num_blocks=report["memory"]["num_blocks"])
    else:
        notes.append("no device memory given: pass --gpu-memory SIZE (or --device on a GPU) "
                     "for the pool size and concurrency")
    lengths = sorted({n for n in CONTEXT_LENGTHS if n < model_max} | {model_max, max_len})
    for n in lengths:
        report["concurrency"].append({
            "max_model_len": n, "model_max": n == model_max,
            "blocks_per_seq": shape.seq_blocks(n),
            "kv_bytes_per_seq": shape.bytes_for(n),
            "max_concurrency": None if spec is None else spec.max_concurrency(n),
            "concurrency_ratio": None if spec is None else spec.num_blocks / shape.seq_blocks(n)})
    if spec is not None and spec.max_concurrency(max_len) == 0:
        notes.append(f"the pool ({spec.num_tokens} tokens) cannot hold one sequence of "
                     f"max_model_len {max_len}: the engine would refuse to start; lower "
                     "--max-model-len or give it more memory")
    if args.target_concurrency:
        need = mr.min_device_bytes(config, args.target_concurrency, weights, peak)
        report["target"] = {"concurrency": args.target_concurrency, "max_model_len": max_len,
                            "min_device_memory_bytes": need,
                            "min_device_memory_gib": need / GiB,
                            "gpu_memory_utilization": eargs.gpu_memory_utilization}
    if args.requests:
        report["requests"] = _requests(args, res, shape, model_max, spec)
    if report["host_tier"] is not None and spec is not None:
        report["host_tier"]["gpu_pool_ratio"] = report["host_tier"]["blocks"] / spec.num_blocks
    return report


def host_tier(eargs: EngineArgs, shape: KVPoolSpec, tp: int) -> dict | None:
    """The host KV tier (pagedjax.worker.swap.make_swap_space's arithmetic): one pool of
    --swap-space (with --preemption-mode swap) + --kv-offloading-size GiB counted in one device's
    blocks; each device's shard of a block is kept, so the host holds tp times that."""
    swap = eargs.swap_space if eargs.preemption_mode == "swap" else 0.0
    gib = swap + eargs.kv_offloading_size
    if not gib:
        return None
    blocks = eargs.num_cpu_blocks_override or int(gib * GiB // shape.bytes_per_block)
    return {"swap_space_gib": swap, "kv_offloading_size_gib": eargs.kv_offloading_size,
            "blocks": blocks, "tokens": blocks * shape.block_size,
            "host_bytes": blocks * shape.bytes_per_block * tp, "gpu_pool_ratio": None}


def _requests(args, res: ResolvedModel, shape: KVPoolSpec, model_max: int,
              spec: KVPoolSpec | None) -> dict:
    if args.tokenizer:
        t = Path(args.tokenizer)
        tok_src = (str(t.parent), t.name) if t.suffix == ".gguf" else (args.tokenizer, None)
    else:
        tok_src = res.tokenizer
    tokenizer = LazyTokenizer(tok_src, res.kind, res.source)
    prompts, errors = request_log.read_request_log(args.requests, tokenizer)
    out = request_log.summarize(prompts, errors, max_tokens=args.max_tokens,
                                spec=shape, model_max_len=model_max)
    out["log"] = str(args.requests)
    rec = out["recommended_max_model_len"]
    out["max_concurrency"] = None if spec is None else spec.max_concurrency(rec)
    out["max_concurrency_at_model_max"] = (None if spec is None
                                           else spec.max_concurrency(model_max))
    return out


def run(args: argparse.Namespace) -> None:
    try:
        report = plan(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"pagedjax plan: error: {e}") from None
    print(json.dumps(report, indent=2) if args.json else render(report))

