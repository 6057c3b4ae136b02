"""The upstream keep-alive pool against real servers on 127.0.0.1.

aiohttp.web plays a well-behaved upstream; ``RawUpstream`` scripts bytes on a plain asyncio
server for what aiohttp will not send (HTTP/1.0, 1xx, malformed or truncated responses).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.upstream.client import (
    HostPool,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

HOST = [("Host", "upstream.test")]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# -- upstreams ----------------------------------------------------------------------------------


class AppUpstream:
    def __init__(self, port: int, peers: set[tuple[str, int]]) -> None:
        self.port = port
        self.peers = peers  # client (host, port) pairs seen: one per upstream connection


@contextlib.asynccontextmanager
async def app_upstream(
    *routes: web.RouteDef, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[AppUpstream]:
    peers: set[tuple[str, int]] = set()

    @web.middleware
    async def record_peer(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        return await handler(request)

    app = web.Application(middlewares=[record_peer])
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context, backlog=1024)
    await site.start()
    try:
        yield AppUpstream(runner.addresses[0][1], peers)
    finally:
        await runner.cleanup()


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawUpstream:
    """A TCP server that runs ``script(reader, writer, connection_number)`` per connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.connections
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            # The client hanging up mid-script is part of several scenarios.
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await self.script(reader, writer, number)
        except asyncio.CancelledError:
            return  # __aexit__ stops scripts still waiting on a client; nothing awaits them
        finally:
            writer.close()
            self._tasks.discard(task)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


async def answer_each_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: bytes
) -> None:
    while True:
        await read_request(reader)
        writer.write(response)
        await writer.drain()


# -- helpers ------------------------------------------------------------------------------------


class PoolFactory:
    """Makes pools to 127.0.0.1 and closes them all at the end of the test."""

    def __init__(self) -> None:
        self.pools: list[HostPool] = []

    def __call__(self, port: int, scheme: str = "http", **options: Any) -> HostPool:
        pool = HostPool(scheme, "127.0.0.1", port, **options)
        self.pools.append(pool)
        return pool

    async def aclose(self) -> None:
        for pool in self.pools:
            await pool.close()


@pytest.fixture
async def make_pool() -> AsyncIterator[Callable[..., HostPool]]:
    factory = PoolFactory()
    yield factory
    await factory.aclose()


async def fetch(
    pool: HostPool,
    method: str = "GET",
    target: str = "/",
    body: bytes | AsyncIterator[bytes] | None = None,
    *,
    limit: float = 5.0,
    content_length: int | None = None,
) -> tuple[int, bytes]:
    resp = await pool.request(
        method, target, HOST, body, timeout=limit, content_length=content_length
    )
    try:
        return resp.status, await resp.read()
    finally:
        resp.release()


def refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=f"hello {request.path_qs}")


# -- keep-alive ---------------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_upstream_connection(
    make_pool: Callable[..., HostPool],
) -> None:
    async with app_upstream(web.get("/{name}", hello)) as upstream:
        pool = make_pool(upstream.port)
        for i in range(20):
            assert await fetch(pool, target=f"/r{i}?q=1") == (200, f"hello /r{i}?q=1".encode())
        assert len(upstream.peers) == 1
        assert pool.idle_count == 1
        assert pool.in_flight == 0


