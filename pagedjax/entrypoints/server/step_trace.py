"""``pagedjax serve --step-trace FILE``: one JSON line per engine step, written by the engine thread.

It answers "where does the served step lose time": what each step scheduled, how long the engine
thread spent inside ``engine.step`` (host work + the wait for the device), how long it spent
handing the outputs to the event loops, and the gap before the next step began. A line:

    {"t": 1733554200.123,    wall time (time.time()) when engine.step was called
     "prefill": 512,         prompt tokens the step scheduled (recompute of a preempted one too)
     "decode": 31,           rows that feed a generated token (one new token each)
     "first": 2,             prefill rows that end their prompt, so sample a first token
     "step_ms": 9.1,         the engine thread inside engine.step
     "host_ms": 1.2, "device_ms": 7.9,   the engine's own split of it (EngineStats)
     "gap_ms": 0.4,          since the previous engine.step returned (delivery, commands, idle)
     "idle_ms": 0.0,         of which the engine thread slept with nothing to run
     "deliver_ms": 0.3}      _dispatch + _publish of this step's outputs

With async scheduling a step schedules batch k and waits for batch k - 1, so ``step_ms`` is the
wait for the previous batch while the composition is this one's; over a run they pair up. The
generated tokens of a run are ``sum(decode) + sum(first)`` (for requests that are not aborted).

Lines are buffered and flushed when the engine goes idle, at most a second apart, and on close:
a reader sees whole lines once the requests it waited for have finished.
"""
from __future__ import annotations

import json
import time

FLUSH_EVERY_S = 1.0


def composition(batch) -> tuple[int, int, int]:
    """(prefill tokens, decode rows, prefill rows that sample) of a ScheduledBatch, read after
    the scheduler closed it (its sequences' new tokens already count as computed)."""
    prefill = decode = first = 0
    if batch is None:
        return 0, 0, 0
    for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        start = seq.num_computed_tokens - n
        if start >= len(seq.prompt_token_ids):
            decode += 1
        else:
            prefill += n
            first += i in batch.samples
    return prefill, decode, first


class StepTrace:
    """Registered as one of the engine's ``step_observers`` (to read the step's batch and time
    split), then told by the engine thread when the step's outputs were delivered."""

    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1 << 20)
        self._pending: dict | None = None
        self._last_end = time.perf_counter()  # when the last engine.step returned (or we began)
        self._host = self._device = 0.0
        self._last_flush = time.perf_counter()

    def observe(self, engine) -> None:
        """The step observer: the batch this step scheduled and the engine's time split."""
        s = engine.stats
        prefill, decode, first = composition(engine.last_batch)
        self._pending = {"prefill": prefill, "decode": decode, "first": first,
                         "host_ms": round((s.host_seconds - self._host) * 1e3, 4),
                         "device_ms": round((s.device_seconds - self._device) * 1e3, 4)}
        self._host, self._device = s.host_seconds, s.device_seconds

    def record(self, wall: float, start: float, end: float, delivered: float,
               idle: float) -> None:
        """One step: ``wall`` its time.time() at the call; ``start``, ``end``, ``delivered``
        perf_counter at the call, the return and the end of delivery; ``idle`` the seconds the
        thread slept waiting for work since the last step."""
        line = self._pending or {"prefill": 0, "decode": 0, "first": 0}  # a step that raised
        self._pending = None
        gap, self._last_end = start - self._last_end, end
        ms = {"step_ms": end - start, "gap_ms": gap, "idle_ms": idle,
              "deliver_ms": delivered - end}
        line |= {k: round(v * 1e3, 4) for k, v in ms.items()}
        self._file.write(json.dumps({"t": round(wall, 6), **line}, separators=(",", ":")) + "\n")
        if delivered - self._last_flush >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        self._file.flush()
        self._last_flush = time.perf_counter()

    def close(self) -> None:
        self._file.close()


def read(path: str) -> list[dict]:
    """The trace's lines (a torn last line, from a server still writing, is left out)."""
    lines = []
    with open(path) as f:
        for text in f:
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                break
    return lines
