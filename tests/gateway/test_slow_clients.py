"""Slow clients: header, body and idle timeouts, and the per-worker connection cap.

Raw sockets against real gateways (docs/adr/0011-slow-clients.md): a client that trickles
bytes is something no HTTP client library will do on purpose.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from cityplane.cli import CliError, _gateway_settings, build_parser
from gateway.connections import GatewayLimits
from tests.conftest import service
from tests.gateway.procs import GatewayProcess

HEAD = b"GET /bus/stops HTTP/1.1\r\nHost: city.example\r\nUser-Agent: slow\r\n\r\n"


def bus_route() -> dict[str, Any]:
    return {"name": "read", "match": {"pathPrefix": "/bus/"}, "stripPrefix": True}


def limits(**overrides: Any) -> GatewayLimits:
    return GatewayLimits(**overrides)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def trickle(writer: asyncio.StreamWriter, data: bytes, pieces: int, gap: float) -> None:
    size = -(-len(data) // pieces)
    for i in range(0, len(data), size):
        writer.write(data[i : i + size])
        await writer.drain()
        if i + size < len(data):
            await asyncio.sleep(gap)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the gateway sends until it closes the connection (fails if it does not)."""
    return await asyncio.wait_for(reader.read(), seconds)


async def test_head_trickled_one_byte_per_200ms_is_cut_with_408_at_the_header_timeout(
    upstreams, gateway_factory
):
    up = await upstreams()
    gw = await gateway_factory(
        [service("bus", [up.url], [bus_route()])], limits=limits(header_timeout=1.0)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.port)
    began = time.monotonic()
    sender = asyncio.create_task(trickle(writer, HEAD, len(HEAD), 0.2))
    try:
        answer = await closed_within(reader, 5)
    finally:
        sender.cancel()
        writer.close()
    took = time.monotonic() - began
    assert 0.9 <= took < 2.0
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in head
    assert b"application/problem+json" in head
    assert json.loads(body)["status"] == 408
    assert up.requests == []


async def test_slow_but_steady_head_within_the_header_timeout_is_served(upstreams, gateway_factory):
    up = await upstreams()
    gw = await gateway_factory(
        [service("bus", [up.url], [bus_route()])], limits=limits(header_timeout=2.0)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.port)
    await trickle(writer, HEAD, 7, 0.2)  # 1.2 s from first to last byte
    status, _, body = await asyncio.wait_for(read_response(reader), 5)
    writer.close()
    assert status == 200
    assert json.loads(body)["path"] == "/stops"


async def test_every_request_on_a_keep_alive_connection_gets_its_own_head_clock(
    upstreams, gateway_factory
):
    up = await upstreams()
    gw = await gateway_factory(
        [service("bus", [up.url], [bus_route()])], limits=limits(header_timeout=1.0)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.port)
    began = time.monotonic()
    for _ in range(3):  # each head takes 0.6 s; together they take longer than the timeout
        await trickle(writer, HEAD, 4, 0.2)
        status, _, _ = await asyncio.wait_for(read_response(reader), 5)
        assert status == 200
        await asyncio.sleep(0.3)
    writer.close()
    assert time.monotonic() - began > 2.0
    assert len(up.requests) == 3


async def test_idle_keep_alive_connection_is_closed_without_an_answer(upstreams, gateway_factory):
    up = await upstreams()
    gw = await gateway_factory(
        [service("bus", [up.url], [bus_route()])], limits=limits(idle_timeout=0.5)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.port)
    writer.write(HEAD)
    status, _, _ = await asyncio.wait_for(read_response(reader), 5)
    assert status == 200
    began = time.monotonic()
    assert await closed_within(reader, 5) == b""
    assert 0.3 <= time.monotonic() - began < 2.0
    writer.close()


async def test_connection_that_never_sends_a_request_is_closed_at_the_idle_timeout(
    upstreams, gateway_factory
):
    up = await upstreams()
    gw = await gateway_factory(
        [service("bus", [up.url], [bus_route()])], limits=limits(idle_timeout=0.5)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.port)
    assert await closed_within(reader, 5) == b""
    writer.close()


async def test_body_sent_slowly_with_gaps_under_the_body_timeout_is_proxied(
    upstreams, gateway_factory
):
    up = await upstreams()
    gw = await gateway_factory(
        [service("bus", [up.url], [bus_route()])], limits=limits(body_timeout=0.6)
    )
    body = b"0123456789"
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.port)
    writer.write(b"POST /bus/reports HTTP/1.1\r\nHost: city.example\r\nContent-Length: 10\r\n\r\n")
    await trickle(writer, body, 10, 0.2)  # 1.8 s in all, never 0.6 s without a byte
    status, _, answer = await asyncio.wait_for(read_response(reader), 5)
    writer.close()
    assert status == 200
    assert json.loads(answer)["body_len"] == 10


