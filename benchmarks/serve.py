"""serve: an async client against `pagedjax serve`, printing `vllm bench serve`'s table.

The scenario starts a ``pagedjax serve`` process on 127.0.0.1 with the engine flags given here
(``--model``, ``--max-num-seqs``, ..., or ``--tiny``), or attaches to a running one with
``--base-url``. The server is always a separate process, so the client's event loop never competes
with the engine thread for the GIL.

Workload, as vLLM's ``random`` dataset: ``--num-prompts`` prompts of exactly ``--input-len``
random token ids (ids 2.. of the model's vocabulary, seeded), each asking for exactly
``--output-len`` tokens (``ignore_eos``, greedy, as vLLM's client sends). Prompts travel as token
ids (``/v1/completions`` accepts a list of ints), so their length is exact and no tokenizer is
needed on the client side. Dummy weights have no tokenizer, and a server without one has no text
to stream until a request ends; so a started server gets a synthetic word-level tokenizer of the
model's vocabulary size (token i decodes to "wi"): every token streams as its own text, and the
server pays a real tokenizer's incremental-detokenization cost. An attached server needs a
tokenizer for the same reason (the run warns when streams arrive in one piece).

Arrivals: ``--request-rate`` requests/s as a Poisson process (exponential gaps; ``--burstiness``
!= 1 gives vLLM's gamma gaps), seeded, or ``inf`` to send them all at once;
``--max-concurrency`` caps the requests in flight (the rest wait on the client, outside their
timing). A comma list of rates measures each in turn against the same server.

Figures, vLLM's definitions: TTFT = first streamed token after sending; TPOT = (latency - TTFT) /
(output tokens - 1) per request; ITL = gaps between consecutive streamed chunks over all requests
(a chunk carries one token unless the client falls behind: ``tokens_per_chunk`` says);
throughputs over the duration of the whole run. Before each measured rate a warm-up of
``--num-warmup-prompts`` requests with the same shape and rate compiles the step shapes it
needs; ``compilations_after_warmup`` comes from the server's ``pagedjax:step_compilations``
counter (null for a server without it), and the server's token counters are read around each
run to check the client's counts. The server process, the tokenizer and the client live in
``serving_client.py``.

Steps: a started server writes its ``--step-trace``; each rate's row gets the figures of the steps
its measured run took (``steps``: composition, time in ``engine.step`` per step kind, gaps between
steps, the engine thread's busy share; ``serve_steps.py``) and the plot a panel of the step
composition over time.

vLLM's client: with ``--peer-client-dir DIR`` (or $PAGEDJAX_VLLM_BENCH_DIR) vLLM's own
``benchmark_serving.py`` (not committed here; ``peer_client.py`` says which files and why) runs
after each rate's measured run, against the same server with the same workload and settings; its
figures go in that rate's row under ``peer`` and in the summary as ``peer_output_tok_s``,
``peer_median_tpot_ms``, ``peer_median_ttft_ms`` (``..._c64`` too at ``--max-concurrency 64``;
``rate<R>_peer_...`` for the later rates).

A device of known speed: ``--fake-device`` starts ``benchmarks/fake_serve.py`` instead of
``pagedjax serve``: the same server (engine, scheduler, engine thread, app, SSE, detokeniser) over
the tiny config with its device step modelled (``modelled_device.py``: max(W, C x tokens) + A x
rows, the H100's figures for Qwen2.5-7B by default). Each row then gets ``modelled``: the modelled
decode step at its concurrency (the least its TPOT can be) and the share of the run the modelled
device was busy; the summary ``tpot_over_modelled_decode`` and the engine thread's split
(``host_work_pct``, ``device_wait_pct``, ``idle_pct``).

Serving overhead: ``--compare-latency PATH`` (with ``--max-concurrency 1``) reads the latency
scenario's JSON, run on the same device for the same lengths (``python -m benchmarks latency
--batch-sizes 1 --input-lens L --output-len O``), and reports ``serving_overhead_pct_c1`` = (this
run's median TPOT / the offline engine's median batch-1 TPOT - 1) x 100 for the first rate (and
``peer_serving_overhead_pct_c1`` by vLLM's client).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from benchmarks import harness, modelled_device, peer_client, plots, serve_steps
from benchmarks.common import device_name, print_table, results_dir, write_result
from benchmarks.serving_client import (RequestResult, rate_label, request_rates, run_requests,
                                       scrape, started_server)

logger = logging.getLogger(__name__)

COLUMNS = ["request_rate", "max_concurrency", "completed", "failed", "duration",
           "request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms",
           "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
           "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "compilations"]
HEADLINE = ("output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms",
            "median_tpot_ms", "median_itl_ms")
COUNTERS = ("prompt_tokens", "generation_tokens", "num_preemptions", "step_compilations")


def add_arguments(p: argparse.ArgumentParser) -> None:
    harness.add_engine_arguments(p)
    p.add_argument("--base-url", default=None,
                   help="attach to this running server (e.g. http://127.0.0.1:8000) instead of "
                        "starting one; --model still names the shape (for the vocabulary size)")
    p.add_argument("--api-key", default=os.environ.get("PAGEDJAX_API_KEY"))
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=200)
    p.add_argument("--request-rate", type=request_rates, default=[math.inf],
                   help="requests/s (Poisson), inf = all at once; a comma list runs each")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps; 1 = Poisson (vLLM's meaning)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="most requests in flight at once (default: no limit)")
    p.add_argument("--num-warmup-prompts", type=int, default=None,
                   help="warm-up requests before each rate (default: --num-prompts, at most "
                        "2 x --max-concurrency, or 64 without one)")
    p.add_argument("--server-timeout", type=float, default=900.0,
                   help="seconds to wait for a started server to answer /health")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for the started `pagedjax serve` (repeatable)")
    p.add_argument("--step-trace", default=None, metavar="FILE",
                   help="the server's --step-trace file (default: a temporary one for a started "
                        "server; an attached server's figures need its FILE here)")
    p.add_argument("--tag", default="", help="results file serve-<tag>.json")
    p.add_argument("--peer-client-dir", default=None, metavar="DIR",
                   help="a folder with vLLM v0.7.3's benchmarks/benchmark_serving.py, "
                        "backend_request_func.py and benchmark_utils.py: run vLLM's client too "
                        f"(default ${peer_client.ENV}; unset: ours only)")
    p.add_argument("--fake-device", action="store_true",
                   help="serve with a modelled device step of known time instead of a model "
                        "(benchmarks/modelled_device.py; the --fake-* flags set its cost "
                        "model): measures what the served path's host side adds on any machine. "
                        "Implies --tiny (the host side needs only the model's shape)")
    modelled_device.add_arguments(p)
    p.add_argument("--compare-latency", default=None, metavar="PATH",
                   help="the latency scenario's JSON (same device, batch 1, same lengths): "
                        "report serving_overhead_pct_c1 (needs --max-concurrency 1)")


# ---- figures ---------------------------------------------------------------------------------
def metrics(results: list[RequestResult], duration: float) -> dict:
    """vLLM ``bench serve``'s figures (names as in its JSON) over the successful requests."""
    ok = [r for r in results if r.ok]
    ms = 1e3
    ttft = [r.ttft * ms for r in ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) * ms for r in ok if r.output_tokens > 1]
    itl = [g * ms for r in ok for g in r.itl]
    e2e = [r.latency * ms for r in ok]
    inp, out = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)
    m = {"completed": len(ok), "failed": len(results) - len(ok), "duration": duration,
         "total_input_tokens": inp, "total_output_tokens": out,
         "request_throughput": len(ok) / duration, "output_throughput": out / duration,
         "total_token_throughput": (inp + out) / duration,
         "tokens_per_chunk": out / max(sum(r.chunks for r in ok), 1)}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2e)):
        a = np.asarray(xs) if xs else np.zeros(1)
        m |= {f"mean_{name}_ms": float(a.mean()), f"median_{name}_ms": float(np.median(a)),
              f"std_{name}_ms": float(a.std()), f"p90_{name}_ms": float(np.percentile(a, 90)),
              f"p99_{name}_ms": float(np.percentile(a, 99))}
    return m


