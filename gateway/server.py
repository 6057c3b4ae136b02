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
from typing import TYPE_CHECKING, cast

from cityplane.problem import Problem
from gateway import metrics
from gateway.connections import GatewayLimits
from gateway.exchange import Exchange
from gateway.forwarding import (
    TrustedProxies,
    client_address,
    forwarded_fields,
)
from gateway.h1server import ClientGone, IncomingRequest, encode_fields
from gateway.metrics import RequestMetrics
from gateway.paths import normalize_path, split_target
from gateway.routing import CompiledRoute, MethodNotAllowed, RoutingTable
from gateway.tracing import Tracing, continue_trace, random_hex
from gateway.tunnel import tunnel
from gateway.upstream.client import UpstreamError
from gateway.upstream.cluster import Resume
from gateway.upstream.heads import drop_table, relay_fields

if TYPE_CHECKING:
    from gateway.accesslog import AccessLog
    from gateway.upstream.cluster import InlineAttempt, UpstreamCluster
    from gateway.upstream.http1 import UpstreamResponse
    from gateway.upstream.target import TargetState

log = logging.getLogger("cityplane.gateway")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # fullmatch: no trailing newline
# Bodies up to this size are read whole: cheap, and replayable for retries.
SMALL_BODY = 64 * 1024
_NO_ROUTE = ("-", "-")
# A request's duration (access log, latency histogram) is timed with this clock, not the loop's:
# uvloop's loop.time() is libuv's cached millisecond tick, which made every duration a whole
# millisecond (0.000 or 1.000 in the log, and in the histogram's sum).
_clock = time.perf_counter
_time_ns = time.time_ns  # a module global: no attribute lookup on `time` per request
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    """The client sent no body bytes for ``body_timeout`` seconds."""


# What `RequestPath.dispatch` did with a request (ADR 14).
DONE = 0  # answered
IN_FLIGHT = 1  # its upstream exchange is under way; `ClientConnection.request_done` follows
TASK = 2  # the connection's task is to handle it, from where ``request.inline`` says


class Flight:
    """One request's state between the steps of its path, whichever drives them: the
    connection's task (`RequestPath.__call__`) or the protocol callbacks (ADR 14)."""

    __slots__ = (
        "attempt",
        "ex",
        "fields",
        "next_policy",
        "owner",
        "query",
        "request",
        "response",
        "resume",
        "route",
        "status",
        "target",
        "upstream_url",
    )

    def __init__(self, owner: RequestPath, request: IncomingRequest, ex: Exchange) -> None:
        self.owner = owner
        self.request = request
        self.ex = ex  # the policies' view: client, request id, start, path once routed
        self.route: CompiledRoute | None = None
        self.query = ""
        self.status = 500
        self.upstream_url: str | None = None
        self.next_policy = 0  # the policies before this one have passed
        # Inline only: the upstream request as sent (fields, body), the attempt under way,
        # and what the task goes on with after a hand-over.
        self.fields: tuple[bytes, list[tuple[str, str]], bytes | None] | None = None
        self.attempt: InlineAttempt | None = None
        self.resume: Resume | None = None
        self.response: UpstreamResponse | None = None
        self.target: TargetState | None = None

    def upstream_ready(self) -> None:
        self.owner._upstream_ready(self)

    def policy_done(self, problem: Problem | None) -> None:
        self.owner._policy_done(self, problem)

    def client_lost(self) -> None:
        """The client left while this request was inline or handed over but not yet taken."""
        self.request.inline = None
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.abandon()
        self.status = 499
        self.owner._settle_flight(self)


