"""Target health: passive ejection from real traffic and active probes of real servers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from cityplane.schema import HealthCheck
from gateway.upstream.balancer import RoundRobin
from gateway.upstream.health import (
    ActiveHealthChecker,
    PassiveHealth,
    close_probe_session,
    http_probe,
)
from gateway.upstream.target import TargetState

FAST = HealthCheck(
    interval=0.05, timeout=0.5, healthyThreshold=2, unhealthyThreshold=3, ejectionTime=60
)


def gauge(target: TargetState) -> float | None:
    return REGISTRY.get_sample_value(
        "cityplane_gateway_upstream_target_healthy",
        {"service": target.service, "target": target.url},
    )


def make_targets(service: str, count: int) -> list[TargetState]:
    return [TargetState(service, f"http://10.1.0.{i + 1}", 1) for i in range(count)]


async def eventually(condition: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- passive ------------------------------------------------------------------------------------


def test_consecutive_failures_eject_the_target_for_the_ejection_time() -> None:
    a, b = make_targets("passive-eject", 2)
    passive = PassiveHealth("passive-eject", HealthCheck(passiveFailures=3, ejectionTime=30))
    passive.record(b, True)
    passive.record(a, False)
    passive.record(a, False)
    assert a.available(time.monotonic())
    before = time.monotonic()
    passive.record(a, False)
    assert not a.available(time.monotonic())
    assert before + 30 <= a.ejected_until <= time.monotonic() + 30
    assert gauge(a) == 0


def test_a_success_resets_the_failure_count() -> None:
    a, b = make_targets("passive-reset", 2)
    passive = PassiveHealth("passive-reset", HealthCheck(passiveFailures=3), targets=[a, b])
    for ok in (False, False, True, False, False):
        passive.record(a, ok)
    assert a.ejected_until == 0.0
    passive.record(a, False)
    assert a.ejected_until > 0


def test_an_ejection_expires_after_the_ejection_time() -> None:
    a, b = make_targets("passive-expiry", 2)
    passive = PassiveHealth("passive-expiry", HealthCheck(passiveFailures=1, ejectionTime=10))
    passive.record(b, True)
    passive.record(a, False)
    assert not a.available(a.ejected_until - 0.001)
    assert a.available(a.ejected_until)
    # The first success after the deadline resets the marker and the gauge.
    a.ejected_until = time.monotonic() - 0.001
    passive.record(a, True)
    assert (a.ejected_until, gauge(a)) == (0.0, 1)


async def test_the_gauge_shows_the_target_back_when_its_ejection_ends() -> None:
    a, b = make_targets("passive-timer", 2)
    passive = PassiveHealth(
        "passive-timer", HealthCheck(passiveFailures=2, ejectionTime=0.05), targets=[a, b]
    )
    passive.record(a, False)
    passive.record(a, False)
    assert (gauge(a), gauge(b)) == (0, 1)
    await eventually(lambda: gauge(a) == 1, within=1.0)
    assert a.ejected_until == 0.0 and a.available(time.monotonic())


def test_the_last_available_target_is_never_ejected() -> None:
    a, b = make_targets("passive-last", 2)
    passive = PassiveHealth("passive-last", HealthCheck(passiveFailures=2), targets=[a, b])
    passive.record(a, False)
    passive.record(a, False)
    assert not a.available(time.monotonic())
    for _ in range(10):
        passive.record(b, False)
    assert b.available(time.monotonic())
    assert gauge(b) == 1


def test_a_lone_target_is_never_ejected() -> None:
    (only,) = make_targets("passive-lone", 1)
    passive = PassiveHealth("passive-lone", HealthCheck(passiveFailures=1))
    for _ in range(10):
        passive.record(only, False)
    assert only.available(time.monotonic())


def test_a_target_whose_peers_fail_active_checks_is_not_ejected() -> None:
    a, b = make_targets("passive-peers-down", 2)
    passive = PassiveHealth("passive-peers-down", HealthCheck(passiveFailures=1), targets=[a, b])
    b.healthy = False
    passive.record(a, False)
    assert a.available(time.monotonic())
    b.healthy = True  # once another target is back, the next failure ejects
    passive.record(a, False)
    assert not a.available(time.monotonic())


def test_failures_reported_while_ejected_do_not_extend_the_ejection() -> None:
    a, b = make_targets("passive-late", 2)
    passive = PassiveHealth("passive-late", HealthCheck(passiveFailures=1), targets=[a, b])
    passive.record(a, False)
    until = a.ejected_until
    passive.record(a, False)
    assert (a.ejected_until, a.passive_failures) == (until, 0)


def test_passive_failures_zero_disables_ejection() -> None:
    a, b = make_targets("passive-off", 2)
    passive = PassiveHealth("passive-off", HealthCheck(passiveFailures=0), targets=[a, b])
    for _ in range(100):
        passive.record(a, False)
    assert a.available(time.monotonic())


def test_without_a_spec_the_defaults_apply() -> None:
    a, b = make_targets("passive-defaults", 2)
    passive = PassiveHealth("passive-defaults", None, targets=[a, b])
    for _ in range(HealthCheck().passiveFailures - 1):
        passive.record(a, False)
    assert a.ejected_until == 0.0
    passive.record(a, False)
    assert a.ejected_until == pytest.approx(time.monotonic() + HealthCheck().ejectionTime, abs=1)


def test_the_balancer_skips_an_ejected_target() -> None:
    a, b = make_targets("passive-balancer", 2)
    rr = RoundRobin([a, b])
    passive = PassiveHealth("passive-balancer", HealthCheck(passiveFailures=1), targets=[a, b])
    passive.record(a, False)
    assert {rr.pick() for _ in range(10)} == {b}


# --- active, against real servers ---------------------------------------------------------------


class HealthzServer:
    """A real HTTP server on 127.0.0.1 whose /healthz answer the test controls."""

    def __init__(self) -> None:
        self.status = 200
        self.slow = False
        self.target: TargetState | None = None
        # (status answered, target.healthy when the probe arrived), one per probe.
        self.probes: list[tuple[int, bool]] = []
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        self.probes.append((self.status, self.target.healthy if self.target else True))
        if self.slow:
            await self._release.wait()
        return web.Response(status=self.status, text="ok" if self.status < 400 else "down")

    def answered(self, status: int, healthy_on_arrival: bool) -> int:
        return self.probes.count((status, healthy_on_arrival))


@pytest.fixture
async def servers() -> AsyncIterator[Callable[[], Any]]:
    started: list[HealthzServer] = []

    async def start() -> HealthzServer:
        server = HealthzServer()
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()
    await close_probe_session()


async def checked(
    service: str, servers: list[HealthzServer], spec: HealthCheck = FAST
) -> tuple[list[TargetState], ActiveHealthChecker]:
    targets = [TargetState(service, server.url, 1) for server in servers]
    for server, target in zip(servers, targets, strict=True):
        server.target = target
    checker = ActiveHealthChecker(service, targets, spec, http_probe)
    await checker.start()
    return targets, checker


async def test_a_target_failing_its_probes_becomes_unhealthy_and_recovers(servers: Any) -> None:
    flaky, steady = await servers(), await servers()
    (a, b), checker = await checked("active-flip", [flaky, steady])
    rr = RoundRobin([a, b])
    try:
        await eventually(lambda: len(flaky.probes) >= 2)
        flaky.status = 503
        await eventually(lambda: not a.healthy)
        # Exactly unhealthyThreshold failed probes arrived while it still counted as healthy.
        assert flaky.answered(503, healthy_on_arrival=True) == FAST.unhealthyThreshold
        assert (gauge(a), gauge(b)) == (0, 1)
        assert {rr.pick() for _ in range(10)} == {b}

        flaky.status = 200
        await eventually(lambda: a.healthy)
        assert flaky.answered(200, healthy_on_arrival=False) == FAST.healthyThreshold
        assert gauge(a) == 1
        assert {rr.pick() for _ in range(10)} == {a, b}
        assert steady.answered(200, healthy_on_arrival=False) == 0
    finally:
        await checker.close()


async def test_a_stopped_server_is_marked_unhealthy_and_back_when_it_restarts(
    servers: Any,
) -> None:
    server = await servers()
    (target,), checker = await checked("active-refused", [server])
    try:
        await eventually(lambda: len(server.probes) >= 2)
        await server.stop()  # connection refused from now on
        await eventually(lambda: not target.healthy)
        assert gauge(target) == 0
        assert RoundRobin([target]).pick() is None
        await server.start()  # same port
        await eventually(lambda: target.healthy)
        assert gauge(target) == 1
    finally:
        await checker.close()


async def test_a_probe_that_times_out_counts_as_a_failure(servers: Any) -> None:
    server = await servers()
    server.slow = True
    spec = FAST.model_copy(update={"timeout": 0.05})
    (target,), checker = await checked("active-timeout", [server], spec)
    try:
        started = time.monotonic()
        await eventually(lambda: not target.healthy)
        # Three rounds of (timeout 0.05 s, then the next one at once): well under a second.
        assert time.monotonic() - started < 1.0
        assert len(server.probes) >= FAST.unhealthyThreshold
    finally:
        await checker.close()


async def test_http_probe_raises_when_the_port_refuses_connections() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = TargetState("probe-closed", f"http://127.0.0.1:{port}", 1)
    try:
        with pytest.raises(OSError):  # aiohttp's ClientConnectorError is an OSError
            await http_probe(target, "/healthz", 0.5)
    finally:
        await close_probe_session()


@pytest.mark.parametrize(("status", "healthy"), [(204, True), (302, True), (404, False)])
async def test_http_probe_takes_2xx_and_3xx_as_healthy(
    servers: Any, status: int, healthy: bool
) -> None:
    server = await servers()
    server.status = status
    target = TargetState("probe-status", server.url + "/base/path", 1)
    assert await http_probe(target, "/healthz", 0.5) is healthy


async def test_a_probe_that_raises_counts_as_a_failure_and_checking_goes_on() -> None:
    (target,) = make_targets("active-raises", 1)
    healthy_on_call: list[bool] = []

    async def probe(t: TargetState, path: str, seconds: float) -> bool:
        healthy_on_call.append(t.healthy)
        if len(healthy_on_call) <= 3:
            raise RuntimeError("probe bug")
        return True

    checker = ActiveHealthChecker("active-raises", [target], FAST, probe)
    await checker.start()
    try:
        await eventually(lambda: len(healthy_on_call) >= 7)
        # Three raising probes (unhealthyThreshold), then two good ones (healthyThreshold).
        assert healthy_on_call[:7] == [True, True, True, False, False, True, True]
    finally:
        await checker.close()


async def test_good_probes_end_a_passive_ejection_early(servers: Any) -> None:
    first, second = await servers(), await servers()
    (a, b), checker = await checked("active-uneject", [first, second])
    passive = PassiveHealth("active-uneject", FAST.model_copy(update={"passiveFailures": 1}))
    try:
        passive.record(b, True)
        probes_before = len(first.probes)
        passive.record(a, False)
        assert gauge(a) == 0 and a.ejected_until > time.monotonic() + 30
        await eventually(lambda: a.ejected_until == 0.0)
        assert len(first.probes) - probes_before >= FAST.healthyThreshold
        assert gauge(a) == 1 and a.available(time.monotonic())
    finally:
        await checker.close()


async def test_close_stops_probing(servers: Any) -> None:
    server = await servers()
    _, checker = await checked("active-close", [server])
    await eventually(lambda: len(server.probes) >= 2)
    await checker.close()
    count = len(server.probes)
    await asyncio.sleep(0.2)
    assert len(server.probes) == count
    await checker.close()  # closing twice is harmless


async def test_a_checker_with_active_checks_off_does_not_probe(servers: Any) -> None:
    server = await servers()
    _, checker = await checked("active-off", [server], FAST.model_copy(update={"active": False}))
    await asyncio.sleep(0.15)
    assert server.probes == []
    await checker.close()
