"""Held writes (gateway/outbox.py, ADR 14): whole responses wait for the end of the loop's round
of callbacks, go out in order with everything else written on the connection, and a close
waits for them."""

from __future__ import annotations

import asyncio
from typing import Any

from cityplane.problem import Problem
from gateway.connections import GatewayLimits
from gateway.h1server import ClientConnection, FrontServer, IncomingRequest
from gateway.outbox import Outbox, outbox


class Recorder:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def flush_held(self) -> None:
        self.log.append(self.name)


async def test_holders_are_flushed_once_after_the_round_in_the_order_they_held() -> None:
    loop = asyncio.get_running_loop()
    box = Outbox(loop)
    log: list[str] = []
    scheduled: list[Any] = []
    real_call_soon = loop.call_soon

    def counting_call_soon(callback: Any, *args: Any, **kwargs: Any) -> Any:
        scheduled.append(callback)
        return real_call_soon(callback, *args, **kwargs)

    loop.call_soon = counting_call_soon  # type: ignore[method-assign]
    try:
        for name in ("a", "b", "c"):
            box.hold(Recorder(name, log))
        assert log == []  # nothing before the round's callbacks are done
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    finally:
        loop.call_soon = real_call_soon  # type: ignore[method-assign]
    assert log == ["a", "b", "c"]
    assert len([c for c in scheduled if getattr(c, "__self__", None) is box]) == 1
    box.hold(Recorder("d", log))  # a new round schedules again
    await asyncio.sleep(0)
    assert log == ["a", "b", "c", "d"]


async def test_the_outbox_belongs_to_the_running_loop() -> None:
    loop = asyncio.get_running_loop()
    assert outbox(loop) is outbox(loop)
    other = asyncio.new_event_loop()
    try:
        assert outbox(other) is not outbox(loop)
    finally:
        other.close()


class FakeTransport:
    def __init__(self) -> None:
        self.events: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "written after close"
        self.events.append(("write", data))

    def close(self) -> None:
        self.closing = True
        self.events.append(("close", b""))

    def abort(self) -> None:
        self.closing = True
        self.events.append(("abort", b""))

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def noop_handler(request: IncomingRequest) -> None:
    pass


def connection() -> tuple[ClientConnection, FakeTransport]:
    server = FrontServer(noop_handler, GatewayLimits(max_connections=10))
    conn = ClientConnection(server)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def request(conn: ClientConnection, *, keep_alive: bool = True) -> IncomingRequest:
    req = IncomingRequest(conn)
    req.method = "GET"
    req.raw_path = "/"
    req.keep_alive = keep_alive
    req.body_complete = True
    return req


async def test_a_held_response_goes_out_before_anything_written_after_it() -> None:
    conn, transport = connection()
    conn.respond(request(conn), 200, b"X-A: 1\r\n", b"first")
    assert transport.events == []  # held
    conn.write_raw(b"RAW")  # e.g. a refusal written after the earlier answers
    assert transport.events[0][1].endswith(b"first")
    assert transport.events[1] == ("write", b"RAW")
    await asyncio.sleep(0)  # the outbox finds nothing left to write
    assert len(transport.events) == 2


async def test_a_close_waits_for_the_held_responses() -> None:
    conn, transport = connection()
    conn.respond(request(conn), 200, b"", b"one")
    conn.respond(request(conn, keep_alive=False), 200, b"", b"two")  # says Connection: close
    assert transport.events == []
    await asyncio.sleep(0)
    kinds = [kind for kind, _ in transport.events]
    assert kinds == ["write", "close"]  # both answers in one write, then the close
    written = transport.events[0][1]
    assert written.index(b"one") < written.index(b"two")
    assert b"Connection: close" in written


async def test_a_problem_answer_and_a_connection_lost_before_the_flush() -> None:
    conn, transport = connection()
    conn.respond_problem(request(conn), Problem(404, "no-route", "nothing here"))
    conn.connection_lost(None)  # the client went away before the round ended
    await asyncio.sleep(0)
    assert transport.events == []  # nothing written to a connection that is gone
