"""kv-offload: multi-turn chats whose working set exceeds the GPU pool, prefix caching with and
without its host tier (``--kv-offloading-size``, issue 21).

Workload: the ``prefix`` scenario's (benchmarks/prefix.py: ``--num-conversations`` chats of
``--turns`` turns in lockstep, each turn's prompt = the history + the answer + a new user message
of random ids, greedy answers of ``--answer-len`` tokens), with the GPU pool limited by
``--num-gpu-blocks-override`` to ``--pool-fraction`` (default a quarter) of the working set, the
blocks of every conversation at its last turn (at least two conversations' worth). Without the
tier the prefix cache evicts most conversations' histories between their turns and the next turn
recomputes them; with it they come back from host memory.

Arrivals. Turns stay in lockstep (turn t+1 of every conversation after turn t of all), so the
eviction pressure is the same at every rate. Within a turn, conversation i's request arrives at
its own time: ``--request-rate`` requests/s as a Poisson process (``--burstiness`` != 1: vLLM's
gamma gaps), the gaps seeded by ``--seed`` and the turn, so both modes (and every rate, scaled)
see the same arrivals; ``inf`` (the default) sends the whole turn at once. The engine loop adds a
request once the wall clock passes its arrival, and its TTFT counts from that arrival (the
engine's ``first_token_time - arrival_time``), so time spent behind a running step is in it.
``--max-concurrency`` keeps at most that many requests in flight, as a client with that many
connections (default: the conversations the GPU pool holds at the last turn; 0: no limit); a
request held back by it is sent when a connection frees, and its TTFT counts from then, as
vLLM's client counts it. A closed loop (rate ``inf``) saturates the engine, so TTFT is mostly
waiting behind other requests' steps; at a rate below saturation it is mostly the request's own
prefill, which is what the tier shortens. ``--request-rate 4,8,inf`` runs each rate in turn.

Both modes: prefix caching on, one engine each, a warm-up of ``--warmup-turns`` turns of another
workload at rate ``inf`` (compiles what ``--precompile`` did not and touches the host pool), then
for each rate: the prefix cache and its host tier dropped (every rate starts from the same empty
caches), the workload. Each rate's answers are compared (greedy: ``answers_identical`` should be
1). The host tier defaults to twice the working set (``--num-cpu-blocks-override``), so that what
the figures measure is the copy, not the tier's size; ``--kv-offloading-size`` GiB sets it.

Figures per rate, turn and mode: TTFT mean / p50 / p99 over the conversations and the mean part
of it spent waiting to be scheduled (``queue_mean_ms``; the rest runs from the first step that
took the request, its loads and prefill included), every request's arrival (seconds after the
turn began) and TTFT, prefill tokens computed, GPU and host hit rates;
per rate and mode: output tok/s (output tokens over the workload's wall time: at a rate below
saturation the rate sets it, so ``throughput_ratio`` tends to 1 there), the tier's blocks and
bytes each way and their GB/s (bytes over the transfer events' seconds, pagedjax.worker.swap:
each event is timed from when the device finished the step before it). The raw pinned bandwidth
is measured in the same process (benchmarks/swap_bandwidth.py: one large ``device_put`` each
way). Summary per rate (``figures.rates[<rate>].summary``): ``ttft_speedup_turn4plus`` (mean TTFT
of turns >= 4 without the tier over with it; target >= 3 on the H100), ``throughput_ratio``
(output tok/s with / without; target >= 1.5), ``transfer_pct_raw_bw`` (the time the raw link
would take for the bytes the tier moved, whole host pieces, over the time its transfers took, in
percent; target >= 70), ``compilations_after_warmup`` (step and transfer programs; target 0).
The top-level summary holds the FIRST rate's figures under the same keys (except
``compilations_after_warmup``: every rate's together), plus ``ttft_speedup_turn4plus_by_rate``
and ``throughput_ratio_by_rate`` ({rate: x}).
"""
from __future__ import annotations

import argparse
import logging
import math
import time

import numpy as np

from benchmarks import harness, plots
from benchmarks.common import print_table, results_dir, write_result
from benchmarks.prefix import _turn_figures
from benchmarks.serving_client import arrival_gaps, rate_label, request_rates

logger = logging.getLogger(__name__)

