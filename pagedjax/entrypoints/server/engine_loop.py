"""AsyncEngine: the LLMEngine stepping in ONE background thread, fed by asyncio request handlers.

The engine is not thread-safe, so the engine thread is the only one that touches it: handlers
send commands (add, abort) through a queue that the thread drains between steps, and the thread
hands each step's outputs back to the handlers' event loop with one ``call_soon_threadsafe`` per
step. Engine outputs are cumulative, so a request's stream keeps only the newest one: a slow
reader never makes outputs pile up, it just sees bigger deltas.

The thread also owns the metrics (gauges after every step, latency histograms from the engine's
per-request timestamps) and the periodic throughput log line.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable

from pagedjax.core.beam_search import BeamSearchParams
from pagedjax.engine import LLMEngine
from pagedjax.outputs import RequestOutput
from pagedjax.sampling_params import SamplingParams
from pagedjax.stats import EngineSnapshot

from pagedjax.entrypoints.server.kv_status import KVBoard
from pagedjax.entrypoints.server.metrics import EngineMetrics
from pagedjax.entrypoints.server.step_trace import StepTrace

logger = logging.getLogger(__name__)


class RequestFailedError(RuntimeError):
    """A request the engine could not finish; ``status`` and ``code`` are what its client sees."""

    def __init__(self, message: str, status: int = 500, code: str = "request_failed"):
        super().__init__(message)
        self.status, self.code = status, code


class EngineDeadError(RequestFailedError):
    """The engine thread stopped (a step raised, or the server is shutting down)."""

    def __init__(self, message: str):
        super().__init__(message, 500, "engine_dead")


@dataclasses.dataclass
class _Seen:
    """What the histograms need of a request between its outputs."""

    last: float  # the time of its last token (its arrival before the first)
    n: int
    max_tokens: int
    tokens: int = 0


@dataclasses.dataclass(frozen=True)
class Submission:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams | BeamSearchParams

    @property
    def num_seqs(self) -> int:
        p = self.params
        return p.beam_width if isinstance(p, BeamSearchParams) else p.best_of


class RequestStream:
    """The handler's side of one HTTP request: its engine requests (one per prompt) and the newest
    output of each. Lives on the event loop that created it."""

    def __init__(self, request_ids: list[str]):
        self.loop = asyncio.get_running_loop()
        self.request_ids = list(request_ids)
        self._unfinished = set(request_ids)
        self._latest: dict[str, RequestOutput] = {}
        self._ready = asyncio.Event()
        self._error: BaseException | None = None

    def _deliver(self, out: RequestOutput) -> None:
        self._latest[out.request_id] = out
        self._ready.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    async def updates(self) -> AsyncIterator[list[RequestOutput]]:
        """Yield the outputs that changed since the last yield, until every request finished."""
        while self._unfinished:
            await self._ready.wait()
            self._ready.clear()
            if self._error is not None:
                raise self._error
            batch, self._latest = list(self._latest.values()), {}
            for out in batch:
                if out.finished:
                    self._unfinished.discard(out.request_id)
            yield batch


def _deliver_all(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in items:
        stream._deliver(out)


def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():  # the handler gave up waiting (client gone); its abort follows the add
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: EngineMetrics, log_interval: float = 5.0,
                 log_stats: bool = True, step_trace: str | None = None):
        self.engine = engine
        self.metrics = metrics
        self.log_interval = log_interval
        self.log_stats = log_stats
        self.snapshot = EngineSnapshot()  # the engine thread's latest (pagedjax.stats)
        self.kv = KVBoard()  # GET /v1/kv's view, built by the engine thread while watched
        self.dead: BaseException | None = None
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stopping = False
        self.draining = False  # set on SIGTERM: new requests get 503 (server/shutdown.py)
        self._refusal: RequestFailedError | None = None  # set by fail_all: later adds fail too
        self._submitted_seqs = 0  # guarded by _lock: sequences handed to submit() ...
        self._added_seqs = 0  # ... and those the engine thread has taken in (added or refused)
        self._lock = threading.Lock()
        # engine-thread state
        self._streams: dict[str, RequestStream] = {}
        self._seen: dict[str, _Seen] = {}  # request -> its tokens so far, for the histograms
        self._last_log = time.monotonic()
        self._logged = EngineSnapshot()  # the snapshot of the last log line
        self.trace = StepTrace(step_trace) if step_trace else None  # --step-trace
        if self.trace is not None:
            engine.step_observers.append(self.trace.observe)
        self._idle = 0.0  # seconds slept waiting for work since the last step (for the trace)
        self._thread = threading.Thread(target=self._run, name="pagedjax-engine", daemon=True)

    # ---- handler side (event-loop threads) ---------------------------------------------------
    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._commands.put(lambda: None)  # wake the thread if it is idle
        self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    @property
    def num_queued(self) -> int:
        """Sequences waiting for the scheduler, counting those not yet handed to the engine."""
        with self._lock:
            pending = self._submitted_seqs - self._added_seqs
        return self.snapshot.num_waiting + pending

    @property
    def num_in_flight(self) -> int:
        """Requests being served, counting those not yet handed to the engine (read by the
        drain; the engine thread's dict is only sized here, never iterated)."""
        with self._lock:
            pending = self._submitted_seqs - self._added_seqs
        return len(self._streams) + pending

    async def submit(self, subs: list[Submission], arrival_time: float) -> RequestStream:
        """Add all of ``subs`` or none: a ValueError from the engine (a bad prompt) is raised here
        after undoing the ones already added."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine is not running ({self.dead or 'stopped'})")
        stream = RequestStream([s.request_id for s in subs])
        fut = stream.loop.create_future()
        seqs = sum(s.num_seqs for s in subs)
        with self._lock:
            self._submitted_seqs += seqs
        self._commands.put(lambda: self._add(subs, arrival_time, stream, fut, seqs))
        try:
            await fut
        except asyncio.CancelledError:
            self.abort(stream.request_ids)
            raise
        return stream

    async def on_engine_thread(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the engine thread between two steps (it may read the engine there);
        its exception is raised here."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine is not running ({self.dead or 'stopped'})")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def call():
            error = None
            try:
                fn()
            except Exception as e:  # raised in the handler, not in the engine thread
                error = e
            self._call(loop, _settle, fut, error)

        self._commands.put(call)
        await fut

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests (finished or unknown ones are ignored); returns at once."""
        ids = list(request_ids)
        self._commands.put(lambda: self._abort(ids))

    def fail_all(self, error: RequestFailedError) -> None:
        """Abort every request in flight and any added later, their clients getting ``error``
        (the end of a drain); returns at once."""
        self._commands.put(lambda: self._fail_all(error))

    # ---- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._publish()  # the programs the engine precompiled count from the start
            while not self._stopping:
                self._run_commands(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished() and not self._stopping:
                    wall, start = time.time(), time.perf_counter()
                    outputs = self.engine.step()
                    end = time.perf_counter()
                    self._dispatch(outputs)
                    self._publish()
                    if self.trace is not None:
                        self.trace.record(wall, start, end, time.perf_counter(), self._idle)
                        self._idle = 0.0
                else:
                    self._publish()
        except Exception as e:  # a host-side error leaves the engine in an unknown state: stop
            # (a failed device step is handled inside LLMEngine.step: pagedjax.worker.faults)
            logger.exception("engine step failed; failing all requests")
            self.dead = e
        finally:
            self.dead = self.dead or EngineDeadError("the engine was shut down")
            err = EngineDeadError(f"the engine stopped: {self.dead}")
            for stream in set(self._streams.values()):
                self._call(stream.loop, stream._fail, err)
            self._streams.clear()
            self._run_commands(block=False)  # pending adds see self.dead and fail
            if self.trace is not None:
                self.trace.close()

    def _run_commands(self, block: bool) -> None:
        try:
            if not block:
                cmd = self._commands.get_nowait()
            else:
                if self.trace is not None:  # idle: the lines so far become readable
                    self.trace.flush()
                t = time.perf_counter()
                try:
                    cmd = self._commands.get(timeout=self.log_interval or 1.0)
                finally:
                    self._idle += time.perf_counter() - t
        except queue.Empty:
            return
        while True:
            cmd()
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    @staticmethod
    def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # that server's loop is closed: nobody is listening
            pass

    def _add(self, subs: list[Submission], arrival: float, stream: RequestStream,
             fut: asyncio.Future, seqs: int) -> None:
        added: list[str] = []
        error: BaseException | None = None
        if self.dead is not None:
            error = EngineDeadError(f"the engine stopped: {self.dead}")
        elif self._refusal is not None:
            error = self._refusal
        else:
            try:
                for s in subs:
                    if isinstance(s.params, BeamSearchParams):  # outputs only when done
                        self.engine.add_beam_request(s.request_id, s.prompt_token_ids, s.params)
                    else:
                        self.engine.add_request(s.request_id, s.prompt_token_ids, s.params,
                                                arrival_time=arrival, stream=True)
                    added.append(s.request_id)
            except Exception as e:  # ValueError: a bad prompt; any other error fails only this
                error = e
                for rid in added:
                    self.engine.abort(rid)
            else:
                for rid in added:
                    self._streams[rid] = stream
                    self._seen[rid] = _Seen(last=arrival, n=s.params.n if isinstance(
                        s.params, SamplingParams) else s.params.beam_width,
                        max_tokens=s.params.max_tokens)
        with self._lock:
            self._added_seqs += seqs
        self._call(stream.loop, _settle, fut, error)

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if self._streams.pop(rid, None) is not None:
                self.engine.abort(rid)
                self._seen.pop(rid, None)
                self.metrics.finished["abort"].inc()
                logger.debug("aborted request %s", rid)

    def _fail_all(self, error: RequestFailedError) -> None:
        self._refusal = error
        streams = set(self._streams.values())
        self._abort(list(self._streams))
        for stream in streams:
            self._call(stream.loop, stream._fail, error)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.time()
        by_loop: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            self._observe(out, now)
            if out.finished:
                del self._streams[out.request_id]
                self._seen.pop(out.request_id, None)
            if out.error is not None:  # its device step failed (pagedjax.worker.faults): a 500
                self._call(stream.loop, stream._fail,
                           RequestFailedError(out.error, code="engine_step_failed"))
                continue
            by_loop[stream.loop].append((stream, out))
        for loop, items in by_loop.items():
            self._call(loop, _deliver_all, items)

    def _observe(self, out: RequestOutput, now: float) -> None:
        m, t, seen = self.metrics, out.metrics, self._seen[out.request_id]
        lengths = [len(o.token_ids) for o in out.outputs]
        n = sum(lengths)
        if n > seen.tokens:
            if seen.tokens == 0:
                m.ttft.observe((t.first_token_time or now) - t.arrival_time)
            else:
                m.itl.observe(now - seen.last)
                m.tpot.observe(now - seen.last)
            seen.tokens, seen.last = n, now
        if not out.finished:
            return
        reason = "error" if out.error is not None else (
            out.outputs[0].finish_reason if out.outputs else "stop")
        m.finished.get(reason, m.finished["stop"]).inc()
        end = t.finished_time or now
        m.e2e.observe(end - t.arrival_time)
        if t.first_scheduled_time is not None:
            m.queue.observe(t.first_scheduled_time - t.arrival_time)
            m.inference.observe(end - t.first_scheduled_time)
            if t.first_token_time is not None:
                m.prefill.observe(t.first_token_time - t.first_scheduled_time)
                m.decode.observe(end - t.first_token_time)
        m.request_prompt_tokens.observe(len(out.prompt_token_ids))
        m.request_generation_tokens.observe(n)
        m.request_max_generation_tokens.observe(max(lengths, default=0))
        m.request_n.observe(seen.n)
        m.request_max_tokens.observe(seen.max_tokens)

    def _publish(self) -> None:
        """The engine's snapshot into the metrics (counters by their change since the last one)
        and, every log interval, into the log line. ``self.snapshot`` is what handlers read."""
        m, before, snap = self.metrics, self.snapshot, self.engine.make_stats()
        self.snapshot = snap
        m.running.set(snap.num_running)
        m.waiting.set(snap.num_waiting)
        m.swapped.set(snap.num_swapped)
        m.kv_usage.set(snap.kv_cache_usage)
        m.gpu_usage.set(snap.kv_cache_usage)
        m.cpu_usage.set(snap.cpu_cache_usage)
        m.offload_usage.set(snap.kv_offload_usage)
        delta = snap.delta(before)
        for counter, name in ((m.prompt_tokens, "prompt_tokens"),
                              (m.generation_tokens, "generation_tokens"),
                              (m.preemptions, "num_preemptions"),
                              (m.prefix_queries, "prefix_cache_queries"),
                              (m.prefix_hits, "prefix_cache_hits"),
                              (m.compilations, "num_compilations"),
                              (m.offload_queries, "kv_offload_queries"),
                              (m.offload_hits, "kv_offload_hits"),
                              *((m.offload[what][d], f"kv_offload_{d}_{what}")
                                for what in m.offload for d in ("store", "load"))):
            if delta[name] > 0:
                counter.inc(delta[name])
        self.kv.after_step(self.engine, snap)
        self._maybe_log(snap)

    def _maybe_log(self, snap: EngineSnapshot) -> None:
        now = time.monotonic()
        elapsed = now - self._last_log
        if not self.log_stats or elapsed < self.log_interval:
            return
        d = snap.delta(self._logged)
        if (d["prompt_tokens"] or d["generation_tokens"] or snap.num_running or snap.num_waiting
                or snap.num_swapped):  # quiet when idle
            logger.info(
                "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                "Running: %d reqs, Waiting: %d reqs, Swapped: %d reqs, GPU KV cache usage: %.1f%%, "
                "CPU KV cache usage: %.1f%%", d["prompt_tokens"] / elapsed,
                d["generation_tokens"] / elapsed, snap.num_running, snap.num_waiting,
                snap.num_swapped, 100 * snap.kv_cache_usage, 100 * snap.cpu_cache_usage)
        self._last_log, self._logged = now, snap
