"""swap: the thrashing experiment: preemption by swap vs recompute vs no memory pressure.

Workload (defaults, Qwen2.5-7B-Instruct dummy weights): 5 prompts of 8,192 tokens, 500 new tokens
each, greedy, ``ignore_eos``. Three policies over the same workload:

* ``no-pressure``: a pool that holds all 5 sequences at their full length;
* ``swap``: a pool of ``--pool-prompts`` (3.05) prompts' worth of blocks, ``--preemption-mode
  swap`` with ``--swap-space`` (4 GiB) of pinned host memory: once the running sequences fill it,
  the youngest goes to the host and comes back as soon as there is room, again and again;
* ``recompute``: the same small pool, preemption by recompute (an 8K-token prefill each time).

Figures: swap events, blocks and bytes each way, the achieved transfer GB/s against the raw
pinned host<->device bandwidth measured in the same run, output tok/s of each policy, and output
tok/s over time (PNG). A swap's time runs from its dispatch to its data being in place (gather or
scatter included: ``pagedjax.worker.swap``). ``swap_pct_raw_bw`` is the time the raw bandwidth would need
for the payload moved (padding of the last piece counts against the swap), over the time the
swaps took, in percent, like with like: raw = transfers of the engine's piece size, as many per
call as one swap program moves (``benchmarks.swap_bandwidth``); ``swap_pct_raw_bw_large`` is the
same against one large (1 GiB) transfer each way. ``--transfer-only`` measures the transfers
alone, without a model, in under a minute (``benchmarks.swap_bandwidth``).

One engine serves the three policies so that they share compiled step shapes (a compile of the 7B
step costs seconds): its pool is the no-pressure size, and the pressure runs park the surplus
blocks under a ballast sequence, which to the scheduler is exactly a smaller pool; the swap space
is switched on for the swap run only. The swap programs compile when the engine starts, and on
a GPU or TPU so does every step shape (``--precompile``, on there by default). ``--warmup short``
(default) then compiles every step bucket the engine did not precompile (``runner.warmup``: on
the CPU, where ``--precompile`` is off) and runs the workload with a few new tokens, so
``compilations_after_warmup`` is 0 by construction, whichever shapes the swapping produces;
``--warmup full`` runs all three policies once unmeasured (the same schedule, hence the same step
shapes) at twice the time. ``warmup_compilations`` counts what the warm-up compiled.
"""
from __future__ import annotations

import argparse
import logging
import time

from benchmarks import harness, plots
from benchmarks.common import print_table, results_dir, write_result
from benchmarks.swap_bandwidth import (direction_figures, pct_of_raw, raw_large, raw_pieces,
                                       transfer_only)

logger = logging.getLogger(__name__)

POLICIES = ("no-pressure", "swap", "recompute")
BALLAST = -1  # the sequence id that holds the blocks a pressure run takes out of the pool
COLUMNS = ["policy", "output_tok_s", "elapsed_s", "steps", "preemptions_swap",
           "preemptions_recompute", "swap_out_events", "swap_in_events", "swap_out_gib",
           "swap_out_gb_s", "swap_in_gb_s", "compilations", "completed"]
FULL = dict(num_prompts=5, prompt_len=8192, output_len=500, pool_prompts=3.05, swap_space=4.0,
            bw_mib=1024, warmup_output_len=8, max_num_batched_tokens=2048, rounds=5)
TINY = dict(num_prompts=5, prompt_len=64, output_len=32, pool_prompts=3.05,
            swap_space=1 / 1024, bw_mib=16, warmup_output_len=4, max_num_batched_tokens=64,
            rounds=2)


