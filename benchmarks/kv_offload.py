"""kv-offload: multi-turn chats whose working set exceeds the GPU pool, prefix caching with and
without its host tier (``--kv-offloading-size``, issue 21).

Workload: the ``prefix`` scenario's (benchmarks/prefix.py: ``--num-conversations`` chats of
``--turns`` turns in lockstep, each turn's prompt = the history + the answer + a new user message
of random ids, greedy answers of ``--answer-len`` tokens), sent by a client that keeps
``--max-concurrency`` requests in flight (default: the conversations the GPU pool holds at the
last turn; TTFT counts from when a request is sent, as vLLM's client counts it), with the GPU pool limited by
``--num-gpu-blocks-override`` to ``--pool-fraction`` (default a quarter) of the working set, the
blocks of every conversation at its last turn (at least two conversations' worth). Without the
tier the prefix cache evicts most conversations' histories between their turns and the next turn
recomputes them; with it they come back from host memory. Both runs: prefix caching on, the same workload, after a warm-up of
``--warmup-turns`` turns of another workload (compiles what ``--precompile`` did not and touches
the host pool). Each run's answers are compared (greedy: ``answers_identical`` should be 1).

The host tier defaults to twice the working set (``--num-cpu-blocks-override``), so that what
the figures measure is the copy, not the tier's size; ``--kv-offloading-size`` GiB sets it.

Figures per turn and mode: TTFT mean / p50 / p99 over the conversations, prefill tokens computed,
GPU and host hit rates; per mode: output tok/s (output tokens over the workload's wall time),
the tier's blocks and bytes each way and their GB/s (bytes over the transfer events' seconds,
pagedjax.worker.swap: each event is timed from when the device finished the step before it). The
raw pinned bandwidth is measured in the same process (benchmarks/swap_bandwidth.py: one large
``device_put`` each way). Summary: ``ttft_speedup_turn4plus`` (mean TTFT of turns >= 4 without
the tier over with it; target >= 3 on the H100), ``throughput_ratio`` (output tok/s with / without;
target >= 1.5), ``transfer_pct_raw_bw`` (the time the raw link would take for the bytes the tier
moved, whole host pieces, over the time its transfers took, in percent; target >= 70),
``compilations_after_warmup`` (step and transfer programs; target 0).
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from benchmarks import harness, plots
from benchmarks.common import print_table, results_dir, write_result
from benchmarks.prefix import _turn_figures

logger = logging.getLogger(__name__)

MODES = (("off", False), ("on", True))
COLUMNS = ["turn", "prompt_len", "ttft_mean_ms_off", "ttft_mean_ms_on", "ttft_p99_ms_off",
           "ttft_p99_ms_on", "speedup", "host_hit_rate", "prefill_tokens_off",
           "prefill_tokens_on"]
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
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at once, as a client with that many connections "
                        "(default: as many conversations as the GPU pool holds at the last turn; "
                        "0 sends each turn's requests all at once)")
    p.add_argument("--bw-mib", type=int, default=None,
                   help="raw bandwidth transfer size (default 1024; 16 with --tiny)")


def _conversations(llm, args, seed: int, turns: int) -> tuple[list[dict], list, float]:
    """The workload: per-turn figures, every answer, and the wall time."""
    from pagedjax import SamplingParams

    e, vocab = llm.engine, llm.engine.cfg.vocab_size
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0.0, max_tokens=args.answer_len, ignore_eos=True)
    histories = [rng.integers(2, vocab, size=args.user_len).tolist()
                 for _ in range(args.num_conversations)]
    out, answers, t_all = [], [], time.perf_counter()
    for t in range(turns):
        s0, c0 = e.make_stats(), e.stats.computed_tokens
        outs = _generate_limited(e, histories, params, args.max_concurrency, f"t{seed}-{t}")
        s1 = e.make_stats()
        d = s1.delta(s0)
        fig = _turn_figures(outs, histories, e.stats.computed_tokens - c0,
                            d["prefix_cache_hits"], d["prefix_cache_queries"], args)
        ttft = fig["ttft_ms"]
        fig.update(turn=t + 1, ttft_p99_ms=float(np.percentile(ttft, 99)),
                   host_hits=d["kv_offload_hits"], host_queries=d["kv_offload_queries"],
                   host_hit_rate=(d["kv_offload_hits"] / d["kv_offload_queries"]
                                  if d["kv_offload_queries"] else 0.0))
        out.append(fig)
        answers.append([o.outputs[0].token_ids for o in outs])
        histories = [h + o.outputs[0].token_ids + rng.integers(2, vocab, size=args.user_len)
                     .tolist() for h, o in zip(histories, outs)]
    return out, answers, time.perf_counter() - t_all


def _generate_limited(e, prompts: list[list[int]], params, limit: int | None,
                      tag: str) -> list:
    """Every prompt through the engine with at most ``limit`` in flight (all at once without):
    a client holding ``limit`` connections, as vLLM's ``--max-concurrency``. A request's TTFT
    counts from when it is sent, so it measures the server, not the client's own queue."""
    limit = limit or len(prompts)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    done: dict[str, object] = {}
    sent = 0
    while len(done) < len(prompts):
        while sent < len(prompts) and sent - len(done) < limit:
            e.add_request(ids[sent], prompts[sent], params, stream=False)
            sent += 1
        for out in e.step():
            if out.error is not None:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids]