MODES = (("off", False), ("on", True))
COLUMNS = ["turn", "prompt_len", "ttft_mean_ms_off", "ttft_mean_ms_on", "queue_mean_ms_off",
           "queue_mean_ms_on", "ttft_p99_ms_off", "ttft_p99_ms_on", "speedup", "host_hit_rate",
           "prefill_tokens_off", "prefill_tokens_on"]
RATE_COLUMNS = ["request_rate", "ttft_speedup_turn4plus", "throughput_ratio", "host_hit_rate",
                "transfer_pct_raw_bw", "output_tok_s_off", "output_tok_s_on", "answers_identical"]
TARGETS = {"ttft_speedup_turn4plus": 3.0, "throughput_ratio": 1.5, "transfer_pct_raw_bw": 70.0}
FULL = dict(num_conversations=64, turns=8, user_len=300, answer_len=100)
TINY = dict(num_conversations=8, turns=4, user_len=24, answer_len=8)


def add_arguments(p: argparse.ArgumentParser) -> None:
    harness.add_engine_arguments(p)
    for name, v in FULL.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"default {v} ({TINY[name]} with --tiny)")
    p.add_argument("--pool-fraction", type=float, default=0.25,
                   help="GPU pool as a share of the working set (unless "
                        "--num-gpu-blocks-override)")
    p.add_argument("--warmup-turns", type=int, default=None,
                   help="turns of the warm-up workload (default 2, where --precompile compiled "
                        "every step shape at start; all of them with --tiny, which does not)")
    p.add_argument("--request-rate", type=request_rates, default=[math.inf],
                   help="requests/s within each turn (Poisson, seeded); inf sends a turn at "
                        "once; a comma list (4,8,inf) runs each rate with the tier off and on")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps; 1 = Poisson (vLLM's meaning)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at once, as a client with that many connections "
                        "(default: as many conversations as the GPU pool holds at the last turn; "
                        "0: no limit)")
    p.add_argument("--bw-mib", type=int, default=None,
                   help="raw bandwidth transfer size (default 1024; 16 with --tiny)")


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int, turn: int) -> np.ndarray:
    """Seconds after the turn begins at which each of its ``n`` requests arrives: the first at
    0, then seeded gamma gaps (Poisson at burstiness 1; all zeros at rate inf). The seed takes
    no mode or rate, so both modes see the same arrivals and every rate the same ones scaled."""
    gaps = arrival_gaps(n, rate, burstiness, (seed, turn))
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


def _conversations(llm, args, seed: int, turns: int, rate: float) -> tuple[list[dict], list, float]:
    """The workload: per-turn figures, every answer, and the wall time."""
    from pagedjax import SamplingParams

    e, vocab = llm.engine, llm.engine.cfg.vocab_size
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0.0, max_tokens=args.answer_len, ignore_eos=True)
    n = args.num_conversations
    histories = [rng.integers(2, vocab, size=args.user_len).tolist() for _ in range(n)]
    out, answers, t_all = [], [], time.perf_counter()
    for t in range(turns):
        s0, c0 = e.make_stats(), e.stats.computed_tokens
        offsets = arrival_offsets(n, rate, args.burstiness, seed, t)
        outs, start, wall = send(e, histories, params, args.max_concurrency, offsets,
                                 f"t{seed}-{rate_label(rate)}-{t}")
        d = e.make_stats().delta(s0)
        fig = _turn_figures(outs, histories, e.stats.computed_tokens - c0,
                            d["prefix_cache_hits"], d["prefix_cache_queries"], args)
        ttft = fig["ttft_ms"]
        fig.update(turn=t + 1, ttft_p99_ms=float(np.percentile(ttft, 99)), wall_s=wall,
                   arrival_s=[o.metrics.arrival_time - start for o in outs],
                   host_hits=d["kv_offload_hits"], host_queries=d["kv_offload_queries"],
                   host_hit_rate=(d["kv_offload_hits"] / d["kv_offload_queries"]
                                  if d["kv_offload_queries"] else 0.0))
        out.append(fig)
        answers.append([o.outputs[0].token_ids for o in outs])
        histories = [h + o.outputs[0].token_ids + rng.integers(2, vocab, size=args.user_len)
                     .tolist() for h, o in zip(histories, outs)]
    return out, answers, time.perf_counter() - t_all


