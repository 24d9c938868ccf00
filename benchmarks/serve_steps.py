"""The serve scenario's step figures: what the server's engine thread did during one measured run,
from its ``--step-trace`` file (pagedjax/entrypoints/server/step_trace.py).

Per run: steps per second, the mean prefill tokens and decode rows of a step, the share of steps
that mix the two, the time inside ``engine.step`` per step kind (decode-only / mixed /
prefill-only; with async scheduling a step's time is mostly the wait for the batch before it),
the gaps between steps, and the share of the run's wall time the engine thread spent outside
``engine.step`` (delivering outputs, taking commands, or idle with nothing to run), and its
split into waiting for the device, host work and idle.
"""
from __future__ import annotations

import time

import numpy as np

from pagedjax.entrypoints.server.step_trace import read

KINDS = ("decode", "mixed", "prefill")


def kind(line: dict) -> str | None:
    """decode-only, mixed, prefill-only, or None for a step that scheduled nothing (it only
    waited for the batch before it)."""
    if line["prefill"] and line["decode"]:
        return "mixed"
    return "prefill" if line["prefill"] else "decode" if line["decode"] else None


def window(path: str, start: float, end: float, tokens: int) -> list[dict]:
    """The trace's steps that began in [start, end] (time.time()). The server flushes its trace
    when its engine goes idle, which races the client's last read by a little: wait (a few
    seconds at most) for steps that account for the ``tokens`` the client received."""
    for _ in range(50):
        steps = [s for s in read(path) if start <= s["t"] <= end]
        if sum(s["decode"] + s["first"] for s in steps) >= tokens:
            break
        time.sleep(0.1)
    return steps


def figures(steps: list[dict]) -> dict:
    """The step figures of one run. Its wall time is the engine's span, from the first step's
    start to the end of the last one's delivery: the client's own ramp-up and tail (HTTP before
    the first request reaches the engine, the last stream's end) are not the engine's."""
    busy = [s for s in steps if kind(s)]
    wall_s = (steps[-1]["t"] - steps[0]["t"] + (steps[-1]["step_ms"] + steps[-1]["deliver_ms"])
              / 1e3) if steps else 0.0
    n = max(len(busy), 1)
    step_s = sum(s["step_ms"] for s in steps) / 1e3
    gaps = [s["gap_ms"] for s in steps[1:]]  # the first step's gap reaches back before the run
    f = {"wall_s": wall_s, "steps": len(busy), "empty_steps": len(steps) - len(busy),
         "steps_per_s": len(busy) / wall_s if wall_s > 0 else 0.0,
         "mean_prefill_tokens": sum(s["prefill"] for s in busy) / n,
         "mean_decode_rows": sum(s["decode"] for s in busy) / n,
         "mixed_step_share": sum(kind(s) == "mixed" for s in busy) / n,
         # each generated token is a decode row or the first token of a finished prefill
         "traced_generated_tokens": sum(s["decode"] + s["first"] for s in steps),
         "traced_prefill_tokens": sum(s["prefill"] for s in steps),
         "step_gap_ms_mean": float(np.mean(gaps)) if gaps else 0.0,
         "busy_gap_ms_mean": float(np.mean([s["gap_ms"] - s["idle_ms"] for s in steps[1:]]))
         if gaps else 0.0,
         "deliver_ms_mean": float(np.mean([s["deliver_ms"] for s in steps])) if steps else 0.0,
         "engine_busy_pct": 100 * step_s / wall_s if wall_s > 0 else 0.0,
         "idle_pct": 100 * sum(s["idle_ms"] for s in steps[1:]) / 1e3 / wall_s
         if wall_s > 0 else 0.0}
    f["outside_step_pct"] = 100 - f["engine_busy_pct"]
    # the engine thread's wall time = waiting for the device + host work + idle
    f["device_wait_pct"] = (100 * sum(s["device_ms"] for s in steps) / 1e3 / wall_s
                            if wall_s > 0 else 0.0)
    f["host_work_pct"] = (100 - f["device_wait_pct"] - f["idle_pct"]) if wall_s > 0 else 0.0
    f["host_ms_mean"] = float(np.mean([s["host_ms"] for s in busy])) if busy else 0.0
    for k in KINDS:
        ms = [s["step_ms"] for s in busy if kind(s) == k]
        f[f"{k}_steps"] = len(ms)
        f[f"{k}_step_ms_mean"] = float(np.mean(ms)) if ms else None
        f[f"{k}_step_ms_p50"] = float(np.median(ms)) if ms else None
        host = [s["host_ms"] for s in busy if kind(s) == k]
        f[f"{k}_host_ms_mean"] = float(np.mean(host)) if host else None
    return f


def panel(steps: list[dict], label: str) -> dict | None:
    """Step composition over the run: prefill tokens and decode rows of each step."""
    if not steps:
        return None
    t0 = steps[0]["t"]
    xs = [s["t"] - t0 for s in steps]
    return {"kind": "lines", "title": f"step composition, rate {label}", "xlabel": "s",
            "ylabel": "per step", "series": {
                "prefill tokens": (xs, [s["prefill"] for s in steps]),
                "decode rows": (xs, [s["decode"] for s in steps])}}
