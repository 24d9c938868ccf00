"""The handlers' tokenizer, on one worker thread with a bounded queue.

Tokenising a 1 MiB prompt takes most of a second; on the event loop that would stall /health and
every stream for as long. Handlers hand their encode and decode jobs to one thread that owns its
own copy of the tokenizer (the engine thread decodes outputs with the engine's), so no tokenizer
object is ever used by two threads; transformers' fast tokenizers let go of the GIL while they
encode, so the loop keeps serving meanwhile.

Prompts queued for the thread are bounded (--max-tokenizer-queue). A request past the bound gets
503 with Retry-After at once - the answer of a full waiting queue - instead of queueing without
limit: every queued prompt holds its text in memory and delays every later request, and a client
retrying later costs nothing. Decoding for a request already admitted (echo, logprobs) is never
refused.
"""
from __future__ import annotations

import asyncio
import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from pagedjax.entrypoints.server.responses import APIError

T = TypeVar("T")


class TokenizerThread:
    def __init__(self, tokenizer, max_queued: int):
        if max_queued < 1:
            raise ValueError(f"--max-tokenizer-queue {max_queued} must be >= 1")
        self.tokenizer = copy.deepcopy(tokenizer)
        self.max_queued = max_queued
        self._queued = 0  # prompts handed to the thread and not finished; guarded by _lock
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pagedjax-tokenizer")

    async def admit(self, fn: Callable[..., T], *args) -> T:
        """Run ``fn(*args)`` (tokenising a new request's prompt) on the thread, or refuse with
        503 when ``max_queued`` prompts are already queued."""
        with self._lock:
            if self._queued >= self.max_queued:
                raise APIError(503, f"the server is overloaded: {self._queued} prompts are waiting "
                                    f"to be tokenised (--max-tokenizer-queue {self.max_queued}); "
                                    "retry later", type="server_error", code="overloaded",
                               headers={"Retry-After": "1"})
            self._queued += 1

        def job():
            try:
                return fn(*args)
            finally:  # counted down when the work ends, even if its client is gone
                with self._lock:
                    self._queued -= 1

        return await asyncio.get_running_loop().run_in_executor(self._pool, job)

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Run ``fn(*args)`` (decoding for an admitted request) on the thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
