"""The cost of one ``GET /v1/kv`` (pagedjax top's data) at 256 running sequences, on the host:
the view's build on the engine thread (``KVBoard.build``: ``make_stats`` + ``kv_view``) and its
JSON serialisation on the handler, plus what a step pays while nobody watches
(``KVBoard.after_step``). The engine runs on the fake device of ``host_overhead``, with prefix
caching on and n = 2 samples per request (shared blocks), so every part of the view has work.
``python -m benchmarks.experiments.kv_endpoint_cost [--out DIR]`` (prints a table, writes JSON)."""
from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.common import print_table, results_dir, write_result
from benchmarks.host_overhead import _fake_engine
from pagedjax.entrypoints.server.kv_status import KVBoard


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.kv_endpoint_cost")
    p.add_argument("--out", default=None)
    p.add_argument("--running-seqs", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args(argv)
    from pagedjax import SamplingParams

    # half the requests, two samples each: every prompt block is shared by two sequences
    engine, _ = _fake_engine(args.running_seqs, args.prompt_len, steps=64,
                             enable_prefix_caching=True)
    for rid in list(engine.requests):  # its requests are n = 1: ours replace them
        engine.abort(rid)
    requests = args.running_seqs // 2
    sp = SamplingParams(n=2, max_tokens=200, ignore_eos=True, temperature=0.7)
    for i in range(requests):
        engine.add_request(f"r{i}", [3 + (i * 7 + j) % 30000 for j in range(args.prompt_len)],
                           sp, stream=False)
    while len(engine.scheduler.running) < args.running_seqs:
        engine.step()
    for _ in range(8):
        engine.step()
    board = KVBoard()
    board.build(engine, engine.make_stats())
    view = board.view
    running = sum(r["sequences"] for r in view["requests"] if r["state"] == "running")
    unwatched = KVBoard()
    snap = engine.make_stats()
    row = {
        "running_seqs": running,
        "num_blocks": view["pool"]["num_blocks"],
        "used_blocks": view["pool"]["used"],
        "shared_blocks": view["pool"]["shared"],
        "build_ms": _median_ms(lambda: board.build(engine, engine.make_stats()), args.repeats),
        "serialize_ms": _median_ms(lambda: json.dumps(board.view, separators=(",", ":")),
                                   args.repeats),
        "unwatched_step_ms": _median_ms(lambda: unwatched.after_step(engine, snap), args.repeats),
        "body_kib": len(board.body()) / 1024,
    }
    row["per_call_ms"] = row["build_ms"] + row["serialize_ms"]
    print_table([row])
    summary = {"kv_endpoint_ms_per_call": row["per_call_ms"], "compilations_after_warmup": None}
    write_result("kv-endpoint-cost", summary, {"rows": [row]}, str(results_dir(args.out)))
    return summary


if __name__ == "__main__":
    main()
