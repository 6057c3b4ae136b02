"""The gateway's connection layer: what one client connection may cost (limits, the
request-head timeout, the connection cap) and the answers given where no request object exists
yet (parse errors, refusals). See docs/adr/0011-slow-clients.md.

`gateway/server.py` is the request path; this module is everything below it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from email.utils import formatdate
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from cityplane.httperrors import parse_error_problem, problem_response
from cityplane.problem import PROBLEM_CONTENT_TYPE, Problem

log = logging.getLogger("cityplane.gateway")


def default_max_connections() -> int:
    """Half the file-descriptor limit, at most 10,000.

    Each client connection may hold an upstream connection too, and the process needs a few
    descriptors of its own; running out of them fails accept() for everyone.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 10_000
    return max(64, min(10_000, soft // 2))


class GatewayLimits:
    """What one client connection may cost; see docs/adr/0011-slow-clients.md."""

    __slots__ = (
        "body_timeout",
        "header_timeout",
        "idle_timeout",
        "max_body",
        "max_connections",
        "max_field_size",
        "max_headers",
        "max_line_size",
    )

    def __init__(
        self,
        *,
        max_body: int = 10 * 1024 * 1024,
        max_line_size: int = 8190,
        max_field_size: int = 8190,
        max_headers: int = 100,
        header_timeout: float = 10.0,
        idle_timeout: float = 75.0,
        body_timeout: float = 30.0,
        max_connections: int | None = None,
    ) -> None:
        for name, value in (
            ("header_timeout", header_timeout),
            ("idle_timeout", idle_timeout),
            ("body_timeout", body_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, not {value!r}")
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections!r}")
        self.max_body = max_body
        self.max_line_size = max_line_size
        self.max_field_size = max_field_size
        self.max_headers = max_headers
        # From the first byte of a request until its head is complete (nginx's
        # client_header_timeout, Envoy's request_headers_timeout).
        self.header_timeout = header_timeout
        # A keep-alive connection with no request in progress (nginx's keepalive_timeout).
        self.idle_timeout = idle_timeout
        # The longest gap between two reads of a request body (nginx's client_body_timeout).
        self.body_timeout = body_timeout
        self.max_connections = (
            max_connections if max_connections is not None else default_max_connections()
        )


def _raw_problem(problem: Problem, extra: str = "") -> bytes:
    """A whole HTTP/1.1 answer for the connection layer, where no request object exists."""
    body = problem.body()
    head = (
        f"HTTP/1.1 {problem.status} {problem.title}\r\n"
        f"Content-Type: {PROBLEM_CONTENT_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        "Server: cityplane\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _ProblemRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own parse errors as problem+json.

    It also bounds how long a client may take to send a request head. aiohttp's server has
    no such timeout: its keep-alive timer only runs between requests, from the end of the
    last response, so a client that trickles a head one byte at a time holds the connection
    for as long as it likes (slow loris). The head timer is armed only when bytes arrive
    while the connection waits for a request and they do not complete a head; a client that
    sends its head in one segment (nearly all of them) never creates a timer.
    """

    __slots__ = ("_head_count", "_head_deadline", "_head_timeout", "_head_timer")

    def __init__(
        self, manager: Server, *, loop: asyncio.AbstractEventLoop, head_timeout: float, **kw: Any
    ) -> None:
        super().__init__(manager, loop=loop, **kw)
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_count = -1  # the request count when the pending head began
        self._head_deadline = 0.0

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        waiter = self._waiter
        # start() waits on _waiter for the next request; if it is still pending after the
        # parser saw these bytes, they are part of an unfinished head.
        if (
            waiter is not None
            and not waiter.done()
            and (self._head_timer is None or self._head_count != self._request_count)
        ):
            self._start_head_clock()

    def _start_head_clock(self) -> None:
        self._head_count = self._request_count
        self._head_deadline = deadline = self._loop.time() + self._head_timeout
        # aiohttp's keep-alive timer would otherwise cut a head in progress silently at the
        # idle deadline; from the first byte on, the head timeout governs (as in nginx).
        self._next_keepalive_close_time = max(self._next_keepalive_close_time, deadline + 1.0)
        if self._head_timer is None:
            self._head_timer = self._loop.call_at(deadline, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._force_close or self._close or self._request_count != self._head_count:
            return  # closed already, or the head was completed in time
        if self._loop.time() < self._head_deadline:
            # A later head started while this timer was pending: wait for its deadline.
            self._head_timer = self._loop.call_at(self._head_deadline, self._head_expired)
            return
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # a request was queued or is being handled
        # RFC 9110 §15.5.9: 408 means the server closes rather than keeps waiting, so it
        # says "Connection: close". The client was mid-request, so an answer tells it why
        # (idle connections, with no request begun, are closed without one).
        if self.transport is not None:
            problem = Problem(
                408,
                "request-header-timeout",
                f"the request head was not complete within {self._head_timeout:g}s",
            )
            self.transport.write(_raw_problem(problem))
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        resp = problem_response(parse_error_problem(exc, status, message, "the gateway"))
        resp.force_close()
        return resp


class _RefusedConnection(asyncio.Protocol):
    """A connection over ``max_connections``: told 503 and closed before anything is read.

    Refused rather than queued: a queued connection still holds a descriptor, which is what
    the cap protects. With ``--workers N`` a client that retries may land on another worker
    (SO_REUSEPORT spreads connections over them).
    """

    def __init__(self, answer: bytes) -> None:
        self._answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self._answer)
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass  # the connection is closing; what the client sent is not read


class GatewayServer(Server):
    """aiohttp's server with a cap on concurrent connections and a request-head timeout."""

    def __init__(self, handler: Any, *, limits: GatewayLimits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.refused = 0
        self._refusal = _raw_problem(
            Problem(503, "too-many-connections", "this gateway worker is at its connection limit"),
            "Retry-After: 1\r\n",
        )
        self._refusal_logged = 0.0

    def __call__(self) -> RequestHandler:
        if len(self._connections) >= self.limits.max_connections:
            return self._refuse()  # type: ignore[return-value]
        return _ProblemRequestHandler(
            self, loop=self._loop, head_timeout=self.limits.header_timeout, **self._kwargs
        )

    def _refuse(self) -> asyncio.Protocol:
        self.refused += 1
        now = self._loop.time()
        if now - self._refusal_logged > 10.0:  # at most one line per 10 s under a flood
            self._refusal_logged = now
            log.warning(
                "connection limit reached (%d); refusing new connections (%d so far)",
                self.limits.max_connections,
                self.refused,
            )
        return _RefusedConnection(self._refusal)


def make_server(handler: Any, limits: GatewayLimits) -> GatewayServer:
    """The server for a request path (`gateway.server.RequestPath`) under `limits`."""
    return GatewayServer(
        handler,
        limits=limits,
        keepalive_timeout=limits.idle_timeout,
        max_line_size=limits.max_line_size,
        max_field_size=limits.max_field_size,
        max_headers=limits.max_headers,
        access_log=None,
    )
