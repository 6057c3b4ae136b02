"""Inline exchanges (docs/adr/0014-inline-exchanges.md): a request whose steps can all complete
now is handled in the protocol callbacks; at the first step that would wait it is handed over
to the connection's task, which goes on from there.

Every test runs on both drivers and asserts the same behaviour on each. On the inline driver
a `Trace` also records what `RequestPath.dispatch` did with each request (`DONE`, `IN_FLIGHT`,
`TASK`, and why) and why an inline request was handed over, to prove which path it took.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiohttp import ClientSession

import gateway.jwks
import gateway.runtime
from gateway.h1server import ClientConnection, FrontServer, IncomingRequest
from gateway.jwks import TokenVerifier
from gateway.server import DONE, IN_FLIGHT, TASK, RequestPath
from tests.conftest import RunningGateway, service
from tests.gateway.raw_http import Canned, RawClient, RecordedRequest, RecordingUpstream
from tests.gateway.test_auth import AUDIENCE, Issuer, bearer

# Every test here runs on both request drivers: inline (ADR 14) and on the connection's task.
GATEWAY_DRIVERS = ("inline", "task")

ALL = {"name": "all", "match": {"pathPrefix": "/"}}
BODY_200K = bytes(range(256)) * 800  # 204,800 bytes: more than the 64 KiB relayed inline


# -- what the inline driver did --------------------------------------------------------------------


class Trace:
    """``dispatched``: (path, what `dispatch` returned, why) per request it was given, ``why``
    saying for `TASK` where the task is to go on ("policy", "connect") or "not inline";
    "raised" instead of an outcome for a bug. ``handed``: (path, why) per hand-over of an
    inline request to the task ("relay" a response, "retry", "redo" on a new connection)."""

    def __init__(self) -> None:
        self.dispatched: list[tuple[str, int | str, str]] = []
        self.handed: list[tuple[str, str]] = []

    def outcome(self, path: str) -> tuple[int | str, str]:
        found = [(o, why) for p, o, why in self.dispatched if p == path]
        assert len(found) == 1, (path, self.dispatched)
        return found[0]


def _task_stage(req: IncomingRequest) -> str:
    flight: Any = req.inline
    if flight is None:
        return "not inline"
    return "connect" if flight.resume is not None else "policy"


def _hand_over_reason(req: IncomingRequest) -> str:
    flight: Any = req.inline
    if flight.response is not None:
        return "relay"
    if flight.resume is None:
        return "nothing to go on with"  # a bug: the test that sees it fails
    return "redo" if flight.resume.redo is not None else "retry"


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> Callable[[RunningGateway], Trace]:
    """Spies on a gateway's `dispatch` (bound by its FrontServer when it started) and on
    `ClientConnection.hand_over`."""
    traces: list[Trace] = []

    class Watched(ClientConnection):
        def hand_over(self, req: IncomingRequest) -> None:
            for t in traces:
                t.handed.append((req.raw_path, _hand_over_reason(req)))
            super().hand_over(req)

    monkeypatch.setattr(FrontServer, "connection_type", Watched)

    def attach(gw: RunningGateway) -> Trace:
        t = Trace()
        traces.append(t)
        server = gw.gateway._server
        original = server.dispatch

        def dispatch(req: IncomingRequest) -> int:
            try:
                outcome = original(req)
            except BaseException:
                t.dispatched.append((req.raw_path, "raised", ""))
                raise
            why = _task_stage(req) if outcome == TASK else ""
            t.dispatched.append((req.raw_path, outcome, why))
            return outcome

        monkeypatch.setattr(server, "dispatch", dispatch)
        return t

    return attach


# -- upstreams -------------------------------------------------------------------------------------


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[..., Awaitable[RecordingUpstream]]]:
    """`RecordingUpstream`s: any path not in ``answers`` is echoed (200, the target as body)
    on a keep-alive connection."""
    started: list[RecordingUpstream] = []

    async def make(answers: dict[str, Any] | None = None) -> RecordingUpstream:
        up = RecordingUpstream(answers=dict(answers or {}))
        await up.start()
        started.append(up)
        return up

    yield make
    for up in started:
        await up.stop()


def held(ended: asyncio.Event, limit: float = 1.8) -> Callable[..., Awaitable[None]]:
    """A `RecordingUpstream` answer that never answers: it waits for the gateway to close the
    connection (then sets ``ended``), for ``limit`` seconds at most."""

    async def handler(req: RecordedRequest, reader: Any, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), limit)
        except (asyncio.IncompleteReadError, ConnectionError):
            ended.set()
        except TimeoutError:
            pass

    return handler


def answer_after(delay: float) -> Callable[..., Awaitable[None]]:
    """A `RecordingUpstream` answer: 200 "late" after ``delay`` seconds."""

    async def handler(req: RecordedRequest, reader: Any, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(delay)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
        await writer.drain()

    return handler


def canned(status: str, fields: str = "", body: bytes = b"") -> Canned:
    """A keep-alive answer with a Content-Length (none for 204)."""
    length = "" if status.startswith("204") else f"Content-Length: {len(body)}\r\n"
    return Canned(f"HTTP/1.1 {status}\r\n{fields}{length}\r\n".encode() + body)


class ReuseClosingUpstream:
    """Answers the first request on each connection and keeps the connection (without saying
    otherwise); a later request on it is read and the connection closed unanswered: an
    upstream closing an idle keep-alive connection just as the gateway reuses it."""

    def __init__(self) -> None:
        self.connections = 0
        self.answered: list[str] = []
        self.dropped: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.answered.append(head.split(b" ", 2)[1].decode())
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            self.dropped.append(head.split(b" ", 2)[1].decode())
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class CloseAfterAnswerUpstream(ReuseClosingUpstream):
    """Answers one request per connection, without ``Connection: close``, then closes."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.answered.append(head.split(b" ", 2)[1].decode())
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


