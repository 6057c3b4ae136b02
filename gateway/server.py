"""The gateway's request path: from a parsed request to the last byte of its response.

It runs on the gateway's own HTTP/1.1 server (`gateway.h1server`, see
docs/adr/0013-own-http1-server.md): aiohttp's server and its `web.Application` (router,
middlewares, request and response objects) are off the hot path; routing is ours
(`RoutingTable`), the upstream side our own pool (docs/adr/0003-upstream-client.md).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from random import getrandbits
from typing import TYPE_CHECKING

from cityplane.problem import Problem
from gateway import metrics
from gateway.connections import GatewayLimits
from gateway.exchange import Exchange
from gateway.forwarding import (
    UPSTREAM_RESPONSE_DROP,
    TrustedProxies,
    client_address,
    forwarded_fields,
)
from gateway.h1server import ClientGone, IncomingRequest, encode_fields
from gateway.paths import normalize_path, split_target
from gateway.routing import CompiledRoute, MethodNotAllowed, RoutingTable
from gateway.tracing import Tracing, continue_trace
from gateway.tunnel import tunnel

if TYPE_CHECKING:
    from gateway.accesslog import AccessLog

log = logging.getLogger("cityplane.gateway")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Bodies up to this size are read whole: cheap, and replayable for retries.
SMALL_BODY = 64 * 1024
_NO_ROUTE = ("-", "-")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    """The client sent no body bytes for ``body_timeout`` seconds."""


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
        self._loop = asyncio.get_running_loop()
        self._metrics = metrics.REQUEST_METRICS  # lock-free counters (gateway/metrics.py)
        self.in_flight = 0

    async def close(self) -> None:
        pass  # nothing of its own to release (upstream pools belong to the clusters)

    # -- bookkeeping ---------------------------------------------------------------------------

    def _observe(
        self,
        request: IncomingRequest,
        route: CompiledRoute | None,
        status: int,
        start: float,
        request_id: str,
        client_ip: str,
        upstream: str | None,
    ) -> None:
        key = (route.service, route.name) if route is not None else _NO_ROUTE
        elapsed = self._loop.time() - start
        self._metrics.observe(key[0], key[1], status, elapsed)
        if self.access_log is not None:
            self.access_log.record_request(
                round(time.time(), 3),
                request_id,
                client_ip,
                request.method,
                request.raw_path,
                status,
                round(elapsed * 1000, 3),
                key[0],
                key[1],
                upstream,
            )

    # -- the request path -------------------------------------------------------------------------

    async def __call__(self, request: IncomingRequest) -> None:
        start = self._loop.time()
        self.in_flight += 1
        conn = request.conn
        peer = conn.peer
        trusted = self.trusted.trusts(peer) if self.trusted else False
        client_ip = client_address(peer, request.forwarded_for, self.trusted) if trusted else peer
        incoming_id = request.request_id
        request_id = (
            incoming_id
            if incoming_id and _REQUEST_ID.match(incoming_id)
            else getrandbits(128).to_bytes(16, "big").hex()  # as f"{n:032x}", in half the time
        )
        route: CompiledRoute | None = None
        ex: Exchange | None = None
        status = 500
        upstream_url: str | None = None
        try:
            if request.method == "CONNECT":
                raise Problem(
                    405, "method-not-allowed", "CONNECT is not allowed: the gateway is no tunnel"
                )
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
            if request.upgrading and request.upgrade == "websocket" and request.method == "GET":
                status, upstream_url = await self._tunnel(
                    request, route, ex, path, query, peer, trusted
                )
            else:
                status, upstream_url = await self._proxy(
                    request, route, ex, path, query, peer, trusted
                )
        except Problem as problem:
            status = problem.status
            self._metrics.reject(route.route_id if route is not None else "-", problem.slug)
            extra: list[tuple[str, str]] = []
            if route is not None:
                extra.extend(route.response_headers)
            if ex is not None and problem.status in (429, 503):
                named = {n.lower() for n in problem.headers}
                extra.extend((n, v) for n, v in ex.response_headers if n.lower() not in named)
            # RFC 9110 §15.5.9: after a 408 the body's framing is lost.
            request.conn.respond_problem(
                request, problem, request_id=request_id, extra=extra, close=status == 408
            )
        except (ClientGone, ConnectionError, asyncio.CancelledError):
            status = 499  # client went away (nginx's convention)
            raise
        finally:
            self.in_flight -= 1
            self._observe(request, route, status, start, request_id, client_ip, upstream_url)

    async def _request_body(
        self, request: IncomingRequest
    ) -> tuple[bytes | AsyncIterator[bytes] | None, int | None]:
        if not request.body_exists:
            return None, None
        length = request.content_length
        if request.body_complete:
            body = request.take_body()  # it came with the head: no timer
            if len(body) > self.limits.max_body:  # chunked: no length was announced
                raise BodyTooLarge()
            return body, length
        if request.expect_continue:
            request.conn.write_raw(_CONTINUE)
        if length is not None and length <= SMALL_BODY:
            return await self._read_small_body(request), length
        return self._stream_body(request), length

    async def _read_small_body(self, request: IncomingRequest) -> bytes:
        timeout = self.limits.body_timeout
        parts: list[bytes] = []
        try:
            # One timer per body, pushed back after every read: the timeout bounds the gap
            # between two reads, not the whole upload (nginx's client_body_timeout).
            async with asyncio.timeout(timeout) as clock:
                while chunk := await request.read_chunk():
                    parts.append(chunk)
                    clock.reschedule(self._loop.time() + timeout)
        except TimeoutError:
            raise _body_timeout(timeout) from None
        return b"".join(parts)

    async def _stream_body(self, request: IncomingRequest) -> AsyncIterator[bytes]:
        limit = self.limits.max_body
        timeout = self.limits.body_timeout
        seen = 0
        while True:
            # A timer per read, not one across yields: the upstream pool may move the rest of
            # the upload to a task of its own, and a timeout must cancel the task that reads.
            try:
                async with asyncio.timeout(timeout):
                    chunk = await request.read_chunk()
            except TimeoutError:
                raise BodyTimeout() from None
            if not chunk:
                return
            seen += len(chunk)
            if seen > limit:
                raise BodyTooLarge()
            yield chunk

    def _forward_headers(
        self, request: IncomingRequest, ex: Exchange, peer: str, trusted: bool
    ) -> tuple[bytes, list[tuple[str, str]]]:
        """The client's fields as wire bytes, and the fields this hop adds."""
        raw, headers = forwarded_fields(
            request.raw_headers, peer=peer, peer_trusted=trusted, scheme="http", host=request.host
        )
        headers.append(("X-Request-Id", ex.request_id))
        return raw, headers

    async def _proxy(
        self,
        request: IncomingRequest,
        route: CompiledRoute,
        ex: Exchange,
        path: str,
        query: str,
        peer: str,
        trusted: bool,
    ) -> tuple[int, str]:
        raw_fields, headers = self._forward_headers(request, ex, peer, trusted)
        _trace_id, traceparent = continue_trace(request.traceparent)
        span = None
        if self.tracing.enabled:
            span = self.tracing.server_span(request.method, route.route_id, request.traceparent)
            client_span, traceparent = self.tracing.client_span(
                span, request.method, route.service + route.upstream_path(path)
            )
        headers.append(("traceparent", traceparent))
        headers.extend(ex.upstream_headers)
        cluster = route.cluster
        try:
            body, length = await self._request_body(request)
            up, target = await cluster.send(
                request.method,
                route.upstream_path(path) + query,
                headers,
                body,
                request_headers=request,
                client_ip=ex.client_ip,
                content_length=length,
                raw_fields=raw_fields,
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
        conn = request.conn
        try:
            # The gateway's own fields replace any of the same name from the upstream. The
            # upstream's fields are relayed as the bytes llhttp accepted (no CR, LF or NUL).
            own = [("X-Request-Id", ex.request_id), *route.response_headers, *ex.response_headers]
            drop = (
                UPSTREAM_RESPONSE_DROP
                if len(own) == 1
                else UPSTREAM_RESPONSE_DROP | {n.lower().encode("latin-1") for n, _ in own}
            )
            head = b"".join(
                [n + b": " + v + b"\r\n" for n, v in up.raw_headers if n.lower() not in drop]
            ) + encode_fields(own)
            status = up.status
            if span is not None:
                span.set_attribute("http.response.status_code", status)
            reason = up.reason or None
            if request.method == "HEAD" or status in (204, 304):
                conn.start_response(
                    request, status, head, content_length=up.content_length, reason=reason
                )
                conn.end_response()
                return status, target.url
            if up.content_length is not None and up.content_length <= SMALL_BODY:
                data = await up.read()
                conn.respond(request, status, head, data, reason=reason)
                return status, target.url
            chunks = up.iter_chunks().__aiter__()
            try:
                first = await chunks.__anext__()
            except StopAsyncIteration:
                first = b""
            conn.start_response(
                request, status, head, content_length=up.content_length, reason=reason, first=first
            )
            if first:
                async for chunk in chunks:
                    await conn.write(chunk)
            conn.end_response()
            return status, target.url
        finally:
            up.release()
            if span is not None:
                span.end()

    async def _tunnel(
        self,
        request: IncomingRequest,
        route: CompiledRoute,
        ex: Exchange,
        path: str,
        query: str,
        peer: str,
        trusted: bool,
    ) -> tuple[int, str]:
        """A WebSocket: bytes relayed between the client and one upstream target."""
        cluster = route.cluster
        target = cluster.balancer.pick(None, None)
        if target is None:
            raise Problem(503, "no-healthy-upstream", "no healthy upstream for this WebSocket")
        base, host = cluster.address(target)
        raw_fields, headers = self._forward_headers(request, ex, peer, trusted)
        headers.extend(ex.upstream_headers)
        response_headers = [("X-Request-Id", ex.request_id), *ex.response_headers]
        status = await tunnel(
            request,
            target=target,
            base=base,
            host=host,
            path=route.upstream_path(path) + query,
            headers=headers,
            raw_fields=raw_fields,
            response_headers=response_headers,
            timeout=cluster.request_timeout,
        )
        return status, target.url


def _body_timeout(timeout: float) -> Problem:
    return Problem(408, "request-body-timeout", f"no request body bytes for {timeout:g}s")
