"""One response timer per upstream connection, kept across requests (gateway/upstream/http1.py).

A keep-alive connection's timer is armed by its first request and re-armed when it fires early;
a later request on the same connection must still time out at its own deadline.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.upstream.client import HostPool
from gateway.upstream.http1 import UpstreamTimeout

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_later_request_on_a_reused_connection_times_out_at_its_own_deadline() -> None:
    seen = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        while await reader.readuntil(b"\r\n\r\n"):
            seen += 1
            if seen == 1:
                writer.write(OK)  # the first request is answered; the second never is
                await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = HostPool("http", "127.0.0.1", port, connect_timeout=1.0)
    try:
        first = await pool.request("GET", "/a", [("Host", "up")], None, timeout=0.4)
        assert await first.read() == b"ok"
        conn = first._conn
        first.release()
        await asyncio.sleep(0.3)  # the timer armed by /a is due 0.1 s into /b
        started = time.perf_counter()
        with pytest.raises(UpstreamTimeout):
            await pool.request("GET", "/b", [("Host", "up")], None, timeout=0.4)
        waited = time.perf_counter() - started
        assert waited >= 0.39, waited  # /b's own deadline, not /a's leftover (due at 0.1 s)
        assert seen == 2 and conn is not None  # /b went over the same connection
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