def send(e, prompts: list[list[int]], params, limit: int | None, offsets, tag: str):
    """Every prompt through the engine, prompt i arriving ``offsets[i]`` seconds after the start,
    at most ``limit`` in flight (no limit without): a client holding ``limit`` connections, as
    vLLM's ``--max-concurrency``. A request is added at the first step boundary after it is
    due; its arrival time is when it was due, or when a connection freed for it if later (the
    client sends it then), so its TTFT measures the server, not the client's own queue.
    Returns the outputs in prompt order, the start (``time.time()``) and the wall seconds."""
    n = len(prompts)
    limit = limit or n
    ids = [f"{tag}-{i}" for i in range(n)]
    done: dict[str, object] = {}
    freed: list[float] = []  # when each finished request's connection freed, in order
    sent, start = 0, time.time()
    due = [start + float(x) for x in offsets]
    while len(done) < n:
        now = time.time()
        while sent < n and sent - len(done) < limit and due[sent] <= now:
            # the (sent - limit)-th connection to free is the one this request waited for
            arrival = due[sent] if sent < limit else max(due[sent], freed[sent - limit])
            e.add_request(ids[sent], prompts[sent], params, arrival_time=arrival, stream=False)
            sent += 1
        if sent == len(done):  # nothing in flight: wait for the next arrival
            time.sleep(max(due[sent] - now, 0.0))
            continue
        outs = e.step()
        now = time.time()
        for out in outs:
            if out.error is not None:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            if out.finished:
                done[out.request_id] = out
                freed.append(now)
    return [done[i] for i in ids], start, time.time() - start


def _run_mode(loaded, args, tier: bool, pool_blocks: int, host_blocks: int) -> list[dict]:
    """One engine: the warm-up, then the workload at each rate; one result per rate."""
    overrides = dict(enable_prefix_caching=True, num_gpu_blocks_override=pool_blocks,
                     kv_offloading_size=0.0)
    if tier:
        overrides.update(kv_offloading_size=args.kv_offloading_size or 1.0,
                         num_cpu_blocks_override=(None if args.kv_offloading_size
                                                  else host_blocks))
    llm = harness.make_llm(loaded, harness.engine_args(args, **overrides))
    e = llm.engine

    def compiled():
        return e.runner.num_compilations + (e.host_pool.num_compilations if e.host_pool else 0)

    def settle():  # the tier's copies in flight land before a clock starts or stops
        if e.host_pool is not None:
            e.host_pool.wait()

    t0, c0 = time.perf_counter(), compiled()
    if args.warmup_turns:
        _conversations(llm, args, args.seed + 1, args.warmup_turns, math.inf)
    settle()
    engine = {"warmup_s": time.perf_counter() - t0, "warmup_compilations": compiled() - c0,
              "kv_cache_blocks": e.block_manager.num_blocks, **harness.precompile_figures(e)}
    if tier:
        s = e.swap_space
        engine["host_tier"] = {"blocks": s.num_pieces * s.piece_blocks,
                               "piece_blocks": s.piece_blocks,
                               "piece_bytes": e.host_pool.piece_bytes,
                               "transfers": e.host_pool.transfers}
    runs = []
    for rate in args.request_rate:
        e.block_manager.drop_cache()  # idle and settled: nothing in flight reads the caches
        c0, before, t0 = compiled(), e.make_stats(), time.perf_counter()
        turns, answers, wall = _conversations(llm, args, args.seed, args.turns, rate)
        settle()
        t1, d = time.perf_counter(), e.make_stats().delta(before)
        out_tokens = sum(t["output_tokens"] for t in turns)
        res = {"turns": turns, "answers": answers, "elapsed_s": wall,
               "output_tok_s": out_tokens / wall, "compilations": compiled() - c0,
               "preemptions": d["num_preemptions"], **engine,
               "host_hit_rate": (d["kv_offload_hits"] / d["kv_offload_queries"]
                                 if d["kv_offload_queries"] else 0.0),
               "gpu_hit_rate": (d["prefix_cache_hits"] / d["prefix_cache_queries"]
                                if d["prefix_cache_queries"] else 0.0)}
        if tier:
            res.update(_moved(e.host_pool.stats.events, t0, t1))
        runs.append(res)
    harness.release(llm)
    return runs


def _moved(events, t0: float, t1: float) -> dict:
    """The tier's transfers each way dispatched in [t0, t1) (``time.perf_counter()``)."""
    res = {}
    for direction in ("store", "load"):
        evs = [ev for ev in events if ev.direction == direction and t0 <= ev.time < t1]
        link = sum(ev.link_bytes for ev in evs)
        payload = sum(ev.payload_bytes for ev in evs)
        secs = sum(ev.seconds for ev in evs)
        res[direction] = {"events": len(evs), "blocks": sum(ev.blocks for ev in evs),
                          "payload_bytes": payload, "link_bytes": link, "seconds": secs,
                          "link_gb_s": link / secs / 1e9 if secs else None,
                          "payload_gb_s": payload / secs / 1e9 if secs else None}
    return res