def print_vllm_table(m: dict, rate: float, max_concurrency: int | None) -> None:
    line = "{:<40} {:<10}".format
    num = "{:<40} {:<10.2f}".format
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="))
    print(line("Request rate (req/s):", str(rate)))
    print(line("Maximum request concurrency:", str(max_concurrency)))
    print(line("Successful requests:", m["completed"]))
    print(line("Failed requests:", m["failed"]))
    print(num("Benchmark duration (s):", m["duration"]))
    print(line("Total input tokens:", m["total_input_tokens"]))
    print(line("Total generated tokens:", m["total_output_tokens"]))
    print(num("Request throughput (req/s):", m["request_throughput"]))
    print(num("Output token throughput (tok/s):", m["output_throughput"]))
    print(num("Total Token throughput (tok/s):", m["total_token_throughput"]))
    for key, title in (("ttft", "Time to First Token"),
                       ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency")):
        print("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            print(num(f"{label} {key.upper()} (ms):", m[f"{stat}_{key}_ms"]))
    print("=" * 50)


def _cdf(xs: list[float], points: int = 101) -> tuple[list[float], list[float]]:
    if not xs:
        return [], []
    q = np.linspace(0, 100, points)
    return np.percentile(xs, q).tolist(), (q / 100).tolist()


# ---- the scenario ----------------------------------------------------------------------------
def run(args) -> dict:
    # This process is only a client: it must not take GPU memory from the server it starts (JAX
    # preallocates 75% on its first use, which here is only the results' device name).
    server_env = dict(os.environ)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    if args.fake_device:
        if args.base_url:
            raise ValueError("--fake-device starts its own server: drop --base-url")
        if args.model != harness.DEFAULT_MODEL:
            raise ValueError(f"--fake-device serves the tiny config (its step time is the "
                             f"--fake-* flags'), not --model {args.model}: drop --model")
        args.tiny = True
        modelled_device.StepModel.from_args(args)  # its flags checked before the server starts
    vocab = harness.hf_config_dict(args)["vocab_size"]
    if args.max_model_len is None:
        args.max_model_len = args.input_len + args.output_len
    n_warm = args.num_warmup_prompts
    if n_warm is None:
        n_warm = min(args.num_prompts, 2 * (args.max_concurrency or 32))
    tag = f"-{args.tag}" if args.tag else ""
    peer_dir = peer_client.client_dir(args.peer_client_dir)
    if peer_dir and args.base_url and not args.tokenizer:  # a started server gets one here
        raise ValueError("vLLM's client builds its prompts with the server's tokenizer: "
                         "give --tokenizer DIR with --base-url and --peer-client-dir")
    if not args.burstiness > 0:
        raise ValueError(f"--burstiness {args.burstiness} must be > 0 (1: Poisson arrivals)")
    offline = _offline_tpot(args.compare_latency, args) if args.compare_latency else None
    rows, runs, panels = [], [], []
    with contextlib.ExitStack() as stack:
        url = args.base_url or stack.enter_context(started_server(args, vocab, server_env))
        card = _model_card(url, args)
        prompts = harness.random_prompts([args.input_len] * args.num_prompts, vocab, args.seed)
        for i, rate in enumerate(args.request_rate):
            row, results, panel = _measure(url, args, card["id"], prompts, vocab, n_warm, i,
                                           rate)
            if peer_dir:
                row["peer"] = _peer(url, args, card["id"], peer_dir, i, rate)
            rows.append(row)
            panels.append(panel)
            runs.append(results)
            # rewritten after every rate: a run cut short by a time limit keeps what it finished
            summary, figures = _summarise(args, url, rows, runs, n_warm, offline)
            write_result("serve", summary, figures, out=args.out, tag=args.tag)
    print_table(figures["table"]["rows"], COLUMNS)
    _plot(results_dir(args.out) / f"serve{tag}.png", runs, args, panels)
    return summary


def _model_card(url: str, args) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    card = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]
    if args.input_len + args.output_len > card["max_model_len"]:
        raise ValueError(f"--input-len {args.input_len} + --output-len {args.output_len} is more "
                         f"than the server's max_model_len {card['max_model_len']}")
    return card


def _measure(url: str, args, model: str, prompts, vocab: int, n_warm: int, i: int, rate: float):
    """Warm up, then measure one request rate; returns its table row and the request results."""
    go = dict(output_len=args.output_len, rate=rate, burstiness=args.burstiness,
              max_concurrency=args.max_concurrency)
    t0, c0 = time.perf_counter(), scrape(url)
    if n_warm:
        warm = harness.random_prompts([args.input_len] * n_warm, vocab, args.seed + 1000 + i)
        res, _, _ = asyncio.run(run_requests(url, args.api_key, model, warm,
                                              seed=args.seed + 1000 + i, **go))
        bad = [r.error for r in res if not r.ok]
        if bad:
            raise RuntimeError(f"{len(bad)} of {n_warm} warm-up requests failed: {bad[0]}")
    before = scrape(url)
    warm_s, warm_compiled = time.perf_counter() - t0, _delta(c0, before, "step_compilations")
    logger.info("rate %s: warm-up of %d requests took %.1f s (%s step shapes compiled)",
                rate_label(rate), n_warm, warm_s, warm_compiled)
    wall0 = time.time()
    results, duration, peak = asyncio.run(run_requests(url, args.api_key, model, prompts,
                                                        seed=args.seed + i, **go))
    after = scrape(url)
    wall1 = time.time()
    m = metrics(results, duration)
    steps = (serve_steps.window(args.step_trace, wall0, wall1, m["total_output_tokens"])
             if args.step_trace else [])
    server = {k: _delta(before, after, k) for k in COUNTERS}
    print_vllm_table(m, rate, args.max_concurrency)
    errors = [r.error for r in results if not r.ok]
    if errors:
        logger.warning("%d requests failed, e.g. %s", len(errors), errors[0])
    if m["completed"] and m["tokens_per_chunk"] > 1.5:
        logger.warning("%.1f tokens per streamed chunk: the server streams in large pieces "
                       "(no tokenizer?) or the client fell behind; ITL is per chunk",
                       m["tokens_per_chunk"])
    row = {"request_rate": rate_label(rate), "max_concurrency": args.max_concurrency, **m,
           "compilations": server["step_compilations"], "peak_concurrency": peak,
           "warmup_s": warm_s, "warmup_compilations": warm_compiled, "server": server,
           # the server's count before this rate's warm-up: what it precompiled at start, for
           # the first rate of a fresh server (pagedjax serve --precompile)
           "compilations_before_warmup": c0.get("step_compilations"),
           "errors": errors[:5],
           "steps": serve_steps.figures(steps) if args.step_trace else None}
    if args.fake_device:
        row["modelled"] = _modelled(args, steps, row["steps"])
    return row, results, serve_steps.panel(steps, rate_label(rate))


def _modelled(args, steps: list[dict], figures: dict | None) -> dict:
    """The modelled device's side of a run: its decode step at this concurrency (the least a
    TPOT can be) and how busy the traced steps kept it."""
    model = modelled_device.StepModel.from_args(args)
    rows = min(args.max_concurrency or args.num_prompts, args.max_num_seqs, args.num_prompts)
    busy_s = model.trace_seconds(steps)
    wall_s = figures["wall_s"] if figures else 0.0
    return {"step_model": dataclasses.asdict(model), "decode_rows": rows,
            "decode_step_ms": model.seconds(rows, rows) * 1e3, "device_s": busy_s,
            "device_busy_pct": 100 * busy_s / wall_s if wall_s > 0 else None}


def _peer(url: str, args, model: str, folder, i: int, rate: float) -> dict:
    """vLLM's client on this rate's workload, after our measured run (so on a warm server)."""
    before = scrape(url)
    peer = peer_client.run(folder, url, model, args.tokenizer, api_key=args.api_key,
                           input_len=args.input_len, output_len=args.output_len,
                           num_prompts=args.num_prompts, rate=rate, burstiness=args.burstiness,
                           max_concurrency=args.max_concurrency, seed=args.seed + i)
    after = scrape(url)
    # its one "initial test run" request is in the server's counters, not in its figures
    peer["server"] = {k: _delta(before, after, k) for k in COUNTERS}
    peer["compilations"] = peer["server"]["step_compilations"]
    if "error" in peer:
        logger.warning("vLLM's client failed at rate %s: %s", rate_label(rate),
                       peer["error"][-500:])
    return peer


PEER_KEYS = {"output_tok_s": "output_throughput", "median_tpot_ms": "median_tpot_ms",
             "median_ttft_ms": "median_ttft_ms"}


def _offline_tpot(path: str, args) -> dict:
    """The offline engine's median batch-1 TPOT for this run's lengths, from latency's JSON."""
    if args.max_concurrency != 1:
        raise ValueError("--compare-latency compares one request at a time with the offline "
                         "engine at batch 1: add --max-concurrency 1")
    rec = json.loads(Path(path).read_text())
    match = [r for r in rec.get("figures", {}).get("rows", []) if r.get("batch") == 1 and
             r.get("input_len") == args.input_len and r.get("output_len") == args.output_len
             and r.get("tpot_p50_ms")]
    if rec.get("scenario") != "latency" or not match:
        raise ValueError(f"{path} has no latency row of batch 1 with {args.input_len} prompt "
                         f"and {args.output_len} new tokens: run `python -m benchmarks latency "
                         f"--batch-sizes 1 --input-lens {args.input_len} --output-len "
                         f"{args.output_len}` with this run's engine flags first")
    if rec["device"] != device_name():
        raise ValueError(f"{path} was measured on {rec['device']}, this run is on "
                         f"{device_name()}: the overhead needs both on one device")
    return {"path": str(path), "tpot_ms": match[0]["tpot_p50_ms"], "device": rec["device"],
            "git_commit": rec.get("git_commit"), "command": rec.get("command")}


def _overhead_pct(tpot_ms, offline_ms: float):
    return None if tpot_ms is None else 100.0 * (tpot_ms / offline_ms - 1.0)


def _delta(before: dict, after: dict, key: str):
    if key not in after or key not in before:
        return None  # a server without this counter
    return int(after[key] - before[key])


def _summarise(args, url: str, rows: list[dict], runs, n_warm: int, offline: dict | None):
    first = rows[0]
    compiled = [r["compilations"] for r in rows]
    summary = {k: first[k] for k in ("completed", "failed", "duration", "request_throughput",
                                     "output_throughput", "total_token_throughput",
                                     "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                                     "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
                                     "mean_itl_ms", "median_itl_ms", "p99_itl_ms")}
    summary |= {"request_rate": first["request_rate"], "max_concurrency": args.max_concurrency,
                "all_succeeded": all(r["failed"] == 0 for r in rows),
                # null: the server has no pagedjax:step_compilations counter (attached to another)
                "compilations_after_warmup": None if None in compiled else sum(compiled),
                "server_compilations_at_start": first["compilations_before_warmup"]}
    for r in rows[1:]:
        summary |= {f"rate{r['request_rate']}_{k}": r[k] for k in HEADLINE}
    if "peer" in first:  # vLLM's client: null figures where it failed or lost requests
        for i, r in enumerate(rows):
            prefix = "" if i == 0 else f"rate{r['request_rate']}_"
            whole = not r["peer"].get("failed")
            summary |= {f"{prefix}peer_{k}": r["peer"].get(v) if whole else None
                        for k, v in PEER_KEYS.items()}
            summary[f"{prefix}peer_failed"] = r["peer"].get("failed")
        summary["peer_completed"] = first["peer"].get("completed")
        if args.max_concurrency == 64:  # issue 25's acceptance keys
            summary |= {f"peer_{k}_c64": summary[f"peer_{k}"]
                        for k in ("output_tok_s", "median_tpot_ms")}
    if offline:
        summary["offline_tpot_ms_c1"] = offline["tpot_ms"]
        summary["serving_overhead_pct_c1"] = _overhead_pct(first["median_tpot_ms"],
                                                           offline["tpot_ms"])
        if "peer" in first:
            summary["peer_serving_overhead_pct_c1"] = _overhead_pct(
                first["peer"].get("median_tpot_ms"), offline["tpot_ms"])
    if first["steps"] is not None:  # the server's step trace (serve_steps.py)
        summary |= {k: first["steps"][k] for k in ("step_gap_ms_mean", "engine_busy_pct",
                                                   "decode_step_ms_p50", "steps_per_s",
                                                   "mixed_step_share")}
    if "modelled" in first:  # --fake-device: the run against its device's own step time
        m = first["modelled"]
        summary |= {"fake_step_model": m["step_model"],
                    "modelled_decode_step_ms": m["decode_step_ms"],
                    "modelled_device_busy_pct": m["device_busy_pct"],
                    "tpot_over_modelled_decode": first["median_tpot_ms"] / m["decode_step_ms"]}
        if first["steps"] is not None:
            summary |= {k: first["steps"][k] for k in ("host_work_pct", "device_wait_pct",
                                                       "idle_pct", "host_ms_mean")}
    figures = {
        "model": args.model if not args.tiny else "tiny", "fake_device": args.fake_device,
        "server_url": url,
        "server_started_here": args.base_url is None, "num_prompts": args.num_prompts,
        "input_len": args.input_len, "output_len": args.output_len,
        "burstiness": args.burstiness, "num_warmup_prompts": n_warm,
        "dataset": "random token ids, fixed lengths, ignore_eos, temperature 0",
        "offline_latency": offline,
        "rows": rows,
        "requests": [[{"start_s": r.start, "ttft_ms": r.ttft * 1e3, "latency_ms": r.latency * 1e3,
                       "output_tokens": r.output_tokens, "chunks": r.chunks, "ok": r.ok}
                      for r in results] for results in runs],
        "itl_cdf_ms": [_cdf([g * 1e3 for r in results if r.ok for g in r.itl])[0]
                       for results in runs],
        "table": {"columns": COLUMNS, "rows": [{c: r[c] for c in COLUMNS} for r in rows]},
    }
    return summary, figures


def _plot(path: Path, runs, args, step_panels: list) -> None:
    ttft, itl = {}, {}
    for rate, results in zip(args.request_rate, runs):
        ok = [r for r in results if r.ok]
        ttft[f"rate {rate_label(rate)}"] = _cdf([r.ttft * 1e3 for r in ok])
        itl[f"rate {rate_label(rate)}"] = _cdf([g * 1e3 for r in ok for g in r.itl])
    plots.save(path, [
        {"kind": "lines", "title": "TTFT distribution (CDF)", "xlabel": "ms",
         "ylabel": "fraction of requests", "series": ttft},
        {"kind": "lines", "title": "inter-token latency distribution (CDF)", "xlabel": "ms",
         "ylabel": "fraction of gaps", "series": itl},
        *step_panels,
    ], title=f"serve: {args.num_prompts} x {args.input_len}/{args.output_len}, "
             f"max concurrency {args.max_concurrency}")
