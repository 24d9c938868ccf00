"""``GET /v1/kv``: the KV view (pagedjax.kv_view) for ``pagedjax top`` and anyone polling.

The engine thread builds the view, never the event loop (it reads the block manager, which only
the engine thread may touch), and only while someone watches: a poll marks the board watched for
``WATCH_S`` seconds, and while it is, the engine thread rebuilds the view after a step at most
every ``MIN_INTERVAL_S``. Unwatched, a step costs one clock read. A poll that finds no view or
one older than ``MAX_AGE_S`` (the first poll, or an idle engine whose last build predates its
last step) asks the engine thread for a fresh one and waits for it (at most one step).

Throughput (tokens/s) is the change of the engine's token counters between two builds at least
``RATE_WINDOW_S`` apart.
"""
from __future__ import annotations

import json
import time

from pagedjax.kv_view import kv_view
from pagedjax.stats import EngineSnapshot

WATCH_S = 5.0
MIN_INTERVAL_S = 0.25
MAX_AGE_S = 1.0
RATE_WINDOW_S = 1.0


class KVBoard:
    def __init__(self):
        self.view: dict | None = None  # the newest view; replaced whole, never changed
        self._built = 0.0  # time.monotonic() of the newest view
        self._watched_until = 0.0
        self._rate_ref: tuple[float, int, int] | None = None  # (time, prompt, generation)
        self._rates = {"prompt_tokens_per_s": None, "generation_tokens_per_s": None}
        self._body: tuple[dict | None, bytes] = (None, b"")

    # ---- engine thread -----------------------------------------------------------------------
    def after_step(self, engine, snap: EngineSnapshot) -> None:
        now = time.monotonic()
        if now < self._watched_until and now - self._built >= MIN_INTERVAL_S:
            self.build(engine, snap)

    def build(self, engine, snap: EngineSnapshot) -> None:
        now = time.monotonic()
        ref = self._rate_ref
        if ref is None or now - ref[0] >= RATE_WINDOW_S:
            if ref is not None:
                dt = now - ref[0]
                self._rates = {"prompt_tokens_per_s": (snap.prompt_tokens - ref[1]) / dt,
                               "generation_tokens_per_s": (snap.generation_tokens - ref[2]) / dt}
            self._rate_ref = (now, snap.prompt_tokens, snap.generation_tokens)
        view = kv_view(engine, snap)
        view["throughput"] = dict(self._rates)
        self.view, self._built = view, now

    # ---- handler side ------------------------------------------------------------------------
    def watch(self) -> bool:
        """Mark the board watched; True when the view is missing or stale (build one now)."""
        now = time.monotonic()
        self._watched_until = now + WATCH_S
        return self.view is None or now - self._built > MAX_AGE_S

    def body(self) -> bytes:
        """The newest view as JSON, serialised once however many clients poll it."""
        view, body = self._body
        if view is not self.view:
            view = self.view
            body = json.dumps(view, separators=(",", ":")).encode()
            self._body = (view, body)
        return body


async def kv_status(aengine) -> bytes:
    """The body of ``GET /v1/kv`` (an ``AsyncEngine`` with a ``kv`` board)."""
    board: KVBoard = aengine.kv
    if board.watch():
        engine = aengine.engine
        await aengine.on_engine_thread(lambda: board.build(engine, engine.make_stats()))
    return board.body()
