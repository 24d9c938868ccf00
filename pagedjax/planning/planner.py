"""``pagedjax plan``: how many sequences of which length fit, from the code that sizes the pool.

    pagedjax plan --model Qwen2.5-7B-Instruct --gpu-memory 80GiB
    pagedjax plan --model ./Qwen2.5-7B-Instruct --gpu-memory 24GiB --requests log.jsonl --json

The model's shape comes from its config alone (no weights are read): a shipped config name
(``models/configs/<name>.json``), a Hugging Face folder or ``config.json``, a ``.gguf`` file (its
metadata) or a hub id (its ``config.json`` from the hub). The arithmetic is
:mod:`pagedjax.planning.memory_report`, the same the engine's start-up uses.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import socket
import urllib.parse
from pathlib import Path

from pagedjax.planning import memory_report as mr, request_log
from pagedjax.config import EngineArgs, EngineConfig, add_engine_arguments
from pagedjax.worker.kv_pool import GiB, KVPoolSpec
from pagedjax.models import ModelConfig
from pagedjax.models.loader import resolve_dtype

CONTEXT_LENGTHS = (2048, 4096, 8192, 16384, 32768)


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    cfg: ModelConfig
    kind: str  # "shipped config", "HF folder", "config.json", "GGUF", "hub"
    source: str
    tokenizer: tuple[str, str | None] | None = None  # (folder or hub id, gguf file name)
    gguf_tensor_bytes: int | None = None  # tensors as stored in the file (quantised)
    note: str | None = None  # how the name was resolved, when it is not the obvious way
    quantization: str | None = None  # "fp8": an FP8 checkpoint (models/fp8_checkpoint.py)


_VARIANT_WORDS = {"chat", "instruct", "it", "hf"}


def _base_name(name: str) -> str:
    """``meta-llama/Llama-2-70b-chat-hf`` -> ``llama-2-70b``: the org and variant words dropped."""
    words = re.split(r"[-_]", name.rsplit("/", 1)[-1].lower())
    return "-".join(w for w in words if w not in _VARIANT_WORDS)


def same_shape_config(model: str) -> Path | None:
    """The shipped config of the same model without its chat/instruct suffix, if exactly one."""
    from pagedjax.models import dummy

    found = [p for stem, p in dummy.shipped_configs().items()
             if _base_name(stem) == _base_name(model)]
    return found[0] if len(found) == 1 else None


def _from_json(path: Path, kind: str, name: str, tokenizer=None) -> ResolvedModel:
    from pagedjax.models.fp8_checkpoint import checkpoint_quantization

    cfg = ModelConfig.from_json(path)
    quantization = checkpoint_quantization(json.loads(path.read_text()), str(path))
    return ResolvedModel(dataclasses.replace(cfg, name=cfg.name or name), kind, str(path),
                         tokenizer, quantization=quantization)


def _from_gguf(path: Path) -> ResolvedModel:
    """The loader's own GGUF metadata reading; no tensor is dequantised."""
    from gguf import GGUFReader

    from pagedjax.models import gguf_loader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
    cfg = gguf_loader.read_config(reader, path)
    stored = sum(int(t.n_bytes) for t in reader.tensors)
    return ResolvedModel(cfg, "GGUF", str(path), (str(path.parent), path.name), stored)


def _hub_reachable() -> None:
    """Raise OSError at once when the hub cannot be reached, instead of huggingface_hub's retries
    (half a minute offline). Behind a proxy the proxy decides: no direct probe then."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise OSError("HF_HUB_OFFLINE is set and it is not in the local cache")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    url = urllib.parse.urlparse(constants.ENDPOINT)
    socket.create_connection((url.hostname, url.port or 443), timeout=5).close()


def _offline_first(load):
    """``load(local_files_only)``: the local Hugging Face cache first, then the hub if it can be
    reached, with huggingface_hub's retry warnings silenced (the final error is reported once)."""
    from huggingface_hub.utils import logging as hf_logging

    try:
        return load(True)
    except Exception:
        pass
    _hub_reachable()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load(False)
    finally:
        hf_logging.set_verbosity(level)


