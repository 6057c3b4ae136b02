"""Login throttling: exponential account lockout, per-IP limits, Redis shared by replicas."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from identity.bruteforce import (
    LocalThrottleStore,
    LoginThrottle,
    RedisThrottleStore,
    ThrottlePolicy,
    ip_key,
)

IP = "203.0.113.7"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis(host="127.0.0.1", port=6379)
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis: Redis) -> AsyncIterator[str]:
    name = f"test:throttle:{uuid.uuid4().hex}:"
    yield name
    keys = [key async for key in redis.scan_iter(match=name + "*")]
    if keys:
        await redis.delete(*keys)


async def fail(throttle: LoginThrottle, times: int, account: str | None = "alice") -> None:
    for _ in range(times):
        await throttle.failed(account, IP)


@pytest.mark.parametrize(
    ("failures", "lockout"),
    [(1, 0), (4, 0), (5, 30), (6, 60), (7, 120), (9, 480), (10, 900), (50, 900), (10**6, 900)],
)
def test_the_default_lockout_doubles_from_30_seconds_to_15_minutes(
    failures: int, lockout: float
) -> None:
    assert ThrottlePolicy().lockout_after(failures) == lockout


MakeThrottle = Callable[..., LoginThrottle]


@pytest.fixture(params=["local", "redis"])
async def make_throttle(request: pytest.FixtureRequest, redis: Redis, prefix: str) -> MakeThrottle:
    def make(clock: Clock, policy: ThrottlePolicy | None = None) -> LoginThrottle:
        store = RedisThrottleStore(redis, prefix=prefix) if request.param == "redis" else None
        return LoginThrottle(store, policy, clock=clock)

    return make


async def test_five_failures_lock_the_account_for_30_seconds_then_longer(
    make_throttle: MakeThrottle,
) -> None:
    clock = Clock()
    throttle = make_throttle(clock)
    await fail(throttle, 4)
    assert (await throttle.check("alice", IP)).allowed
    await fail(throttle, 1)
    decision = await throttle.check("alice", IP)
    assert not decision.allowed and decision.retry_after == pytest.approx(30, abs=0.01)
    assert (await throttle.check("bob", IP)).allowed  # other accounts, same address: fine

    clock.now += 30
    assert (await throttle.check("alice", IP)).allowed
    await fail(throttle, 1)
    assert (await throttle.check("alice", IP)).retry_after == pytest.approx(60, abs=0.01)


async def test_a_success_resets_the_account_count(make_throttle: MakeThrottle) -> None:
    clock = Clock()
    throttle = make_throttle(clock)
    await fail(throttle, 4)
    await throttle.succeeded("alice", IP)
    await fail(throttle, 4)
    assert (await throttle.check("alice", IP)).allowed


async def test_usernames_differing_in_case_share_one_count(make_throttle: MakeThrottle) -> None:
    throttle = make_throttle(Clock())
    await fail(throttle, 3, "Alice")
    await fail(throttle, 2, " alice ")
    assert not (await throttle.check("ALICE", IP)).allowed


async def test_one_address_trying_many_accounts_is_blocked_for_the_rest_of_its_window(
    make_throttle: MakeThrottle,
) -> None:
    clock = Clock()
    throttle = make_throttle(clock, ThrottlePolicy(ip_max_failures=20, ip_window=60))
    for i in range(19):
        await throttle.failed(f"user-{i}", IP)
        clock.now += 1
    assert (await throttle.check("user-new", IP)).allowed
    await throttle.failed(None, IP)  # an unknown username counts for the address
    decision = await throttle.check("user-new", IP)
    assert not decision.allowed
    assert 0 < decision.retry_after <= 60
    assert (await throttle.check("user-new", "198.51.100.1")).allowed


async def test_a_success_does_not_reset_the_address_count(make_throttle: MakeThrottle) -> None:
    throttle = make_throttle(Clock(), ThrottlePolicy(ip_max_failures=3))
    for i in range(3):
        await throttle.failed(f"user-{i}", IP)
    await throttle.succeeded("mallory", IP)
    assert not (await throttle.check("mallory", IP)).allowed


async def test_the_address_window_ends() -> None:
    clock = Clock()
    throttle = LoginThrottle(policy=ThrottlePolicy(ip_max_failures=2, ip_window=60), clock=clock)
    await fail(throttle, 2, None)
    assert not (await throttle.check(None, IP)).allowed
    clock.now += 61
    assert (await throttle.check(None, IP)).allowed


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", True),
        ("2001:db8:1:2::1", "2001:db8:1:3::1", False),
        ("::ffff:203.0.113.7", "203.0.113.7", True),
        ("203.0.113.7", "203.0.113.8", False),
    ],
)
def test_ipv6_addresses_count_per_64(a: str, b: str, same: bool) -> None:
    assert (ip_key(a) == ip_key(b)) is same


async def test_the_local_store_stays_bounded() -> None:
    store = LocalThrottleStore(max_entries=10)
    throttle = LoginThrottle(fallback=store)
    for i in range(200):
        await throttle.failed(f"user-{i}", f"198.51.100.{i % 250}")
    assert len(store) <= 20


async def test_two_replicas_sharing_redis_count_concurrent_failures_exactly(
    redis: Redis, prefix: str
) -> None:
    clock = Clock()
    policy = ThrottlePolicy(ip_max_failures=40)
    one = LoginThrottle(RedisThrottleStore(redis, prefix=prefix), policy, clock=clock)
    second_client = Redis(host="127.0.0.1", port=6379)
    two = LoginThrottle(RedisThrottleStore(second_client, prefix=prefix), policy, clock=clock)

    # Five failures at once, spread over both replicas: exactly the 5th lockout (30 s).
    await asyncio.gather(*(r.failed("alice", IP) for r in (one, two, one, two, one)))
    for replica in (one, two):
        decision = await replica.check("alice", IP)
        assert not decision.allowed and decision.retry_after == pytest.approx(30, abs=0.01)

    # 34 more for other accounts from the same address: 39 in all, one short of the limit.
    await asyncio.gather(*((one, two)[i % 2].failed(f"user-{i}", IP) for i in range(34)))
    assert (await two.check("carol", IP)).allowed
    await one.failed("carol", IP)
    assert not (await two.check("carol", IP)).allowed
    assert not (await one.check("dave", IP)).allowed
    await second_client.aclose()


class RedisProxy:
    """A TCP proxy in front of the real Redis that the test can take down and bring back."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        # Closed sockets end every pump; the handlers then return on their own.
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 5)
        await self._server.wait_closed()
        self._writers.clear()
        self._tasks.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 6379)
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


