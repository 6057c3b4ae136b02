"""Rate limiting: the sliding window counter, in process and in Redis, and the route policy.

Redis tests use the shared server on 6379 with a unique key prefix each; tests that break
Redis start their own ``redis-server`` on a free port and kill it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from cityplane.problem import Problem
from cityplane.schema import RateLimit
from gateway.exchange import Exchange
from gateway.h1server import detached_request
from gateway.policies import ratelimit
from gateway.policies.ratelimit import MAX_KEY_PART, RateLimitPolicy
from gateway.policies.ratelimit_redis import RedisStore
from gateway.policies.ratelimit_store import Decision, LocalStore, StoreUnavailable

REDIS_SERVER = "/usr/bin/redis-server"


# --- helpers ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def added(exchange: Exchange) -> list[tuple[str, str]]:
    """The fields the policy added to the client's response (text and wire-form ones)."""
    wire = exchange.response_block.decode("latin-1").split("\r\n")
    fields = [(name, value) for name, _, value in (line.partition(": ") for line in wire if line)]
    return [*exchange.response_headers, *fields]


def make_exchange(
    *,
    client_ip: str = "203.0.113.7",
    consumer: str | None = None,
    headers: dict[str, str] | None = None,
    route_id: str = "bus-times/read",
) -> Exchange:
    request = detached_request("GET", "/bus/42", headers=headers or {})
    exchange = Exchange(
        request,
        client_ip=client_ip,
        path="/bus/42",
        route_id=route_id,
        request_id=uuid.uuid4().hex,
        start=time.monotonic(),
    )
    exchange.consumer = consumer
    return exchange


def spec(requests: int = 3, window: str = "1s", key: str = "ip", on_error: str = "open") -> Any:
    return RateLimit.model_validate(
        {"requests": requests, "window": window, "key": key, "onStoreError": on_error}
    )


def unique_route() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}/read"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def fast_client(port: int, timeout: float = 0.5) -> Redis:
    return Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private, killable redis-server (the shared one on 6379 is never touched)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            REDIS_SERVER,
            *("--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(300):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                await writer.wait_closed()
                return
            await asyncio.sleep(0.01)
        raise RuntimeError("redis-server did not start")

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)


@pytest.fixture
async def private_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    await server.start()
    yield server
    await server.kill()


@pytest.fixture
async def shared_redis() -> AsyncIterator[tuple[Redis, str]]:
    """A client of the shared Redis and a key prefix no other test uses; keys deleted after."""
    client = Redis(host="127.0.0.1", port=6379)
    prefix = f"cityplane-test:rl:{uuid.uuid4().hex}:"
    yield client, prefix
    keys = [key async for key in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture(autouse=True)
def fresh_warning_throttle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "_store_warning", ratelimit._ThrottledWarning(10.0))


async def worst_latency(call: Callable[[], Awaitable[object]], n: int = 100) -> float:
    """The slowest of ``n`` calls, best of three rounds (one preempted round is not the code)."""
    rounds = []
    for _ in range(3):
        durations = []
        for _ in range(n):
            started = time.perf_counter()
            with contextlib.suppress(Problem, StoreUnavailable):
                await call()
            durations.append(time.perf_counter() - started)
        rounds.append(max(durations))
    return min(rounds)


async def hits(store: Any, key: str, limit: int, window: float, n: int) -> list[Decision]:
    return [await store.hit(key, limit, window) for _ in range(n)]


def away_from_boundary(window: float, margin: float = 0.5) -> float:
    """Seconds to sleep so that the next ``margin`` seconds stay inside one aligned window."""
    left = window - time.time() % window
    return left + 0.01 if left < margin else 0.0


# --- the sliding window counter, in process ------------------------------------------------


async def test_local_window_passes_exactly_the_limit_then_refuses() -> None:
    store = LocalStore(clock=FakeClock(1000.0))
    decisions = await hits(store, "k", 5, 1.0, 6)
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert all(d.limit == 5 for d in decisions)
    assert decisions[0].reset_after == pytest.approx(1.0)


