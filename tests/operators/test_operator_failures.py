"""What the operator does when the spec is wrong or a dependency is down: a condition that says
why, retries with backoff, recovery without anyone's help."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import ClientSession

from registry.app import RegistrySettings, RunningRegistry, start_registry
from tests.operators.conftest import StartOperator, eventually, free_port
from tests.operators.hub_double import HubDouble, start_hub_double
from tests.operators.kube_emulator import CITYAPPS, KubeEmulator
from tests.operators.test_operator_lifecycle import (
    NAME,
    NS,
    condition,
    create,
    example,
    patch,
    registered,
)


def has(type_: str, status: str, reason: str | None = None) -> Any:
    def check(kube: KubeEmulator) -> dict[str, Any] | None:
        found = condition(kube.stored(CITYAPPS, NS, NAME), type_)
        if found and found["status"] == status and (reason is None or found["reason"] == reason):
            return found
        return None

    return check


async def test_invalid_spec_gets_ready_false_with_what_is_wrong_and_recovers_when_fixed(
    kube: KubeEmulator, registry: RunningRegistry, hub: HubDouble, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token, hub=hub)
    document = example()
    document["spec"]["replicas"] = 3  # next to autoscaling
    await create(kube, document)

    ready = await eventually(lambda: has("Ready", "False", "InvalidSpec")(kube), what="InvalidSpec")
    assert "give either replicas or autoscaling, not both" in ready["message"]
    assert kube.stored("apps/v1/deployments", NS, NAME) is None
    assert hub.clients == {}

    def invalid_spec_events() -> list[dict[str, Any]]:
        return [
            obj.raw
            for (resource, ns, _), obj in kube.objects.items()
            if resource.plural == "events"
            and not obj.deleted
            and obj.raw.get("reason") == "InvalidSpec"
        ]

    # kopf posts the event after the status patch, from its own task: it may come a little later.
    warnings = await eventually(invalid_spec_events, what="the InvalidSpec event")
    assert warnings[0]["type"] == "Warning"

    await patch(kube, {"spec": {"replicas": None}})
    await registered(kube)
    assert kube.stored("apps/v1/deployments", NS, NAME) is not None


async def test_registry_outage_is_retried_and_recovers(
    kube: KubeEmulator, hub: HubDouble, start_operator: StartOperator, tmp_path: Path
) -> None:
    port = free_port()
    token_file = tmp_path / "registry-token"
    token_file.write_text("registry-admin-token-for-tests-0123456789")
    await start_operator(
        registry_url=f"http://127.0.0.1:{port}",
        registry_token=token_file.read_text(),
        hub=hub,
    )
    await create(kube, example())
    down = await eventually(
        lambda: has("Registered", "False", "RegistryUnavailable")(kube), what="RegistryUnavailable"
    )
    assert f"127.0.0.1:{port}" in down["message"]
    ready = condition(kube.stored(CITYAPPS, NS, NAME), "Ready")
    assert ready is not None and ready["status"] == "False"
    # the workload and the OIDC client did not wait for the registry
    assert kube.stored("apps/v1/deployments", NS, NAME) is not None
    assert "transport.bus-tracker" in hub.clients

    running = await start_registry(
        RegistrySettings(
            data_dir=tmp_path / "registry",
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}",
            admin_token_file=token_file,
            port=port,
        )
    )
    try:
        await registered(kube)
    finally:
        await running.stop()


async def test_hub_outage_is_retried_and_recovers(
    kube: KubeEmulator, registry: RunningRegistry, start_operator: StartOperator
) -> None:
    port = free_port()
    await start_operator(
        registry_url=registry.url,
        registry_token=registry.admin_token,
        hub_url=f"http://127.0.0.1:{port}",
    )
    await create(kube, example())
    down = await eventually(
        lambda: has("IdentityProvisioned", "False", "HubUnavailable")(kube), what="HubUnavailable"
    )
    assert "identity hub" in down["message"]
    assert kube.stored("apps/v1/deployments", NS, NAME) is not None
    assert has("Registered", "True")(kube)

    hub = await start_hub_double(port)
    try:
        # the operator was started without the double's token: it is told the hub refuses it
        await eventually(
            lambda: has("IdentityProvisioned", "False", "HubError")(kube), what="401 reported"
        )
    finally:
        await hub.stop()


async def test_hub_comes_back_and_the_client_is_provisioned(
    kube: KubeEmulator, registry: RunningRegistry, start_operator: StartOperator
) -> None:
    port = free_port()
    hub = HubDouble()
    await start_operator(
        registry_url=registry.url,
        registry_token=registry.admin_token,
        hub=hub,
        hub_url=f"http://127.0.0.1:{port}",
    )
    await create(kube, example())
    await eventually(lambda: has("IdentityProvisioned", "False", "HubUnavailable")(kube))
    await hub.start(port)
    try:
        await eventually(
            lambda: has("IdentityProvisioned", "True", "Provisioned")(kube), what="provisioned"
        )
        ready = has("Ready", "False", "Progressing")(kube)
        assert ready and ready["message"].startswith("WorkloadReady:")  # only pods are missing
        assert kube.stored("v1/secrets", NS, f"{NAME}-oidc") is not None
    finally:
        await hub.stop()


async def test_registry_name_taken_by_someone_else_is_reported(
    kube: KubeEmulator, registry: RunningRegistry, hub: HubDouble, start_operator: StartOperator
) -> None:
    from cityplane.client import RegistryClient
    from cityplane.schema import CityService

    async with RegistryClient(registry.url, registry.admin_token) as client:
        await client.create_service(
            CityService.model_validate(
                {
                    "metadata": {"name": "transport-bus-tracker"},
                    "spec": {
                        "upstream": {"targets": [{"url": "http://legacy:9000"}]},
                        "routes": [{"name": "all", "match": {"pathPrefix": "/legacy/"}}],
                    },
                }
            )
        )
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token, hub=hub)
    await create(kube, example())
    taken = await eventually(lambda: has("Registered", "False", "NameTaken")(kube))
    assert "cityplane.io/registry-name" in taken["message"]
    async with RegistryClient(registry.url, registry.admin_token) as client:
        kept = await client.get_service("transport-bus-tracker")
    assert kept is not None and kept.spec.routes[0].name == "all"

    await patch(kube, {"metadata": {"annotations": {"cityplane.io/registry-name": "bus-tracker"}}})
    await eventually(lambda: has("Registered", "True")(kube), what="registered under a new name")


async def test_metrics_and_healthz_are_served(
    kube: KubeEmulator, registry: RunningRegistry, hub: HubDouble, start_operator: StartOperator
) -> None:
    port = free_port()
    await start_operator(
        registry_url=registry.url,
        registry_token=registry.admin_token,
        hub=hub,
        health_port=port,
        health_host="127.0.0.1",
    )
    await create(kube, example())
    await registered(kube)
    async with ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
        async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    assert 'cityplane_operator_reconciles_total{handler="create",result="ok"} 1.0' in text
    assert "cityplane_operator_reconcile_duration_seconds_count" in text
