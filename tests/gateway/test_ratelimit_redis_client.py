"""The Redis client ``RedisStore.from_url`` builds for the request path: commands packed in C by
hiredis (the same bytes redis-py's Python packing sends), no socket timeout on reads and writes
(the store's own deadline bounds every call), and still fail-fast against a hung Redis.

The servers are private ``redis-server`` processes on free ports, killed after each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from gateway.policies.ratelimit_redis import RedisStore
from gateway.policies.ratelimit_store import StoreUnavailable

REDIS_SERVER = "/usr/bin/redis-server"
SHA = "0123456789abcdef0123456789abcdef01234567"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` of the test's own on a free port (the shared one is never touched)."""

    def __init__(self, port: int, proc: asyncio.subprocess.Process) -> None:
        self.port = port
        self.proc = proc
        self.url = f"redis://127.0.0.1:{port}/0"

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)


@pytest.fixture
async def private_redis() -> AsyncIterator[PrivateRedis]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        REDIS_SERVER,
        *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                break
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("redis-server did not start")
        yield PrivateRedis(port, proc)
    finally:
        proc.kill()
        await proc.wait()


async def test_store_client_packs_every_command_to_the_bytes_redis_py_would_send() -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1/0")
    ours = store._redis.connection_pool.make_connection()
    theirs = Connection()  # redis-py's own packing, in Python
    commands = [
        ("EVALSHA", SHA, 2, "cityplane:rl:bus/read|ip:203.0.113.7", "rl:r|header:zoë", 100, 10**6),
        ("EVAL", "return redis.call('TIME')", 0),
        ("SCRIPT LOAD", "return 1"),  # words of a command name go as separate arguments
        (b"CLIENT SETNAME", b"gateway"),
        ("PING",),
        ("ZREM", "cityplane:rl:members", "host:12:0a1b2c3d"),
        ("SET", "k", b"\x00\xff", "PX", 2.5),
    ]
    try:
        for command in commands:
            assert b"".join(ours.pack_command(*command)) == b"".join(
                theirs.pack_command(*command)
            ), command
        with pytest.raises(DataError):  # as redis-py's packing: an argument it cannot send
            ours.pack_command("SET", "k", None)
    finally:
        await store.close()


async def test_store_client_keeps_the_connection_kind_its_url_asks_for() -> None:
    store = RedisStore.from_url("unix:///run/redis/redis.sock?db=0")
    try:
        connection = store._redis.connection_pool.make_connection()
        assert isinstance(connection, UnixDomainSocketConnection)
        assert connection.socket_timeout is None
    finally:
        await store.close()


async def test_store_from_url_decides_a_batch_through_its_own_client(
    private_redis: PrivateRedis,
) -> None:
    store = RedisStore.from_url(private_redis.url, prefix="t:", timeout=1.0)
    keys = ["bus/read|ip:203.0.113.7", "bus/read|header:zoë", "bus/read|ip:203.0.113.7"]
    try:
        decisions = await asyncio.gather(*(store.hit(key, 2, 60.0) for key in keys))
        assert [(d.allowed, d.remaining) for d in decisions] == [(True, 1), (True, 1), (True, 0)]
        assert all(type(d.remaining) is int and 0 < d.reset_after <= 60.0 for d in decisions)
        refused = await store.hit(keys[0], 2, 60.0)
        assert refused.allowed is False and refused.reset_after > 0
        probe = Redis(port=private_redis.port)
        assert await probe.hget("t:bus/read|header:zoë", "c") == b"1"
        await probe.aclose()
    finally:
        await store.close()


async def test_store_from_url_fails_a_hung_redis_within_its_deadline_without_socket_timeouts(
    private_redis: PrivateRedis,
) -> None:
    store = RedisStore.from_url(private_redis.url, prefix="t:", timeout=0.1)
    await store.hit("k", 5, 1.0)  # the connection is open, the script cached
    private_redis.signal(signal.SIGSTOP)  # the kernel still takes the bytes; nobody answers
    try:
        # Without the store's deadline nothing would end this batch: the client has no socket
        # timeout. The guard is 30 deadlines, a hang, not a measure of speed.
        async with asyncio.timeout(3.0):
            outcomes = await asyncio.gather(
                *(store.hit(f"k{i}", 5, 1.0) for i in range(10)), return_exceptions=True
            )
        assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
        assert store.degraded
    finally:
        private_redis.signal(signal.SIGCONT)
        await store.close()