def _run_mode(loaded, args, tier: bool, pool_blocks: int, host_blocks: int) -> dict:
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

    t0, c0 = time.perf_counter(), compiled()
    if args.warmup_turns:
        _conversations(llm, args, args.seed + 1, args.warmup_turns)
    warmup_s, warm_compiled = time.perf_counter() - t0, compiled() - c0
    if e.host_pool is not None:
        e.host_pool.wait()
    c0, before, t0 = compiled(), e.make_stats(), time.perf_counter()
    turns, answers, wall = _conversations(llm, args, args.seed, args.turns)
    if e.host_pool is not None:
        e.host_pool.wait()
    d = e.make_stats().delta(before)
    out_tokens = sum(t["output_tokens"] for t in turns)
    res = {"turns": turns, "answers": answers, "elapsed_s": wall, "output_tok_s": out_tokens / wall,
           "compilations": compiled() - c0, "warmup_s": warmup_s,
           "warmup_compilations": warm_compiled, "preemptions": d["num_preemptions"],
           "kv_cache_blocks": e.block_manager.num_blocks, **harness.precompile_figures(e),
           "host_hit_rate": (d["kv_offload_hits"] / d["kv_offload_queries"]
                             if d["kv_offload_queries"] else 0.0),
           "gpu_hit_rate": (d["prefix_cache_hits"] / d["prefix_cache_queries"]
                            if d["prefix_cache_queries"] else 0.0)}
    if tier:
        stats, s = e.host_pool.stats, e.swap_space
        res["host_tier"] = {"blocks": s.num_pieces * s.piece_blocks, "piece_blocks": s.piece_blocks,
                            "piece_bytes": e.host_pool.piece_bytes, "transfers":
                            e.host_pool.transfers}
        for direction in ("store", "load"):
            events = [ev for ev in stats.events if ev.direction == direction and ev.time >= t0]
            link = sum(ev.link_bytes for ev in events)
            payload = sum(ev.payload_bytes for ev in events)
            secs = sum(ev.seconds for ev in events)
            res[direction] = {"events": len(events), "blocks": sum(ev.blocks for ev in events),
                              "payload_bytes": payload, "link_bytes": link, "seconds": secs,
                              "link_gb_s": link / secs / 1e9 if secs else None,
                              "payload_gb_s": payload / secs / 1e9 if secs else None}
    harness.release(llm)
    return res


