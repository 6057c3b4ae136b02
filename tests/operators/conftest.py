"""The operator against kmock's Kubernetes emulator, the real registry and the hub double."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import kmock
import kopf
import pytest
from kubernetes import client

from operators.handlers import Timing
from operators.reconcile import Endpoint
from operators.runner import OperatorSettings, run_in_thread
from registry.app import RegistrySettings, RunningRegistry, start_registry
from tests.operators.hub_double import HubDouble, start_hub_double
from tests.operators.kube_emulator import KubeEmulator

T = TypeVar("T")
FAST = Timing(drift_interval=0.5, retry_delay=0.2, max_retry_delay=0.5)


async def eventually(
    probe: Callable[[], T | None], *, timeout: float = 8.0, what: str = "condition"
) -> T:
    """Poll ``probe`` (from the test's event loop, which also serves the emulator and the
    registry) until it answers something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (KeyError, IndexError, TypeError, AssertionError) as exc:
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last seen: {last!r}")


async def eventually_async(
    probe: Callable[[], Awaitable[bool]], *, timeout: float = 8.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await probe():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def kube() -> AsyncIterator[KubeEmulator]:
    emulator = KubeEmulator.with_cityplane()
    async with emulator, kmock.Server(emulator):
        yield emulator


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RunningRegistry]:
    running = await start_registry(
        RegistrySettings(
            data_dir=tmp_path / "registry",
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}",
            port=0,
        )
    )
    yield running
    await running.stop()


@pytest.fixture
async def hub() -> AsyncIterator[HubDouble]:
    double = await start_hub_double()
    yield double
    await double.stop()


StartOperator = Callable[..., Awaitable[OperatorSettings]]


@pytest.fixture
async def start_operator(kube: KubeEmulator) -> AsyncIterator[StartOperator]:
    """Start the operator (kopf in a thread of its own) against the emulator."""
    stops: list[tuple[Any, Any]] = []
    server = str(kube.url).rstrip("/")

    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=server, insecure=True, scheme="Bearer", token="test")

    async def start(
        *,
        registry_url: str,
        hub: HubDouble | None = None,
        registry_token: str | None = None,
        hub_url: str | None = None,
        hub_token: str | None = None,
        **overrides: Any,
    ) -> OperatorSettings:
        settings = OperatorSettings(
            registry=Endpoint(registry_url, registry_token),
            identity=Endpoint(
                hub_url or (hub.url if hub else ""), hub_token or (hub.token if hub else None)
            ),
            health_port=overrides.pop("health_port", None),
            timing=overrides.pop("timing", FAST),
            http_timeout=2.0,
            **overrides,
        )
        api = client.ApiClient(client.Configuration(host=server))
        thread, stop, ready = run_in_thread(settings, api=api, login=login)
        stops.append((thread, stop))
        await eventually(ready.is_set, what="kopf to be ready")
        return settings

    async def stop_all() -> None:
        while stops:
            thread, stop = stops.pop()
            stop.set()
            await asyncio.to_thread(thread.join, 10)

    start.stop_all = stop_all  # type: ignore[attr-defined]
    yield start
    await stop_all()