def _hub_config_path(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(_offline_first(  # the config only, never the weights
        lambda local: hf_hub_download(repo_id, "config.json", local_files_only=local)))


def resolve_model(model: str) -> ResolvedModel:
    """A model's config without its weights: a local path, a shipped config name (a hub id whose
    name is shipped counts: no network needed), or a hub id."""
    from pagedjax.models import dummy

    path = Path(model).expanduser()
    hub_like = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {model}: the folder has no config.json")
        return _from_json(path / "config.json", "HF folder", path.name, (str(path), None))
    if path.is_file():
        if path.suffix == ".gguf":
            return _from_gguf(path)
        return _from_json(path, "config.json", path.parent.name)
    shipped = dummy.shipped_config_path(model)
    if shipped is not None:
        return _from_json(shipped, "shipped config", shipped.stem,
                          (model, None) if hub_like else None)
    shipped = same_shape_config(model)
    if shipped is not None:
        res = _from_json(shipped, "shipped config", shipped.stem,
                         (model, None) if hub_like else None)
        note = (f"--model {model}: not shipped by that name; using the shipped config "
                f"{shipped.stem}, the same model without its chat/instruct suffix (fine-tunes "
                "keep their base's shape), offline. Pass a config.json for another shape.")
        return dataclasses.replace(res, note=note)
    names = ", ".join(sorted(dummy.shipped_configs())) or "none"
    if not hub_like or model.endswith((".gguf", ".json")):
        raise ValueError(f"--model {model!r}: unknown model: no such file or folder and not a "
                         f"shipped config (shipped: {names}); give an HF folder, a config.json, "
                         "a .gguf file, a shipped config name or a hub id like Qwen/Qwen2.5-7B")
    try:
        cfg_path = _hub_config_path(model)
    except Exception as e:  # offline, gated, misspelt: all end here
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"--model {model!r}: not a local path or a shipped config, and its config.json could "
            f"not be fetched from the Hugging Face hub ({type(e).__name__}: {first}). Check the "
            f"name and the network, or pass a local folder, a .gguf file or a shipped config "
            f"name ({names})") from None
    return dataclasses.replace(_from_json(cfg_path, "hub", model, (model, None)), source=model)


def load_tokenizer(source: str, gguf_file: str | None = None):
    """The loaders' tokenizer loading, with an error instead of None; a hub id's from the local
    cache first, and the hub only if it can be reached."""
    from pagedjax.models import gguf_loader, hf

    if gguf_file:
        tok = gguf_loader.load_gguf_tokenizer(Path(source) / gguf_file)
    elif Path(source).expanduser().exists():
        tok = hf.load_tokenizer(source)
    else:
        from transformers import AutoTokenizer

        try:
            tok = _offline_first(lambda local: AutoTokenizer.from_pretrained(
                source, trust_remote_code=False, local_files_only=local))
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise ValueError(f"could not load a tokenizer for {source!r} from the local cache or "
                             f"the hub ({type(e).__name__}: {first}): pass --tokenizer with a "
                             'folder or .gguf, or log token counts ("prompt_tokens": N)') from None
    if tok is None:
        raise ValueError(f"could not load a tokenizer from {source!r}"
                         f"{f' (gguf_file={gguf_file!r})' if gguf_file else ''}: pass --tokenizer "
                         "with a tokenizer folder or hub id")
    return tok


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
    total = mr.parse_size(args.gpu_memory) if isinstance(args.gpu_memory, str) else args.gpu_memory
    notes = [res.note] if res.note else []
    if args.device:
        total = device_memory_bytes(eargs.gpu_memory_utilization)
        notes.append(f"--device read {total / GiB:.2f} GiB: the device's total memory, which "
                     "the engine takes --gpu-memory-utilization of")
    elif total is not None:
        total, note = reported_total(total)
        notes.append(note)
    weights = mr.weights_bytes(cfg, dtype, tp, config.quantization)
    tokens = config.max_num_batched_tokens
    peak = mr.profile_peak_bytes_estimate(dev, tokens, dtype, eargs.max_num_seqs)
    bs, shape = config.block_size, mr.plan_pool(config)
    notes += [f"profiling peak is an estimate (profile_peak_bytes_estimate at {tokens} batched "
             "tokens), the same the engine sizes its pool with"]
    if tp > cfg.num_key_value_heads:
        notes.append(f"--tensor-parallel-size {tp} > {cfg.num_key_value_heads} KV heads: each KV "
                     f"head is replicated on {tp // cfg.num_key_value_heads} devices, so each "
                     "device stores 1 KV head and the KV cache does not shrink further")
    if shape.int4:
        notes.append(f"KV cache int4: half a byte per value, a bf16 scale per token and KV head "
                     f"for V, an fp8 scale and zero point per channel of each {bs}-token block "
                     f"for K "
                     f"({shape.bytes_per_block // (bs * shape.num_layers * shape.num_kv_heads)} "
                     f"B of K and V per token and KV head against {4 * cfg.head_dim} in bf16)")
    elif shape.token_scales:
        notes.append(f"KV cache {kv_dtype}: 1 byte per value plus a bf16 scale per token and KV "
                     f"head ({shape.row_bytes} B per {cfg.head_dim} "
                     f"values; {2 * cfg.head_dim} in bf16)")
    elif shape.quantized:
        notes.append(f"KV cache {kv_dtype}: 1 byte per value, static power-of-two scales per "
                     "layer and KV head from the weights (models/kv_scales.py)")
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
        "block_size": bs, "kv_sink_tokens": config.sink_tokens, "kv_window": config.window,
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