# -- helpers ---------------------------------------------------------------------------------------


def cluster_of(gw: RunningGateway, path: str = "/") -> Any:
    route = gw.gateway.path.table.match("x", path, "GET")
    return route.cluster


async def eventually(condition: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within}s")
        await asyncio.sleep(0.005)


async def settled(gw: RunningGateway, path: str = "/") -> None:
    """Nothing left in flight: requests, upstream attempts, pooled connections in use."""
    cluster = cluster_of(gw, path)
    await eventually(
        lambda: (
            gw.gateway.path.in_flight == 0
            and cluster.active_requests == 0
            and all(t.pool.in_flight == 0 for t in cluster.targets)
        )
    )


def reset_connection(client: RawClient) -> None:
    """Close the client's socket with a reset: an abort the gateway sees at once (a FIN
    alone is a half-close, after which the answer is still sent: RFC 9112 §9.6)."""
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.writer.transport.abort()


async def access_lines(gw: RunningGateway, log_file: Path, *paths: str) -> dict[str, Any]:
    """The access log's lines by path, once it holds every one of ``paths`` (2 s at most).
    ``flush()`` writes what is buffered, but the log's own flusher may have taken a batch a
    moment before and still be writing it on its thread."""
    deadline = time.monotonic() + 2.0
    while True:
        gw.gateway.access_log.flush()
        text = await asyncio.to_thread(log_file.read_text)
        whole = text.rpartition("\n")[0]  # a line being written is left out
        lines = {entry["path"]: entry for entry in map(json.loads, whole.splitlines())}
        if all(path in lines for path in paths) or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.02)


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


async def body_of(http: ClientSession, url: str, **kwargs: Any) -> tuple[int, bytes]:
    async with http.get(url, **kwargs) as resp:
        return resp.status, await resp.read()


# -- 1. the common request -------------------------------------------------------------------------


async def test_warm_get_goes_inline_and_round_robin_still_alternates(
    upstreams, gateway_factory, http, trace, gateway_driver
):
    a, b = await upstreams("a"), await upstreams("b")
    gw = await gateway_factory([service("svc", [a.url, b.url], [ALL])])
    t = trace(gw)
    for i in range(10):
        async with http.get(gw.url + f"/r{i}") as resp:
            assert resp.status == 200
            seen = await resp.json()
            assert seen["path"] == f"/r{i}"
            assert resp.headers["X-Upstream"] == ("a" if i % 2 == 0 else "b")
            assert len(resp.headers["X-Request-Id"]) == 32
    assert len(a.requests) == 5 and len(b.requests) == 5
    if gateway_driver == "inline":
        # Each target's first request finds no idle connection: the task connects.
        assert [(o, why) for _, o, why in t.dispatched] == [(TASK, "connect")] * 2 + [
            (IN_FLIGHT, "")
        ] * 8
        assert t.handed == []
    else:
        assert {(o, why) for _, o, why in t.dispatched} == {(TASK, "not inline")}
    await settled(gw)


