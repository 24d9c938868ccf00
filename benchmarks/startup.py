"""startup: seconds from `pagedjax serve` to a healthy server, cold and warm, and the first token.

Two starts of the same server with one fresh persistent compilation cache directory
(``--compilation-cache-dir``): the cold start compiles every step program (``--precompile``) and
stores it, the warm start (a restart, a deploy) loads them. Each start is timed from the process
launch to its first ``/health`` 200, then one short request measures the time to its first token
and the ``step_compilations`` counter says whether anything compiled after start-up (the target
is none). Each start also reads the server's ``startup_phase_seconds`` (device init, load,
prepare weights, size pool, host memory, allocate pool, precompile): ``engine_s`` is their sum,
and the rest of ``to_health_s`` is the process's own start and the HTTP server's. Summary:
``cold_s``, ``warm_s``, ``cold_ttft_s``, ``warm_ttft_s``, ``compilations_after_warmup``,
``{cold,warm}_<phase>_s``, and the precompile phase split by kind of program
(``{cold,warm}_precompile_{steps,sampler,copies}_s``: compiling, or loading from the cache, and
one run of each; the sampler and copy programs compile alongside the steps, so the three
overlap: see ``ModelRunner.warmup``).
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
import time

from benchmarks import harness, serving_client
from benchmarks.common import print_table, write_result

COLUMNS = ["start", "to_health_s", "engine_s", "first_token_s", "compiled_after_start"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    harness.add_engine_arguments(p)
    p.add_argument("--server-timeout", type=float, default=600.0,
                   help="seconds a start may take before it counts as failed")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for the started `pagedjax serve` (repeatable)")


def _first_token_s(url: str) -> float:
    import httpx

    body = {"model": "bench", "prompt": [1, 2, 3, 4], "max_tokens": 2, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.perf_counter() - t0
    raise RuntimeError("the stream ended without a token")


def _start(args, cache_dir: str, name: str) -> dict:
    args.num_prompts = 1  # sizes the server's waiting queue (serving_client)
    args.compilation_cache, args.compilation_cache_dir = True, cache_dir
    if args.precompile is None:
        args.precompile = True
    t0 = time.perf_counter()
    vocab = harness.hf_config_dict(args)["vocab_size"]
    with serving_client.started_server(args, vocab, dict(os.environ)) as url:
        healthy = time.perf_counter() - t0
        phases, parts = _phases(url)
        before = serving_client.scrape(url).get("step_compilations", 0)
        ttft = _first_token_s(url)
        after = serving_client.scrape(url).get("step_compilations", 0)
    return {"start": name, "to_health_s": healthy, "first_token_s": ttft,
            "compiled_after_start": after - before, "engine_s": sum(phases.values()),
            "phases_s": phases, "precompile_parts_s": parts}


def _phases(url: str) -> tuple[dict[str, float], dict[str, float]]:
    """The server's start-up phases in seconds ({"load": ..., "precompile": ...}), from
    ``pagedjax:startup_phase_seconds``, and the precompile phase by kind of program ({"steps",
    "sampler", "copies"}: ``pagedjax:precompile_seconds``); the rest of ``to_health_s`` is the
    process's own start (imports, argument parsing) and the HTTP server's."""
    import httpx

    phases, parts = {}, {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        m = re.match(r'pagedjax:(startup_phase|precompile)_seconds\{.*(?:phase|programs)="([^"]+)"'
                     r'.*\} (\S+)$', line)
        if m:
            (phases if m.group(1) == "startup_phase" else parts)[m.group(2)] = float(m.group(3))
    return phases, parts


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="pagedjax-compile-cache-") as cache:
        rows = [_start(args, cache, "cold"), _start(args, cache, "warm")]
    cold, warm = rows
    summary = {"cold_s": cold["to_health_s"], "warm_s": warm["to_health_s"],
               "cold_ttft_s": cold["first_token_s"], "warm_ttft_s": warm["first_token_s"],
               "compilations_after_warmup": sum(r["compiled_after_start"] for r in rows),
               **{f"{r['start']}_{phase.replace(' ', '_')}_s": v for r in rows
                  for phase, v in r["phases_s"].items()},
               **{f"{r['start']}_precompile_{kind}_s": v for r in rows
                  for kind, v in r["precompile_parts_s"].items()}}
    write_result("startup", summary, {"rows": rows, "precompile": args.precompile}, out=args.out)
    print_table(rows, COLUMNS)
    return summary