async def test_body_that_stalls_longer_than_the_body_timeout_gets_408(upstreams, gateway_factory):
    up = await upstreams()
    gw = await gateway_factory(
        [service("bus", [up.url], [bus_route()])], limits=limits(body_timeout=0.5)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.port)
    writer.write(
        b"POST /bus/reports HTTP/1.1\r\nHost: city.example\r\nContent-Length: 10\r\n\r\nabc"
    )
    began = time.monotonic()
    status, headers, answer = await asyncio.wait_for(read_response(reader), 5)
    writer.close()
    assert 0.4 <= time.monotonic() - began < 2.0
    assert status == 408
    assert headers["connection"] == "close"
    assert json.loads(answer)["type"].endswith("/request-body-timeout")
    assert up.requests == []


async def test_streamed_upload_that_stalls_gets_408(upstreams, gateway_factory):
    up = await upstreams()
    gw = await gateway_factory(
        [service("bus", [up.url], [bus_route()])], limits=limits(body_timeout=0.5)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.port)
    # Larger than what the gateway reads whole: this body is streamed to the upstream.
    writer.write(
        b"POST /bus/reports HTTP/1.1\r\nHost: city.example\r\nContent-Length: 200000\r\n\r\n"
        + b"x" * 100_000
    )
    status, _, answer = await asyncio.wait_for(read_response(reader), 5)
    writer.close()
    assert status == 408
    assert json.loads(answer)["status"] == 408


async def test_connections_over_the_cap_are_refused_with_503_until_one_closes(
    upstreams, gateway_factory
):
    up = await upstreams()
    gw = await gateway_factory(
        [service("bus", [up.url], [bus_route()])], limits=limits(max_connections=3)
    )
    port = gw.gateway.port
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    refused = await closed_within(reader, 5)
    writer.close()
    assert refused.startswith(b"HTTP/1.1 503 ")
    assert b"Retry-After: 1" in refused
    held_reader, held_writer = held[0]
    held_writer.write(HEAD)  # connections within the cap are served as usual
    status, _, _ = await asyncio.wait_for(read_response(held_reader), 5)
    assert status == 200
    held_writer.close()
    await asyncio.sleep(0.2)  # the gateway notices the close
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEAD)
    status, _, _ = await asyncio.wait_for(read_response(reader), 5)
    assert status == 200
    for _, w in [*held[1:], (reader, writer)]:
        w.close()


async def test_500_slow_loris_sockets_do_not_stop_a_normal_client(upstreams, tmp_path, http):
    import yaml

    up = await upstreams()
    config = tmp_path / "services.yaml"
    config.write_text(yaml.safe_dump_all([service("bus", [up.url], [bus_route()])]))
    gw = GatewayProcess(config, "--header-timeout", "4", "--max-connections", "1000")
    await gw.ready()
    loris: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(500):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET /bus/stops HTTP/1.1\r\nHost: ")
            loris.append((reader, writer))

        async def keep_trickling() -> None:
            while True:
                await asyncio.sleep(0.5)
                for _, w in loris:
                    w.write(b"x")

        trickler = asyncio.create_task(keep_trickling())
        try:
            for _ in range(3):
                began = time.monotonic()
                async with http.get(gw.url + "/bus/stops") as resp:
                    assert resp.status == 200
                    await resp.read()
                assert time.monotonic() - began < 1.0
            # ... and once their header timeout passes, every slow-loris socket is cut.
            answers = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in loris)), 10)
        finally:
            trickler.cancel()
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers)
    finally:
        for _, w in loris:
            w.close()
        gw.stop()


def test_timeouts_and_the_cap_come_from_flags_or_the_environment(monkeypatch, tmp_path: Path):
    config = tmp_path / "services.yaml"
    config.write_text("")
    monkeypatch.setenv("CITYPLANE_HEADER_TIMEOUT", "4.5")
    monkeypatch.setenv("CITYPLANE_MAX_CONNECTIONS", "300")
    args = build_parser().parse_args(
        ["gateway", "--config", str(config), "--idle-timeout", "20", "--body-timeout", "7"]
    )
    limits = _gateway_settings(args).limits
    assert (limits.header_timeout, limits.idle_timeout, limits.body_timeout) == (4.5, 20, 7)
    assert limits.max_connections == 300
    zero = build_parser().parse_args(["gateway", "--config", str(config), "--header-timeout", "0"])
    with pytest.raises(CliError, match="--header-timeout must be positive"):
        _gateway_settings(zero)


def test_default_connection_cap_leaves_room_for_upstream_connections():
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = GatewayLimits().max_connections
    assert 64 <= cap <= 10_000
    assert soft == resource.RLIM_INFINITY or cap <= max(64, soft // 2)
