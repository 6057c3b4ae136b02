"""Stopping the gateway: a request in flight is answered, with "Connection: close"."""

from __future__ import annotations

import asyncio

from tests.conftest import service


async def test_request_in_flight_at_stop_is_answered_and_its_connection_closed(
    upstreams, gateway_factory
) -> None:
    up = await upstreams()
    up.delay = 0.3
    gw = await gateway_factory(
        [service("svc", [up.url], [{"name": "all", "match": {"pathPrefix": "/"}}])],
        drain_timeout=5.0,
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: city.example\r\n\r\n")
    await writer.drain()
    while not up.requests:  # the request has reached the upstream
        await asyncio.sleep(0.01)
    stopping = asyncio.create_task(gw.gateway.stop())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nConnection: close\r\n" in head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # then the gateway closes
    writer.close()
    await stopping