async def test_small_complete_request_bodies_go_inline_byte_for_byte(
    raw_upstream, gateway_factory, trace, gateway_driver
):
    up = await raw_upstream()
    gw = await gateway_factory([service("svc", [up.url], [ALL])])
    t = trace(gw)
    async with await RawClient.open(gw.gateway.port) as client:
        assert (await client.exchange(get("/warm"))).status == 200
        post = b'POST /post HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n{"a":1}'
        resp = await client.exchange(post)
        assert resp.status == 200 and resp.header("X-Body-Length") == "7"
        chunked = (
            b"PUT /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        assert (await client.exchange(chunked)).status == 200
    post_seen, put_seen = up.requests[1], up.requests[2]
    assert post_seen.body == b'{"a":1}' and post_seen.header("Content-Length") == "7"
    # A chunked body complete with its head goes upstream whole, with its length.
    assert put_seen.body == b"abcde" and not put_seen.chunked
    assert put_seen.header("Content-Length") == "5"
    assert {r.connection for r in up.requests} == {0}
    if gateway_driver == "inline":
        assert t.outcome("/post") == (IN_FLIGHT, "")
        assert t.outcome("/chunked") == (IN_FLIGHT, "")


# -- 2. policies that have to wait -----------------------------------------------------------------


async def test_auth_unverified_token_is_handed_over_then_cached_token_goes_inline(
    upstreams, gateway_factory, http, trace, gateway_driver, monkeypatch
):
    hub = Issuer()
    hub.add_key("k1", "ec")
    await hub.start()
    try:
        up = await upstreams("bus")
        route = {**ALL, "auth": {}}

        class Counting(TokenVerifier):  # compiled, TokenVerifier is an extension type
            verified: ClassVar[list[str]] = []

            async def verify(self, token: str, *, key: str | None = None) -> Any:
                self.verified.append(token)
                return await super().verify(token, key=key)

        monkeypatch.setattr(gateway.jwks, "TokenVerifier", Counting)  # the gateway's import
        gw = await gateway_factory(
            [service("bus-times", [up.url], [route])], issuer=hub.url, audience=AUDIENCE
        )
        t = trace(gw)
        verified = gw.gateway.verifier.verified
        first, second = hub.token(), hub.token(sub="citizen-43")
        # The first request warms the upstream connection too.
        assert (await body_of(http, gw.url + "/warm", headers=bearer(first)))[0] == 200
        status, body = await body_of(http, gw.url + "/a", headers=bearer(second))
        assert status == 200
        assert verified == [first, second]
        status, body = await body_of(http, gw.url + "/b", headers=bearer(second))
        assert status == 200
        assert verified == [first, second]  # from the cache
        # The identity the policy added reaches the upstream on the inline path too.
        assert json.loads(body)["headers"]["X-CityPlane-Subject"] == "citizen-43"
        async with http.get(gw.url + "/c") as resp:  # no token: decided inline
            assert resp.status == 401
            assert resp.content_type == "application/problem+json"
        assert len(up.requests) == 3
        if gateway_driver == "inline":
            assert t.outcome("/a") == (TASK, "policy")
            assert t.outcome("/b") == (IN_FLIGHT, "")
            assert t.outcome("/c") == (DONE, "")
            assert t.handed == []
        await settled(gw)
    finally:
        await hub.stop()


# -- 3. a retry ------------------------------------------------------------------------------------


async def test_retryable_5xx_is_retried_on_the_other_target_by_the_task(
    raw_upstream, gateway_factory, http, trace, gateway_driver
):
    bad = await raw_upstream({"/x": canned("503 Service Unavailable", body=b"busy")})
    good = await raw_upstream()
    gw = await gateway_factory([service("svc", [bad.url, good.url], [ALL])])
    t = trace(gw)
    for path in ("/warm-bad", "/warm-good"):  # round-robin: one each, in the targets' order
        assert (await body_of(http, gw.url + path))[0] == 200
    assert bad.targets == ["/warm-bad"] and good.targets == ["/warm-good"]
    assert await body_of(http, gw.url + "/x") == (200, b"/x")
    assert bad.targets.count("/x") == 1 and good.targets.count("/x") == 1
    if gateway_driver == "inline":
        assert t.outcome("/x") == (IN_FLIGHT, "")
        assert t.handed == [("/x", "retry")]
    await settled(gw)


# -- 4. an upstream timeout ------------------------------------------------------------------------


async def test_upstream_timeout_is_answered_504_inline(
    raw_upstream, gateway_factory, http, trace, gateway_driver
):
    ended = asyncio.Event()
    up = await raw_upstream({"/sleep": held(ended)})
    gw = await gateway_factory(
        [
            service(
                "svc",
                [up.url],
                [ALL],
                upstream={
                    "timeouts": {"request": "300ms"},
                    "retries": {"attempts": 0},
                    "circuitBreaker": None,
                },
            )
        ]
    )
    t = trace(gw)
    assert (await body_of(http, gw.url + "/warm"))[0] == 200
    started = time.monotonic()
    async with http.get(gw.url + "/sleep") as resp:
        assert resp.status == 504
        assert resp.content_type == "application/problem+json"
        body = await resp.json(content_type=None)
    assert 0.25 < time.monotonic() - started < 1.5
    assert body["type"].endswith("/upstream-timeout") and body["status"] == 504
    await asyncio.wait_for(ended.wait(), 1)  # the upstream connection was closed
    if gateway_driver == "inline":
        assert t.outcome("/sleep") == (IN_FLIGHT, "")
        assert t.handed == []
    await settled(gw)
    assert (await body_of(http, gw.url + "/after"))[0] == 200


async def test_timed_out_inline_attempt_is_retried_on_the_other_target_by_the_task(
    raw_upstream, gateway_factory, http, trace, gateway_driver
):
    ended = asyncio.Event()
    slow = await raw_upstream({"/sleep": held(ended)})
    good = await raw_upstream()
    gw = await gateway_factory(
        [
            service(
                "svc",
                [slow.url, good.url],
                [ALL],
                upstream={"timeouts": {"request": "300ms"}, "circuitBreaker": None},
            )
        ]
    )
    t = trace(gw)
    for path in ("/warm-slow", "/warm-good"):
        assert (await body_of(http, gw.url + path))[0] == 200
    started = time.monotonic()
    assert await body_of(http, gw.url + "/sleep") == (200, b"/sleep")
    assert 0.25 < time.monotonic() - started < 1.5
    await asyncio.wait_for(ended.wait(), 1)
    assert slow.targets.count("/sleep") == 1 and good.targets.count("/sleep") == 1
    if gateway_driver == "inline":
        assert t.outcome("/sleep") == (IN_FLIGHT, "")
        assert t.handed == [("/sleep", "retry")]
    await settled(gw)


# -- 5. the client leaves --------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["waiting", "streaming"])
async def test_client_leaving_mid_exchange_closes_the_upstream_and_logs_499(
    raw_upstream, gateway_factory, http, trace, gateway_driver, tmp_path, stage
):
    """``waiting``: no response byte yet (inline, the attempt under way); ``streaming``: the
    head and part of a large body relayed (handed over to the task)."""
    ended = asyncio.Event()
    wait = held(ended)

    async def streaming(req: RecordedRequest, reader: Any, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
        await writer.drain()
        await wait(req, reader, writer)

    up = await raw_upstream({"/hold": wait if stage == "waiting" else streaming})
    log_file = tmp_path / "access.log"
    gw = await gateway_factory([service("svc", [up.url], [ALL])], access_log=str(log_file))
    t = trace(gw)
    assert (await body_of(http, gw.url + "/warm"))[0] == 200
    client = await RawClient.open(gw.gateway.port)
    client.send(get("/hold"))
    if stage == "streaming":
        head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 2)
        assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 100000" in head
    else:
        await eventually(lambda: "/hold" in up.targets)
    reset_connection(client)
    await asyncio.wait_for(ended.wait(), 1.5)  # the gateway closed the upstream connection
    await settled(gw)
    lines = await access_lines(gw, log_file, "/hold", "/warm")
    assert lines["/hold"]["status"] == 499
    assert lines["/warm"]["status"] == 200
    if gateway_driver == "inline":
        assert t.outcome("/hold") == (IN_FLIGHT, "")
        assert t.handed == ([] if stage == "waiting" else [("/hold", "relay")])
    # A later request on a new connection is served (on a new upstream connection).
    assert await body_of(http, gw.url + "/after") == (200, b"/after")
    await settled(gw)


async def test_client_leaving_frees_the_half_open_trial(
    raw_upstream, gateway_factory, http, trace, gateway_driver
):
    ended = asyncio.Event()
    up = await raw_upstream(
        {"/fail": canned("500 Internal Server Error", body=b"no"), "/hold": held(ended)}
    )
    gw = await gateway_factory(
        [
            service(
                "svc",
                [up.url],
                [ALL],
                upstream={
                    "retries": {"attempts": 0},
                    "circuitBreaker": {"failureThreshold": 1, "resetTimeout": "200ms"},
                },
            )
        ]
    )
    t = trace(gw)
    breaker = cluster_of(gw).breaker
    assert (await body_of(http, gw.url + "/warm"))[0] == 200
    assert (await body_of(http, gw.url + "/fail"))[0] == 500
    assert breaker.state == "open"
    assert (await body_of(http, gw.url + "/refused"))[0] == 503
    await asyncio.sleep(0.25)
    client = await RawClient.open(gw.gateway.port)
    client.send(get("/hold"))  # the half-open trial
    await eventually(lambda: "/hold" in up.targets)
    assert breaker.state == "half-open"
    reset_connection(client)
    await asyncio.wait_for(ended.wait(), 1.5)
    await settled(gw)
    # The trial's permit was freed without an outcome: the next request is the trial.
    assert await body_of(http, gw.url + "/after") == (200, b"/after")
    assert breaker.state == "closed"
    if gateway_driver == "inline":
        assert t.outcome("/fail") == (IN_FLIGHT, "")
        assert t.outcome("/refused") == (DONE, "")
        assert t.outcome("/hold") == (IN_FLIGHT, "")


# -- 6. responses relayed by the task --------------------------------------------------------------


async def test_large_late_and_chunked_responses_are_handed_over_and_relayed_intact(
    raw_upstream, gateway_factory, http, trace, gateway_driver
):
    chunks = [b"first,", bytes(range(256)) * 100, b"", b"last"]
    chunked_body = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n\r\n"

    async def late(req: RecordedRequest, reader: Any, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"later")
        await writer.drain()

    up = await raw_upstream(
        {
            "/big": canned("200 OK", "Content-Type: application/octet-stream\r\n", BODY_200K),
            "/chunked": Canned(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked_body
            ),
            "/late": late,
        }
    )
    gw = await gateway_factory([service("svc", [up.url], [ALL])])
    t = trace(gw)
    assert (await body_of(http, gw.url + "/warm"))[0] == 200
    async with http.get(gw.url + "/big") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(BODY_200K))
        assert await resp.read() == BODY_200K
    async with http.get(gw.url + "/chunked") as resp:
        assert resp.status == 200
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert await resp.read() == b"".join(chunks)
    assert await body_of(http, gw.url + "/late") == (200, b"later")
    if gateway_driver == "inline":
        for path in ("/big", "/chunked", "/late"):
            assert t.outcome(path) == (IN_FLIGHT, "")
        assert t.handed == [("/big", "relay"), ("/chunked", "relay"), ("/late", "relay")]
    await settled(gw)


