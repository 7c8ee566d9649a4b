"""Read deadlines for uvicorn: a client that sends its request too slowly is disconnected.

uvicorn (0.55) has a keep-alive timeout between requests but none while a request arrives: its
timer is cancelled by every received byte, so a client sending one header byte every 10 s holds
a connection for ever (slowloris). An ASGI middleware cannot help, as the app is only called once
the headers are complete. So the deadlines are kept in the HTTP protocol itself, a small subclass
of uvicorn's h11 protocol (the one used when ``httptools`` is not installed; always used here):

- **headers**: from the connection's first byte (or, on a kept-alive connection, from the next
  request's first byte) the whole header block must arrive within ``header_timeout`` seconds, an
  absolute deadline like nginx's ``client_header_timeout``; a silent new connection counts too.
- **body**: the body may not stall for more than ``body_timeout`` seconds between two reads
  (nginx's ``client_body_timeout``); time the app itself takes to read (reading paused by flow
  control) does not count.

On a missed deadline the client gets ``408 Request Timeout`` (when no answer has started) and the
connection is closed; the app sees a disconnect. A reverse proxy in front (docs/deployment.md)
does the same at the edge; this keeps a server without one safe.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle
from uvicorn.server import ServerState

log = logging.getLogger(__name__)

_TIMEOUT_BODY = b'{"detail": "request not received in time"}'
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


class DeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a body idle timeout (class attributes)."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._timer: asyncio.TimerHandle | None = None
        self._phase: Literal["headers", "body"] = "headers"
        self._seen_cycle: RequestResponseCycle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if self._timer is None and (cycle is None or cycle.response_complete):
            self._arm("headers")  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_request()  # uvicorn may have started a pipelined request that was waiting

    def _follow_request(self) -> None:
        """After each read: the headers are in once uvicorn has started a new request cycle."""
        cycle = self.cycle
        if cycle is None:
            return  # still reading headers: the absolute deadline keeps running
        if cycle is not self._seen_cycle:
            self._seen_cycle = cycle
            self._disarm()
        elif self._phase == "headers":
            return  # a later request's headers (pipelined or kept alive) under their own deadline
        if cycle.more_body and not cycle.disconnected:
            self._arm("body")  # restarted by every read: an idle timeout
        elif self._phase == "body":
            self._disarm()

    def _arm(self, phase: Literal["headers", "body"]) -> None:
        self._disarm()
        self._phase = phase
        seconds = self.header_timeout if phase == "headers" else self.body_timeout
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._phase == "body" and self.flow.read_paused:
            self._arm("body")  # the app has not read what came; the client is not the slow one
            return
        seconds = self.header_timeout if self._phase == "headers" else self.body_timeout
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.warning("closing the connection from %s: request %s not received within %g s", client,
                    self._phase, seconds)
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()


def deadline_protocol(header_timeout: float, body_timeout: float) -> type[DeadlineProtocol]:
    """A :class:`DeadlineProtocol` class with these timeouts, for ``uvicorn.run(http=...)``."""
    return type("DeadlineProtocol", (DeadlineProtocol,),
                {"header_timeout": header_timeout, "body_timeout": body_timeout})
