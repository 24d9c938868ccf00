"""capacity: max_model_len vs concurrency: KV tokens, max concurrency, tok/s at that concurrency.

The post-mortem's table, measured. For each ``--max-model-lens`` value an engine starts at
``--gpu-memory-utilization`` (0.9) of the device's total memory, as vLLM does, and sizes its KV
pool from it (``summary["kv_pool_gib_at_0_9"]``; ``planner_matches_engine``: ``pagedjax plan``
given the same device memory, ``device_memory_gib``, predicts the same pool); vLLM's "maximum
concurrency" is pool tokens / max_model_len, the requests of the full length that fit at once.
Then that many requests, each a ``--input-len`` (1000) token prompt generating ``--output-len``
(512) tokens with ``ignore_eos``, are submitted at once and timed: output tok/s, how many ran at
once (``max_running``), preemptions, and step shapes compiled during the measured run.

A paged pool does not depend on max_model_len (the table shows it), and a step's shapes depend on
the requests, not on max_model_len: so one engine, at the longest max_model_len with
``--max-num-seqs`` = the largest concurrency (its pool a little smaller: more rows to sample),
runs every row, after one warm-up pass of the
largest row's workload (``--warmup same``). The rows run smallest first and the JSON is rewritten
after each, so a run cut short keeps its finished rows.

``--kv-cache-dtype fp8_e4m3`` (or fp8_e5m2 / int8) runs every row on a quantized pool and also
probes an ``auto`` (model dtype) engine at the same memory: ``summary["fp8_pool_token_ratio"]`` is
pool tokens quantized / model dtype (fp8: exactly 2x, its scales are static; int8: 2x minus
the per-token scales' share, 1.97x at head_dim 128).

``--quick`` cuts every size for a smoke run; ``--max-concurrency-cap`` bounds the requests per row
(the CPU's default 1 GiB pool would otherwise admit thousands of tiny requests).
"""
from __future__ import annotations

import argparse
import logging

import jax

from benchmarks import harness, plots
from benchmarks.common import int_list, print_table, results_dir, write_result
from pagedjax.worker import device_memory
from pagedjax.planning import planner
from pagedjax.config import EngineArgs, EngineConfig
from pagedjax.worker.kv_pool import GiB
from pagedjax.planning.memory_report import memory_report, plan_pool

logger = logging.getLogger(__name__)

NOMINAL_GPU_MEMORY = 80 * GiB  # `pagedjax plan --gpu-memory 80GiB`, the H100's nominal size

FULL = {"max_model_lens": [2048, 4096, 8192, 32768], "input_len": 1000, "output_len": 512,
        "max_concurrency_cap": None}
