"""Deadlines for slow clients, at the HTTP connection.

uvicorn closes a keep-alive connection left idle after a response, but nothing else: a client
that connects and sends nothing, or part of a request head, or keeps trickling a body the server
already answered (an early 413), holds its connection - and a slot of the server - forever. This
protocol (uvicorn's h11 one, subclassed) closes the connection when a request head has not fully
arrived ``header_timeout`` seconds after the connection opened or after the head's first bytes
came, and when a body answered early is still coming ``linger_timeout`` seconds after the answer
(discarding it until then lets a client that is still sending read the answer instead of a
reset connection). The deadline is not moved by data: a client sending one byte a second is cut
off as surely as a silent one. The body of a request being served is timed by the app's
RequestGuard (--body-timeout), which can still answer 408.
"""
from __future__ import annotations

import functools

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class DeadlineH11Protocol(H11Protocol):
    def __init__(self, *args, header_timeout: float, linger_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.linger_timeout = linger_timeout
        self._deadline = None  # asyncio.TimerHandle while a deadline is armed

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm(self.header_timeout)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:  # waiting for (the rest of) a request head
            self._arm(self.header_timeout)
        elif self.conn.their_state is h11.SEND_BODY and self.conn.our_state is h11.DONE:
            self._arm(self.linger_timeout)  # a body still coming after we answered
        else:  # a request is being served: the app times its body
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY:
            self._arm(self.linger_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, timeout: float) -> None:
        """Start a deadline unless one is running: data never moves it."""
        if self._deadline is None:
            self._deadline = self.loop.call_later(timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, host: str, port: int, *, log_level: str = "info",
                   timeout_keep_alive: float = 5.0, header_timeout: float = 10.0,
                   linger_timeout: float = 30.0) -> uvicorn.Config:
    """uvicorn's config for ``app`` on the h11 protocol with the deadlines above (h11 whether or
    not httptools is installed, so the deadlines always apply)."""
    protocol = functools.partial(DeadlineH11Protocol, header_timeout=header_timeout,
                                 linger_timeout=linger_timeout)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                          timeout_keep_alive=timeout_keep_alive)
