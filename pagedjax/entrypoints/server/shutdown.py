"""Graceful shutdown: SIGTERM drains the server before it exits.

On SIGTERM the server keeps its socket open but answers every new generation request (and
/health) with 503 ``shutting_down``, so a load balancer moves traffic elsewhere, while requests
already in flight run to the end. When none is left, or after ``--drain-timeout`` seconds, the
ones still running are aborted, each client getting a 503 ``shutting_down`` error (an error
event on a stream), and uvicorn shuts down as usual; the process exits 0. A second SIGTERM, or
SIGINT (Ctrl-C), skips the drain: uvicorn's own shutdown, which re-raises the signal.
"""
from __future__ import annotations

import logging
import signal
import time

import uvicorn

from pagedjax.entrypoints.server.engine_loop import AsyncEngine, RequestFailedError

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, aengine: AsyncEngine, drain_timeout: float):
        super().__init__(config)
        self.aengine = aengine
        self.drain_timeout = drain_timeout
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if sig != signal.SIGTERM or self.drain_deadline is not None or self.should_exit:
            return super().handle_exit(sig, frame)
        # Not recorded as a captured signal: uvicorn would re-raise it after the shutdown and
        # the process would die of it instead of exiting 0.
        self.drain_deadline = time.monotonic() + self.drain_timeout
        self.aengine.draining = True
        logger.info("SIGTERM: draining %d in-flight request(s) for up to %.1f s; new requests "
                    "get 503", self.aengine.num_in_flight, self.drain_timeout)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            left = self.aengine.num_in_flight
            if left == 0 or not self.aengine.is_alive:
                logger.info("drained: shutting down")
                self.should_exit = True
            elif time.monotonic() >= self.drain_deadline:
                logger.warning("drain timeout (%.1f s): aborting %d request(s) still in flight",
                               self.drain_timeout, left)
                self.aengine.fail_all(RequestFailedError(
                    f"the server is shutting down: the request was aborted after the "
                    f"{self.drain_timeout:g} s drain (--drain-timeout); retry it",
                    status=503, code="shutting_down"))
                self.should_exit = True
        return await super().on_tick(counter)