QUICK = {"max_model_lens": [64, 256], "input_len": 32, "output_len": 16, "max_concurrency_cap": 8}
COLUMNS = ["max_model_len", "kv_cache_tokens", "kv_cache_gib", "max_concurrency", "requests",
           "max_running", "output_tok_s", "total_tok_s", "elapsed_s", "preemptions",
           "compilations"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    harness.add_engine_arguments(p)
    p.add_argument("--max-model-lens", type=int_list, default=None,
                   help=f"comma list (default {FULL['max_model_lens']}; "
                        f"--quick {QUICK['max_model_lens']})")
    p.add_argument("--input-len", type=int, default=None, help="prompt tokens (default 1000)")
    p.add_argument("--output-len", type=int, default=None, help="new tokens (default 512)")
    p.add_argument("--max-concurrency-cap", type=int, default=None,
                   help="run at most this many requests per length (default: no cap)")
    p.add_argument("--warmup", choices=("same", "none"), default="same",
                   help="same: the largest row's workload once, unmeasured; none: no warm-up")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")


def _probe(loaded, args, max_model_len: int, **overrides) -> dict:
    """Start an engine at this max_model_len (it sizes its pool and logs vLLM's capacity lines),
    read the pool, drop it. Nothing is compiled."""
    row = {"max_model_len": max_model_len}
    try:
        llm = harness.make_llm(loaded, harness.engine_args(args, max_model_len=max_model_len,
                                                           **overrides))
    except ValueError as e:  # the pool cannot hold one sequence of this length
        return {**row, "error": str(e)}
    spec = llm.engine.spec
    # what `pagedjax plan --gpu-memory <this device's memory>` predicts: the same arithmetic, but
    # weights from the config instead of the bytes the loaded model really occupies
    total = device_memory.device_bytes(jax.local_devices()[0])
    plan = memory_report(llm.engine.config, total_bytes=total)
    row.update(planner_blocks=plan["num_blocks"], planner_max_concurrency=plan["max_concurrency"],
               device_memory_bytes=total)
    if total is not None:  # the planner given the card's nominal size instead
        nominal = memory_report(llm.engine.config,
                                total_bytes=planner.reported_total(NOMINAL_GPU_MEMORY)[0])
        row["planner_blocks_at_80gib"] = nominal["num_blocks"]
    row.update(kv_cache_tokens=spec.num_tokens, kv_cache_gib=spec.total_bytes / GiB,
               kv_cache_blocks=spec.num_blocks, max_concurrency=spec.num_tokens / max_model_len,
               max_num_batched_tokens=llm.engine.config.max_num_batched_tokens)
    harness.release(llm)
    n = int(row["max_concurrency"])
    row["requests"] = min(n, args.max_concurrency_cap) if args.max_concurrency_cap else n
    return row


def _measure(llm, row: dict, args) -> None:
    from pagedjax import SamplingParams

    n = row["requests"]
    prompts = harness.random_prompts([args.input_len] * n, llm.engine.cfg.vocab_size, args.seed)
    sp = SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=args.output_len)
    r = harness.generate(llm, prompts, sp)
    row.update({k: v for k, v in r.figures().items()
                if k in ("output_tok_s", "total_tok_s", "elapsed_s", "preemptions", "max_running",
                         "steps", "host_s", "device_s")})
    row["compilations"] = r.compilations
    logger.info("max_model_len %d: %d KV tokens, concurrency %.1f, %d requests: %.0f output tok/s",
                row["max_model_len"], row["kv_cache_tokens"], row["max_concurrency"], n,
                r.output_tok_s)


def run(args) -> dict:
    from pagedjax import SamplingParams

    harness.preset(args, FULL, QUICK, args.quick)
    loaded = harness.load(args)
    rows = [_probe(loaded, args, m) for m in args.max_model_lens]
    for r in rows:
        if "error" not in r and (r["requests"] < 1 or args.input_len >= r["max_model_len"]):
            r["error"] = f"{r['requests']} requests of {args.input_len} tokens do not fit"
    ok = [r for r in rows if "error" not in r]
    base = None
    if args.kv_cache_dtype != "auto" and ok:
        # the same memory in the model's dtype: the pool does not depend on max_model_len
        base = _probe(loaded, args, ok[0]["max_model_len"], kv_cache_dtype="auto")
        base["kv_cache_dtype"] = "auto"
    summary = _summary(rows, args, base)
    write_result("capacity", summary, _figures(loaded, args, rows, base), out=args.out)
    if ok:
        # max_model_len only changes the admission arithmetic above; what runs depends on the
        # requests. One engine (the longest max_model_len, the same pool) measures every row, so
        # the step shapes compiled for the largest batch serve the smaller ones.
        top = max(ok, key=lambda r: r["max_model_len"])
        biggest = max(r["requests"] for r in ok)
        # sized by the engine itself: with more sequences per step than the probes' default
        # --max-num-seqs its sampler needs more memory, so the pool is a little smaller
        llm = harness.make_llm(loaded, harness.engine_args(
            args, max_model_len=top["max_model_len"], max_num_seqs=biggest,
            max_num_batched_tokens=top["max_num_batched_tokens"]))
        warm = {"measuring_engine_blocks": llm.engine.spec.num_blocks}
        warm |= harness.precompile_figures(llm.engine)
        if args.warmup == "same":
            prompts = harness.random_prompts([args.input_len] * biggest,
                                             llm.engine.cfg.vocab_size, args.seed + 1)
            w = harness.generate(llm, prompts, SamplingParams(
                temperature=1.0, ignore_eos=True, max_tokens=args.output_len))
            warm |= {"warmup_s": w.elapsed_s, "warmup_compilations": w.compilations}
            logger.info("warm-up (%d requests): %d step shapes compiled, %.1f s", biggest,
                        w.compilations, w.elapsed_s)
        for r in sorted(ok, key=lambda r: r["requests"]):  # quickest rows first
            _measure(llm, r, args)
            summary = {**_summary(rows, args, base), **warm}
            # rewritten after every row: a run cut short still leaves its finished rows
            write_result("capacity", summary, _figures(loaded, args, rows, base), out=args.out)
        harness.release(llm)
    print_table(rows, COLUMNS)
    _plot(results_dir(args.out) / "capacity.png", rows, args)
    return summary