async def test_two_hundred_concurrent_requests_all_succeed(
    make_pool: Callable[..., HostPool],
) -> None:
    async def slowish(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        return web.Response(text=request.match_info["n"])

    async with app_upstream(web.get("/{n}", slowish)) as upstream:
        pool = make_pool(upstream.port)
        results = await asyncio.gather(*(fetch(pool, target=f"/{n}") for n in range(200)))
        assert results == [(200, str(n).encode()) for n in range(200)]
        assert pool.in_flight == 0
        assert pool.idle_count == 128  # max_idle: the surplus connections were closed


async def test_in_flight_counts_a_request_until_its_response_is_released(
    make_pool: Callable[..., HostPool],
) -> None:
    async with app_upstream(web.get("/", hello)) as upstream:
        pool = make_pool(upstream.port)
        resp = await pool.request("GET", "/", HOST, timeout=5)
        assert pool.in_flight == 1
        assert await resp.read() == b"hello /"
        resp.release()
        resp.release()  # idempotent
        assert (pool.in_flight, pool.idle_count) == (0, 1)


async def test_connection_close_response_is_not_reused(make_pool: Callable[..., HostPool]) -> None:
    async def closing(request: web.Request) -> web.Response:
        resp = web.Response(text="bye")
        resp.force_close()
        return resp

    async with app_upstream(web.get("/", closing)) as upstream:
        pool = make_pool(upstream.port)
        resp = await pool.request("GET", "/", HOST, timeout=5)
        assert not resp.keep_alive
        assert ("Connection", "close") in resp.headers
        assert await resp.read() == b"bye"
        resp.release()
        assert pool.idle_count == 0
        assert await fetch(pool) == (200, b"bye")
        assert len(upstream.peers) == 2


async def test_response_released_before_its_body_was_read_closes_the_connection(
    make_pool: Callable[..., HostPool],
) -> None:
    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 2_000_000)

    async with app_upstream(web.get("/", big)) as upstream:
        pool = make_pool(upstream.port)
        resp = await pool.request("GET", "/", HOST, timeout=5)
        resp.release()
        assert (pool.in_flight, pool.idle_count) == (0, 0)
        with pytest.raises(RuntimeError):
            await resp.read()


async def test_idle_connections_expire_after_idle_ttl(make_pool: Callable[..., HostPool]) -> None:
    async with app_upstream(web.get("/", hello)) as upstream:
        pool = make_pool(upstream.port, idle_ttl=0.2)
        await fetch(pool)
        assert pool.idle_count == 1
        await asyncio.sleep(0.35)
        assert pool.idle_count == 0
        await fetch(pool)
        assert len(upstream.peers) == 2