@pytest.mark.parametrize("failure", ["closed", "stalled"])
async def test_small_body_the_upstream_fails_to_finish_is_answered_502_or_504(
    raw_upstream, gateway_factory, trace, gateway_driver, tmp_path, failure
):
    async def cut_short(req: RecordedRequest, reader: Any, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await writer.drain()
        if failure == "stalled":
            await held(asyncio.Event())(req, reader, writer)

    up = await raw_upstream({"/cut": cut_short})
    log_file = tmp_path / "access.log"
    gw = await gateway_factory(
        [
            service(
                "svc",
                [up.url],
                [ALL],
                upstream={"timeouts": {"request": "300ms"}, "retries": {"attempts": 0}},
            )
        ],
        access_log=str(log_file),
    )
    trace(gw)
    async with await RawClient.open(gw.gateway.port) as client:
        assert (await client.exchange(get("/warm"))).status == 200
        resp = await client.exchange(get("/cut"))
    lines = await access_lines(gw, log_file, "/cut")
    assert lines["/cut"]["status"] == resp.status  # what the client got
    expected = (502, "upstream-unavailable") if failure == "closed" else (504, "upstream-timeout")
    assert (resp.status, resp.problem_type()) == expected


async def test_large_body_the_upstream_cuts_short_ends_the_client_connection(
    raw_upstream, gateway_factory, gateway_driver, tmp_path, caplog
):
    """Once the head is out the client can only learn of the failure from the connection
    closing before the body's end; logged 502, no 'unhandled error'."""

    async def cut_short(req: RecordedRequest, reader: Any, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"x" * 100_000)
        await writer.drain()
        writer.close()

    up = await raw_upstream({"/cut": cut_short})
    log_file = tmp_path / "access.log"
    gw = await gateway_factory(
        [service("svc", [up.url], [ALL], upstream={"retries": {"attempts": 0}})],
        access_log=str(log_file),
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.port)
    writer.write(get("/cut"))
    received = await asyncio.wait_for(reader.read(), 5)  # until the gateway closes
    writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Length: 200000" in head
    assert 0 < len(body) < 200_000
    lines = await access_lines(gw, log_file, "/cut")
    assert lines["/cut"]["status"] == 502
    assert "unhandled error" not in caplog.text


# -- 7. responses without a body -------------------------------------------------------------------


async def test_head_204_and_304_inline_carry_no_body_bytes(
    raw_upstream, gateway_factory, trace, gateway_driver
):
    up = await raw_upstream(
        {
            "/empty": canned("204 No Content", "X-Empty: yes\r\n"),
            "/same": Canned(
                b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 12\r\n\r\n'
            ),
        }
    )
    gw = await gateway_factory([service("svc", [up.url], [ALL])])
    t = trace(gw)
    async with await RawClient.open(gw.gateway.port) as client:
        assert (await client.exchange(get("/warm"))).status == 200
        head = await client.exchange(b"HEAD /head HTTP/1.1\r\nHost: x\r\n\r\n", "HEAD")
        assert head.status == 200
        assert head.header("Content-Length") == str(len("/head"))  # the GET's length
        assert head.header("Transfer-Encoding") is None
        empty = await client.exchange(get("/empty"))
        assert empty.status == 204 and empty.header("X-Empty") == "yes"
        assert empty.header("Content-Length") is None
        assert empty.header("Transfer-Encoding") is None
        same = await client.exchange(get("/same"))
        assert same.status == 304 and same.header("ETag") == '"v1"'
        assert same.header("Content-Length") == "12"
        # Stray body bytes would have been read as this response's head.
        after = await client.exchange(get("/after"))
        assert (after.status, after.body) == (200, b"/after")
        assert not await client.closed(timeout=0.1)  # nothing more, and still open
    assert up.requests[1].method == "HEAD"
    if gateway_driver == "inline":
        for path in ("/head", "/empty", "/same", "/after"):
            assert t.outcome(path) == (IN_FLIGHT, "")
        assert t.handed == []
    await settled(gw)


# -- 8. pipelining ---------------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order_each_inline(
    raw_upstream, gateway_factory, trace, gateway_driver
):
    up = await raw_upstream()
    gw = await gateway_factory([service("svc", [up.url], [ALL])])
    t = trace(gw)
    async with await RawClient.open(gw.gateway.port) as client:
        assert (await client.exchange(get("/warm"))).status == 200
        client.send(get("/p1") + b"HEAD /p2 HTTP/1.1\r\nHost: x\r\n\r\n" + get("/p3"))
        answers = [await client.response(method) for method in ("GET", "HEAD", "GET")]
        assert not await client.closed(timeout=0.1)  # no stray bytes
    assert [(r.status, r.body) for r in answers] == [(200, b"/p1"), (200, b""), (200, b"/p3")]
    assert answers[1].header("Content-Length") == "3"
    assert up.targets == ["/warm", "/p1", "/p2", "/p3"]
    assert {r.connection for r in up.requests} == {0}  # one upstream connection, reused
    if gateway_driver == "inline":
        assert [t.outcome(p) for p in ("/p1", "/p2", "/p3")] == [(IN_FLIGHT, "")] * 3
        assert t.handed == []
    await settled(gw)