async def test_local_previous_window_weight_decays_with_elapsed_time() -> None:
    clock = FakeClock(1000.0)
    store = LocalStore(clock=clock)
    assert all(d.allowed for d in await hits(store, "k", 10, 1.0, 10))
    clock.now = 1001.5  # half of the previous window still overlaps: estimate 10 * 0.5 = 5
    assert [d.allowed for d in await hits(store, "k", 10, 1.0, 6)] == [True] * 5 + [False]
    clock.now = 1001.9  # estimate 10 * 0.1 + 5 = 6
    assert [d.allowed for d in await hits(store, "k", 10, 1.0, 5)] == [True] * 4 + [False]
    clock.now = 1003.0  # two windows later nothing is remembered
    assert all(d.allowed for d in await hits(store, "k", 10, 1.0, 10))


async def test_local_refusal_reports_when_the_next_request_would_pass() -> None:
    clock = FakeClock(1000.0)
    store = LocalStore(clock=clock)
    await hits(store, "k", 10, 1.0, 10)
    clock.now = 1001.0
    refused = await store.hit("k", 10, 1.0)
    # estimate 10 * (1 - f) must reach 9: f = 0.1
    assert not refused.allowed
    assert refused.reset_after == pytest.approx(0.1)
    clock.now = 1001.0 + refused.reset_after
    assert (await store.hit("k", 10, 1.0)).allowed


async def test_local_refusal_in_a_full_window_waits_for_the_next_one() -> None:
    clock = FakeClock(1000.25)
    store = LocalStore(clock=clock)
    await hits(store, "k", 4, 1.0, 4)
    refused = await store.hit("k", 4, 1.0)
    # 0.75 s to the end of the window, then 4 * (1 - g) <= 3: g = 0.25
    assert refused.reset_after == pytest.approx(1.0)
    clock.now += refused.reset_after
    assert (await store.hit("k", 4, 1.0)).allowed


async def test_local_never_passes_more_than_the_limit_in_any_aligned_window() -> None:
    rng = random.Random(7)
    clock = FakeClock(0.0)
    store = LocalStore(clock=clock)
    allowed_per_window: Counter[int] = Counter()
    for _ in range(50_000):  # ~2.5x the limit, in bursts and lulls, over 80 windows
        clock.now += rng.expovariate(250.0) * rng.choice([0.1, 1.0, 3.0])
        if (await store.hit("k", 100, 1.0)).allowed:
            allowed_per_window[math.floor(clock.now)] += 1
    assert max(allowed_per_window.values()) == 100
    # and it is not just refusing: over-limit traffic gets close to the limit on average
    windows = math.floor(clock.now)
    assert sum(allowed_per_window.values()) >= 0.9 * 100 * windows


async def test_local_clock_going_back_does_not_reopen_a_full_window() -> None:
    clock = FakeClock(1001.2)
    store = LocalStore(clock=clock)
    assert all(d.allowed for d in await hits(store, "k", 3, 1.0, 3))
    clock.now = 1000.5
    refused = await store.hit("k", 3, 1.0)
    assert not refused.allowed
    assert refused.reset_after > 0


async def test_local_sub_second_windows_are_aligned_and_exact() -> None:
    clock = FakeClock(10.0)
    store = LocalStore(clock=clock)
    assert [d.allowed for d in await hits(store, "k", 2, 0.25, 3)] == [True, True, False]
    clock.now = 10.5  # two 250ms windows later
    assert [d.allowed for d in await hits(store, "k", 2, 0.25, 3)] == [True, True, False]


async def test_local_store_memory_is_swept_once_keys_expire() -> None:
    clock = FakeClock(0.0)
    store = LocalStore(clock=clock, sweep_interval=10.0)
    for i in range(100_000):
        await store.hit(f"client-{i}", 10, 1.0)
    # the size trigger sweeps, but these keys are all alive: nothing may be lost
    assert len(store) == 100_000
    clock.now = 11.0
    for _ in range(2000):  # the pass is spread over the next hits, 64 keys each
        await store.hit("late", 10_000, 1.0)
    assert len(store) == 1


async def test_local_store_caps_keys_under_a_flood_within_one_window() -> None:
    store = LocalStore(clock=FakeClock(0.0), max_keys=1000, min_sweep_size=100)
    for i in range(10_000):
        await store.hit(f"client-{i}", 10, 60.0)
    assert len(store) <= 1100
    assert (await store.hit("client-9999", 10, 60.0)).remaining == 8  # recent keys are kept


