"""step-profile: where one engine step's time goes, at a few batch sizes of pure decode.

For each batch size B: B random prompts of ``--input-len`` tokens are prefilled, a few decode
steps compile and warm up, then three measurements of the same decode state follow:

* ``step_ms``: wall time of ``LLMEngine.step()`` (schedule, prepare, dispatch, wait, postprocess);
* ``device_loop_ms``: the last engine step's packed inputs (kept by the engine's ``execute``
  seam) dispatched back to back ``--steps`` times with one wait at the end (the pool is donated
  from call to call): the device's own time per step, with host
  work and the per-step wait overlapped away. ``step_ms - device_loop_ms`` is what the host and the
  round trip add;
* a ``jax.profiler`` trace of ``--trace-steps`` engine steps, its device events summed by kernel
  name (and by a coarse category: matmul, attention, sampling, kv write, other) per step: what the
  device spends its time on, and ``device_busy_ms`` against ``step_ms`` (idle = waiting on host).

The trace is read from the Perfetto JSON that ``jax.profiler`` writes (no TensorBoard needed).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import logging
import re
import tempfile
import time

from benchmarks import harness
from benchmarks.common import int_list, print_table, results_dir, write_result

logger = logging.getLogger(__name__)

CATEGORIES = (  # first match wins; kernel names differ between XLA versions, so keep them coarse
    ("attention", r"decode_kernel|ragged|attention|paged|_merge"),
    ("sampling", r"sort|topk|top_k|cub|radix|threefry|random|gumbel"),
    ("kv write", r"scatter|dynamic.update|kv_write"),
    ("matmul", r"gemm|gemv|cublas|cutlass|matmul|dot|nvjet|sm90|xmma"),
    ("copy", r"memcpy|memset|copy"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    harness.add_engine_arguments(p)
    p.add_argument("--batch-sizes", type=int_list, default=[1, 64, 256])
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=30, help="measured steps per figure")
    p.add_argument("--trace-steps", type=int, default=5, help="engine steps in the trace (0: none)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="1.0 as the throughput benchmark (random sampling), 0 for greedy")
    p.add_argument("--top-kernels", type=int, default=25)
    p.add_argument("--keep-trace", type=int_list, default=[],
                   help="batch sizes whose raw trace is copied next to the JSON")


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def summarize_trace(path: str, steps: int, top: int) -> dict:
    """Device events of a Chrome/Perfetto JSON trace, summed by name and category, per step."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in procs.items() if re.search(r"/device:(GPU|TPU)", name)}
    by_name, busy, spans = collections.Counter(), 0.0, []
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device_pids:
            continue
        dur = float(e.get("dur", 0.0))
        by_name[e.get("name", "?")] += dur
        spans.append((float(e["ts"]), float(e["ts"]) + dur, e.get("name", "?")))
    spans.sort()  # busy time = union of the device intervals (streams may overlap)
    end, last, gaps = -1.0, None, collections.Counter()
    for a, b, name in spans:
        if last is not None and a - end > 5.0:  # idle device: which kernels does it sit between?
            gaps[(last[:60], name[:60])] += a - end
        if b > end:
            busy += b - max(a, end)
            end, last = b, name
    by_cat = collections.Counter()
    for name, us in by_name.items():
        by_cat[category(name)] += us
    per = max(steps, 1) * 1e3  # us in the trace -> ms per step
    return {"processes": sorted(procs.values()),
            "device_processes": sorted(procs[p] for p in device_pids),
            "device_busy_ms": busy / per,
            "kernel_sum_ms": sum(by_name.values()) / per,
            "device_span_ms": (max(b for _, b, _ in spans) - spans[0][0]) / per if spans else 0.0,
            "by_category_ms": {k: v / per for k, v in by_cat.most_common()},
            "top_kernels_ms": [{"name": n[:160], "ms": v / per, "category": category(n)}
                               for n, v in by_name.most_common(top)],
            "num_kernel_names": len(by_name),
            "idle_gaps_ms": [{"after": a, "before": b, "ms": v / per}
                             for (a, b), v in gaps.most_common(top)]}


def _trace(engine, steps: int, top: int, keep_to: str | None = None) -> dict:
    import jax

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - t0
        jax.profiler.stop_trace()
        files = sorted(glob.glob(f"{d}/**/*perfetto_trace.json.gz", recursive=True)
                       or glob.glob(f"{d}/**/*.trace.json.gz", recursive=True))
        if not files:
            return {"error": f"no trace file under {d}", "wall_ms_per_step": wall / steps * 1e3}
        out = summarize_trace(files[-1], steps, top)
        if keep_to:
            import shutil

            shutil.copy(files[-1], keep_to)
    out["wall_ms_per_step"] = wall / steps * 1e3  # profiling slows the host a little
    return out