async def test_pipelined_requests_stay_in_order_across_a_hand_over(
    raw_upstream, gateway_factory, trace, gateway_driver
):
    a, b = await raw_upstream(), await raw_upstream()
    gw = await gateway_factory(
        [
            service("a", [a.url], [{"name": "a", "match": {"pathPrefix": "/a/"}}]),
            service("b", [b.url], [{"name": "b", "match": {"pathPrefix": "/b/"}}]),
        ]
    )
    t = trace(gw)
    async with await RawClient.open(gw.gateway.port) as client:
        assert (await client.exchange(get("/a/warm"))).status == 200
        # /a/1 inline; /b/2 needs a connection (the task); /a/3 and /a/4 after it.
        client.send(get("/a/1") + get("/b/2") + get("/a/3") + get("/a/4"))
        answers = [await client.response() for _ in range(4)]
        later = await client.exchange(get("/a/5"))
    assert [r.body for r in answers] == [b"/a/1", b"/b/2", b"/a/3", b"/a/4"]
    assert (later.status, later.body) == (200, b"/a/5")
    if gateway_driver == "inline":
        assert t.outcome("/a/1") == (IN_FLIGHT, "")
        assert t.outcome("/b/2") == (TASK, "connect")
        assert t.outcome("/a/5") == (IN_FLIGHT, "")  # inline again once the queue is empty
    await settled(gw, "/a/")
    await settled(gw, "/b/")


