"""The Redis rate limit without a task (ADR 14): ``RateLimitPolicy.check_soon`` decides as
``check`` does, through a callback, and an inline request waits on it without a hand-over."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from cityplane.problem import Problem
from gateway.h1server import ClientConnection, FrontServer, IncomingRequest
from gateway.policies.ratelimit import RateLimitPolicy
from gateway.policies.ratelimit_redis import RedisStore
from gateway.policies.ratelimit_store import LocalStore
from gateway.server import IN_FLIGHT
from tests.conftest import service
from tests.gateway.test_ratelimit import (
    FakeClock,
    fast_client,
    free_port,
    make_exchange,
    private_redis,
    spec,
    unique_route,
)

__all__ = ["private_redis"]  # a fixture, used by name


async def soon(policy: RateLimitPolicy, exchange: Any) -> Problem | None:
    """``check_soon``'s answer, awaited."""
    answered: asyncio.Future[Problem | None] = asyncio.get_running_loop().create_future()
    assert policy.check_soon(exchange, answered.set_result)
    return await asyncio.wait_for(answered, 2)


async def via_check(policy: RateLimitPolicy, exchange: Any) -> Problem | None:
    try:
        await policy.check(exchange)
    except Problem as problem:
        return problem
    return None


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisStore]:
    client = Redis(host="127.0.0.1", port=6379)
    store = RedisStore(client, prefix=f"cityplane-test:soon:{uuid.uuid4().hex}:")
    yield store
    await store.close()
    await client.aclose()


async def test_check_soon_gives_the_decisions_and_headers_of_check(
    redis_store: RedisStore,
) -> None:
    by_soon = RateLimitPolicy(unique_route(), spec(3, "10s"), redis_store, local=LocalStore())
    by_check = RateLimitPolicy(unique_route(), spec(3, "10s"), redis_store, local=LocalStore())
    for _ in range(5):
        a, b = make_exchange(), make_exchange()
        got_soon, got_check = await soon(by_soon, a), await via_check(by_check, b)
        assert (got_soon is None) == (got_check is None)
        if got_soon is not None and got_check is not None:
            assert (got_soon.status, got_soon.headers) == (got_check.status, got_check.headers)
        assert (a.response_headers, a.response_block) == (b.response_headers, b.response_block)


async def test_the_in_process_store_has_no_callback_form() -> None:
    policy = RateLimitPolicy(unique_route(), spec(3), LocalStore(), local=LocalStore())
    exchange = make_exchange()
    assert policy.check_now(exchange)
    assert not policy.check_soon(exchange, lambda problem: None)


@pytest.mark.parametrize(("mode", "status"), [("open", None), ("closed", 503), ("local", None)])
async def test_check_soon_follows_on_store_error_when_redis_fails_and_while_degraded(
    mode: str, status: int | None
) -> None:
    client = fast_client(free_port())  # nothing listens there
    store = RedisStore(client, prefix="t:", backoff=5.0)
    policy = RateLimitPolicy(unique_route(), spec(2, on_error=mode), store, local=LocalStore())
    answers = []
    for _ in range(3):  # the failing batch, then answered at once while degraded
        problem = await soon(policy, make_exchange())
        answers.append(problem.status if problem is not None else None)
    assert store.degraded
    if mode == "local":
        assert answers == [None, None, 429]  # the local share of a limit of 2
    else:
        assert answers == [status] * 3
    await store.close()
    await client.aclose()


async def test_a_failing_callback_does_not_cost_the_rest_of_its_batch_their_answer(
    redis_store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[Any] = []

    def broken(reply: Any) -> None:
        raise RuntimeError("a bug in one request")

    redis_store.hit_soon("a", 5, 1.0, broken)
    redis_store.hit_soon("b", 5, 1.0, got.append)
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.01)
    assert len(got) == 1 and got[0].allowed
    assert "rate-limit decision callback failed" in caplog.text


async def test_local_mode_share_uses_the_replica_count_known_before_the_failure() -> None:
    client = fast_client(free_port())
    store = RedisStore(client, prefix="t:", backoff=5.0)
    store.replicas = 3
    local = LocalStore(clock=FakeClock(500.0))
    policy = RateLimitPolicy(unique_route(), spec(9, on_error="local"), store, local=local)
    allowed = 0
    for _ in range(5):
        if await soon(policy, make_exchange()) is None:
            allowed += 1
    assert allowed == 3  # ceil(9 / 3)
    await store.close()
    await client.aclose()


async def test_a_gateway_on_redis_waits_for_the_decision_without_its_task(
    upstreams: Any, gateway_factory: Any, http: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = await upstreams()
    route = {
        "name": "read",
        "match": {"pathPrefix": "/bus"},
        "rateLimit": {"requests": 3, "window": "10s", "key": "ip"},
    }
    gw = await gateway_factory(
        [service(f"svc-{uuid.uuid4().hex[:6]}", [up.url], [route])],
        redis_url="redis://127.0.0.1:6379/0",
    )
    outcomes: list[int] = []
    server = gw.gateway._server
    original = server.dispatch

    def dispatch(req: IncomingRequest) -> int:
        outcome = original(req)
        outcomes.append(outcome)
        return outcome

    monkeypatch.setattr(server, "dispatch", dispatch)
    handed: list[str] = []

    class Watched(ClientConnection):
        def hand_over(self, req: IncomingRequest) -> None:
            handed.append(req.raw_path)
            super().hand_over(req)

    monkeypatch.setattr(FrontServer, "connection_type", Watched)
    statuses = []
    for _ in range(5):
        async with http.get(gw.url + "/bus/x") as resp:
            statuses.append(resp.status)
            assert resp.headers["RateLimit-Policy"] == '"default";q=3;w=10'
            await resp.read()
    assert statuses == [200, 200, 200, 429, 429]
    assert outcomes == [IN_FLIGHT] * 5  # each waited on Redis inline
    # Only the first request had no idle upstream connection to go on with.
    assert handed == ["/bus/x"]
