"""CityService resources in the registry: the operator against kmock's emulator and the real
registry (SQLite): register, update, drift, delete, invalid specs, outages, names taken."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml
from aiohttp import ClientSession

from cityplane.client import RegistryClient
from cityplane.schema import CityService, ServiceSpec
from operators.services import ServiceRef, owned, render_registry_service
from registry.app import RegistrySettings, RunningRegistry, start_registry
from tests.operators.conftest import StartOperator, eventually, eventually_async, free_port
from tests.operators.kube_emulator import KubeEmulator

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "k8s" / "cityservice-bus-times.yaml"
CITYSERVICES = "cityplane.io/v1alpha1/cityservices"
NS, NAME = "transport", "bus-times"
REGISTRY_NAME = f"{NS}-{NAME}"  # <namespace>-<name>, as for CityApps
BASE = f"/apis/cityplane.io/v1alpha1/namespaces/{NS}/cityservices"


@pytest.fixture
async def kube() -> AsyncIterator[KubeEmulator]:
    """The emulator with the CityService resource registered (its status subresource too)."""
    emulator = KubeEmulator.with_cityplane()
    emulator.resources[CITYSERVICES] = kmock.ResourceInfo(
        kind="CityService",
        singular="cityservice",
        namespaced=True,
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        subresources={"status"},
    )
    async with emulator, kmock.Server(emulator):
        yield emulator


def example() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    return document


def stored(kube: KubeEmulator, name: str = NAME) -> dict[str, Any] | None:
    return kube.stored(CITYSERVICES, NS, name)


def condition(kube: KubeEmulator, type_: str, name: str = NAME) -> dict[str, Any] | None:
    for each in ((stored(kube, name) or {}).get("status") or {}).get("conditions") or []:
        if each["type"] == type_:
            return dict(each)
    return None


def has(kube: KubeEmulator, type_: str, status: str, reason: str | None = None) -> Any:
    found = condition(kube, type_)
    if found and found["status"] == status and (reason is None or found["reason"] == reason):
        return found
    return None


async def create(kube: KubeEmulator, document: dict[str, Any]) -> None:
    async with kube.post(BASE, json=document) as resp:
        assert resp.status in (200, 201), await resp.text()


async def patch(kube: KubeEmulator, changes: dict[str, Any]) -> None:
    async with kube.patch(
        f"{BASE}/{NAME}",
        json=changes,
        headers={"Content-Type": "application/merge-patch+json"},
    ) as resp:
        assert resp.status == 200, await resp.text()


async def registered(kube: KubeEmulator) -> dict[str, Any]:
    return await eventually(
        lambda: has(kube, "Registered", "True") and stored(kube), what="Registered=True"
    )


async def entry(registry: RunningRegistry, name: str = REGISTRY_NAME) -> CityService | None:
    async with RegistryClient(registry.url, registry.admin_token) as client:
        return await client.get_service(name)


def as_written(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec in the registry's written form (durations normalized, defaults left out)."""
    return ServiceSpec.model_validate(spec).model_dump(mode="json", exclude_unset=True)


# --- the translation, without Kubernetes -----------------------------------------------------


def test_every_spec_field_goes_to_the_registry_unchanged() -> None:
    spec = {
        "version": "v2beta",
        "lifecycle": "deprecated",
        "sunset": "2031-01-01T00:00:00Z",
        "deprecatedSince": "2030-01-01T00:00:00Z",
        "owner": "org-transport",
        "upstream": {
            "targets": [{"url": "https://legacy.example.org:8443", "weight": 3}],
            "loadBalancing": "consistent-hash",
            "hashOn": "header:X-Citizen",
            "healthCheck": {
                "path": "/ping",
                "interval": "2s",
                "timeout": "500ms",
                "healthyThreshold": 1,
                "unhealthyThreshold": 4,
                "passiveFailures": 0,
                "ejectionTime": "10s",
                "active": False,
            },
            "timeouts": {"connect": "250ms", "request": "30s"},
            "retries": {"attempts": 0, "budgetPercent": 5.0, "minRetryConcurrency": 1},
            "circuitBreaker": None,
            "instances": {"ttl": "20s", "removeAfter": "90s"},
        },
        "routes": [
            {
                "name": "read",
                "match": {"pathPrefix": "/bus/", "methods": ["GET"], "host": "bus.example.org"},
                "stripPrefix": True,
                "auth": {"required": True, "scopes": ["bus:read"], "minTrustLevel": 2},
                "rateLimit": {
                    "requests": 5,
                    "window": "1s",
                    "key": "header:X-Key",
                    "onStoreError": "closed",
                },
            },
            {"name": "exact", "match": {"path": "/bus/now"}, "auth": None, "rateLimit": None},
        ],
    }
    ref = ServiceRef(NAME, NS, labels={"department": "transport"})
    document = render_registry_service(ref, copy.deepcopy(spec))
    written = document.model_dump(mode="json", exclude_unset=True)
    assert written["spec"] == spec
    assert written["metadata"] == {
        "name": REGISTRY_NAME,
        "labels": {
            "department": "transport",
            "cityplane.io/namespace": NS,
            "cityplane.io/cityservice": NAME,
        },
    }