async def test_malformed_bytes_behind_an_inline_request_are_refused_after_its_answer(
    raw_upstream, gateway_factory, trace, gateway_driver
):
    up = await raw_upstream({"/slow": answer_after(0.1)})
    gw = await gateway_factory([service("svc", [up.url], [ALL])])
    t = trace(gw)
    async with await RawClient.open(gw.gateway.port) as client:
        assert (await client.exchange(get("/warm"))).status == 200
        client.send(get("/slow") + b"GET /x HTTP/1.1\r\nHost: x\r\nBad Field: y\r\n\r\n")
        first = await client.response()
        refused = await client.response()
        assert await client.closed()
    assert (first.status, first.body) == (200, b"late")
    assert refused.status == 400
    assert up.targets == ["/warm", "/slow"]
    if gateway_driver == "inline":
        assert t.outcome("/slow") == (IN_FLIGHT, "")
    await settled(gw)


# -- the client connection's own rules around an exchange under way --------------------------------


async def test_half_closed_client_still_gets_the_answer_then_the_connection_closes(
    raw_upstream, gateway_factory, trace, gateway_driver
):
    up = await raw_upstream({"/slow": answer_after(0.1)})
    gw = await gateway_factory([service("svc", [up.url], [ALL])])
    t = trace(gw)
    async with await RawClient.open(gw.gateway.port) as client:
        assert (await client.exchange(get("/warm"))).status == 200
        client.send(get("/slow"))
        await eventually(lambda: "/slow" in up.targets)
        client.writer.write_eof()  # RFC 9112 §9.6: the answer is still due
        resp = await client.response()
        assert (resp.status, resp.body) == (200, b"late")
        assert await client.closed()
    if gateway_driver == "inline":
        assert t.outcome("/slow") == (IN_FLIGHT, "")
    await settled(gw)


