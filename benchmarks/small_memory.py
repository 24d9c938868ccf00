"""small-memory: seed 002's question, measured: a 7B model's 32K-token context in a 24 GiB card.

LLaMA-2-7B-32K (Llama-2-7B shapes: 32 layers x 32 KV heads x 128, 512 KiB of bf16 KV a token; 32K
positions by linear rope scaling; dummy bf16 weights, 12.6 GiB) runs one prompt of
``--prompt-len`` tokens (32,256 by default) + ``--new-tokens`` (512: the model's whole 32,768
positions) under a simulated ``--budget-gib`` card (``XLA_PYTHON_CLIENT_MEM_FRACTION`` for JAX,
``set_per_process_memory_fraction`` for torch), once per KV configuration, each in its own process
(``benchmarks/native_jax.py``, case ``a``): bf16, fp8, int8 and int4 pages, and bf16 pages keeping
only ``--sink-tokens`` + ``--window`` tokens (StreamingLLM's sinks + window; 64 + 8,192 by
default). For each: did it complete, the KV pool's size in tokens, peak device memory, time to
first token and decode tok/s after it. Then transformers (sdpa, bf16) in the same budget: its
completion or OOM, and its speed when it runs.

Summary: ``seed002_fits`` (the configurations that completed), ``compilations_after_warmup``, and
per configuration its pool tokens, peak GiB, TTFT and decode tok/s. On a machine without a GPU everything runs on the CPU
with no budget (``--tiny --quick``): the plumbing, not the memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from benchmarks import harness, plots
from benchmarks.common import print_table, results_dir, write_result
from benchmarks.native_vs_paged import GiB, Children

# name -> EngineArgs fields on top of the command line's
CONFIGS = {"bf16": {"kv_cache_dtype": "auto"}, "fp8": {"kv_cache_dtype": "fp8"},
           "int8": {"kv_cache_dtype": "int8"}, "int4": {"kv_cache_dtype": "int4"},
           "window": {"kv_cache_dtype": "auto", "kv_sink_tokens": None, "kv_window": None}}
COLUMNS = ["config", "status", "pool_tokens", "peak_gib", "ttft_s", "decode_tok_s", "note"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    harness.add_engine_arguments(p)
    p.set_defaults(model="LLaMA-2-7B-32K", load_format="dummy", gpu_memory_utilization=0.95)
    p.add_argument("--budget-gib", type=float, default=24.0, help="the simulated card (GPU only)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 32256 (--quick 48)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 512 (--quick 8)")
    p.add_argument("--sink-tokens", type=int, default=64, help="the window configuration's sinks")
    p.add_argument("--window", type=int, default=8192, help="the window configuration's window")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"a subset of {list(CONFIGS)}")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--skip-hf", action="store_true", help="pagedjax side only")
    p.add_argument("--child-timeout", type=float, default=None, help="seconds per process")


def _engine(args, name: str) -> dict:
    """The configuration's EngineArgs as a dict."""
    extra = dict(CONFIGS[name])
    if name == "window":
        extra.update(kv_sink_tokens=args.sink_tokens, kv_window=args.window)
    return {**dataclasses.asdict(harness.engine_args(args)), **extra,
            "max_model_len": args.prompt_len + args.new_tokens}


def run(args) -> dict:
    if args.quick:
        args.prompt_len = args.prompt_len or 48
        args.new_tokens = args.new_tokens or 8
        args.sink_tokens, args.window = min(args.sink_tokens, 16), min(args.window, 32)
    args.prompt_len = args.prompt_len or 32256
    args.new_tokens = args.new_tokens or 512
    ch = Children(args)
    budget, total = ch.budget, ch.total
    case = {"a": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens}}
    results: dict = {}
    hf: dict = {"skipped": True, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="small-memory-") as tmp:
        for name in args.configs.split(","):
            results[name] = ch.paged(_engine(args, name), case, args.child_timeout, Path(tmp))
            _write(args, budget, total, results, hf)
        if not args.skip_hf:
            hf = ch.hf(case, "sdpa", None, args.child_timeout, Path(tmp))
    summary, rows = _write(args, budget, total, results, hf)
    print_table(rows, COLUMNS)
    print("  ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, dict)))
    _plot(results_dir(args.out) / "small-memory.png", rows, args)
    return summary


def _row(name: str, res: dict) -> dict:
    a = res.get("cases", {}).get("a", {})
    if not a and res.get("stderr_tail"):  # the process died before the case: its last line
        a = {"error": res["stderr_tail"][-1]}
    peak = a.get("peak_bytes_in_use")
    return {"config": name, "status": a.get("status", f"exit {res.get('exit')}"),
            "pool_tokens": (res.get("pool") or {}).get("tokens"),
            "peak_gib": peak / GiB if peak else None, "ttft_s": a.get("ttft_s"),
            "decode_tok_s": a.get("decode_tok_s"), "note": (a.get("error") or "")[:80]}


def _hf_row(hf: dict) -> dict | None:
    a = hf.get("cases", {}).get("a")
    if not a and hf.get("stderr_tail"):  # transformers died before the case
        return {"config": "transformers sdpa bf16", "status": f"exit {hf.get('exit')}",
                "note": hf["stderr_tail"][-1][:80]}
    if not a:
        return None
    decode = None
    if a.get("status") == "completed" and a.get("ttft_s") is not None:
        decode = (a["new_tokens"] - 1) / (a["elapsed_s"] - a["ttft_s"])
    peak = a.get("peak_allocated_bytes")
    return {"config": "transformers sdpa bf16", "status": a["status"],
            "peak_gib": peak / GiB if peak else None, "ttft_s": a.get("ttft_s"),
            "decode_tok_s": decode, "note": (a.get("error") or "")[:80]}


def _write(args, budget, total, results: dict, hf: dict):
    rows = [_row(name, res) for name, res in results.items()]
    hf_row = _hf_row(hf)
    summary = {"seed002_fits": [r["config"] for r in rows if r["status"] == "completed"],
               "transformers_status": hf_row["status"] if hf_row else None,
               "compilations_after_warmup": sum(
                   res.get("cases", {}).get("a", {}).get("compilations", 0)
                   for res in results.values()),
               "configs": {r["config"]: {k: r.get(k) for k in COLUMNS[1:-1]} for r in rows}}
    if hf_row:
        rows.append(hf_row)
    figures = {"budget_bytes": budget, "device_total_bytes": total,
               "model": "tiny-qwen2" if args.tiny else args.model,
               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "sink_tokens": args.sink_tokens, "window": args.window,
               "gpu_memory_utilization": args.gpu_memory_utilization, "paged": results,
               "transformers": hf, "table": {"columns": COLUMNS, "rows": rows}}
    write_result("small-memory", summary, figures, out=args.out)
    return summary, rows


def _plot(path, rows, args) -> None:
    labels = [r["config"].replace("transformers ", "transformers\n") for r in rows]
    panels = [{"kind": "bars", "title": f"peak device memory (budget {args.budget_gib:g} GiB)",
               "ylabel": "GiB", "labels": labels, "values": [r.get("peak_gib") for r in rows]},
              {"kind": "bars", "title": "decode tok/s (batch 1)", "ylabel": "tok/s",
               "labels": labels, "values": [r.get("decode_tok_s") for r in rows]},
              {"kind": "bars", "title": "time to first token", "ylabel": "s",
               "labels": labels, "values": [r.get("ttft_s") for r in rows]}]
    plots.save(path, panels, title=f"{args.prompt_len} + {args.new_tokens} tokens of "
                                   f"{args.model} in {args.budget_gib:g} GiB")