def client_without_retries(port: int) -> Redis:
    return Redis(
        host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0), socket_connect_timeout=0.5
    )


async def test_when_redis_is_down_logins_are_throttled_in_process_and_it_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = client_without_retries(1)
    clock = Clock()
    throttle = LoginThrottle(RedisThrottleStore(down), clock=clock, retry_interval=0)
    with caplog.at_level(logging.WARNING, logger="identity.bruteforce"):
        assert (await throttle.check("alice", IP)).allowed
        await fail(throttle, 5)
        decision = await throttle.check("alice", IP)
        await throttle.succeeded("bob", IP)
    assert not decision.allowed and decision.retry_after == pytest.approx(30, abs=0.01)
    unavailable = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(unavailable) == 1
    await down.aclose()


async def test_after_an_outage_the_shared_store_is_used_again(
    redis: Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = RedisProxy()
    await proxy.up()
    client = client_without_retries(proxy.port)
    clock = Clock()
    throttle = LoginThrottle(
        RedisThrottleStore(client, prefix=prefix), clock=clock, retry_interval=10
    )
    with caplog.at_level(logging.WARNING, logger="identity.bruteforce"):
        await fail(throttle, 1)
        await proxy.down()
        await fail(throttle, 2)  # counted in the process
        await proxy.up()
        await fail(throttle, 1)  # still inside the retry interval: in the process
        clock.now += 10
        await fail(throttle, 4)  # the shared store answers again
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m for m in messages) == 1
    assert sum("counting there again" in m for m in messages) == 1
    # 1 + 4 failures reached Redis: the 5th consecutive one there, visible to another replica.
    other = LoginThrottle(RedisThrottleStore(redis, prefix=prefix), clock=clock)
    decision = await other.check("alice", IP)
    assert not decision.allowed and decision.retry_after == pytest.approx(30, abs=0.01)
    await client.aclose()
    await proxy.down()