async def test_client_idle_timeout_does_not_cut_an_exchange_under_way(
    raw_upstream, gateway_factory, trace, gateway_driver
):
    from gateway.connections import GatewayLimits

    up = await raw_upstream({"/slow": answer_after(0.5)})
    gw = await gateway_factory(
        [service("svc", [up.url], [ALL])], limits=GatewayLimits(idle_timeout=0.2)
    )
    t = trace(gw)
    async with await RawClient.open(gw.gateway.port) as client:
        assert (await client.exchange(get("/warm"))).status == 200
        resp = await client.exchange(get("/slow"))
        assert (resp.status, resp.body) == (200, b"late")
        # Idle afterwards: the idle timeout applies again.
        assert await client.closed(timeout=1.0)
    if gateway_driver == "inline":
        assert t.outcome("/slow") == (IN_FLIGHT, "")
    await settled(gw)


# -- 9. a stale keep-alive connection --------------------------------------------------------------


async def test_upstream_closing_a_reused_connection_is_redone_on_a_new_one(
    gateway_factory, http, trace, gateway_driver
):
    up = ReuseClosingUpstream()
    await up.start()
    try:
        gw = await gateway_factory([service("svc", [up.url], [ALL])])
        t = trace(gw)
        breaker = cluster_of(gw).breaker
        assert await body_of(http, gw.url + "/one") == (200, b"ok")
        assert await body_of(http, gw.url + "/two") == (200, b"ok")
        assert up.dropped == ["/two"] and up.answered == ["/one", "/two"]
        assert up.connections == 2
        assert breaker._storage.failures == 0  # not an upstream failure
        if gateway_driver == "inline":
            assert t.outcome("/two") == (IN_FLIGHT, "")
            assert t.handed == [("/two", "redo")]
        # A POST may have been processed: it is not sent again (ADR 3), as on the task path.
        async with http.post(gw.url + "/post", data=b"{}") as resp:
            assert resp.status == 502
        assert up.dropped == ["/two", "/post"] and up.connections == 2
        await settled(gw)
    finally:
        await up.stop()