def run(args) -> dict:
    from benchmarks.swap_bandwidth import pct_of_raw, raw_large

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
    off, on = res["off"], res["on"]
    rows = []
    for a, b in zip(off["turns"], on["turns"]):
        rows.append({"turn": a["turn"], "prompt_len": a["prompt_len"],
                     **{f"ttft_{s}_ms_{m}": t[f"ttft_{s}_ms"] for s in ("mean", "p50", "p99")
                        for m, t in (("off", a), ("on", b))},
                     "speedup": a["ttft_mean_ms"] / b["ttft_mean_ms"],
                     "host_hit_rate": b["host_hit_rate"],
                     "prefill_tokens_off": a["prefill_tokens"],
                     "prefill_tokens_on": b["prefill_tokens"]})
    late = [r for r in rows if r["turn"] >= 4] or rows
    st, ld = on["store"], on["load"]
    link_pct = pct_of_raw(st["link_bytes"], st["seconds"], ld["link_bytes"], ld["seconds"], raw)
    payload_pct = pct_of_raw(st["payload_bytes"], st["seconds"], ld["payload_bytes"],
                             ld["seconds"], raw)
    same = [x == y for ta, tb in zip(off["answers"], on["answers"]) for x, y in zip(ta, tb)]
    summary = {
        "ttft_speedup_turn4plus": (float(np.mean([r["ttft_mean_ms_off"] for r in late]))
                                   / float(np.mean([r["ttft_mean_ms_on"] for r in late]))),
        "throughput_ratio": on["output_tok_s"] / off["output_tok_s"],
        "transfer_pct_raw_bw": link_pct, "transfer_payload_pct_raw_bw": payload_pct,
        "compilations_after_warmup": off["compilations"] + on["compilations"],
        "host_hit_rate": on["host_hit_rate"],
        "prefill_tokens_ratio": (sum(r["prefill_tokens_off"] for r in rows)
                                 / max(sum(r["prefill_tokens_on"] for r in rows), 1)),
        "store_gb_s": st["link_gb_s"], "load_gb_s": ld["link_gb_s"],
        "raw_d2h_gb_s": raw["d2h_gb_s"], "raw_h2d_gb_s": raw["h2d_gb_s"],
        "output_tok_s_off": off["output_tok_s"], "output_tok_s_on": on["output_tok_s"],
        "answers_identical": sum(same) / len(same), "gpu_pool_blocks": pool_blocks,
        "working_set_blocks": working_set, "num_conversations": args.num_conversations,
        "max_concurrency": args.max_concurrency,
        "turns": args.turns,
    }
    print_table(rows, COLUMNS)
    print(f"turns >= 4: TTFT {summary['ttft_speedup_turn4plus']:.2f}x better with the host tier "
          f"(target >= {TARGETS['ttft_speedup_turn4plus']:g}x); output tok/s "
          f"{summary['throughput_ratio']:.2f}x (>= {TARGETS['throughput_ratio']:g}x); transfers "
          f"at {link_pct or 0:.0f}% of the raw pinned bandwidth (>= "
          f"{TARGETS['transfer_pct_raw_bw']:g}%); host hit rate {on['host_hit_rate']:.1%}; "
          f"{summary['compilations_after_warmup']} compilations after warm-up")
    for mode in res.values():
        del mode["answers"]  # token ids: long, and only their equality matters
    figures = {"model": loaded.cfg.name or args.model, "dtype": loaded.dtype,
               "workload": {k: getattr(args, k) for k in FULL} | {
                   "arrivals": "lockstep: a turn of every conversation at once",
                   "pool_fraction": args.pool_fraction, "warmup_turns": args.warmup_turns},
               "engine": {"max_model_len": args.max_model_len, "block_size": args.block_size,
                          "max_num_seqs": args.max_num_seqs,
                          "max_num_batched_tokens": args.max_num_batched_tokens,
                          "kv_cache_dtype": args.kv_cache_dtype},
               "raw_bandwidth": raw, "targets": TARGETS, **res,
               "table": {"columns": COLUMNS, "rows": rows}}
    _plot(results_dir(args.out) / "kv-offload.png", rows, args)
    write_result("kv-offload", summary, figures, out=args.out)
    return summary


def _plot(path, rows: list[dict], args) -> None:
    turns = [r["turn"] for r in rows]

    def series(key):
        return {"prefix cache only": (turns, [r[f"{key}_off"] for r in rows]),
                "with the host tier": (turns, [r[f"{key}_on"] for r in rows])}

    plots.save(path, [
        {"kind": "lines", "title": "TTFT per turn (mean over conversations)", "xlabel": "turn",
         "ylabel": "ms", "series": series("ttft_mean_ms")},
        {"kind": "lines", "title": "TTFT per turn (p99)", "xlabel": "turn", "ylabel": "ms",
         "series": series("ttft_p99_ms")},
        {"kind": "lines", "title": "prefill tokens computed per turn", "xlabel": "turn",
         "ylabel": "tokens", "series": series("prefill_tokens")},
    ], title=f"kv-offload: {args.num_conversations} chats x {args.turns} turns, GPU pool "
             f"{args.pool_fraction:g} of the working set")