def test_owner_defaults_to_the_annotation_then_the_namespace_and_reserved_labels_are_dropped() -> (
    None
):
    spec = example()["spec"]
    plain = render_registry_service(ServiceRef(NAME, NS), spec)
    assert plain.spec.owner == NS
    ref = ServiceRef(
        NAME,
        NS,
        labels={"cityplane.io/cityapp": "someone-else", "cityplane.io/namespace": "parks"},
        annotations={"cityplane.io/owner": "org-transport"},
    )
    annotated = render_registry_service(ref, spec)
    assert annotated.spec.owner == "org-transport"
    assert annotated.metadata.labels == {
        "cityplane.io/namespace": NS,
        "cityplane.io/cityservice": NAME,
    }


def test_only_entries_marked_for_this_very_resource_are_its_own() -> None:
    spec = example()["spec"]
    ref = ServiceRef(NAME, NS)
    mine = render_registry_service(ref, spec)
    assert owned(mine, ref)
    a_cityapps = mine.model_copy(
        update={
            "metadata": mine.metadata.model_copy(
                update={"labels": {"cityplane.io/namespace": NS, "cityplane.io/cityapp": NAME}}
            )
        }
    )
    by_hand = mine.model_copy(update={"metadata": mine.metadata.model_copy(update={"labels": {}})})
    assert not owned(a_cityapps, ref) and not owned(by_hand, ref)
    # the same registry name claimed from another namespace through the annotation
    other = ServiceRef(NAME, "parks", annotations={"cityplane.io/registry-name": REGISTRY_NAME})
    assert render_registry_service(other, spec).metadata.name == REGISTRY_NAME
    assert not owned(mine, other)


# --- the operator -----------------------------------------------------------------------------


async def test_creating_a_cityservice_registers_its_spec_as_written(
    kube: KubeEmulator, registry: RunningRegistry, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token)
    await create(kube, example())

    service = await registered(kube)
    assert "cityplane.io/finalizer" in service["metadata"]["finalizers"]
    status = service["status"]
    assert status["observedGeneration"] == 1 and status["registryName"] == REGISTRY_NAME
    ready = condition(kube, "Ready")
    assert ready is not None and ready["status"] == "True", ready
    assert "2 route(s)" in ready["message"]
    # what the gateways get: the registry's snapshot
    async with (
        ClientSession() as session,
        session.get(
            f"{registry.url}/v1/snapshot",
            headers={"Authorization": f"Bearer {registry.admin_token}"},
        ) as resp,
    ):
        snapshot = await resp.json()
    [document] = [s for s in snapshot["services"] if s["metadata"]["name"] == REGISTRY_NAME]
    assert document["spec"] == as_written({**example()["spec"], "owner": NS})
    assert document["metadata"]["labels"] == {
        "department": "transport",
        "cityplane.io/namespace": NS,
        "cityplane.io/cityservice": NAME,
    }


async def test_updating_a_cityservice_replaces_its_registry_entry(
    kube: KubeEmulator, registry: RunningRegistry, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token)
    await create(kube, example())
    await registered(kube)
    before = await entry(registry)
    assert before is not None

    routes = copy.deepcopy(example()["spec"]["routes"])
    routes[0]["match"]["pathPrefix"] = "/bus/v2/"
    await patch(kube, {"spec": {"routes": routes}, "metadata": {"labels": {"tier": "gold"}}})
    await eventually(
        lambda: (stored(kube) or {}).get("status", {}).get("observedGeneration") == 2,
        what="generation 2 observed",
    )

    after = await entry(registry)
    assert after is not None
    assert after.metadata.resourceVersion != before.metadata.resourceVersion
    assert after.spec.routes[0].match.pathPrefix == "/bus/v2/"
    assert after.metadata.labels["tier"] == "gold"
    registered_now = condition(kube, "Registered")
    assert registered_now is not None
    assert f"resourceVersion {after.metadata.resourceVersion}" in registered_now["message"]


