"""The gateway following a real registry: live changes, outages, restarts, propagation time."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from gateway.runtime import Gateway, GatewaySettings
from registry.app import RegistrySettings, start_registry
from tests.conftest import service
from tests.gateway.procs import GatewayProcess, free_port


def follower(registry: Any, state_dir: Path) -> GatewaySettings:
    """A gateway on free ports following `registry`, keeping its snapshot in `state_dir`."""
    return GatewaySettings(
        port=0,
        status_port=0,
        access_log="off",
        registry_url=registry.url,
        registry_token=registry.admin_token,
        state_dir=state_dir,
    )


def doc(name: str, url: str, prefix: str) -> dict:
    return service(name, [url], [{"name": "r", "match": {"pathPrefix": prefix}}])


async def put(http: ClientSession, registry, document: dict) -> int:
    name = document["metadata"]["name"]
    async with http.put(
        f"{registry.url}/v1/services/{name}",
        json=document,
        headers={"Authorization": f"Bearer {registry.admin_token}"},
    ) as resp:
        assert resp.status in (200, 201), await resp.text()
        return int(resp.headers["X-CityPlane-Revision"])


async def wait_status(http: ClientSession, url: str, status: int, within: float = 5.0) -> float:
    started = time.monotonic()
    while True:
        try:
            async with http.get(url) as resp:
                if resp.status == status:
                    return time.monotonic() - started
        except OSError:
            pass
        if time.monotonic() - started > within:
            raise AssertionError(f"{url} did not answer {status} within {within}s")
        await asyncio.sleep(0.002)


async def test_gateway_follows_changes_survives_outages_and_restarts(upstreams, tmp_path: Path):
    up = await upstreams("city")
    port = free_port()
    reg_settings = RegistrySettings(port=port, data_dir=tmp_path / "reg", heartbeat=1.0)
    registry = await start_registry(reg_settings)
    gw_settings = follower(registry, tmp_path / "gw")
    gateway = Gateway(gw_settings)
    await gateway.start()
    second: Gateway | None = None
    try:
        base = f"http://127.0.0.1:{gateway.port}"
        status = f"http://127.0.0.1:{gateway.status_port}"
        async with ClientSession() as http:
            async with http.get(status + "/readyz") as resp:
                assert resp.status == 200  # an empty registry is a valid snapshot
            await put(http, registry, doc("bus", up.url, "/bus"))
            await wait_status(http, base + "/bus/1", 200)
            async with http.delete(
                f"{registry.url}/v1/services/bus",
                headers={"Authorization": f"Bearer {registry.admin_token}"},
            ) as resp:
                assert resp.status == 200
            await wait_status(http, base + "/bus/1", 404)
            revision = await put(http, registry, doc("trams", up.url, "/trams"))
            await wait_status(http, base + "/trams/1", 200)
            async with http.get(status + "/metrics") as resp:
                assert f"cityplane_gateway_config_revision {float(revision)}" in await resp.text()

            # The registry dies: the gateway keeps serving what it has.
            await registry.stop()
            await asyncio.sleep(0.3)
            async with http.get(base + "/trams/1") as resp:
                assert resp.status == 200

            # A gateway started while the registry is down serves the saved snapshot.
            second = Gateway(follower(registry, tmp_path / "gw"))
            second.source._first_wait = 0.5  # type: ignore[attr-defined]
            await second.start()
            async with http.get(f"http://127.0.0.1:{second.port}/trams/1") as resp:
                assert resp.status == 200
            async with http.get(f"http://127.0.0.1:{second.status_port}/readyz") as resp:
                assert resp.status == 200

            # The registry comes back on the same address: both gateways resume the watch.
            registry = await start_registry(reg_settings)
            await put(http, registry, doc("parks", up.url, "/parks"))
            await wait_status(http, base + "/parks/1", 200, within=10)
            await wait_status(http, f"http://127.0.0.1:{second.port}/parks/1", 200, within=10)
    finally:
        await gateway.stop()
        if second is not None:
            await second.stop()
        await registry.stop()


async def test_gateway_without_registry_or_snapshot_is_not_ready(tmp_path: Path):
    gateway = Gateway(
        GatewaySettings(
            port=0,
            status_port=0,
            access_log="off",
            registry_url=f"http://127.0.0.1:{free_port()}",
            state_dir=tmp_path,
        )
    )
    gateway.source._first_wait = 0.3  # type: ignore[attr-defined]
    await gateway.start()
    try:
        async with ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{gateway.status_port}/readyz") as resp:
                assert resp.status == 503
            async with http.get(f"http://127.0.0.1:{gateway.port}/anything") as resp:
                assert resp.status == 404
    finally:
        await gateway.stop()


@pytest.mark.slow
async def test_a_change_reaches_three_gateway_processes_pushed(upstreams, tmp_path: Path):
    up = await upstreams("city")
    registry = await start_registry(
        RegistrySettings(port=0, data_dir=tmp_path / "reg", heartbeat=5.0)
    )
    token_file = tmp_path / "token"
    token_file.write_text(registry.admin_token)
    gateways = [
        GatewayProcess(
            None,
            "--registry",
            registry.url,
            "--registry-token-file",
            str(token_file),
            "--state-dir",
            str(tmp_path / f"gw{i}"),
            log_dir=tmp_path,
        )
        for i in range(3)
    ]
    try:
        await asyncio.gather(*(g.ready() for g in gateways))
        delays: list[float] = []
        async with ClientSession() as http:
            for i in range(40):
                await put(http, registry, doc(f"svc{i}", up.url, f"/v{i}"))
                committed = time.monotonic()
                await asyncio.gather(*(wait_status(http, f"{g.url}/v{i}/x", 200) for g in gateways))
                delays.append(time.monotonic() - committed)
    finally:
        for g in gateways:
            g.stop()
        await registry.stop()
    delays.sort()
    p50 = statistics.median(delays) * 1000
    p99 = delays[int(len(delays) * 0.99) - 1] * 1000
    print(f"registry commit -> served by all 3 gateways: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    # The median tells a push from a poll; the 100 ms p99 target is measured by
    # `python -m bench.propagation` (a stall of this shared CI VM is not the gateway's).
    assert p50 <= 50, delays
    assert p99 <= 1000, delays


async def test_gateway_routes_to_self_registered_instances_while_they_heartbeat(
    upstreams, tmp_path: Path
):
    up = await upstreams("city")
    ttl = 0.5
    registry = await start_registry(
        RegistrySettings(port=0, data_dir=tmp_path / "reg", heartbeat=1.0, reap_interval=0.1)
    )
    gateway = Gateway(follower(registry, tmp_path / "gw"))
    await gateway.start()
    auth = {"Authorization": f"Bearer {registry.admin_token}"}
    instance = f"{registry.url}/v1/services/bus/instances/bus-1"
    beat = {"url": up.url}
    try:
        base = f"http://127.0.0.1:{gateway.port}"
        async with ClientSession() as http:
            # No instance yet: the service compiles, with no healthy upstream.
            await put(
                http,
                registry,
                service(
                    "bus",
                    [],
                    [{"name": "r", "match": {"pathPrefix": "/bus"}}],
                    upstream={"instances": {"ttl": f"{ttl}s", "removeAfter": "30s"}},
                ),
            )
            await wait_status(http, base + "/bus/1", 503)
            async with http.get(base + "/bus/1") as resp:
                assert resp.headers["Retry-After"]
                assert (await resp.json())["type"].endswith("/no-healthy-upstream")

            async with http.put(instance, json=beat, headers=auth) as resp:
                assert resp.status == 201, await resp.text()
            await wait_status(http, base + "/bus/1", 200)

            # Heartbeats stop: the gateway answers 503 within the TTL and about a second.
            stopped = time.monotonic()
            await wait_status(http, base + "/bus/1", 503, within=ttl + 1.5)
            assert time.monotonic() - stopped >= ttl * 0.9

            # It heartbeats again: served again.
            async with http.put(instance, json=beat, headers=auth) as resp:
                assert resp.status == 200, await resp.text()
            await wait_status(http, base + "/bus/1", 200)
    finally:
        await gateway.stop()
        await registry.stop()
