"""The gateway's request path on aiohttp's low-level server.

aiohttp's `web.Application` (router, middlewares, signals) is bypassed on purpose: routing is
ours (`RoutingTable`), and measured on this machine the application layer costs a quarter of
the throughput (docs/adr/0001-layout-and-server.md). The server still gives us aiohttp's HTTP
parser with its protections (request smuggling checks, header limits, pipelining).
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import time
from collections.abc import AsyncIterator
from email.utils import formatdate
from random import getrandbits
from typing import TYPE_CHECKING, Any

from aiohttp import ClientSession, DummyCookieJar, WSMsgType, web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from cityplane.problem import PROBLEM_CONTENT_TYPE, Problem
from gateway import metrics
from gateway.exchange import Exchange
from gateway.forwarding import RESPONSE_DROP, TrustedProxies, client_address, upstream_headers
from gateway.paths import normalize_path, split_target
from gateway.routing import CompiledRoute, MethodNotAllowed, RoutingTable
from gateway.tracing import Tracing, continue_trace

if TYPE_CHECKING:
    from gateway.accesslog import AccessLog

log = logging.getLogger("cityplane.gateway")

# aiohttp reports the offending URL (request line) or header value; URLs start with "/".
_REQUEST_LINE = re.compile(rb"^([A-Z]+ |/|[a-z]+://)")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Bodies up to this size are read whole: cheap, and replayable for retries.
SMALL_BODY = 64 * 1024
_NO_ROUTE = ("-", "-")


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    """The client sent no body bytes for ``body_timeout`` seconds."""


class ProxyResponse(web.StreamResponse):
    """A streamed response whose head leaves with the first body bytes, in one write.

    aiohttp's StreamResponse sends the head at ``prepare()``; ``web.Response`` waits for the
    body. A proxy wants the second behaviour for every response: one write (one syscall, one
    packet) for a small answer instead of two.
    """

    _send_headers_immediately = False


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


def problem_response(problem: Problem, request_id: str | None = None) -> web.Response:
    headers = dict(problem.headers)
    headers.setdefault("Server", "cityplane")
    if request_id:
        headers["X-Request-Id"] = request_id
    return web.Response(
        status=problem.status,
        body=problem.body(),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
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
        if isinstance(exc, LineTooLong):
            line = exc.args[0] if exc.args else b""
            line = bytes(line) if isinstance(line, bytes | bytearray) else str(line).encode()
            if _REQUEST_LINE.match(line):
                problem = Problem(414, "uri-too-long", "the request line is too long")
            else:
                problem = Problem(431, "headers-too-large", "a request header is too large")
        elif isinstance(exc, BadHttpMessage):
            text = str(getattr(exc, "message", exc))
            if "too many headers" in text.lower():
                problem = Problem(431, "headers-too-large", "too many request headers")
            else:
                problem = Problem(400, "bad-request", "malformed HTTP request")
        elif status >= 500:
            log.error("unhandled error in request handling", exc_info=exc)
            problem = Problem(status, "internal-error", "the gateway failed to handle this request")
        else:
            problem = Problem(status, "bad-request", message or None)
        resp = problem_response(problem)
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


class RequestPath:
    """Handles one proxied request from routing to the last byte of the response."""

    def __init__(
        self,
        *,
        table: RoutingTable,
        trusted: TrustedProxies,
        limits: GatewayLimits,
        access_log: AccessLog | None,
        tracing: Tracing,
    ) -> None:
        self.table = table  # swapped atomically on reload; read once per request
        self.trusted = trusted
        self.limits = limits
        self.access_log = access_log
        self.tracing = tracing
        self._ws_session: ClientSession | None = None
        self._loop = asyncio.get_running_loop()
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}
        self._rejected: dict[tuple[str, str], Any] = {}
        self.in_flight = 0

    async def close(self) -> None:
        if self._ws_session is not None:
            await self._ws_session.close()

    # -- bookkeeping ---------------------------------------------------------------------------

    def _observe(
        self,
        request: BaseRequest,
        route: CompiledRoute | None,
        status: int,
        start: float,
        request_id: str,
        client_ip: str,
        upstream: str | None,
    ) -> None:
        key = (route.service, route.name) if route is not None else _NO_ROUTE
        ckey = (key[0], key[1], status)
        counter = self._counters.get(ckey)
        if counter is None:
            counter = self._counters[ckey] = metrics.REQUESTS.labels(key[0], key[1], str(status))
        counter.inc()
        elapsed = self._loop.time() - start
        hist = self._durations.get(key)
        if hist is None:
            hist = self._durations[key] = metrics.REQUEST_DURATION.labels(*key)
        hist.observe(elapsed)
        if self.access_log is not None:
            self.access_log.record(
                {
                    "ts": round(time.time(), 3),
                    "request_id": request_id,
                    "client": client_ip,
                    "method": request.method,
                    "path": request.raw_path,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "service": key[0],
                    "route": key[1],
                    "upstream": upstream,
                }
            )

    # -- the request path -------------------------------------------------------------------------

    async def __call__(self, request: BaseRequest) -> web.StreamResponse:
        start = self._loop.time()
        self.in_flight += 1
        peername = request.transport.get_extra_info("peername") if request.transport else None
        peer = peername[0] if peername else "0.0.0.0"
        trusted = self.trusted.trusts(peer) if self.trusted else False
        client_ip = (
            client_address(peer, request.headers.get("X-Forwarded-For"), self.trusted)
            if trusted
            else peer
        )
        incoming_id = request.headers.get("X-Request-Id")
        request_id = (
            incoming_id
            if incoming_id and _REQUEST_ID.match(incoming_id)
            else f"{getrandbits(128):032x}"
        )
        route: CompiledRoute | None = None
        ex: Exchange | None = None
        status = 500
        upstream_url: str | None = None
        try:
            path_raw, query = split_target(request.raw_path)
            path = normalize_path(path_raw)
            found = self.table.match(request.host, path, request.method)
            if found is None:
                raise Problem(404, "no-route", f"no route matches {request.method} {path}")
            if isinstance(found, MethodNotAllowed):
                raise Problem(
                    405,
                    "method-not-allowed",
                    f"{request.method} is not allowed on {path}",
                    headers={"Allow": found.allowed},
                )
            route = found
            if route.lifecycle == "retired":
                raise Problem(410, "api-retired", f"{route.service!r} has been retired")
            length = request.content_length
            if length is not None and length > self.limits.max_body:
                raise Problem(
                    413, "body-too-large", f"the body is larger than {self.limits.max_body} bytes"
                )
            ex = Exchange(
                request,
                client_ip=client_ip,
                path=path,
                route_id=route.route_id,
                request_id=request_id,
                start=start,
            )
            for policy in route.policies:
                await policy.check(ex)
            if request.headers.get("Upgrade", "").lower() == "websocket":
                resp, upstream_url = await self._websocket(request, route, ex, path, query)
            else:
                resp, upstream_url = await self._proxy(
                    request, route, ex, path, query, peer, trusted
                )
            status = resp.status
            return resp
        except Problem as problem:
            status = problem.status
            reason_key = (route.route_id if route is not None else "-", problem.slug)
            rejected = self._rejected.get(reason_key)
            if rejected is None:
                rejected = self._rejected[reason_key] = metrics.REJECTED.labels(*reason_key)
            rejected.inc()
            resp = problem_response(problem, request_id)
            if status == 408:
                resp.force_close()  # RFC 9110 §15.5.9: the body's framing is lost
            if route is not None:
                for name, value in route.response_headers:
                    resp.headers[name] = value
            if ex is not None and problem.status in (429, 503):
                for name, value in ex.response_headers:
                    resp.headers.setdefault(name, value)
            return resp
        except (ConnectionResetError, asyncio.CancelledError):
            status = 499  # client went away (nginx's convention)
            raise
        finally:
            self.in_flight -= 1
            self._observe(request, route, status, start, request_id, client_ip, upstream_url)

    async def _request_body(
        self, request: BaseRequest
    ) -> tuple[bytes | AsyncIterator[bytes] | None, int | None]:
        if not request.body_exists:
            return None, None
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        length = request.content_length
        if length is not None and length <= SMALL_BODY:
            if request.content.is_eof():
                return await request.read(), length  # it came with the head: no timer
            return await self._read_small_body(request), length
        return self._stream_body(request), length

    async def _read_small_body(self, request: BaseRequest) -> bytes:
        content = request.content
        timeout = self.limits.body_timeout
        parts: list[bytes] = []
        try:
            # One timer per body, pushed back after every read: the timeout bounds the gap
            # between two reads, not the whole upload (nginx's client_body_timeout).
            async with asyncio.timeout(timeout) as clock:
                while chunk := await content.readany():
                    parts.append(chunk)
                    clock.reschedule(self._loop.time() + timeout)
        except TimeoutError:
            raise _body_timeout(timeout) from None
        return b"".join(parts)

    async def _stream_body(self, request: BaseRequest) -> AsyncIterator[bytes]:
        limit = self.limits.max_body
        timeout = self.limits.body_timeout
        content = request.content
        seen = 0
        while True:
            # A timer per read, not one across yields: the upstream pool may move the rest of
            # the upload to a task of its own, and a timeout must cancel the task that reads.
            try:
                async with asyncio.timeout(timeout):
                    chunk = await content.readany()
            except TimeoutError:
                raise BodyTimeout() from None
            if not chunk:
                return
            seen += len(chunk)
            if seen > limit:
                raise BodyTooLarge()
            yield chunk

    async def _proxy(
        self,
        request: BaseRequest,
        route: CompiledRoute,
        ex: Exchange,
        path: str,
        query: str,
        peer: str,
        trusted: bool,
    ) -> tuple[web.StreamResponse, str]:
        headers = upstream_headers(
            request.raw_headers,
            peer=peer,
            peer_trusted=trusted,
            scheme=request.scheme,
            host=request.host,
        )
        _trace_id, traceparent = continue_trace(request.headers.get("traceparent"))
        span = None
        if self.tracing.enabled:
            span = self.tracing.server_span(
                request.method, route.route_id, request.headers.get("traceparent")
            )
            client_span, traceparent = self.tracing.client_span(
                span, request.method, route.service + route.upstream_path(path)
            )
        headers.append(("X-Request-Id", ex.request_id))
        headers.append(("traceparent", traceparent))
        headers.extend(ex.upstream_headers)
        body, length = await self._request_body(request)
        cluster = route.cluster
        try:
            up, target = await cluster.send(
                request.method,
                route.upstream_path(path) + query,
                headers,
                body,
                request_headers=request.headers,
                client_ip=ex.client_ip,
                content_length=length,
            )
        except BodyTooLarge:
            raise Problem(
                413, "body-too-large", f"the body is larger than {self.limits.max_body} bytes"
            ) from None
        except BodyTimeout:
            raise _body_timeout(self.limits.body_timeout) from None
        finally:
            if span is not None:
                client_span.end()
        try:
            resp = ProxyResponse(status=up.status, reason=up.reason or None)
            out = resp.headers
            for name, value in up.headers:
                if name.lower() not in RESPONSE_DROP:
                    out.add(name, value)
            out["X-Request-Id"] = ex.request_id
            for name, value in route.response_headers:
                out[name] = value
            for name, value in ex.response_headers:
                out[name] = value
            if up.content_length is not None:
                resp.content_length = up.content_length
            if span is not None:
                span.set_attribute("http.response.status_code", up.status)
            if request.method == "HEAD" or up.status in (204, 304):
                await resp.prepare(request)
                await resp.write_eof()
                return resp, target.url
            if up.content_length is not None and up.content_length <= SMALL_BODY:
                data = await up.read()
                await resp.prepare(request)
                await resp.write_eof(data)
                return resp, target.url
            await resp.prepare(request)
            async for chunk in up.iter_chunks():
                await resp.write(chunk)
            await resp.write_eof()
            return resp, target.url
        finally:
            up.release()
            if span is not None:
                span.end()

    async def _websocket(
        self,
        request: BaseRequest,
        route: CompiledRoute,
        ex: Exchange,
        path: str,
        query: str,
    ) -> tuple[web.StreamResponse, str]:
        """Relay a WebSocket message by message between client and one upstream target."""
        cluster = route.cluster
        target = cluster.balancer.pick(None, None)
        if target is None:
            raise Problem(503, "no-healthy-upstream", "no healthy upstream for this WebSocket")
        scheme = "wss" if target.scheme == "https" else "ws"
        url = f"{scheme}://{target.host}:{target.port}{route.upstream_path(path)}{query}"
        if self._ws_session is None:
            # One session for all relays, with no cookie jar: clients never share cookies.
            self._ws_session = ClientSession(cookie_jar=DummyCookieJar())
        protocols = [
            p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p
        ]
        forward = {"X-Request-Id": ex.request_id, "X-Forwarded-For": ex.client_ip}
        forward.update(dict(ex.upstream_headers))
        try:
            async with asyncio.timeout(cluster.request_timeout):
                upstream = await self._ws_session.ws_connect(
                    url, protocols=protocols, headers=forward
                )
        except Exception as exc:  # noqa: BLE001 - any failure to open is the upstream's
            log.info("websocket upstream %s failed: %s", url, exc)
            raise Problem(502, "upstream-unavailable", "the WebSocket upstream refused") from None
        client = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else ())
        for name, value in ex.response_headers:
            client.headers[name] = value
        await client.prepare(request)

        async def pump(src: Any, dst: Any) -> None:
            async for msg in src:
                if msg.type == WSMsgType.TEXT:
                    await dst.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                else:
                    break
            await dst.close()

        tasks = [
            asyncio.ensure_future(pump(client, upstream)),
            asyncio.ensure_future(pump(upstream, client)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await upstream.close()
            await client.close()
        return client, target.url


def _body_timeout(timeout: float) -> Problem:
    return Problem(408, "request-body-timeout", f"no request body bytes for {timeout:g}s")


def make_server(handler: RequestPath, limits: GatewayLimits) -> GatewayServer:
    return GatewayServer(
        handler,
        limits=limits,
        keepalive_timeout=limits.idle_timeout,
        max_line_size=limits.max_line_size,
        max_field_size=limits.max_field_size,
        max_headers=limits.max_headers,
        access_log=None,
    )