def _summary(rows: list[dict], args, base: dict | None = None) -> dict:
    sized = [r for r in rows if "kv_cache_blocks" in r]
    total = next((r["device_memory_bytes"] for r in sized if r["device_memory_bytes"]), None)
    summary = {"compilations_after_warmup": sum(r.get("compilations", 0) for r in rows),
               # within one block: the engine counts the weights it measured, the planner the
               # config's (a few bytes apart)
               "planner_matches_engine": all(abs(r["planner_blocks"] - r["kv_cache_blocks"]) <= 1
                                             for r in sized),
               "kv_pool_gib": sized[0]["kv_cache_gib"] if sized else None,
               "kv_pool_gib_at_0_9": (sized[0]["kv_cache_gib"] if sized and
                                      args.gpu_memory_utilization == 0.9 else None),
               "device_memory_gib": None if total is None else total / GiB,
               "planner_blocks_at_80gib": sized[0].get("planner_blocks_at_80gib") if sized
               else None,
               "planner_at_80gib_matches_engine": (
                   abs(sized[0]["planner_blocks_at_80gib"] - sized[0]["kv_cache_blocks"]) <= 1
                   if sized and sized[0].get("planner_blocks_at_80gib") else None),
               "kv_cache_dtype": args.kv_cache_dtype}
    if base is not None:
        prefix = "fp8" if args.kv_cache_dtype.startswith("fp8") else args.kv_cache_dtype
        row = next(r for r in rows if r["max_model_len"] == base["max_model_len"])
        summary[f"{prefix}_pool_token_ratio"] = (
            row["kv_cache_tokens"] / base["kv_cache_tokens"] if "kv_cache_tokens" in base
            else None)
    for r in rows:
        m = r["max_model_len"]
        summary[f"max_concurrency_{m}"] = r.get("max_concurrency")
        summary[f"output_tok_s_{m}"] = r.get("output_tok_s")
    return summary


def _figures(loaded, args, rows, base: dict | None = None) -> dict:
    shape = plan_pool(EngineConfig.resolve(EngineArgs(kv_cache_dtype=args.kv_cache_dtype),
                                           loaded.cfg, loaded.dtype))
    return {"model": loaded.cfg.name or args.model, "dtype": loaded.dtype,
            "kv_cache_dtype": shape.dtype,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "input_len": args.input_len, "output_len": args.output_len,
            "max_concurrency_cap": args.max_concurrency_cap, "warmup": args.warmup,
            "kv_bytes_per_token": shape.bytes_per_token,
            "model_dtype_pool": base, "rows": rows,
            "table": {"columns": COLUMNS, "rows": rows}}


def _plot(path, rows, args) -> None:
    labels = [str(r["max_model_len"]) for r in rows]
    plots.save(path, [
        {"kind": "bars", "title": "maximum concurrency (pool tokens / max_model_len)",
         "ylabel": "requests", "labels": labels,
         "values": [r.get("max_concurrency") for r in rows]},
        {"kind": "bars", "title": f"output tok/s at that concurrency ({args.input_len} in, "
                                  f"{args.output_len} out)",
         "ylabel": "tok/s", "labels": labels, "values": [r.get("output_tok_s") for r in rows]},
    ], title=f"capacity at gpu_memory_utilization {args.gpu_memory_utilization}")