def measure(e, last: dict, batch: int, args) -> dict:
    """The three figures at one batch size; ``last["inputs"]`` is the latest step's inputs."""
    import jax

    from pagedjax import SamplingParams

    total = args.steps * 2 + args.trace_steps + 16
    sp = SamplingParams(temperature=args.temperature, top_p=1.0, ignore_eos=True, max_tokens=total)
    prompts = harness.random_prompts([args.input_len] * batch, e.cfg.vocab_size, batch)
    ids = [f"p{batch}-{i}" for i in range(batch)]
    for rid, p in zip(ids, prompts):
        e.add_request(rid, p, sp, stream=False)
    while e.scheduler.waiting or any(not s.output_token_ids for s in e.scheduler.running):
        e.step()  # prefill
    for _ in range(4):
        e.step()  # compile and warm the decode shape
    if len(e.scheduler.running) != batch:
        raise RuntimeError(f"{len(e.scheduler.running)} of {batch} sequences running after prefill: "
                           "give the pool more room (--max-num-seqs, memory)")
    c0, st0 = e.runner.num_compilations, (e.stats.host_seconds, e.stats.device_seconds)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        e.step()
    step_s = (time.perf_counter() - t0) / args.steps
    host_s = (e.stats.host_seconds - st0[0]) / args.steps
    wait_s = (e.stats.device_seconds - st0[1]) / args.steps

    row = {"batch": batch, "input_len": args.input_len,
           "step_ms": step_s * 1e3, "host_ms": host_s * 1e3, "dispatch_wait_ms": wait_s * 1e3,
           "tok_s": batch / step_s, "compilations": e.runner.num_compilations - c0}
    if args.trace_steps:
        keep = (str(results_dir(args.out) / f"trace-b{batch}.json.gz")
                if batch in args.keep_trace else None)
        row["trace"] = _trace(e, args.trace_steps, args.top_kernels, keep)
        row["device_busy_ms"] = row["trace"].get("device_busy_ms")
    # the device's own time: the last decode step again, back to back, one wait at the end
    inputs = last["inputs"]
    row["layout"] = str(inputs.layout)
    jax.block_until_ready(e.runner.execute(inputs))
    t0, dispatch = time.perf_counter(), 0.0
    for _ in range(args.steps):  # the same step again and again (same slots, same tokens)
        t1 = time.perf_counter()
        out = e.runner.execute(inputs)
        dispatch += time.perf_counter() - t1
    jax.block_until_ready(out)
    device_s = (time.perf_counter() - t0) / args.steps
    for rid in ids:  # the loop rewrote the same slots; the requests end here
        e.abort(rid)

    row.update(device_loop_ms=device_s * 1e3, dispatch_ms=dispatch / args.steps * 1e3,
               tok_s_device_bound=batch / device_s)
    while e.has_unfinished():  # (nothing should be left)
        e.step()
    logger.info("batch %d: step %.2f ms (host %.2f, wait %.2f), device loop %.2f ms", batch,
                row["step_ms"], row["host_ms"], row["dispatch_wait_ms"], row["device_loop_ms"])
    return row


def run(args) -> dict:
    loaded = harness.load(args)
    longest = args.input_len + args.steps * 2 + args.trace_steps + 32
    ea = harness.engine_args(args, max_model_len=args.max_model_len or longest,
                             max_num_seqs=max(max(args.batch_sizes), args.max_num_seqs or 0))
    from pagedjax.engine import LLMEngine

    last = {}

    def execute(inputs):  # the engine's execute seam: the real step, its inputs kept
        last["inputs"] = inputs
        return engine.runner.execute(inputs)

    engine = LLMEngine(ea, loaded=loaded, execute=execute)
    rows = [measure(engine, last, b, args) for b in args.batch_sizes]
    print_table(rows, ["batch", "step_ms", "host_ms", "dispatch_wait_ms", "device_loop_ms",
                       "dispatch_ms",
                       "device_busy_ms", "tok_s", "tok_s_device_bound", "compilations"])
    for r in rows:
        t = r.get("trace", {})
        if "by_category_ms" in t:
            print(f"batch {r['batch']}: " + ", ".join(f"{k} {v:.2f} ms"
                                                      for k, v in t["by_category_ms"].items()))
            for k in t["top_kernels_ms"][:12]:
                print(f"    {k['ms']:8.3f} ms  {k['category']:9s} {k['name'][:100]}")
            for g in t["idle_gaps_ms"][:8]:
                print(f"    idle {g['ms']:8.3f} ms  after {g['after']}  before {g['before']}")
    summary = {f"b{r['batch']}_{k}": r[k] for r in rows
               for k in ("step_ms", "device_loop_ms", "host_ms", "tok_s")}
    summary["compilations_after_warmup"] = sum(r["compilations"] for r in rows)
    write_result("step-profile", summary, {"model": loaded.cfg.name or args.model,
                                           "dtype": loaded.dtype, "rows": rows}, out=args.out)
    harness.release(engine)
    return summary