async def registry_requests(registry: RunningRegistry) -> dict[str, float]:
    """``cityplane_registry_requests_total`` by method, from the registry's own /metrics."""
    async with ClientSession() as session, session.get(f"{registry.url}/metrics") as resp:
        text = await resp.text()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("cityplane_registry_requests_total{"):
            method = line.split('method="', 1)[1].split('"', 1)[0]
            counts[method] = counts.get(method, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


async def test_drift_check_that_finds_nothing_writes_nothing(
    kube: KubeEmulator, registry: RunningRegistry, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token)
    await create(kube, example())
    await registered(kube)
    before = await registry_requests(registry)
    polls = [before]

    async def two_more_checks() -> bool:
        polls.append(await registry_requests(registry))
        # each earlier read of /metrics is a GET too: k reads after `before`, k GETs of ours
        theirs = polls[-1].get("GET", 0) - before.get("GET", 0) - (len(polls) - 1)
        return theirs >= 2

    await eventually_async(two_more_checks, what="two drift checks")
    after = polls[-1]
    writes = ("POST", "PUT", "DELETE")
    assert {m: after.get(m, 0) for m in writes} == {m: before.get(m, 0) for m in writes}


async def test_registry_entry_deleted_behind_the_operators_back_is_put_back(
    kube: KubeEmulator, registry: RunningRegistry, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token)
    await create(kube, example())
    await registered(kube)

    async with RegistryClient(registry.url, registry.admin_token) as client:
        await client.delete_service(REGISTRY_NAME)

    async def restored() -> bool:
        return await entry(registry) is not None

    await eventually_async(restored, what="the entry put back by the drift check")


async def test_entry_retired_by_hand_is_reported_not_fought(
    kube: KubeEmulator, registry: RunningRegistry, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token)
    await create(kube, example())
    await registered(kube)
    async with RegistryClient(registry.url, registry.admin_token) as client:
        await client.transition(REGISTRY_NAME, "retired")

    # the resource still says published; retired -> published is a transition the registry
    # refuses, so the drift check reports it (until the resource says retired too)
    invalid = await eventually(
        lambda: has(kube, "Ready", "False", "InvalidSpec"), what="the refused transition"
    )
    assert "retired" in invalid["message"], invalid
    kept = await entry(registry)
    assert kept is not None and kept.spec.lifecycle == "retired"

    await patch(kube, {"spec": {"lifecycle": "retired"}})
    ready = await eventually(lambda: has(kube, "Ready", "True"), what="Ready again")
    assert "not routed while the lifecycle is retired" in ready["message"]


async def test_drift_check_undoes_an_edit_of_the_registry_entry(
    kube: KubeEmulator, registry: RunningRegistry, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token)
    await create(kube, example())
    await registered(kube)
    live = await entry(registry)
    assert live is not None
    routes = [r.model_copy(update={"stripPrefix": False}) for r in live.spec.routes]
    async with RegistryClient(registry.url, registry.admin_token) as client:
        await client.replace_service(
            live.model_copy(update={"spec": live.spec.model_copy(update={"routes": routes})})
        )

    async def undone() -> bool:
        again = await entry(registry)
        return again is not None and again.spec.routes[0].stripPrefix is True

    await eventually_async(undone, what="the route edit undone")


async def test_deleting_a_cityservice_removes_its_registry_entry(
    kube: KubeEmulator, registry: RunningRegistry, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token)
    await create(kube, example())
    await registered(kube)

    async with kube.delete(f"{BASE}/{NAME}") as resp:
        assert resp.status == 200
    await eventually(lambda: stored(kube) is None, what="the CityService to go")
    assert await entry(registry) is None


async def test_route_without_match_gets_ready_false_naming_the_field_and_recovers(
    kube: KubeEmulator, registry: RunningRegistry, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token)
    document = example()
    del document["spec"]["routes"][1]["match"]
    await create(kube, document)

    ready = await eventually(lambda: has(kube, "Ready", "False", "InvalidSpec"), what="invalid")
    assert "spec.routes.1.match: Field required" in ready["message"]
    registered_now = condition(kube, "Registered")
    assert registered_now is not None and registered_now["status"] == "Unknown"
    assert await entry(registry) is None
    warnings = [
        obj.raw
        for (resource, _, _), obj in kube.objects.items()
        if resource.plural == "events"
        and not obj.deleted
        and obj.raw.get("reason") == "InvalidSpec"
        and obj.raw.get("involvedObject", {}).get("kind") == "CityService"
    ]
    assert warnings and warnings[0]["type"] == "Warning"

    await patch(kube, {"spec": {"routes": example()["spec"]["routes"]}})
    await registered(kube)
    assert await entry(registry) is not None


async def test_unknown_field_is_refused_and_the_last_good_entry_kept(
    kube: KubeEmulator, registry: RunningRegistry, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token)
    await create(kube, example())
    await registered(kube)

    # kmock validates nothing: a typo'd field reaches the operator, as it would without the CRD
    await patch(kube, {"spec": {"upstream": {"retry": {"attempts": 9}}}})
    ready = await eventually(lambda: has(kube, "Ready", "False", "InvalidSpec"), what="invalid")
    assert "spec.upstream.retry: Extra inputs are not permitted" in ready["message"]
    kept = await entry(registry)
    assert kept is not None and kept.spec.upstream.retries.attempts == 2
    assert (stored(kube) or {})["status"]["registryName"] == REGISTRY_NAME


async def test_registry_outage_is_retried_and_recovers(
    kube: KubeEmulator, start_operator: StartOperator, tmp_path: Path
) -> None:
    port = free_port()
    token_file = tmp_path / "registry-token"
    token_file.write_text("registry-admin-token-for-tests-0123456789")
    await start_operator(
        registry_url=f"http://127.0.0.1:{port}", registry_token=token_file.read_text()
    )
    await create(kube, example())
    down = await eventually(
        lambda: has(kube, "Registered", "False", "RegistryUnavailable"), what="unavailable"
    )
    assert f"127.0.0.1:{port}" in down["message"]
    ready = condition(kube, "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == (
        "False",
        "RegistryUnavailable",
    )

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
        assert await entry(running) is not None
    finally:
        await running.stop()


async def test_name_taken_by_a_service_the_operator_does_not_own_is_left_alone(
    kube: KubeEmulator, registry: RunningRegistry, start_operator: StartOperator
) -> None:
    async with RegistryClient(registry.url, registry.admin_token) as client:
        await client.create_service(
            CityService.model_validate(
                {
                    "metadata": {"name": REGISTRY_NAME},
                    "spec": {
                        "upstream": {"targets": [{"url": "http://legacy:9000"}]},
                        "routes": [{"name": "all", "match": {"pathPrefix": "/legacy/"}}],
                    },
                }
            )
        )
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token)
    await create(kube, example())

    taken = await eventually(lambda: has(kube, "Registered", "False", "NameTaken"), what="taken")
    assert "cityplane.io/registry-name" in taken["message"]
    ready = condition(kube, "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", "NameTaken")
    kept = await entry(registry)
    assert kept is not None and [r.name for r in kept.spec.routes] == ["all"]

    await patch(kube, {"metadata": {"annotations": {"cityplane.io/registry-name": "bus-times"}}})
    await eventually(lambda: has(kube, "Registered", "True"), what="registered under a new name")
    assert await entry(registry, "bus-times") is not None
    # deleting the resource removes its own entry, never the one it did not own
    async with kube.delete(f"{BASE}/{NAME}") as resp:
        assert resp.status == 200
    await eventually(lambda: stored(kube) is None, what="the CityService to go")
    assert await entry(registry, "bus-times") is None
    assert await entry(registry) is not None


async def test_changing_the_registry_name_moves_the_entry(
    kube: KubeEmulator, registry: RunningRegistry, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token)
    await create(kube, example())
    await registered(kube)

    await patch(kube, {"metadata": {"annotations": {"cityplane.io/registry-name": "bus-times"}}})
    await eventually(
        lambda: (stored(kube) or {}).get("status", {}).get("registryName") == "bus-times",
        what="the new name in the status",
    )
    assert await entry(registry, "bus-times") is not None
    assert await entry(registry) is None


async def test_a_name_that_is_no_registry_name_asks_for_the_annotation(
    kube: KubeEmulator, registry: RunningRegistry, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token)
    document = example()
    document["metadata"]["name"] = "bus.times"  # a valid Kubernetes name, not a registry name
    await create(kube, document)

    def invalid() -> dict[str, Any] | None:
        found = condition(kube, "Ready", name="bus.times")
        return found if found and found["reason"] == "InvalidSpec" else None

    ready = await eventually(invalid, what="invalid name")
    assert "cityplane.io/registry-name" in ready["message"]