class _LazyTokenizer:
    """Loaded when a line needs one (text prompts, chat messages); token counts need none."""

    def __init__(self, source: tuple[str, str | None] | None, kind: str, model: str):
        self.source, self.what, self._tok, self._error = source, f"{kind} {model!r}", None, None

    def __getattr__(self, name):
        if self._tok is None:
            if self._error is None:  # tried once: a failure is the answer for every line
                try:
                    if self.source is None:
                        raise ValueError(
                            f"a text prompt needs a tokenizer and {self.what} has none: pass "
                            "--tokenizer (a folder, hub id or .gguf), or log token counts "
                            '("prompt_tokens": N) instead of text')
                    self._tok = load_tokenizer(*self.source)
                except ValueError as e:
                    self._error = str(e)
            if self._error is not None:
                raise ValueError(self._error)
        return getattr(self._tok, name)


def _requests(args, res: ResolvedModel, shape: KVPoolSpec, model_max: int,
              spec: KVPoolSpec | None) -> dict:
    if args.tokenizer:
        t = Path(args.tokenizer)
        tok_src = (str(t.parent), t.name) if t.suffix == ".gguf" else (args.tokenizer, None)
    else:
        tok_src = res.tokenizer
    tokenizer = _LazyTokenizer(tok_src, res.kind, res.source)
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


def _gib(b) -> str:
    return f"{b / GiB:.2f}"