# --- the same counter in Redis -------------------------------------------------------------


async def test_redis_store_passes_exactly_the_limit_then_refuses(
    shared_redis: tuple[Redis, str],
) -> None:
    client, prefix = shared_redis
    store = RedisStore(client, prefix=prefix, timeout=2.0)
    await asyncio.sleep(away_from_boundary(3600.0))
    decisions = await hits(store, "k", 5, 3600.0, 6)
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    window_left = 3600.0 - time.time() % 3600.0
    assert decisions[0].reset_after == pytest.approx(window_left, abs=0.5)
    # refused in a full window with nothing before: the rest of this window, then 1/5 of the next
    assert decisions[-1].reset_after == pytest.approx(window_left + 720.0, abs=0.5)


async def test_redis_store_weights_the_previous_window_by_its_remaining_overlap(
    shared_redis: tuple[Redis, str],
) -> None:
    client, prefix = shared_redis
    store = RedisStore(client, prefix=prefix, timeout=2.0)
    window = 1000.0
    await asyncio.sleep(away_from_boundary(window, margin=2.0))
    now = time.time()
    index = math.floor(now / window)
    elapsed = (now - index * window) / window
    await client.hset(prefix + "k", mapping={"w": index - 1, "c": 100, "p": 0})
    allowed = sum(d.allowed for d in await hits(store, "k", 100, window, 100))
    # estimate 100 * (1 - elapsed) + n: about 100 * elapsed requests fit
    assert abs(allowed - math.floor(100 * elapsed)) <= 1


async def test_redis_store_keys_expire_after_two_windows(
    shared_redis: tuple[Redis, str],
) -> None:
    client, prefix = shared_redis
    store = RedisStore(client, prefix=prefix, timeout=2.0)
    await store.hit("k", 10, 30.0)
    assert 59_000 < await client.pttl(prefix + "k") <= 60_000


async def test_two_gateway_replicas_sharing_redis_never_pass_more_than_the_limit_in_any_second(
    shared_redis: tuple[Redis, str],
) -> None:
    _, prefix = shared_redis
    clients = [Redis(host="127.0.0.1", port=6379) for _ in range(2)]
    replicas = [RedisStore(c, prefix=prefix, timeout=2.0) for c in clients]
    passed: Counter[int] = Counter()  # allowed requests per epoch second, both replicas
    slowest = 0.0
    deadline = time.time() + 3.0

    async def hammer(store: RedisStore) -> None:
        nonlocal slowest
        while time.time() < deadline:
            start = time.time()
            decision = await store.hit("bus-times/read|route", 100, 1.0)
            end = time.time()
            slowest = max(slowest, end - start)
            if decision.allowed:
                # Redis decided at some t in [start, end] (same host, same clock) and says the
                # window ends at t + reset_after, a whole second: that names t's second exactly
                # while the call took under half a second.
                passed[round((start + end) / 2 + decision.reset_after) - 1] += 1

    try:
        await asyncio.gather(*(hammer(store) for store in replicas for _ in range(8)))
    finally:
        for c in clients:
            await c.aclose()
    assert slowest < 0.5
    assert max(passed.values()) <= 100
    assert sum(passed.values()) >= 250  # about 100 per second: the limit is reached


async def test_redis_store_reloads_its_script_after_a_script_flush(
    private_redis: RedisServer,
) -> None:
    client = fast_client(private_redis.port)
    store = RedisStore(client, prefix="t:", timeout=0.5)
    assert (await store.hit("k", 5, 60.0)).allowed
    await client.script_flush()
    assert (await store.hit("k", 5, 60.0)).allowed
    await client.aclose()