class RequestPath:
    """Handles one proxied request from routing to the last byte of the response."""

    __slots__ = (
        "_loop",
        "_metrics",
        "access_log",
        "in_flight",
        "inline",
        "limits",
        "table",
        "tracing",
        "trusted",
    )

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
        # Lock-free counters (gateway/metrics.py); typed, so observe() is a C call (ADR 18).
        self._metrics: RequestMetrics = metrics.REQUEST_METRICS
        self.in_flight = 0
        # Requests that need not wait are handled without a task (ADR 14); tests turn it off
        # to run the same suites on the task path.
        self.inline = True

    async def close(self) -> None:
        pass  # nothing of its own to release (upstream pools belong to the clusters)

    # -- the steps, shared by both drivers --------------------------------------------------------

    def _begin(self, request: IncomingRequest) -> Flight:
        start = _clock()
        self.in_flight += 1
        peer = request.conn.peer
        trusted = self.trusted.trusts(peer)  # False at once without trusted proxies
        client_ip = client_address(peer, request.forwarded_for, self.trusted) if trusted else peer
        incoming_id = request.request_id
        request_id = (
            incoming_id if incoming_id and _REQUEST_ID.fullmatch(incoming_id) else random_hex(32)
        )
        ex = Exchange(
            request,
            client_ip=client_ip,
            path=request.raw_path,  # the normalized path once routed (_admit)
            route_id="-",
            request_id=request_id,
            start=start,
        )
        return Flight(self, request, ex)

    def _admit(self, flight: Flight) -> CompiledRoute:
        """Routing and the checks before any policy; raises the Problem that answers."""
        request, ex = flight.request, flight.ex
        if request.method == "CONNECT":
            raise Problem(
                405, "method-not-allowed", "CONNECT is not allowed: the gateway is no tunnel"
            )
        path_raw, flight.query = split_target(request.raw_path)
        ex.path = path = normalize_path(path_raw)
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
        route: CompiledRoute = found  # typed: its fields are struct reads (ADR 17)
        flight.route = route
        if route.lifecycle == "retired":
            raise Problem(410, "api-retired", f"{route.service!r} has been retired")
        length = request.content_length
        if length is not None and length > self.limits.max_body:
            raise Problem(
                413, "body-too-large", f"the body is larger than {self.limits.max_body} bytes"
            )
        ex.route_id = route.route_id
        return route

    def _answer_problem(self, flight: Flight, problem: Problem) -> None:
        flight.status = problem.status
        route, ex = flight.route, flight.ex
        self._metrics.reject(route.route_id if route is not None else "-", problem.slug)
        extra: list[tuple[str, str]] = []
        if route is not None:
            extra.extend(route.response_headers)
        block = b""
        if problem.status in (429, 503):
            named = {n.lower() for n in problem.headers}
            extra.extend((n, v) for n, v in ex.response_headers if n.lower() not in named)
            # The gateway's own policies refuse before writing `response_block` (a 429 carries
            # its RateLimit fields in the problem): what is there is from an earlier decision.
            block = ex.response_block
        # RFC 9110 §15.5.9: after a 408 the body's framing is lost.
        request = flight.request
        request.conn.respond_problem(
            request,
            problem,
            request_id=ex.request_id,
            extra=extra,
            raw=block,
            close=flight.status == 408,
        )

    def _end(self, flight: Flight) -> None:
        self.in_flight -= 1
        request, route, ex = flight.request, flight.route, flight.ex
        key = (route.service, route.name) if route is not None else _NO_ROUTE
        elapsed = _clock() - ex.start
        self._metrics.observe(key[0], key[1], flight.status, elapsed)
        if self.access_log is not None:
            self.access_log.record_request(
                _time_ns() // 1_000_000,
                ex.request_id,
                ex.client_ip,
                request.method,
                request.raw_path,
                flight.status,
                int(elapsed * 1_000_000 + 0.5),  # not round(): a call by name (~670)
                key[0],
                key[1],
                flight.upstream_url,
            )

    def _body_now(self, request: IncomingRequest) -> tuple[bytes | None, int | None]:
        """A body that is complete already (or none), without waiting."""
        if not request.body_exists():
            return None, None
        body = request.take_body()  # it came with the head: no timer
        if len(body) > self.limits.max_body:  # chunked: no length was announced
            raise Problem(
                413, "body-too-large", f"the body is larger than {self.limits.max_body} bytes"
            )
        return body, request.content_length

    def _upstream_fields(
        self, flight: Flight, traceparent: str | None = None
    ) -> tuple[bytes, list[tuple[str, str]]]:
        """The upstream request's fields: wire lines (the client's, this hop's forwarding
        fields, the policies' ready-made ones) and text fields (the request id, the trace
        context, the policies')."""
        request, ex = flight.request, flight.ex
        peer = request.conn.peer
        trusted = self.trusted.trusts(peer)  # False at once without trusted proxies
        raw, hop = forwarded_fields(
            request.raw_headers, peer=peer, peer_trusted=trusted, scheme="http", host=request.host
        )
        headers = [("X-Request-Id", ex.request_id)]
        if traceparent is not None:
            headers.append(("traceparent", traceparent))
        headers.extend(ex.upstream_headers)
        return raw + hop + ex.upstream_block, headers

    def _response_head(self, flight: Flight, up: UpstreamResponse) -> bytes:
        # The gateway's own fields replace any of the same name from the upstream. The
        # upstream's field lines are relayed as the bytes llhttp accepted (no CR, LF or NUL),
        # in runs, with those not passed cut out (ADR 21).
        # The request id is ours or passed _REQUEST_ID: no CR, LF or NUL to remove.
        route, ex = flight.route, flight.ex
        assert route is not None
        extra = ex.response_headers
        if extra:  # text fields from a policy (the gateway's own write `response_block`)
            table = _response_drop_table(extra, route.response_drop)
            own = route.response_block + encode_fields(extra)
        else:
            table, own = route.response_drop_table, route.response_block
        return b"".join(
            (
                relay_fields(up.fields, table),
                b"X-Request-Id: ",
                ex.request_id.encode(),
                b"\r\n",
                own,
                ex.response_block,
            )
        )

    # -- the task's driver ------------------------------------------------------------------------

    async def __call__(self, request: IncomingRequest) -> None:
        handed = request.inline  # an inline request handed over (ADR 14)
        if handed is None:
            flight = self._begin(request)
        else:
            flight = cast(Flight, handed)
            request.inline = None
        inline = False
        try:
            inline = await self._run(flight)
        except Problem as problem:
            self._answer_problem(flight, problem)
        except (ClientGone, ConnectionError, asyncio.CancelledError):
            flight.status = 499  # client went away (nginx's convention)
            raise
        finally:
            if not inline:
                self._settle_flight(flight)

    def _settle_flight(self, flight: Flight) -> None:
        """The request is done with: what a hand-over left unused is let go, and it is
        counted and logged."""
        response, flight.response = flight.response, None
        if response is not None:  # handed over, then cancelled before the relay
            response.release()
        resume, flight.resume = flight.resume, None
        if resume is not None:  # handed over, then cancelled before the send
            resume.abandon()
        self._end(flight)

    async def _run(self, flight: Flight) -> bool:
        """The request's steps on the task; True when its upstream exchange went on inline
        (`_upstream_ready` ends it)."""
        request = flight.request
        route = flight.route if flight.route is not None else self._admit(flight)
        ex = flight.ex
        policies = route.policies
        while flight.next_policy < len(policies):
            await policies[flight.next_policy].check(ex)
            flight.next_policy += 1
        if request.upgrading and request.upgrade == "websocket" and request.method == "GET":
            await self._tunnel(flight, route, ex)
            return False
        if (
            flight.fields is None  # not handed over after an inline attempt
            and self.inline
            and request.body_complete
            and not request.upgrading
            and not self.tracing.enabled
            and self._start_upstream(flight)
        ):
            return True  # after a policy that had to wait (Redis, a token to verify)
        await self._proxy(flight, route, ex)
        return False

    async def _request_body(
        self, request: IncomingRequest
    ) -> tuple[bytes | AsyncIterator[bytes] | None, int | None]:
        if not request.body_exists() or request.body_complete:
            return self._body_now(request)
        length = request.content_length
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

    async def _proxy(self, flight: Flight, route: CompiledRoute, ex: Exchange) -> None:
        request = flight.request
        span = client_span = None
        up, target = flight.response, flight.target
        if up is None:
            if flight.fields is not None:  # prepared inline before the hand-over
                raw_fields, headers, body_now = flight.fields
                body: bytes | AsyncIterator[bytes] | None = body_now
                length = request.content_length
            else:
                _trace_id, traceparent = continue_trace(request.traceparent)
                if self.tracing.enabled:
                    span = self.tracing.server_span(
                        request.method, route.route_id, request.traceparent
                    )
                    client_span, traceparent = self.tracing.client_span(
                        span, request.method, route.service + route.upstream_path(flight.ex.path)
                    )
                raw_fields, headers = self._upstream_fields(flight, traceparent)
            resume, flight.resume = flight.resume, None
            try:
                if flight.fields is None:
                    body, length = await self._request_body(request)
                up, target = await route.cluster.send(
                    request.method,
                    route.upstream_path(flight.ex.path) + flight.query,
                    headers,
                    body,
                    request_headers=request,
                    client_ip=ex.client_ip,
                    content_length=length,
                    raw_fields=raw_fields,
                    resume=resume,
                )
            except BodyTooLarge:
                raise Problem(
                    413, "body-too-large", f"the body is larger than {self.limits.max_body} bytes"
                ) from None
            except BodyTimeout:
                raise _body_timeout(self.limits.body_timeout) from None
            finally:
                if client_span is not None:
                    client_span.end()
        else:
            flight.response = None  # relayed (and released) here from now on
        assert target is not None
        flight.upstream_url = target.url
        conn = request.conn
        try:
            head = self._response_head(flight, up)
            flight.status = status = up.status
            if span is not None:
                span.set_attribute("http.response.status_code", status)
            reason = up.reason or None
            if request.method == "HEAD" or status in (204, 304):
                conn.start_response(
                    request, status, head, content_length=up.content_length, reason=reason
                )
                conn.end_response()
                return
            if up.content_length is not None and up.content_length <= SMALL_BODY:
                try:
                    data = await up.read()
                except UpstreamError as exc:  # nothing sent yet: the client gets 502/504
                    raise route.cluster.body_failed(target, exc) from None
                conn.respond(request, status, head, data, reason=reason)
                return
            chunks = up.iter_chunks().__aiter__()
            try:
                first = await chunks.__anext__()
            except StopAsyncIteration:
                first = b""
            except UpstreamError as exc:
                raise route.cluster.body_failed(target, exc) from None
            conn.start_response(
                request, status, head, content_length=up.content_length, reason=reason, first=first
            )
            if first:
                try:
                    async for chunk in chunks:
                        await conn.write(chunk)
                except UpstreamError as exc:
                    # The head is out: the client can only learn of it from the connection
                    # closing before the body's end (as nginx does).
                    flight.status = route.cluster.body_failed(target, exc).status
                    log.warning("%s: response body cut short: %s", route.service, exc)
                    conn.cut()
                    return
            conn.end_response()
        finally:
            up.release()
            if span is not None:
                span.end()

    async def _tunnel(self, flight: Flight, route: CompiledRoute, ex: Exchange) -> None:
        """A WebSocket: bytes relayed between the client and one upstream target."""
        request = flight.request
        cluster = route.cluster
        target = cluster.balancer.pick(None, None)
        if target is None:
            raise Problem(503, "no-healthy-upstream", "no healthy upstream for this WebSocket")
        base, host = cluster.address(target)
        raw_fields, headers = self._upstream_fields(flight)
        response_headers = [("X-Request-Id", ex.request_id), *ex.response_headers]
        flight.upstream_url = target.url
        flight.status = await tunnel(
            request,
            target=target,
            base=base,
            host=host,
            path=route.upstream_path(flight.ex.path) + flight.query,
            headers=headers,
            raw_fields=raw_fields,
            response_headers=response_headers,
            response_block=ex.response_block,
            timeout=cluster.request_timeout,
        )

    # -- the inline driver (docs/adr/0014-inline-exchanges.md) -----------------------------------

    def dispatch(self, request: IncomingRequest) -> int:
        """Handle ``request`` from the connection's callback if nothing has to wait: `DONE`
        (answered), `IN_FLIGHT` (a policy's or the upstream's callback follows) or `TASK`."""
        if (
            not self.inline
            or not request.body_complete
            or request.upgrading
            or self.tracing.enabled
        ):
            return TASK
        return self._go(self._begin(request))

    def _go(self, flight: Flight) -> int:
        """The flight's remaining steps, up to the first that has to wait (see `dispatch`)."""
        request = flight.request
        try:
            route: CompiledRoute = flight.route if flight.route is not None else self._admit(flight)
            ex = flight.ex
            policies = route.policies
            while flight.next_policy < len(policies):
                policy = policies[flight.next_policy]
                if not policy.check_now(ex):
                    request.inline = flight
                    if policy.check_soon(ex, flight.policy_done):
                        return IN_FLIGHT  # Redis answers through _policy_done
                    return TASK  # the task awaits this policy's check (a token to verify)
                flight.next_policy += 1
            if self._start_upstream(flight):
                return IN_FLIGHT
            request.inline = flight  # no idle connection to the target: the task connects
            return TASK
        except Problem as problem:
            request.inline = None
            try:
                self._answer_problem(flight, problem)
            except ClientGone:
                flight.status = 499
        except BaseException:
            request.inline = None
            flight.status = 500  # the connection logs it and answers 500
            self._end(flight)
            raise
        self._end(flight)
        return DONE

    def _policy_done(self, flight: Flight, problem: Problem | None) -> None:
        """A policy that answered through a callback (`Policy.check_soon`) has decided."""
        request = flight.request
        if request.inline is not flight:
            return  # the client left meanwhile (Flight.client_lost)
        conn = request.conn
        if problem is None:
            flight.next_policy += 1
            try:
                outcome = self._go(flight)
            except Exception:  # noqa: BLE001 - a bug: request_crashed logs it, answers 500
                conn.request_crashed(request)
                return
        else:
            request.inline = None
            try:
                self._answer_problem(flight, problem)
            except ClientGone:
                flight.status = 499
            self._end(flight)
            outcome = DONE
        if outcome == DONE:
            conn.request_done(request)
        elif outcome == TASK:
            conn.hand_over(request)

    def _start_upstream(self, flight: Flight) -> bool:
        """The upstream attempt without waiting: True when it is under way (``request.inline``
        says so to the connection), False when the task sends it (``flight.resume``)."""
        request, route, ex = flight.request, flight.route, flight.ex
        assert route is not None
        body, _length = self._body_now(request)
        raw_fields, headers = self._upstream_fields(flight, continue_trace(request.traceparent)[1])
        flight.fields = (raw_fields, headers, body)
        cluster: UpstreamCluster = route.cluster  # typed: start_inline() is a C call (ADR 18)
        started = cluster.start_inline(
            request.method,
            route.upstream_path(flight.ex.path) + flight.query,
            headers,
            body,
            request_headers=request,
            client_ip=ex.client_ip,
            raw_fields=raw_fields,
            on_ready=flight.upstream_ready,
        )
        if isinstance(started, Resume):
            flight.resume = started  # no idle connection to the target: send() connects
            return False
        flight.attempt = started
        request.inline = flight
        return True

    def _upstream_ready(self, flight: Flight) -> None:
        """The inline request's upstream attempt has an outcome: relay a response that is
        complete and small now; hand anything else over to the connection's task."""
        request = flight.request
        conn = request.conn
        attempt, flight.attempt = flight.attempt, None
        assert attempt is not None
        try:
            try:
                outcome = attempt.settle()
                if isinstance(outcome, Resume):
                    flight.resume = outcome
                    conn.hand_over(request)
                    return
                up: UpstreamResponse = outcome  # typed: struct reads (ADR 17)
                status = up.status
                bodiless = request.method == "HEAD" or status in (204, 304)
                if not bodiless and (
                    up.content_length is None or up.content_length > SMALL_BODY or not up.complete()
                ):
                    flight.response, flight.target = up, attempt.target
                    conn.hand_over(request)  # its body is still to come, or to be streamed
                    return
                request.inline = None
                flight.upstream_url = attempt.target.url
                try:
                    head = self._response_head(flight, up)
                    flight.status = status
                    reason = up.reason or None
                    if bodiless:
                        conn.start_response(
                            request, status, head, content_length=up.content_length, reason=reason
                        )
                        conn.end_response()
                    else:
                        conn.respond(request, status, head, up.read_now(), reason=reason)
                finally:
                    up.release()
            except Problem as problem:
                request.inline = None
                self._answer_problem(flight, problem)
        except (ClientGone, ConnectionError):
            flight.status = 499
        except Exception:  # noqa: BLE001 - a bug: request_crashed logs it, answers 500
            request.inline = None
            flight.status = 500
            self._end(flight)
            conn.request_crashed(request)
            return
        self._end(flight)
        conn.request_done(request)


_DROPS: dict[tuple[frozenset[bytes], tuple[str, ...]], tuple[tuple[bytes, ...], ...]] = {}


def _response_drop_table(
    own: list[tuple[str, str]], route_drop: frozenset[bytes]
) -> tuple[tuple[bytes, ...], ...]:
    """The upstream response fields not relayed (`drop_table`) when a policy writes the text
    fields ``own`` on a route that drops ``route_drop``: a route's requests add the same few
    names, so the table is built once per route and set of names."""
    names = tuple([n for n, _ in own])
    key = (route_drop, names)
    table = _DROPS.get(key)
    if table is None:
        table = drop_table(route_drop | {n.lower().encode("latin-1") for n in names})
        if len(_DROPS) < 1024:  # names come from config and policies, but stay bounded
            _DROPS[key] = table
    return table


def _body_timeout(timeout: float) -> Problem:
    return Problem(408, "request-body-timeout", f"no request body bytes for {timeout:g}s")