async def test_upstream_closing_after_each_answer_without_saying_so(
    gateway_factory, http, gateway_driver
):
    up = CloseAfterAnswerUpstream()
    await up.start()
    try:
        gw = await gateway_factory([service("svc", [up.url], [ALL])])
        for i in range(5):
            assert await body_of(http, gw.url + f"/r{i}") == (200, b"ok")
            if i % 2:
                await asyncio.sleep(0.02)  # the upstream's FIN arrives before the next request
        assert up.answered == [f"/r{i}" for i in range(5)]
        await settled(gw)
    finally:
        await up.stop()


# -- 10. the breaker -------------------------------------------------------------------------------


async def test_open_breaker_answers_503_inline_without_touching_the_upstream(
    upstreams, gateway_factory, http, trace, gateway_driver
):
    up = await upstreams()
    up.fail_with = 500
    gw = await gateway_factory(
        [
            service(
                "flaky",
                [up.url],
                [ALL],
                upstream={
                    "retries": {"attempts": 0},
                    "circuitBreaker": {"failureThreshold": 2, "resetTimeout": "10s"},
                },
            )
        ]
    )
    t = trace(gw)
    for path in ("/f1", "/f2"):
        assert (await body_of(http, gw.url + path))[0] == 500
    async with http.get(gw.url + "/x") as resp:
        assert resp.status == 503
        assert resp.content_type == "application/problem+json"
        assert int(resp.headers["Retry-After"]) >= 1
        assert (await resp.json(content_type=None))["type"].endswith("/circuit-open")
    assert len(up.requests) == 2
    if gateway_driver == "inline":
        assert t.outcome("/f2") == (IN_FLIGHT, "")
        assert t.outcome("/x") == (DONE, "")
    await settled(gw)


# -- 11. a bug -------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["_upstream_fields", "_response_head"])
async def test_a_bug_is_answered_500_and_the_gateway_keeps_serving(
    raw_upstream, gateway_factory, trace, gateway_driver, monkeypatch, caplog, tmp_path, step
):
    """``_upstream_fields`` fails in the front half (in `dispatch`), ``_response_head`` in the
    back half (in the upstream connection's callback)."""
    original = getattr(RequestPath, step)

    def broken(self: RequestPath, flight: Any, *args: Any) -> Any:
        if flight.request.raw_path == "/boom":
            raise RuntimeError("a bug")
        return original(self, flight, *args)

    # Compiled, RequestPath is an extension type: the gateway builds a subclass instead.
    broken_path = type("BrokenPath", (RequestPath,), {step: broken})
    monkeypatch.setattr(gateway.runtime, "RequestPath", broken_path)
    up = await raw_upstream()
    log_file = tmp_path / "access.log"
    gw = await gateway_factory([service("svc", [up.url], [ALL])], access_log=str(log_file))
    t = trace(gw)
    caplog.set_level(logging.ERROR, logger="cityplane.gateway")
    async with await RawClient.open(gw.gateway.port) as client:
        assert (await client.exchange(get("/warm"))).status == 200
        resp = await client.exchange(get("/boom"))
        assert resp.status == 500
        assert resp.problem_type() == "internal-error"
        assert resp.header("Connection") == "close"
        assert await client.closed()
    assert "unhandled error handling GET /boom" in caplog.text
    await settled(gw)
    lines = await access_lines(gw, log_file, "/boom")
    assert lines["/boom"]["status"] == 500
    async with await RawClient.open(gw.gateway.port) as client:
        resp = await client.exchange(get("/ok"))
        assert (resp.status, resp.body) == (200, b"/ok")
    if gateway_driver == "inline":
        expected = "raised" if step == "_upstream_fields" else IN_FLIGHT
        assert t.outcome("/boom") == (expected, "")
        assert t.handed == []
    await settled(gw)