async def test_idle_connection_closed_by_the_upstream_leaves_the_pool(
    make_pool: Callable[..., HostPool],
) -> None:
    async def answer_once(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(OK)
        await w.drain()

    async with RawUpstream(answer_once) as upstream:
        pool = make_pool(upstream.port)
        assert await fetch(pool) == (200, b"ok")
        await asyncio.sleep(0.1)
        assert pool.idle_count == 0
        assert await fetch(pool) == (200, b"ok")
        assert upstream.connections == 2


async def test_close_drops_idle_connections_now_and_busy_ones_on_release(
    make_pool: Callable[..., HostPool],
) -> None:
    finish = asyncio.Event()

    async def streaming(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 10
        await resp.prepare(request)
        await resp.write(b"01234")
        await finish.wait()
        await resp.write(b"56789")
        return resp

    async with app_upstream(web.get("/", hello), web.get("/stream", streaming)) as upstream:
        pool = make_pool(upstream.port)
        await asyncio.gather(fetch(pool), fetch(pool))
        busy = await pool.request("GET", "/stream", HOST, timeout=5)
        assert pool.idle_count == 1
        await pool.close()
        assert pool.idle_count == 0
        finish.set()
        assert await busy.read() == b"0123456789"
        busy.release()
        assert (pool.idle_count, pool.in_flight) == (0, 0)
        with pytest.raises(UpstreamConnectError) as info:
            await fetch(pool)
        assert info.value.request_sent is False


# -- framing ------------------------------------------------------------------------------------


async def test_content_length_and_chunked_responses_are_read_exactly(
    make_pool: Callable[..., HostPool],
) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b"one,", b"two,", b"three"):
            await resp.write(part)
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    async with app_upstream(web.get("/cl", hello), web.get("/chunked", chunked)) as upstream:
        pool = make_pool(upstream.port)
        resp = await pool.request("GET", "/cl", HOST, timeout=5)
        assert (resp.status, resp.reason, resp.content_length, resp.chunked) == (
            200,
            "OK",
            len(b"hello /cl"),
            False,
        )
        assert await resp.read() == b"hello /cl"
        resp.release()
        resp = await pool.request("GET", "/chunked", HOST, timeout=5)
        assert (resp.content_length, resp.chunked, resp.keep_alive) == (None, True, True)
        assert [chunk async for chunk in resp.iter_chunks()] != []
        resp.release()
        assert await fetch(pool, target="/chunked") == (200, b"one,two,three")
        assert len(upstream.peers) == 1


async def test_fifty_megabyte_response_streams_and_a_stalled_reader_holds_the_upstream_back(
    make_pool: Callable[..., HostPool],
) -> None:
    total = 50 * 1024 * 1024
    upstream_done = asyncio.Event()

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = total
        await resp.prepare(request)
        block = b"x" * (256 * 1024)
        for _ in range(total // len(block)):
            await resp.write(block)
        upstream_done.set()
        return resp

    async with app_upstream(web.get("/big", big)) as upstream:
        pool = make_pool(upstream.port)
        resp = await pool.request("GET", "/big", HOST, timeout=5)
        try:
            chunks = resp.iter_chunks()
            received = largest = len(await anext(chunks))
            assert not upstream_done.is_set()
            await asyncio.sleep(0.2)  # a stalled consumer: reading pauses, nothing piles up
            assert not upstream_done.is_set()
            async for chunk in chunks:
                received += len(chunk)
                largest = max(largest, len(chunk))
        finally:
            resp.release()
        assert received == total
        assert largest <= 1024 * 1024  # never more than ~high-water + one read buffered
        assert upstream_done.is_set()
        assert pool.idle_count == 1


async def test_request_body_iterable_is_streamed_chunked_to_the_upstream(
    make_pool: Callable[..., HostPool],
) -> None:
    first_part_arrived = asyncio.Event()

    async def upload(request: web.Request) -> web.Response:
        total = 0
        async for data in request.content.iter_any():
            total += len(data)
            first_part_arrived.set()
        te = request.headers.get("Transfer-Encoding", "-")
        cl = request.headers.get("Content-Length", "-")
        return web.Response(text=f"{te} {cl} {total}")

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        # The upstream holds the first part before the second exists: nothing was buffered.
        await asyncio.wait_for(first_part_arrived.wait(), 2)
        yield b""  # skipped, not taken as the end of the chunked body
        yield b"b" * 300_000

    async with app_upstream(web.post("/up", upload)) as upstream:
        pool = make_pool(upstream.port)
        assert await fetch(pool, "POST", "/up", body()) == (200, b"chunked - 301000")
        first_part_arrived.clear()
        assert await fetch(pool, "POST", "/up", body(), content_length=301_000) == (
            200,
            b"- 301000 301000",
        )
        assert await fetch(pool, "POST", "/up", b"abc") == (200, b"- 3 3")
        assert await fetch(pool, "POST", "/up") == (200, b"- 0 0")
        assert len(upstream.peers) == 1


async def test_early_response_is_returned_while_the_upload_is_still_blocked(
    make_pool: Callable[..., HostPool],
) -> None:
    produced: list[int] = []

    async def too_large(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")
        await w.drain()
        await asyncio.sleep(10)  # never reads the body: the client's writes block

    async def body() -> AsyncIterator[bytes]:
        for i in range(2000):  # 128 MB if it were all sent
            produced.append(i)
            yield b"x" * 65536

    async with RawUpstream(too_large) as upstream:
        pool = make_pool(upstream.port)
        started = time.perf_counter()
        assert await fetch(pool, "POST", "/", body(), limit=5) == (413, b"too big!")
        assert time.perf_counter() - started < 1
        assert len(produced) < 2000
        assert (pool.idle_count, pool.in_flight) == (0, 0)


async def test_upstream_answering_while_it_reads_the_upload_does_not_deadlock(
    make_pool: Callable[..., HostPool],
) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        async for data in request.content.iter_any():
            await resp.write(data)
        await resp.write_eof()
        return resp

    async def body() -> AsyncIterator[bytes]:
        for _ in range(128):  # 8 MB: far more than socket buffers plus read high-water
            yield b"e" * 65536

    async with app_upstream(web.post("/echo", echo)) as upstream:
        pool = make_pool(upstream.port)
        resp = await pool.request("POST", "/echo", HOST, body(), timeout=2)
        try:
            echoed = 0
            async for chunk in resp.iter_chunks():
                echoed += len(chunk)
        finally:
            resp.release()
        assert echoed == 128 * 65536


async def test_iterable_body_not_matching_content_length_is_refused(
    make_pool: Callable[..., HostPool],
) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"abc"

    async with app_upstream(web.post("/", hello)) as upstream:
        pool = make_pool(upstream.port)
        with pytest.raises(ValueError, match="content_length"):
            await fetch(pool, "POST", "/", body(), content_length=10)
        with pytest.raises(ValueError, match="content_length"):
            await fetch(pool, "POST", "/", body(), content_length=2)
        assert (pool.in_flight, pool.idle_count) == (0, 0)


async def test_head_response_has_no_body_and_keeps_the_connection(
    make_pool: Callable[..., HostPool],
) -> None:
    async with app_upstream(web.get("/", hello)) as upstream:
        pool = make_pool(upstream.port)
        resp = await pool.request("HEAD", "/", HOST, timeout=5)
        assert resp.content_length == len(b"hello /")
        assert await resp.read() == b""
        resp.release()
        assert await fetch(pool) == (200, b"hello /")
        assert len(upstream.peers) == 1


async def test_head_response_head_split_across_packets_keeps_the_connection(
    make_pool: Callable[..., HostPool],
) -> None:
    async def split(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        for part in (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r", b"\n"):
            w.write(part)
            await w.drain()
            await asyncio.sleep(0.05)
        await answer_each_request(r, w, OK)

    async with RawUpstream(split) as upstream:
        pool = make_pool(upstream.port)
        assert await fetch(pool, "HEAD") == (200, b"")
        assert await fetch(pool) == (200, b"ok")
        assert upstream.connections == 1


async def test_bytes_after_a_head_response_are_not_taken_for_the_next_response(
    make_pool: Callable[..., HostPool],
) -> None:
    async def sends_body_to_head(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        if n == 0:
            await read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            await w.drain()
            await r.read()
        await answer_each_request(r, w, OK)

    async with RawUpstream(sends_body_to_head) as upstream:
        pool = make_pool(upstream.port)
        assert await fetch(pool, "HEAD") == (200, b"")
        assert await fetch(pool) == (200, b"ok")
        assert upstream.connections == 2


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_keep_the_connection(
    make_pool: Callable[..., HostPool], status: int
) -> None:
    async def bodiless(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"ETag": '"v1"'})

    async with app_upstream(web.get("/", bodiless)) as upstream:
        pool = make_pool(upstream.port)
        for _ in range(3):
            assert await fetch(pool) == (status, b"")
        assert len(upstream.peers) == 1


async def test_interim_1xx_responses_are_skipped(make_pool: Callable[..., HostPool]) -> None:
    async def interim(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await w.drain()
            await r.readexactly(4)
            w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
            await w.drain()
            await asyncio.sleep(0.02)
            w.write(b"HTTP/1.1 201 Created\r\nContent-Length: 7\r\n\r\ncreated")
            await w.drain()

    async with RawUpstream(interim) as upstream:
        pool = make_pool(upstream.port)
        for _ in range(2):
            resp = await pool.request("POST", "/", HOST, b"data", timeout=5)
            assert (resp.status, resp.headers) == (201, [("Content-Length", "7")])
            assert await resp.read() == b"created"
            resp.release()
        assert await fetch(pool, "HEAD", body=b"data") == (201, b"")
        assert upstream.connections == 1


async def test_http10_upstream_body_until_close_and_keep_alive_opt_in(
    make_pool: Callable[..., HostPool],
) -> None:
    async def http10(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        if n == 0:  # no framing: the body ends when the connection closes
            w.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
            return
        if n == 1:  # HTTP/1.0 without "keep-alive": the client must not send another request
            w.write(OK.replace(b"HTTP/1.1", b"HTTP/1.0"))
            await r.read()
            return
        keep_alive = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
        w.write(keep_alive)
        await answer_each_request(r, w, keep_alive)

    async with RawUpstream(http10) as upstream:
        pool = make_pool(upstream.port)
        resp = await pool.request("GET", "/", HOST, timeout=5)
        assert (resp.content_length, resp.chunked, resp.keep_alive) == (None, False, False)
        assert await resp.read() == b"until the end"
        resp.release()
        resp = await pool.request("GET", "/", HOST, timeout=5)
        assert not resp.keep_alive
        assert await resp.read() == b"ok"
        resp.release()
        for _ in range(3):
            assert await fetch(pool) == (200, b"ok")
        assert upstream.connections == 3


async def test_a_final_http10_response_after_an_http11_interim_one_is_not_kept_alive(
    make_pool: Callable[..., HostPool],
) -> None:
    # The client reads "HTTP/1.1 " off a response's first bytes instead of asking llhttp
    # (http1's data_received); a 1xx before the final response must not lend it its version.
    async def interim_then_10(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await r.read()

    async with RawUpstream(interim_then_10) as upstream:
        pool = make_pool(upstream.port)
        for _ in range(2):
            resp = await pool.request("GET", "/", HOST, timeout=5)
            assert (resp.status, resp.keep_alive) == (200, False)
            assert await resp.read() == b"ok"
            resp.release()
        assert upstream.connections == 2


# -- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_upstream_closing_mid_body_is_a_protocol_error_and_the_connection_is_dropped(
    make_pool: Callable[..., HostPool], response: bytes
) -> None:
    async def truncated(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(response)
        await w.drain()

    async with RawUpstream(truncated) as upstream:
        pool = make_pool(upstream.port)
        with pytest.raises(UpstreamProtocolError) as info:
            await fetch(pool)
        assert info.value.request_sent is True
        assert (pool.idle_count, pool.in_flight) == (0, 0)


async def test_refused_port_is_a_connect_error_with_nothing_sent(
    make_pool: Callable[..., HostPool],
) -> None:
    pool = make_pool(refused_port())
    with pytest.raises(UpstreamConnectError) as info:
        await fetch(pool)
    assert info.value.request_sent is False
    assert pool.in_flight == 0


async def test_slow_upstream_times_out_within_the_timeout(
    make_pool: Callable[..., HostPool],
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response()

    async with app_upstream(web.get("/", slow)) as upstream:
        pool = make_pool(upstream.port)
        started = time.perf_counter()
        with pytest.raises(UpstreamTimeout) as info:
            await fetch(pool, limit=0.3)
        assert 0.29 <= time.perf_counter() - started < 0.45  # uvloop's clock ticks in ms
        assert info.value.request_sent is True
        assert (pool.idle_count, pool.in_flight) == (0, 0)


async def test_body_timeout_bounds_each_idle_wait_not_the_whole_body(
    make_pool: Callable[..., HostPool],
) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(5):
            await resp.write(b"tick ")
            await asyncio.sleep(0.15)
        if request.query.get("stall"):
            await asyncio.sleep(10)
        await resp.write_eof()
        return resp

    async with app_upstream(web.get("/", trickle)) as upstream:
        pool = make_pool(upstream.port)
        resp = await pool.request("GET", "/", HOST, timeout=0.3)
        await asyncio.sleep(0.5)  # the consumer being slow is not the upstream being idle
        assert await resp.read() == b"tick " * 5  # 0.75 s in total, never 0.3 s idle
        resp.release()
        resp = await pool.request("GET", "/?stall=1", HOST, timeout=0.3)
        with pytest.raises(UpstreamTimeout, match="idle"):
            async for _ in resp.iter_chunks():
                last = time.perf_counter()
        assert 0.29 <= time.perf_counter() - last < 0.45
        resp.release()
        assert (pool.idle_count, pool.in_flight) == (0, 0)


async def test_cancelled_request_releases_its_connection(
    make_pool: Callable[..., HostPool],
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response()

    async with app_upstream(web.get("/", slow)) as upstream:
        pool = make_pool(upstream.port)
        task = asyncio.create_task(fetch(pool))
        await asyncio.sleep(0.1)
        assert pool.in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (pool.idle_count, pool.in_flight) == (0, 0)


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"hello upstream\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    ],
    ids=["bad-status", "not-http", "bad-content-length", "unasked-upgrade", "huge-head"],
)
async def test_malformed_response_is_a_protocol_error(
    make_pool: Callable[..., HostPool], response: bytes
) -> None:
    async def malformed(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(response)
        await w.drain()
        await r.read()

    async with RawUpstream(malformed) as upstream:
        pool = make_pool(upstream.port)
        with pytest.raises(UpstreamProtocolError):
            await fetch(pool)
        assert (pool.idle_count, pool.in_flight) == (0, 0)


@pytest.mark.parametrize("later", [False, True], ids=["same-packet", "later-packet"])
async def test_bytes_after_a_complete_response_drop_the_connection(
    make_pool: Callable[..., HostPool], later: bool
) -> None:
    async def chatty(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(r)
            w.write(OK if later else OK + b"EXTRA")
            await w.drain()
            if later:
                await asyncio.sleep(0.02)
                w.write(b"EXTRA")

    async with RawUpstream(chatty) as upstream:
        pool = make_pool(upstream.port)
        assert await fetch(pool) == (200, b"ok")
        await asyncio.sleep(0.05)
        assert await fetch(pool) == (200, b"ok")
        assert upstream.connections == 2


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Note", "a\r\nX-Injected: 1")],
        [("X-Note", "a\nb")],
        [("X-Note", "a\rb")],
        [("X-Note", "a\x00b")],
        [("X-Note\r\nX-Injected", "1")],
        [("X Note", "1")],
        [("Content-Length", "5")],
        [("Transfer-Encoding", "chunked")],
        [("Connection", "close")],
        [("Proxy-Authorization", "Basic eA==")],
        [("Host", "second.test")],
    ],
)
async def test_header_injection_and_pool_owned_headers_are_refused_before_connecting(
    make_pool: Callable[..., HostPool], headers: list[tuple[str, str]]
) -> None:
    pool = make_pool(refused_port())  # a ValueError, not a connect error: nothing was tried
    with pytest.raises(ValueError):
        await pool.request("GET", "/", HOST + headers, timeout=1)
    for target in ("/a b", "/a\r\nX-Injected: 1", "/a\nb", "/a\x00b"):
        with pytest.raises(ValueError):
            await pool.request("GET", target, HOST, timeout=1)
    assert pool.in_flight == 0


async def test_header_bytes_pass_through_as_latin1_and_wider_text_goes_out_as_utf8(
    make_pool: Callable[..., HostPool],
) -> None:
    heads: list[bytes] = []

    async def record(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        heads.append(await r.readuntil(b"\r\n\r\n"))
        w.write(b"HTTP/1.1 200 OK\r\nX-Back: caf\xe9\r\nContent-Length: 0\r\n\r\n")
        await w.drain()

    async with RawUpstream(record) as upstream:
        pool = make_pool(upstream.port)
        client_bytes = b"caf\xe9".decode("latin-1")  # how the proxy reads a client's header
        resp = await pool.request(
            "GET",
            "/",
            [*HOST, ("X-Client", client_bytes), ("X-Citizen", "\u5f20\u4e09")],
            timeout=5,
        )
        resp.release()
        assert b"\r\nX-Client: caf\xe9\r\n" in heads[0]
        assert b"\r\nX-Citizen: " + "\u5f20\u4e09".encode() + b"\r\n" in heads[0]
        assert ("X-Back", "caf\xe9") in resp.headers


# -- stale keep-alive connections ---------------------------------------------------------------


async def answer_once_then_hang_up(
    r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
) -> None:
    await read_request(r)
    w.write(OK)
    await w.drain()
    # The next request on this connection arrives just as the upstream decides the
    # connection has been idle long enough: it closes without answering.
    await r.readuntil(b"\r\n\r\n")


async def test_stale_keep_alive_connection_is_retried_transparently_for_get(
    make_pool: Callable[..., HostPool],
) -> None:
    async with RawUpstream(answer_once_then_hang_up) as upstream:
        pool = make_pool(upstream.port)
        assert await fetch(pool) == (200, b"ok")
        assert await fetch(pool) == (200, b"ok")
        assert upstream.connections == 2


async def test_stale_keep_alive_connection_is_not_retried_for_a_streamed_post_body(
    make_pool: Callable[..., HostPool],
) -> None:
    consumed: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        for part in (b"first", b"second", b"third"):
            consumed.append(part)
            yield part
            await asyncio.sleep(0.05)

    async with RawUpstream(answer_once_then_hang_up) as upstream:
        pool = make_pool(upstream.port)
        assert await fetch(pool) == (200, b"ok")
        with pytest.raises(UpstreamProtocolError) as info:
            await fetch(pool, "POST", "/", body())
        assert info.value.request_sent is True
        assert consumed
        assert upstream.connections == 1
        assert (pool.idle_count, pool.in_flight) == (0, 0)


async def test_post_on_a_reused_connection_is_not_retried_once_fully_written(
    make_pool: Callable[..., HostPool],
) -> None:
    async def process_then_hang_up(
        r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
    ) -> None:
        await read_request(r)
        w.write(OK)
        await w.drain()
        await read_request(r)  # took the whole POST, then died: it may have acted on it

    async with RawUpstream(process_then_hang_up) as upstream:
        pool = make_pool(upstream.port)
        assert await fetch(pool) == (200, b"ok")
        with pytest.raises(UpstreamProtocolError):
            await fetch(pool, "POST", "/", b"pay 10 EUR")
        assert upstream.connections == 1


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed_cert(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", str(key), "-out", str(cert)),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    yield cert, key


async def test_https_upstream_is_verified_and_kept_alive(
    make_pool: Callable[..., HostPool], self_signed_cert: tuple[Path, Path]
) -> None:
    cert, key = self_signed_cert
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    async with app_upstream(web.get("/", hello), ssl_context=server_context) as upstream:
        trusting = make_pool(
            upstream.port, "https", ssl_context=ssl.create_default_context(cafile=str(cert))
        )
        for _ in range(3):
            assert await fetch(trusting, target="/?tls=1") == (200, b"hello /?tls=1")
        assert len(upstream.peers) == 1
        default = make_pool(upstream.port, "https")  # system CAs do not know the test cert
        with pytest.raises(UpstreamConnectError) as info:
            await fetch(default)
        assert info.value.request_sent is False


# -- uvloop -------------------------------------------------------------------------------------

UVLOOP_SCENARIOS = [
    test_sequential_requests_reuse_one_upstream_connection,
    test_close_drops_idle_connections_now_and_busy_ones_on_release,
    test_fifty_megabyte_response_streams_and_a_stalled_reader_holds_the_upstream_back,
    test_request_body_iterable_is_streamed_chunked_to_the_upstream,
    test_early_response_is_returned_while_the_upload_is_still_blocked,
    test_upstream_answering_while_it_reads_the_upload_does_not_deadlock,
    test_head_response_head_split_across_packets_keeps_the_connection,
    test_interim_1xx_responses_are_skipped,
    test_http10_upstream_body_until_close_and_keep_alive_opt_in,
    test_refused_port_is_a_connect_error_with_nothing_sent,
    test_slow_upstream_times_out_within_the_timeout,
    test_body_timeout_bounds_each_idle_wait_not_the_whole_body,
    test_cancelled_request_releases_its_connection,
    test_stale_keep_alive_connection_is_retried_transparently_for_get,
    test_stale_keep_alive_connection_is_not_retried_for_a_streamed_post_body,
    test_post_on_a_reused_connection_is_not_retried_once_fully_written,
]


@pytest.mark.parametrize(
    "scenario", UVLOOP_SCENARIOS, ids=[f.__name__.removeprefix("test_") for f in UVLOOP_SCENARIOS]
)
def test_same_behaviour_on_uvloop(scenario: Callable[[PoolFactory], Awaitable[None]]) -> None:
    # The gateway runs on uvloop: its transports differ from asyncio's in flow control and in
    # how a failed write surfaces, so the loop-sensitive scenarios run on it too.
    uvloop = pytest.importorskip("uvloop")

    async def run() -> None:
        factory = PoolFactory()
        try:
            await scenario(factory)
        finally:
            await factory.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
