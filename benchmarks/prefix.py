"""prefix: multi-turn chat TTFT per turn with and without automatic prefix caching.

Workload: ``--num-conversations`` chats of ``--turns`` turns. Turn 1's prompt is one user message
of ``--user-len`` random token ids; turn t+1's prompt is turn t's prompt + the model's answer
(``--answer-len`` tokens, greedy, ``ignore_eos``) + a new user message of ``--user-len`` tokens,
so the history grows by user-len + answer-len tokens a turn (turn 8 of 300 / 100: 3,100 tokens).
The user messages come from one seed, so both runs get the same workload (the answers have the
same lengths; their tokens are each run's own, since only a run's own answers are in its cache).

Arrivals, lockstep: each turn, the turn's requests of all conversations are submitted together
(one ``LLM.generate``), and the next turn starts when every answer of this one is done. With
fixed answer lengths every conversation finishes its answer in the same step, so this is also
what "each conversation sends its next turn when its answer arrives" gives, minus think time.
TTFT is the engine's own: first token time - arrival time of each request, so it includes
waiting behind the other conversations' prefills, which is exactly what caching shortens.

The same workload runs on two engines (prefix caching off, then on), each warmed up first:
``--warmup workload`` (default) runs the whole workload once with other user messages (the same
lengths, hence the same step shapes: ``compilations_after_warmup`` is 0 unless something else
changes), ``buckets`` compiles the runner's bucket shapes (``runner.warmup``), ``none`` nothing.
(``--enable-prefix-caching`` is ignored here: both runs are made.)
Figures per turn: TTFT mean / p50 / max over conversations, prompt tokens, prefill tokens actually
computed, prefix-cache hit rate (block manager ``hits / queries``, in tokens). Summary:
``ttft_turn8_speedup`` = mean TTFT of the last turn without caching / with caching (issue 10's
target is >= 3 on the H100), the hit rate, and ``compilations_after_warmup``.
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from benchmarks import harness, plots
from benchmarks.common import print_table, results_dir, write_result

logger = logging.getLogger(__name__)

MODES = (("no_cache", False), ("cache", True))
COLUMNS = ["turn", "prompt_len", "ttft_mean_ms_no_cache", "ttft_mean_ms_cache",
           "ttft_p50_ms_no_cache", "ttft_p50_ms_cache", "speedup", "hit_rate",
           "prefill_tokens_no_cache", "prefill_tokens_cache"]
TARGET_SPEEDUP = 3.0  # issue 10, Qwen2.5-7B on the H100, turn 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    harness.add_engine_arguments(p)
    p.add_argument("--num-conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--user-len", type=int, default=300, help="tokens of each user message")
    p.add_argument("--answer-len", type=int, default=100, help="tokens of each answer")
    p.add_argument("--warmup", choices=("workload", "buckets", "none"), default="workload")


def _turn_figures(outs, prompts, computed: int, hits: int, queries: int, args) -> dict:
    ttft = [(o.metrics.first_token_time - o.metrics.arrival_time) * 1e3 for o in outs]
    # of which waiting to be scheduled (the rest: from the first step that ran it to its token)
    queue = [(o.metrics.first_scheduled_time - o.metrics.arrival_time) * 1e3 for o in outs]
    decode = len(outs) * (args.answer_len - 1)  # one token per decode step after the first
    return {"prompt_tokens": sum(len(p) for p in prompts),
            "prompt_len": float(np.mean([len(p) for p in prompts])),
            "ttft_ms": ttft, "ttft_mean_ms": float(np.mean(ttft)),
            "ttft_p50_ms": float(np.median(ttft)), "ttft_max_ms": float(np.max(ttft)),
            "queue_mean_ms": float(np.mean(queue)),
            "prefill_tokens": computed - decode, "hits": hits, "queries": queries,
            "hit_rate": hits / queries if queries else 0.0,
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


def conversations(llm, args, seed: int) -> tuple[list[dict], list[list[list[int]]]]:
    """Run the workload; returns per-turn figures and every turn's answers."""
    from pagedjax import SamplingParams

    e, vocab = llm.engine, llm.engine.cfg.vocab_size
    rng = np.random.default_rng(seed)

    def user():
        return rng.integers(2, vocab, size=args.user_len).tolist()

    params = SamplingParams(temperature=0.0, max_tokens=args.answer_len, ignore_eos=True)
    histories = [user() for _ in range(args.num_conversations)]
    turns, answers = [], []
    for t in range(args.turns):
        bm, c0 = e.block_manager, e.stats.computed_tokens
        h0, q0 = bm.hits, bm.queries
        t0 = time.perf_counter()
        outs = llm.generate(histories, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        fig = _turn_figures(outs, histories, e.stats.computed_tokens - c0, bm.hits - h0,
                            bm.queries - q0, args)
        turns.append({"turn": t + 1, "wall_s": wall, **fig})
        answers.append([o.outputs[0].token_ids for o in outs])
        if t + 1 < args.turns:  # the user messages are drawn in the same order in every run
            histories = [h + o.outputs[0].token_ids + user() for h, o in zip(histories, outs)]
    return turns, answers


def _run_mode(loaded, args, caching: bool) -> dict:
    llm = harness.make_llm(loaded, harness.engine_args(args, enable_prefix_caching=caching))
    e = llm.engine
    need = args.num_conversations * e.block_manager.blocks_for(args.max_model_len)
    if need > e.block_manager.num_blocks:
        logger.warning("the pool (%d blocks) is smaller than %d conversations at full length "
                       "(%d blocks): expect preemptions and evictions",
                       e.block_manager.num_blocks, args.num_conversations, need)
    t0, c0 = time.perf_counter(), e.runner.num_compilations
    if args.warmup == "workload":
        conversations(llm, args, args.seed + 1)
    elif args.warmup == "buckets":
        e.runner.warmup(max_context=args.max_model_len)
    warmup_s, warm_compiled = time.perf_counter() - t0, e.runner.num_compilations - c0
    logger.info("%s: warm-up (%s) compiled %d step shapes in %.1f s",
                "cache" if caching else "no cache", args.warmup, warm_compiled, warmup_s)
    bm, c0, pre0 = e.block_manager, e.runner.num_compilations, e.scheduler.num_preemptions
    h0, q0 = bm.hits, bm.queries
    t0 = time.perf_counter()
    turns, answers = conversations(llm, args, args.seed)
    out = {"turns": turns, "answers": answers, "elapsed_s": time.perf_counter() - t0,
           "compilations": e.runner.num_compilations - c0, "warmup_s": warmup_s,
           "warmup_compilations": warm_compiled, "hits": bm.hits - h0,
           "queries": bm.queries - q0, "preemptions": e.scheduler.num_preemptions - pre0,
           **harness.precompile_figures(e),
           "kv_cache_blocks": bm.num_blocks, "block_size": bm.block_size}
    out["hit_rate"] = out["hits"] / out["queries"] if out["queries"] else 0.0
    harness.release(llm)
    return out


def run(args) -> dict:
    if args.max_model_len is None:
        args.max_model_len = args.turns * (args.user_len + args.answer_len)
    loaded = harness.load(args)
    res = {}
    for name, caching in MODES:
        res[name] = _run_mode(loaded, args, caching)
        if not caching:  # a run killed by a time limit says how far it got
            write_result("prefix", {f"ttft_turn{args.turns}_speedup": None,
                                    "compilations_after_warmup": None,
                                    "status": "no-cache run done, cache run not finished"},
                         {"no_cache": {k: v for k, v in res[name].items() if k != "answers"}},
                         out=args.out)
    off, on = res["no_cache"], res["cache"]
    rows = []
    for a, b in zip(off["turns"], on["turns"]):
        rows.append({"turn": a["turn"], "prompt_len": a["prompt_len"],
                     **{f"ttft_{s}_ms_{mode}": t[f"ttft_{s}_ms"]
                        for s in ("mean", "p50") for mode, t in (("no_cache", a), ("cache", b))},
                     "speedup": a["ttft_mean_ms"] / b["ttft_mean_ms"], "hit_rate": b["hit_rate"],
                     "prefill_tokens_no_cache": a["prefill_tokens"],
                     "prefill_tokens_cache": b["prefill_tokens"]})
    last = rows[-1]
    same = [x == y for ta, tb in zip(off["answers"], on["answers"]) for x, y in zip(ta, tb)]
    n = args.turns
    summary = {
        f"ttft_turn{n}_speedup": last["speedup"],
        f"ttft_turn{n}_p50_speedup": last["ttft_p50_ms_no_cache"] / last["ttft_p50_ms_cache"],
        f"ttft_turn{n}_ms_no_cache": last["ttft_mean_ms_no_cache"],
        f"ttft_turn{n}_ms_cache": last["ttft_mean_ms_cache"],
        "prefix_cache_hit_rate": on["hit_rate"], "hit_rate_no_cache": off["hit_rate"],
        "compilations_after_warmup": off["compilations"] + on["compilations"],
        "precompile_s": off["precompile_s"] + on["precompile_s"],
        "prefill_tokens_ratio": (sum(r["prefill_tokens_no_cache"] for r in rows)
                                 / max(sum(r["prefill_tokens_cache"] for r in rows), 1)),
        "elapsed_s_no_cache": off["elapsed_s"], "elapsed_s_cache": on["elapsed_s"],
        "answers_identical": sum(same) / len(same),
        "preemptions": off["preemptions"] + on["preemptions"],
        "num_conversations": args.num_conversations, "turns": n,
    }
    print_table(rows, COLUMNS)
    print(f"turn {n} TTFT: {last['ttft_mean_ms_no_cache']:.1f} ms without prefix caching, "
          f"{last['ttft_mean_ms_cache']:.1f} ms with it ({last['speedup']:.2f}x; target "
          f">= {TARGET_SPEEDUP:g}x on the H100); hit rate {on['hit_rate']:.1%}; "
          f"{summary['compilations_after_warmup']} compilations after warm-up")
    for mode in res.values():
        del mode["answers"]  # token ids: long, and only their equality matters
    figures = {"model": loaded.cfg.name or args.model, "dtype": loaded.dtype,
               "workload": {"num_conversations": args.num_conversations, "turns": n,
                            "user_len": args.user_len, "answer_len": args.answer_len,
                            "arrivals": "lockstep: a turn of every conversation at once"},
               "engine": {"max_model_len": args.max_model_len, "block_size": args.block_size,
                          "max_num_seqs": args.max_num_seqs,
                          "max_num_batched_tokens": args.max_num_batched_tokens},
               "warmup": args.warmup, "target_speedup": TARGET_SPEEDUP, **res,
               "table": {"columns": COLUMNS, "rows": rows}}
    _plot(results_dir(args.out) / "prefix.png", rows, args)
    write_result("prefix", summary, figures, out=args.out)
    return summary


def _plot(path, rows: list[dict], args) -> None:
    turns = [r["turn"] for r in rows]
    plots.save(path, [
        {"kind": "lines", "title": "TTFT per turn (mean over conversations)", "xlabel": "turn",
         "ylabel": "ms", "series": {
             "no prefix caching": (turns, [r["ttft_mean_ms_no_cache"] for r in rows]),
             "prefix caching": (turns, [r["ttft_mean_ms_cache"] for r in rows])}},
        {"kind": "lines", "title": "prefill tokens computed per turn", "xlabel": "turn",
         "ylabel": "tokens", "series": {
             "no prefix caching": (turns, [r["prefill_tokens_no_cache"] for r in rows]),
             "prefix caching": (turns, [r["prefill_tokens_cache"] for r in rows])}},
    ], title=f"prefix: {args.num_conversations} chats x {args.turns} turns "
             f"(+{args.user_len} user / {args.answer_len} answer tokens a turn)")