async def command_calls(client: Redis) -> dict[str, int]:
    """Calls per command since the server started (``INFO commandstats``)."""
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def test_concurrent_hits_on_different_keys_cost_one_round_trip(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[list[str]] = []

    class Counted(RedisStore):  # compiled, RedisStore is an extension type: no patching it
        async def _run_hits(self, keys: list[str], args: list[int]) -> Any:
            sent.append(keys)
            return await super()._run_hits(keys, args)

    client = fast_client(private_redis.port)
    store = Counted(client, prefix="t:", timeout=0.5)
    await store.hit("warm-up", 5, 60.0)  # the script is cached, the connection is open
    sent.clear()
    before = await command_calls(client)
    decisions = await asyncio.gather(*(store.hit(f"k{i}", 5, 60.0) for i in range(50)))
    after = await command_calls(client)
    assert all(d.allowed and d.remaining == 4 for d in decisions)
    assert [len(keys) for keys in sent] == [50]  # one command from the store ...
    assert after["evalsha"] - before["evalsha"] == 1  # ... and one script run on the server
    assert after.get("eval", 0) == before.get("eval", 0)
    assert after.get("hmget", 0) - before.get("hmget", 0) == 50  # each key decided on its own
    await client.aclose()


async def test_decisions_in_a_batch_are_those_of_sequential_hits(
    shared_redis: tuple[Redis, str],
) -> None:
    client, prefix = shared_redis
    batched = RedisStore(client, prefix=prefix + "batched:", timeout=2.0)
    sequential = RedisStore(client, prefix=prefix + "sequential:", timeout=2.0)
    # keys repeat within the batch, with different limits: later hits see the earlier ones
    calls = [(f"k{i % 7}", 1 + i % 7, 3600.0 if i % 2 else 1800.0) for i in range(60)]
    await asyncio.sleep(away_from_boundary(3600.0, margin=2.0))
    began = time.monotonic()
    together = await asyncio.gather(*(batched.hit(*call) for call in calls))
    one_by_one = [await sequential.hit(*call) for call in calls]
    took = time.monotonic() - began
    assert [(d.allowed, d.limit, d.remaining) for d in together] == [
        (d.allowed, d.limit, d.remaining) for d in one_by_one
    ]
    assert any(not d.allowed for d in together) and any(d.allowed for d in together)
    # The sequential hits come later, by up to `took` (0.58 s once on a stalling VM).
    for a, b in zip(together, one_by_one, strict=True):
        assert a.reset_after == pytest.approx(b.reset_after, abs=took + 0.05)


async def test_a_redis_failure_mid_batch_gives_every_waiter_store_unavailable(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dying = False

    class DiesOnTheWay(RedisStore):
        async def _run_hits(self, keys: list[str], args: list[int]) -> Any:
            if dying:
                await private_redis.kill()  # the batch is being sent when the server goes away
            return await super()._run_hits(keys, args)

    client = fast_client(private_redis.port)
    store = DiesOnTheWay(client, prefix="t:", timeout=0.5, backoff=60.0)
    await store.hit("warm-up", 5, 60.0)
    dying = True
    started = time.perf_counter()
    outcomes = await asyncio.gather(
        *(store.hit(f"k{i}", 5, 60.0) for i in range(20)), return_exceptions=True
    )
    assert time.perf_counter() - started < 0.5
    assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
    assert len({id(o) for o in outcomes}) == 20  # each waiter raises its own exception
    assert store.degraded
    with pytest.raises(StoreUnavailable):  # and the next hits do not wait for Redis
        await store.hit("k0", 5, 60.0)
    await store.close()
    await client.aclose()


async def test_a_hung_redis_fails_the_whole_batch_within_the_deadline(
    private_redis: RedisServer,
) -> None:
    client = fast_client(private_redis.port, timeout=5.0)
    store = RedisStore(client, prefix="t:", timeout=0.1)
    await store.hit("warm-up", 5, 60.0)
    private_redis.signal(signal.SIGSTOP)
    try:
        started = time.perf_counter()
        outcomes = await asyncio.gather(
            *(store.hit(f"k{i}", 5, 60.0) for i in range(20)), return_exceptions=True
        )
        assert time.perf_counter() - started < 0.5
    finally:
        private_redis.signal(signal.SIGCONT)
    assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
    await store.close()
    await client.aclose()


async def test_a_batch_gets_its_whole_deadline_when_the_watchdog_was_armed_for_an_earlier_one(
    private_redis: RedisServer,
) -> None:
    # One timer watches the batches' deadlines (RedisStore._check_deadline). Armed for the
    # first batch, it fires 0.4 s later, while the second batch, sent 0.25 s later, still has
    # 0.25 s to go: that batch must fail at its own deadline, not at the timer's first firing.
    client = fast_client(private_redis.port, timeout=5.0)
    store = RedisStore(client, prefix="t:", timeout=0.4, backoff=60.0)
    await store.hit("warm-up", 5, 60.0)
    await asyncio.sleep(0.25)
    private_redis.signal(signal.SIGSTOP)
    try:
        started = time.perf_counter()
        with pytest.raises(StoreUnavailable, match=r"TimeoutError: no answer within 0\.4s"):
            await store.hit("k", 5, 60.0)
        took = time.perf_counter() - started
    finally:
        private_redis.signal(signal.SIGCONT)
    assert 0.38 <= took < 0.9, took
    assert store.degraded
    await store.close()
    await client.aclose()


async def test_a_batch_after_a_script_flush_reloads_the_script_in_that_batch(
    private_redis: RedisServer,
) -> None:
    client = fast_client(private_redis.port)
    store = RedisStore(client, prefix="t:", timeout=0.5)
    await store.hit("k0", 5, 60.0)
    await client.script_flush()
    before = await command_calls(client)
    decisions = await asyncio.gather(*(store.hit(f"k{i}", 5, 60.0) for i in range(10)))
    after = await command_calls(client)
    assert [d.remaining for d in decisions] == [3] + [4] * 9
    assert after["evalsha"] - before["evalsha"] == 1  # refused with NOSCRIPT ...
    assert after["eval"] - before.get("eval", 0) == 1  # ... then the whole batch in one EVAL
    assert not store.degraded
    await client.aclose()


async def test_a_caller_cancelled_while_its_batch_is_in_flight_does_not_disturb_the_others(
    shared_redis: tuple[Redis, str],
) -> None:
    client, prefix = shared_redis
    store = RedisStore(client, prefix=prefix, timeout=2.0)
    tasks = [asyncio.create_task(store.hit(f"k{i}", 5, 60.0)) for i in range(10)]
    await asyncio.sleep(0)  # all queued; the flusher has not run yet
    tasks[3].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[3], asyncio.CancelledError)
    assert all(isinstance(r, Decision) and r.allowed for i, r in enumerate(results) if i != 3)
    assert not store.degraded


async def test_more_hits_than_one_script_takes_are_split_and_all_answered(
    shared_redis: tuple[Redis, str],
) -> None:
    client, prefix = shared_redis
    store = RedisStore(client, prefix=prefix, timeout=2.0)
    decisions = await asyncio.gather(*(store.hit(f"k{i % 300}", 2, 60.0) for i in range(600)))
    assert [d.remaining for d in decisions] == [1] * 300 + [0] * 300
    assert all(d.allowed for d in decisions)


async def test_heartbeat_counts_live_replicas_and_forgets_dead_ones(
    private_redis: RedisServer,
) -> None:
    clients = [fast_client(private_redis.port) for _ in range(2)]
    a = RedisStore(clients[0], prefix="t:", replica_id="a", member_ttl=15.0)
    b = RedisStore(clients[1], prefix="t:", replica_id="b", member_ttl=15.0)
    seconds, micros = await clients[0].time()
    await clients[0].zadd("t:members", {"crashed": seconds * 1_000_000 + micros - 20_000_000})
    await a.start()
    assert a.replicas == 1  # the member silent for 20 s is gone
    await b.start()
    assert b.replicas == 2
    await b.close()
    await a._beat()
    assert a.replicas == 1
    await a.close()
    assert await clients[0].zcard("t:members") == 0
    for c in clients:
        await c.aclose()


# --- the route policy ------------------------------------------------------------------------


async def test_allowed_request_gets_ratelimit_policy_and_ratelimit_headers() -> None:
    policy = RateLimitPolicy(
        unique_route(), spec(3, "1s"), LocalStore(clock=FakeClock(100.0)), local=LocalStore()
    )
    exchange = make_exchange()
    await policy.check(exchange)
    assert added(exchange) == [
        ("RateLimit-Policy", '"default";q=3;w=1'),
        ("RateLimit", '"default";r=2;t=1'),
    ]


async def test_window_is_advertised_in_whole_seconds_never_shorter() -> None:
    store = LocalStore(clock=FakeClock(100.0))
    sub_second = RateLimitPolicy(unique_route(), spec(5, "250ms"), store, local=store)
    long = RateLimitPolicy(unique_route(), spec(600, "1m"), store, local=store)
    for policy, expected in ((sub_second, '"default";q=5;w=1'), (long, '"default";q=600;w=60')):
        exchange = make_exchange()
        await policy.check(exchange)
        assert added(exchange)[0] == ("RateLimit-Policy", expected)
    assert added(exchange)[1] == ("RateLimit", '"default";r=599;t=20')


async def test_over_the_limit_answers_429_with_retry_after_and_counts_it() -> None:
    route = unique_route()
    clock = FakeClock(100.75)
    policy = RateLimitPolicy(route, spec(2, "1s"), LocalStore(clock=clock), local=LocalStore())
    for _ in range(2):
        await policy.check(make_exchange())
    exchange = make_exchange()
    with pytest.raises(Problem) as caught:
        await policy.check(exchange)
    problem = caught.value
    assert problem.status == 429
    assert problem.type.endswith("/rate-limited")
    # 0.25 s to the end of the window, then until 2 * (1 - g) <= 1: 0.75 s, rounded up to 1
    assert problem.headers["Retry-After"] == "1"
    assert problem.headers["RateLimit"] == '"default";r=0;t=1'
    assert problem.headers["RateLimit-Policy"] == '"default";q=2;w=1'
    assert added(exchange) == []  # the problem carries the fields: written once
    assert sample("cityplane_gateway_ratelimit_rejected_total", route=route) == 1


async def test_retry_after_is_a_whole_number_of_seconds_at_least_one() -> None:
    clock = FakeClock(100.0)
    store = LocalStore(clock=clock)
    policy = RateLimitPolicy(unique_route(), spec(1, "1m"), store, local=LocalStore())
    await policy.check(make_exchange())
    with pytest.raises(Problem) as caught:
        await policy.check(make_exchange())
    retry_after = caught.value.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    # limit 1: wait out this window (20 s left) and all of the next
    assert retry_after == "80"


class RecordingStore:
    def __init__(self) -> None:
        self.keys: list[str] = []

    async def hit(self, key: str, limit: int, window: float) -> Decision:
        self.keys.append(key)
        return Decision(True, limit, limit - 1, window)


OTHER_IP = "198.51.100.1"
KEY = "X-Api-Key"


@pytest.mark.parametrize(
    ("key", "first", "second", "same_bucket"),
    [
        ("consumer", {"consumer": "app-1"}, {"consumer": "app-1", "client_ip": OTHER_IP}, True),
        ("consumer", {"consumer": "app-1"}, {"consumer": "app-2"}, False),
        ("consumer", {}, {}, True),
        ("consumer", {}, {"client_ip": OTHER_IP}, False),
        ("ip", {"consumer": "app-1"}, {"consumer": "app-2"}, True),
        ("ip", {}, {"client_ip": OTHER_IP}, False),
        ("route", {"consumer": "app-1"}, {"client_ip": OTHER_IP}, True),
        (f"header:{KEY}", {"headers": {KEY: "k1"}}, {"headers": {KEY.lower(): "k1"}}, True),
        (f"header:{KEY}", {"headers": {KEY: "k1"}}, {"headers": {KEY: "k2"}}, False),
        (f"header:{KEY}", {"headers": {"X-Other": "k1"}}, {}, True),
        (f"header:{KEY}", {}, {"client_ip": OTHER_IP}, False),
    ],
)
async def test_key_kinds_choose_the_bucket(
    key: str, first: dict[str, Any], second: dict[str, Any], same_bucket: bool
) -> None:
    store = RecordingStore()
    policy = RateLimitPolicy("bus-times/read", spec(5, key=key), store, local=LocalStore())
    for fields in (first, second):
        await policy.check(make_exchange(**fields))
    assert (store.keys[0] == store.keys[1]) is same_bucket
    assert all(k.startswith("bus-times/read|") for k in store.keys)


async def test_anonymous_consumer_shares_the_bucket_of_its_ip_not_of_a_consumer_named_like_it() -> (
    None
):
    store = RecordingStore()
    policy = RateLimitPolicy("r/x", spec(5, key="consumer"), store, local=LocalStore())
    await policy.check(make_exchange(consumer=None, client_ip="203.0.113.7"))
    await policy.check(make_exchange(consumer="ip:203.0.113.7"))
    assert store.keys[0] != store.keys[1]


async def test_routes_never_share_a_bucket() -> None:
    store = LocalStore(clock=FakeClock(100.0))
    first = RateLimitPolicy("bus-times/read", spec(1, key="route"), store, local=store)
    second = RateLimitPolicy("bus-times/write", spec(1, key="route"), store, local=store)
    await first.check(make_exchange())
    await second.check(make_exchange())  # would be a 429 if the buckets were shared


async def test_long_key_values_are_hashed_to_a_bounded_length() -> None:
    store = RecordingStore()
    policy = RateLimitPolicy("r/x", spec(5, key="header:X-Api-Key"), store, local=LocalStore())
    for value in ("a" * 10_000, "a" * 9_999 + "b", "short"):
        await policy.check(make_exchange(headers={"X-Api-Key": value}))
    long_a, long_b, short = store.keys
    assert len(long_a) <= len("r/x|") + MAX_KEY_PART and len(long_b) == len(long_a)
    assert long_a != long_b
    assert short == "r/x|header:short"


# --- when Redis fails ----------------------------------------------------------------------


async def test_store_error_open_allows_everything_with_the_policy_header_only(
    private_redis: RedisServer,
) -> None:
    route = unique_route()
    client = fast_client(private_redis.port)
    store = RedisStore(client, prefix="t:", timeout=0.5)
    policy = RateLimitPolicy(route, spec(2, on_error="open"), store, local=LocalStore())
    await private_redis.kill()
    for _ in range(20):
        exchange = make_exchange()
        await policy.check(exchange)
        assert added(exchange) == [("RateLimit-Policy", '"default";q=2;w=1')]
    errors = "cityplane_gateway_ratelimit_store_errors_total"
    assert sample(errors, route=route, mode="open") == 20
    assert sample("cityplane_gateway_ratelimit_degraded") == 1
    await store.close()
    await client.aclose()


async def test_store_error_closed_answers_503_problem(private_redis: RedisServer) -> None:
    route = unique_route()
    client = fast_client(private_redis.port)
    store = RedisStore(client, prefix="t:", timeout=0.5)
    policy = RateLimitPolicy(route, spec(2, on_error="closed"), store, local=LocalStore())
    await policy.check(make_exchange())
    await private_redis.kill()
    for _ in range(5):
        with pytest.raises(Problem) as caught:
            await policy.check(make_exchange())
        assert caught.value.status == 503
        assert caught.value.type.endswith("/rate-limit-store-unavailable")
        assert caught.value.headers == {"Retry-After": "1"}
    errors = "cityplane_gateway_ratelimit_store_errors_total"
    assert sample(errors, route=route, mode="closed") == 5
    await store.close()
    await client.aclose()


async def test_store_error_local_enforces_each_replicas_share_of_the_limit(
    private_redis: RedisServer,
) -> None:
    route = unique_route()
    clients = [fast_client(private_redis.port) for _ in range(2)]
    stores = [RedisStore(c, prefix="t:", timeout=0.5) for c in clients]
    for store in stores:
        await store.start()
    assert [store.replicas for store in stores] == [1, 2]
    await stores[0]._beat()
    await private_redis.kill()
    for store in stores:
        local = LocalStore(clock=FakeClock(500.0))
        policy = RateLimitPolicy(route, spec(9, on_error="local"), store, local=local)
        allowed = 0
        for _ in range(10):
            with contextlib.suppress(Problem):
                await policy.check(make_exchange())
                allowed += 1
        assert store.replicas == 2  # the last count known before Redis went away
        assert allowed == 5  # ceil(9 / 2)
    for store, c in zip(stores, clients, strict=True):
        await store.close()
        await c.aclose()


async def test_with_redis_dead_checks_answer_without_network_or_waiting(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = fast_client(private_redis.port)
    store = RedisStore(client, prefix="t:", timeout=0.5)
    policy = RateLimitPolicy(unique_route(), spec(2, on_error="local"), store, local=LocalStore())
    await policy.check(make_exchange())
    await private_redis.kill()
    with caplog.at_level(logging.WARNING, logger="gateway.policies.ratelimit"):
        started = time.perf_counter()
        await policy.check(make_exchange())  # the failure that trips the store
        first = time.perf_counter() - started
        calls = 0

        async def counted(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            raise AssertionError("no Redis call while degraded")

        monkeypatch.setattr(client, "evalsha", counted)
        exchange = make_exchange()
        worst = await worst_latency(lambda: policy.check(exchange))
    assert first < 0.5
    assert calls == 0  # the proof of no network; the bound below is 10x under the deadline
    assert worst < 0.05
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one line, not one per request
    await store.close()
    await client.aclose()


async def test_a_hung_redis_costs_one_timeout_then_nothing(private_redis: RedisServer) -> None:
    client = fast_client(private_redis.port, timeout=5.0)  # only the store's deadline is short
    store = RedisStore(client, prefix="t:", timeout=0.1)
    private_redis.signal(signal.SIGSTOP)  # the kernel still accepts connections; nobody answers
    try:
        started = time.perf_counter()
        with pytest.raises(StoreUnavailable):
            await store.hit("k", 5, 1.0)
        assert time.perf_counter() - started < 0.5
        # a call that waited would take the 0.1 s deadline; the bound leaves room for a busy VM
        assert await worst_latency(lambda: store.hit("k", 5, 1.0)) < 0.05
    finally:
        private_redis.signal(signal.SIGCONT)
    await store.close()
    await client.aclose()


async def test_no_redis_exception_escapes_the_policy_in_any_mode() -> None:
    client = fast_client(free_port())  # nothing listens there
    store = RedisStore(client, prefix="t:", backoff=0.01)
    for mode, expected in (("open", None), ("closed", 503), ("local", None)):
        policy = RateLimitPolicy(unique_route(), spec(5, on_error=mode), store, local=LocalStore())
        for _ in range(3):
            try:
                await policy.check(make_exchange())
                status = None
            except Problem as problem:
                status = problem.status
            assert status == expected
    await store.close()
    await client.aclose()


async def test_store_recovers_when_redis_restarts_on_the_same_port(
    private_redis: RedisServer,
) -> None:
    client = fast_client(private_redis.port)
    store = RedisStore(client, prefix="t:", timeout=0.5, backoff=0.05, max_backoff=0.2)
    policy = RateLimitPolicy(unique_route(), spec(3, on_error="open"), store, local=LocalStore())
    await policy.check(make_exchange())
    await private_redis.kill()
    await policy.check(make_exchange())
    assert store.degraded
    await asyncio.sleep(0.5)  # several failed probes: the back-off has grown to its cap
    assert store.degraded
    await private_redis.start()
    for _ in range(100):
        if not store.degraded:
            break
        await asyncio.sleep(0.02)
    assert not store.degraded
    assert sample("cityplane_gateway_ratelimit_degraded") == 0
    exchange = make_exchange()
    await policy.check(exchange)
    # served by Redis again: a fresh server counts from zero
    assert added(exchange)[1] == ("RateLimit", '"default";r=2;t=1')
    await store.close()
    await client.aclose()


async def test_store_built_from_url_fails_fast_and_closes_its_client() -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix="t:")
    started = time.perf_counter()
    for _ in range(10):
        with pytest.raises(StoreUnavailable):
            await store.hit("k", 5, 1.0)
    assert time.perf_counter() - started < 0.5
    await store.close()


def test_the_batch_command_is_the_one_redis_py_would_pack() -> None:
    from redis.asyncio.connection import Connection

    from gateway.policies.ratelimit_redis import _HIT

    store = RedisStore(fast_client(free_port()), prefix="t:")
    keys = ["t:ip:203.0.113.7:1", "t:consumer:bus-\u00e4pp:1", "t:ip:203.0.113.7:1"]
    args = [5, 1_000_000, 5, 1_000_000, 10_000_000, -1]
    expected = b"".join(Connection().pack_command("EVALSHA", _HIT.sha, len(keys), *keys, *args))
    assert store._evalsha(keys, args) == expected
    assert store._evalsha(keys, args) == expected  # from the cached bulk strings
    for i in range(10_500):  # one per client: the cache stays bounded
        store._evalsha([f"t:ip:{i}"], [5, 1])
    assert len(store._chunks) <= 10_000