def _compare(off: dict, on: dict, raw: dict) -> tuple[list[dict], dict]:
    """One rate's per-turn table and summary, from its two runs."""
    from benchmarks.swap_bandwidth import pct_of_raw

    rows = []
    for a, b in zip(off["turns"], on["turns"]):
        rows.append({"turn": a["turn"], "prompt_len": a["prompt_len"],
                     **{f"ttft_{s}_ms_{m}": t[f"ttft_{s}_ms"] for s in ("mean", "p50", "p99")
                        for m, t in (("off", a), ("on", b))},
                     **{f"queue_mean_ms_{m}": t["queue_mean_ms"] for m, t in (("off", a),
                                                                               ("on", b))},
                     "speedup": a["ttft_mean_ms"] / b["ttft_mean_ms"],
                     "host_hit_rate": b["host_hit_rate"],
                     "prefill_tokens_off": a["prefill_tokens"],
                     "prefill_tokens_on": b["prefill_tokens"]})
    late = [r for r in rows if r["turn"] >= 4] or rows
    st, ld = on["store"], on["load"]
    same = [x == y for ta, tb in zip(off["answers"], on["answers"]) for x, y in zip(ta, tb)]
    return rows, {
        "ttft_speedup_turn4plus": (float(np.mean([r["ttft_mean_ms_off"] for r in late]))
                                   / float(np.mean([r["ttft_mean_ms_on"] for r in late]))),
        "throughput_ratio": on["output_tok_s"] / off["output_tok_s"],
        "transfer_pct_raw_bw": pct_of_raw(st["link_bytes"], st["seconds"], ld["link_bytes"],
                                          ld["seconds"], raw),
        "transfer_payload_pct_raw_bw": pct_of_raw(st["payload_bytes"], st["seconds"],
                                                  ld["payload_bytes"], ld["seconds"], raw),
        "compilations_after_warmup": off["compilations"] + on["compilations"],
        "host_hit_rate": on["host_hit_rate"],
        "prefill_tokens_ratio": (sum(r["prefill_tokens_off"] for r in rows)
                                 / max(sum(r["prefill_tokens_on"] for r in rows), 1)),
        "store_gb_s": st["link_gb_s"], "load_gb_s": ld["link_gb_s"],
        "output_tok_s_off": off["output_tok_s"], "output_tok_s_on": on["output_tok_s"],
        "answers_identical": sum(same) / len(same),
    }