def add_arguments(p: argparse.ArgumentParser) -> None:
    harness.add_engine_arguments(p)
    p.set_defaults(swap_space=None)
    for name, help_ in (("num_prompts", "requests"), ("prompt_len", "prompt tokens each"),
                        ("output_len", "new tokens each"),
                        ("pool_prompts", "device pool of the pressure runs, in prompts' worth of "
                                         "KV blocks (the workload needs ~5.3)"),
                        ("bw_mib", "MiB per raw bandwidth transfer"),
                        ("warmup_output_len", "new tokens of the short warm-up pass"),
                        ("rounds", "--transfer-only: rounds of swapping 3 sequences out and back")):
        kind = float if name == "pool_prompts" else int
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"{help_} (default {FULL[name]}; --tiny {TINY[name]})")
    p.add_argument("--warmup", choices=("short", "full"), default="short")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--transfer-only", action="store_true",
                   help="only the swap transfers and the raw bandwidth, no model (< 1 minute)")


# ---- one policy ------------------------------------------------------------------------------
def _run_policy(llm, policy: str, prompts, params, ballast_blocks: int) -> dict:
    e = llm.engine
    sched, bm, host = e.scheduler, e.block_manager, e.host_pool
    sched.swap = e.swap_space if policy == "swap" else None
    if policy != "no-pressure":
        bm.append_slots(BALLAST, 0, ballast_blocks * bm.block_size)
    pre0 = (sched.num_preemptions_swap, sched.num_preemptions_recompute)
    ev0, hc0, t0 = len(host.stats.events), host.num_compilations, time.perf_counter()
    try:
        r = harness.generate(llm, prompts, params)
    finally:
        bm.free(BALLAST)
        sched.swap = e.swap_space
    events = list(host.stats.events)[ev0:]
    completed = all(len(o.outputs[0].token_ids) == params.max_tokens
                    and o.outputs[0].finish_reason == "length" for o in r.outputs)
    row = {"policy": policy, "output_tok_s": r.output_tok_s, "elapsed_s": r.elapsed_s,
           "steps": r.steps, "completed": completed,
           "preemptions_swap": sched.num_preemptions_swap - pre0[0],
           "preemptions_recompute": sched.num_preemptions_recompute - pre0[1],
           "compilations": r.compilations + host.num_compilations - hc0}
    for d in ("out", "in"):
        f = direction_figures(events, d)
        mine = [ev for ev in events if ev.direction == d]
        row |= {f"swap_{d}_events": f["events"], f"swap_{d}_blocks": sum(ev.blocks for ev in mine),
                f"swap_{d}_gib": f["bytes"] / harness.GiB,
                f"swap_{d}_link_gib": sum(ev.link_bytes for ev in mine) / harness.GiB,
                f"swap_{d}_s": f["s"], f"swap_{d}_gb_s": f["gb_s"]}
    row["events"] = [{"t": ev.time - t0, "direction": ev.direction, "blocks": ev.blocks,
                      "pieces": ev.pieces, "programs": ev.programs, "ms": ev.seconds * 1e3,
                      "gb_s": ev.payload_bytes / ev.seconds / 1e9} for ev in events]
    row["timeline"] = harness.thin(r.timeline)
    row["rate"] = harness.rate_series(r.timeline)
    return row