def render(r: dict) -> str:
    """The human tables."""
    m = r["model"]
    out = [f"{m['name'] or m['source']}  ({m['kind']}: {m['source']})",
           f"  {m['family']}, {m['params'] / 1e9:.2f} B params, {m['layers']} layers, "
           f"{m['attention_heads']} query / {m['kv_heads']} KV heads x {m['head_dim']}, vocab "
           f"{m['vocab_size']:,}, max {m['max_position_embeddings']:,} positions",
           f"  dtype {r['dtype']}{', fp8 linears' if r['quantization'] else ''}, KV cache "
           f"{r['kv_cache_dtype']}, block size {r['block_size']}, "
           f"tensor parallel {r['tensor_parallel_size']} ({r['kv_heads_per_device']} KV heads "
           f"per device{', replicated' if r['kv_heads_replicated'] else ''})", ""]
    mem = r["memory"]
    if mem is None:
        out += [f"weights per device       {_gib(r['weights_bytes_per_device']):>8} GiB",
                f"profiling peak (est.)    {_gib(r['profile_peak_bytes_estimate']):>8} GiB"]
    else:
        rows = []
        if mem["device_memory_gib"] is not None:
            rows += [("device memory", mem["device_memory_gib"]),
                     (f"usable (x {mem['gpu_memory_utilization']})",
                      mem["device_memory_gib"] * mem["gpu_memory_utilization"])]
        rows += [("weights", mem["weights_gib"]),
                 (f"profiling peak ({mem['profile_peak_source']})", mem["profile_peak_gib"]),
                 (f"KV pool ({mem['kv_budget_source']})", mem["kv_pool_gib"])]
        if mem["free_gib"] is not None:
            rows.append(("free", mem["free_gib"]))
        out.append("memory per device                          GiB")
        out += [f"  {name:<38}{v:>8.2f}" for name, v in rows]
    kv = r["kv_bytes_per_token"]
    out += ["", f"KV cache: {kv:,} B per token ({kv / 1024:.1f} KiB) per device, "
                f"{r['block_bytes']:,} B per block of {r['block_size']}"]
    if mem is not None:
        out.append(f"KV pool: {mem['num_blocks']:,} blocks x {mem['block_size']} = "
                   f"{mem['num_tokens']:,} tokens")
    out += ["", "max_model_len      KV/seq GiB   blocks/seq   max concurrency"]
    for row in r["concurrency"]:
        conc = "-" if row["max_concurrency"] is None else (
            f"{row['max_concurrency']:,} ({row['concurrency_ratio']:.2f}x)")
        tag = " (model max)" if row["model_max"] else ""
        out.append(f"  {row['max_model_len']:>7,}{tag:<12}{_gib(row['kv_bytes_per_seq']):>8}"
                   f"{row['blocks_per_seq']:>13,}   {conc}")
    t = r["target"]
    if t:
        out += ["", f"smallest device memory for {t['concurrency']} x {t['max_model_len']:,}-token "
                    f"sequences: {t['min_device_memory_gib']:.2f} GiB per device "
                    f"(at --gpu-memory-utilization {t['gpu_memory_utilization']})"]
    h = r.get("host_tier")
    if h:
        ratio = "" if h["gpu_pool_ratio"] is None else f", {h['gpu_pool_ratio']:.1f}x the KV pool"
        out += ["", f"host KV tier: {h['blocks']:,} blocks x {r['block_size']} = {h['tokens']:,} "
                    f"tokens{ratio} ({_gib(h['host_bytes'])} GiB of host memory; --swap-space "
                    f"{h['swap_space_gib']:g} + --kv-offloading-size "
                    f"{h['kv_offloading_size_gib']:g} GiB, one pool: prefix blocks evicted from "
                    "the GPU come back from it)"]
    if r["requests"]:
        out += ["", *_render_requests(r["requests"])]
    out += ["", *(f"note: {n}" for n in r["notes"])]
    return "\n".join(out)


def _render_requests(q: dict) -> list[str]:
    p = q["prompt_tokens"]
    out = [f"request log {q['log']}: {q['requests']:,} prompts"
           + (f", {len(q['malformed_lines'])} malformed line"
              f"{'s' if len(q['malformed_lines']) > 1 else ''}" if q["malformed_lines"] else ""),
           f"  prompt tokens  P50 {p['p50']:,}  P95 {p['p95']:,}  P99 {p['p99']:,}  "
           f"max {p['max']:,}  mean {p['mean']:.1f}",
           f"  recommended --max-model-len {q['recommended_max_model_len']:,} "
           f"(P99 prompt + --max-tokens {q['max_tokens']}, rounded up to the block size"
           + (", capped at the model's maximum)" if q["capped_at_model_max"] else ")"),
           f"  rejects {q['rejected']:,} of {q['requests']:,} prompts "
           f"({100 * q['rejected_share']:.1f}%: prompt + max_tokens > max_model_len)"]
    if q["max_concurrency"] is not None:
        out.append(f"  max concurrency {q['max_concurrency']:,} at that length "
                   f"(vs {q['max_concurrency_at_model_max']:,} at the model's maximum)")
    a = q["requested_max_tokens"]
    if a:
        out.append(f"  max_tokens asked by {a['requests']:,} requests: P50 {a['p50']:,}, "
                   f"P99 {a['p99']:,}, max {a['max']:,}")
    if q["by_user_turns"]:
        out.append("  user turns   requests   mean prompt   growth   P99")
        for t in q["by_user_turns"]:
            g = "" if t["growth_vs_previous"] is None else f"{t['growth_vs_previous']:+.0f}"
            out.append(f"  {t['user_turns']:>10}{t['requests']:>11,}{t['mean']:>14.1f}{g:>9}"
                       f"{t['p99']:>6,}")
    for e in q["malformed_lines"][:10]:
        out.append(f"  line {e['line']}: {e['error']}")
    if len(q["malformed_lines"]) > 10:
        out.append(f"  ... and {len(q['malformed_lines']) - 10} more malformed lines (see --json)")
    return out