def run(args) -> dict:
    from benchmarks.swap_bandwidth import raw_large

    if not args.burstiness > 0:
        raise ValueError(f"--burstiness {args.burstiness}: give a gamma shape > 0 (1 = Poisson)")
    harness.preset(args, FULL, TINY, args.tiny)
    if args.max_model_len is None:
        args.max_model_len = args.turns * (args.user_len + args.answer_len)
    if args.warmup_turns is None:
        args.warmup_turns = args.turns if args.tiny else 2
    loaded = harness.load(args)
    per_conv = -(-(args.turns * (args.user_len + args.answer_len)) // args.block_size)
    working_set = args.num_conversations * per_conv
    pool_blocks = args.num_gpu_blocks_override or max(int(working_set * args.pool_fraction),
                                                      2 * per_conv)
    if args.max_concurrency is None:
        args.max_concurrency = max(pool_blocks // per_conv, 1)
    raw = raw_large((args.bw_mib or (16 if args.tiny else 1024)) << 20)
    res = {name: _run_mode(loaded, args, tier, pool_blocks, 2 * working_set)
           for name, tier in MODES}
    rates = {}
    for i, rate in enumerate(args.request_rate):
        off, on = res["off"][i], res["on"][i]
        rows, summary = _compare(off, on, raw)
        label = rate_label(rate)
        print(f"request rate {label} req/s (burstiness {args.burstiness:g}, at most "
              f"{args.max_concurrency or 'any number of'} in flight):")
        print_table(rows, COLUMNS)
        print(f"turns >= 4: TTFT {summary['ttft_speedup_turn4plus']:.2f}x better with the host "
              f"tier (target >= {TARGETS['ttft_speedup_turn4plus']:g}x); output tok/s "
              f"{summary['throughput_ratio']:.2f}x (>= {TARGETS['throughput_ratio']:g}x); "
              f"transfers at {summary['transfer_pct_raw_bw'] or 0:.0f}% of the raw pinned "
              f"bandwidth (>= {TARGETS['transfer_pct_raw_bw']:g}%); host hit rate "
              f"{on['host_hit_rate']:.1%}; {summary['compilations_after_warmup']} compilations "
              f"after warm-up")
        for mode in (off, on):
            del mode["answers"]  # token ids: long, and only their equality matters
        rates[label] = {"summary": summary, "table": {"columns": COLUMNS, "rows": rows},
                        "off": off, "on": on}
    by_rate = {k: r["summary"] for k, r in rates.items()}
    if len(rates) > 1:
        print_table([{"request_rate": k, **s} for k, s in by_rate.items()], RATE_COLUMNS)
    first = next(iter(by_rate.values()))
    summary = {
        **first, "request_rate": next(iter(rates)), "request_rates": list(rates),
        "burstiness": args.burstiness,
        "ttft_speedup_turn4plus_by_rate": {k: s["ttft_speedup_turn4plus"]
                                           for k, s in by_rate.items()},
        "throughput_ratio_by_rate": {k: s["throughput_ratio"] for k, s in by_rate.items()},
        "compilations_after_warmup": sum(s["compilations_after_warmup"]
                                         for s in by_rate.values()),
        "raw_d2h_gb_s": raw["d2h_gb_s"], "raw_h2d_gb_s": raw["h2d_gb_s"],
        "gpu_pool_blocks": pool_blocks, "working_set_blocks": working_set,
        "num_conversations": args.num_conversations, "max_concurrency": args.max_concurrency,
        "turns": args.turns,
    }
    figures = {"model": loaded.cfg.name or args.model, "dtype": loaded.dtype,
               "workload": {k: getattr(args, k) for k in FULL} | {
                   "arrivals": "lockstep turns; within a turn Poisson (gamma) at each rate, "
                               "inf: the whole turn at once",
                   "request_rates": list(rates), "burstiness": args.burstiness,
                   "max_concurrency": args.max_concurrency,
                   "pool_fraction": args.pool_fraction, "warmup_turns": args.warmup_turns},
               "engine": {"max_model_len": args.max_model_len, "block_size": args.block_size,
                          "max_num_seqs": args.max_num_seqs,
                          "max_num_batched_tokens": args.max_num_batched_tokens,
                          "kv_cache_dtype": args.kv_cache_dtype},
               "raw_bandwidth": raw, "targets": TARGETS, "rates": rates}
    _plot(results_dir(args.out) / "kv-offload.png", rates, args)
    write_result("kv-offload", summary, figures, out=args.out)
    return summary


def _plot(path, rates: dict, args) -> None:
    label, first = next(iter(rates.items()))
    rows = first["table"]["rows"]
    turns = [r["turn"] for r in rows]

    def series(key):
        return {"prefix cache only": (turns, [r[f"{key}_off"] for r in rows]),
                "with the host tier": (turns, [r[f"{key}_on"] for r in rows])}

    at = f" at {label} req/s" if len(rates) > 1 else ""
    panels = [
        {"kind": "lines", "title": f"TTFT per turn (mean over conversations){at}",
         "xlabel": "turn", "ylabel": "ms", "series": series("ttft_mean_ms")},
        {"kind": "lines", "title": f"TTFT per turn (p99){at}", "xlabel": "turn", "ylabel": "ms",
         "series": series("ttft_p99_ms")},
        {"kind": "lines", "title": f"prefill tokens computed per turn{at}", "xlabel": "turn",
         "ylabel": "tokens", "series": series("prefill_tokens")},
    ]
    if len(rates) > 1:
        panels.append({"kind": "bars", "title": "TTFT speedup from turn 4 vs request rate",
                       "ylabel": "mean TTFT without / with the tier", "labels":
                       [f"{k} req/s" for k in rates], "values":
                       [r["summary"]["ttft_speedup_turn4plus"] for r in rates.values()],
                       "hlines": {"target": TARGETS["ttft_speedup_turn4plus"]}})
    rate = ", ".join(rates)
    plots.save(path, panels, title=f"kv-offload: {args.num_conversations} chats x {args.turns} "
                                   f"turns, GPU pool {args.pool_fraction:g} of the working set, "
                                   f"{rate} req/s")
