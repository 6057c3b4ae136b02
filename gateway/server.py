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
import time
from collections.abc import AsyncIterator
from random import getrandbits
from typing import TYPE_CHECKING, Any

from aiohttp import ClientSession, DummyCookieJar, WSMsgType, web
from aiohttp.web_request import BaseRequest

from cityplane.problem import Problem
from gateway import metrics
from gateway.connections import GatewayLimits, problem_response
from gateway.exchange import Exchange
from gateway.forwarding import RESPONSE_DROP, TrustedProxies, client_address, upstream_headers
from gateway.paths import normalize_path, split_target
from gateway.routing import CompiledRoute, MethodNotAllowed, RoutingTable
from gateway.tracing import Tracing, continue_trace

if TYPE_CHECKING:
    from gateway.accesslog import AccessLog

log = logging.getLogger("cityplane.gateway")

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
            else getrandbits(128).to_bytes(16, "big").hex()  # as f"{n:032x}", in half the time
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