def run(args) -> dict:
    from pagedjax import SamplingParams

    harness.preset(args, FULL, TINY, args.tiny)
    if args.max_model_len is None:
        args.max_model_len = args.prompt_len + args.output_len
    if args.transfer_only:
        return transfer_only(args)
    policies = [p for p in args.policies.split(",") if p]
    if not set(policies) <= set(POLICIES):
        raise ValueError(f"--policies {args.policies!r}: choose from {POLICIES}")
    loaded = harness.load(args)
    raw = raw_large(int(args.bw_mib * (1 << 20)))
    logger.info("raw pinned bandwidth, one large transfer: device->host %.1f GB/s, host->device "
                "%.1f GB/s (first transfers %.1f / %.1f GB/s)", raw["d2h_gb_s"], raw["h2d_gb_s"],
                raw["d2h_first_gb_s"], raw["h2d_first_gb_s"])

    bs = args.block_size
    seq_blocks = -(-(args.prompt_len + args.output_len) // bs)
    big = args.num_prompts * seq_blocks
    small = max(-(-int(args.pool_prompts * args.prompt_len) // bs), -(-args.max_model_len // bs))
    ea = harness.engine_args(args, num_gpu_blocks_override=big, preemption_mode="swap",
                             swap_space=args.swap_space, max_num_seqs=args.num_prompts,
                             max_num_batched_tokens=args.max_num_batched_tokens)
    llm = harness.make_llm(loaded, ea)
    e = llm.engine
    host = e.host_pool
    piece_raw = raw_pieces(host.piece_bytes, host.sizes[0])
    prompts = harness.random_prompts([args.prompt_len] * args.num_prompts, e.cfg.vocab_size,
                                     args.seed)
    greedy = dict(temperature=0.0, ignore_eos=True)
    params = SamplingParams(max_tokens=args.output_len, **greedy)

    t0, c0 = time.perf_counter(), e.runner.num_compilations + host.num_compilations
    if args.warmup == "full":
        for policy in policies:
            _run_policy(llm, policy, prompts, params, big - small)
    else:
        if not e.precompile:  # every step shape, not only those the short pass happens to hit
            e.runner.warmup()
        _run_policy(llm, "no-pressure", prompts,
                    SamplingParams(max_tokens=args.warmup_output_len, **greedy), big - small)
    warmup_s = time.perf_counter() - t0
    warm_compiled = e.runner.num_compilations + host.num_compilations - c0
    logger.info("warm-up (%s) took %.1f s, compiled %d programs (engine start: %d in %.1f s)",
                args.warmup, warmup_s, warm_compiled, e.precompile_compilations, e.precompile_s)

    rows, by = [], {}
    for policy in policies:
        row = by[policy] = _run_policy(llm, policy, prompts, params, big - small)
        rows.append(row)
        logger.info("%s: %.1f output tok/s, %d swaps out, %d recomputes", policy,
                    row["output_tok_s"], row["swap_out_events"], row["preemptions_recompute"])
        summary, figures = _summarise(args, raw, piece_raw, rows, by, e, big, small, warmup_s,
                                      warm_compiled)
        figures["table"] = {"columns": COLUMNS,
                            "rows": [{c: r[c] for c in COLUMNS} for r in rows]}
        write_result("swap", summary, figures, out=args.out, tag="tiny" if args.tiny else "")
    print_table(rows, COLUMNS)
    basis = piece_raw or raw
    print(f"raw pinned bandwidth at the engine's transfer sizes: device->host "
          f"{basis['d2h_gb_s']:.1f} GB/s, host->device {basis['h2d_gb_s']:.1f} GB/s; swaps reached "
          f"{summary['swap_pct_raw_bw'] or 0:.0f}% of it "
          f"({summary['swap_pct_raw_bw_large'] or 0:.0f}% of one large transfer's "
          f"{raw['d2h_gb_s']:.1f} / {raw['h2d_gb_s']:.1f} GB/s)")
    _plot(results_dir(args.out) / f"swap{'-tiny' if args.tiny else ''}.png", rows, raw, piece_raw,
          args)
    harness.release(llm)
    return summary


def _summarise(args, raw, piece_raw, rows, by, e, big, small, warmup_s, warm_compiled):
    sw = by.get("swap")

    def pct(basis):
        if not sw or basis is None:
            return None
        return pct_of_raw(sw["swap_out_gib"] * harness.GiB, sw["swap_out_s"],
                          sw["swap_in_gib"] * harness.GiB, sw["swap_in_s"], basis)

    summary = {
        "swap_pct_raw_bw": pct(piece_raw or raw),  # like with like: the engine's transfer sizes
        "swap_pct_raw_bw_large": pct(raw),
        "all_completed": all(r["completed"] for r in rows),
        **{f"output_tok_s_{p.replace('-', '_')}": by[p]["output_tok_s"] if p in by else None
           for p in POLICIES},
        "compilations_after_warmup": sum(r["compilations"] for r in rows),
        "warmup_s": warmup_s, "warmup_compilations": warm_compiled,
        **harness.precompile_figures(e),
        "swap_out_events": sw["swap_out_events"] if sw else None,
        "swap_in_events": sw["swap_in_events"] if sw else None,
        "swap_gib_moved": sw["swap_out_gib"] + sw["swap_in_gib"] if sw else None,
        "swap_out_gb_s": sw["swap_out_gb_s"] if sw else None,
        "swap_in_gb_s": sw["swap_in_gb_s"] if sw else None,
        "raw_piece_d2h_gb_s": (piece_raw or raw)["d2h_gb_s"],
        "raw_piece_h2d_gb_s": (piece_raw or raw)["h2d_gb_s"],
        "raw_large_d2h_gb_s": raw["d2h_gb_s"], "raw_large_h2d_gb_s": raw["h2d_gb_s"],
        "swap_transfers": e.host_pool.transfers,
        "preemptions_recompute": by["recompute"]["preemptions_recompute"] if "recompute" in by
        else None,
    }
    spec = e.spec
    figures = {
        "model": e.cfg.name or args.model, "dtype": e.config.dtype,
        "workload": {"num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
                     "output_len": args.output_len, "greedy": True},
        "engine": {"block_size": spec.block_size, "block_bytes": spec.bytes_per_block,
                   "pool_blocks_no_pressure": big, "pool_blocks_pressure": small,
                   "pool_prompts": args.pool_prompts, "max_model_len": e.max_model_len,
                   "max_num_batched_tokens": e.config.max_num_batched_tokens,
                   "swap_space_gib": args.swap_space, "host_pieces": len(e.host_pool.pieces),
                   "piece_blocks": e.host_pool.piece_blocks,
                   "piece_mib": e.host_pool.piece_bytes / (1 << 20),
                   "pieces_per_program": e.host_pool.sizes,
                   "host_memory_kind": e.host_pool.memory_kind or "numpy"},
        "raw_bandwidth_large": raw, "raw_bandwidth_pieces": piece_raw,
        "basis": "swap_pct_raw_bw: the swap run's transfers against raw_bandwidth_pieces (the "
                 "engine's piece size, as many per call as one swap program moves, pinned, this "
                 "run); swap_pct_raw_bw_large: against raw_bandwidth_large (one 1 GiB transfer "
                 "each way)",
        "warmup": args.warmup, "warmup_s": warmup_s,
        "rows": [{k: v for k, v in r.items() if k not in ("timeline", "rate", "events")}
                 for r in rows],
        "events": {r["policy"]: r["events"] for r in rows if r["events"]},
        "timelines": {r["policy"]: r["timeline"] for r in rows},
    }
    return summary, figures


def _plot(path, rows, raw, piece_raw, args) -> None:
    series = {f"{r['policy']} ({r['output_tok_s']:,.0f} tok/s)": tuple(r["rate"]) for r in rows}
    ev = [e for r in rows for e in r["events"]]
    gbs = {}
    for d in ("out", "in"):
        mine = [e for e in ev if e["direction"] == d]
        if mine:
            gbs[f"swap {d}"] = ([e["t"] for e in mine], [e["gb_s"] for e in mine])
    plots.save(path, [
        {"kind": "lines", "title": "output tokens/s over time", "xlabel": "s", "ylabel": "tok/s",
         "series": series},
        {"kind": "lines", "title": "swap transfers vs raw pinned bandwidth", "xlabel": "s",
         "ylabel": "GB/s", "series": gbs,
         "hlines": {f"raw {what} {d} {r[d + '_gb_s']:.1f}": r[d + "_gb_s"]
                    for what, r in (("large", raw), ("pieces", piece_raw)) if r
                    for d in ("d2h", "h2d")}} if gbs else None,
    ], title=f"swap thrashing: {args.num_prompts} x {args.prompt_len} tokens + "
             f"{args.output_len} new, pool {args.pool_prompts} prompts")
