"""The operator against kmock's emulator, the real registry and the hub double: create,
update, rotate, drift, delete."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

from cityplane.client import RegistryClient
from operators.handlers import Timing
from registry.app import RunningRegistry
from tests.operators.conftest import StartOperator, eventually, eventually_async
from tests.operators.hub_double import HubDouble
from tests.operators.kube_emulator import CITYAPPS, KubeEmulator

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "k8s" / "cityapp-bus-tracker.yaml"
NS, NAME = "transport", "bus-tracker"


def example() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    return document


def condition(app: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for each in ((app or {}).get("status") or {}).get("conditions") or []:
        if each["type"] == type_:
            return dict(each)
    return None


def secret_value(secret: dict[str, Any], key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


async def create(kube: KubeEmulator, document: dict[str, Any]) -> None:
    async with kube.post(
        f"/apis/{CITYAPPS.replace('/cityapps', '')}/namespaces/{NS}/cityapps", json=document
    ) as resp:
        assert resp.status in (200, 201), await resp.text()


async def patch(kube: KubeEmulator, changes: dict[str, Any], name: str = NAME) -> None:
    async with kube.patch(
        f"/apis/cityplane.io/v1alpha1/namespaces/{NS}/cityapps/{name}",
        json=changes,
        headers={"Content-Type": "application/merge-patch+json"},
    ) as resp:
        assert resp.status == 200, await resp.text()


async def test_creating_a_cityapp_deploys_registers_and_provisions_it(
    kube: KubeEmulator, registry: RunningRegistry, hub: HubDouble, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token, hub=hub)
    await create(kube, example())

    app = await eventually(
        lambda: condition(kube.stored(CITYAPPS, NS, NAME), "Registered"), what="Registered"
    )
    assert app["status"] == "True"
    deployment = kube.stored("apps/v1/deployments", NS, NAME)
    assert deployment is not None
    owner = deployment["metadata"]["ownerReferences"][0]
    assert (
        owner["kind"] == "CityApp"
        and owner["uid"] == kube.stored(CITYAPPS, NS, NAME)["metadata"]["uid"]
    )
    for plural in (
        "v1/services",
        "autoscaling/v2/horizontalpodautoscalers",
        "policy/v1/poddisruptionbudgets",
        "networking.k8s.io/v1/networkpolicies",
    ):
        assert kube.stored(plural, NS, NAME) is not None, plural
    secret = kube.stored("v1/secrets", NS, f"{NAME}-oidc")
    assert secret is not None
    assert secret_value(secret, "client_id") == "transport.bus-tracker"
    assert secret_value(secret, "client_secret") == hub.secrets["transport.bus-tracker"]
    assert secret_value(secret, "issuer") == hub.issuer
    async with RegistryClient(registry.url, registry.admin_token) as client:
        stored = await client.get_service("transport-bus-tracker")
    assert stored is not None
    assert stored.spec.owner == "org-transport"
    assert (
        stored.spec.upstream.targets[0].url == "http://bus-tracker.transport.svc.cluster.local:8080"
    )
    assert [r.name for r in stored.spec.routes] == ["live", "report"]
    status = kube.stored(CITYAPPS, NS, NAME)["status"]
    assert status["observedGeneration"] == 1
    ready = condition(kube.stored(CITYAPPS, NS, NAME), "Ready")
    assert ready is not None and ready["status"] == "False" and ready["reason"] == "Progressing"


async def registered(kube: KubeEmulator, name: str = NAME) -> dict[str, Any]:
    return await eventually(
        lambda: (
            (c := condition(kube.stored(CITYAPPS, NS, name), "Registered"))
            and c["status"] == "True"
            and kube.stored(CITYAPPS, NS, name)
        ),
        what="the app to be registered",
    )


async def test_updating_a_cityapp_patches_its_objects_and_registry_entry(
    kube: KubeEmulator, registry: RunningRegistry, hub: HubDouble, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token, hub=hub)
    await create(kube, example())
    await registered(kube)

    routes = copy.deepcopy(example()["spec"]["routes"])
    routes[0]["match"]["pathPrefix"] = "/tracker/v2/"
    await patch(
        kube,
        {
            "spec": {
                "autoscaling": {"maxReplicas": 20},
                "env": [
                    {"name": "LOG_LEVEL", "value": "debug"},
                    {"name": "REGION", "value": "north"},
                ],
                "routes": routes,
            }
        },
    )

    def updated() -> bool:
        app = kube.stored(CITYAPPS, NS, NAME) or {}
        return (app.get("status") or {}).get("observedGeneration") == 2

    await eventually(updated, what="generation 2 to be observed")
    hpa = kube.stored("autoscaling/v2/horizontalpodautoscalers", NS, NAME)
    assert hpa is not None and hpa["spec"]["maxReplicas"] == 20
    deployment = kube.stored("apps/v1/deployments", NS, NAME)
    assert deployment is not None
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["LOG_LEVEL"] == "debug" and env["REGION"] == "north"
    async with RegistryClient(registry.url, registry.admin_token) as client:
        stored = await client.get_service("transport-bus-tracker")
    assert stored is not None and stored.spec.routes[0].match.pathPrefix == "/tracker/v2/"
    # the OIDC client was updated in place, its secret kept
    secret = kube.stored("v1/secrets", NS, f"{NAME}-oidc")
    assert secret is not None
    assert secret_value(secret, "client_secret") == hub.secrets["transport.bus-tracker"]
    assert [m for m, p in hub.requests if p.endswith("/secret")] == []


async def test_app_turns_ready_once_its_pods_are_and_drift_is_corrected(
    kube: KubeEmulator, registry: RunningRegistry, hub: HubDouble, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token, hub=hub)
    await create(kube, example())
    await registered(kube)

    # what the deployment controller would report once two pods are ready
    path = f"/apis/apps/v1/namespaces/{NS}/deployments/{NAME}"
    deployment = kube.stored("apps/v1/deployments", NS, NAME)
    assert deployment is not None
    generation = deployment["metadata"]["generation"]
    async with kube.patch(
        path + "/status",
        json={
            "status": {
                "observedGeneration": generation,
                "readyReplicas": 2,
                "updatedReplicas": 2,
                "replicas": 2,
            }
        },
    ) as resp:
        assert resp.status == 200
    ready = await eventually(
        lambda: (
            (c := condition(kube.stored(CITYAPPS, NS, NAME), "Ready"))
            and c["status"] == "True"
            and c
        ),
        what="Ready=True",
    )
    assert ready["reason"] == "Ready"

    # someone edits the Deployment by hand: the drift check puts the image back
    async with kube.patch(
        path,
        json={
            "spec": {
                "template": {
                    "spec": {"containers": [{"name": "app", "image": "evil/miner:latest"}]}
                }
            }
        },
    ) as resp:
        assert resp.status == 200

    def image() -> str:
        live = kube.stored("apps/v1/deployments", NS, NAME) or {}
        return str(live["spec"]["template"]["spec"]["containers"][0]["image"])

    await eventually(lambda: image() == example()["spec"]["image"], what="the image restored")
    # and the registry entry, deleted behind the operator's back, comes back
    async with RegistryClient(registry.url, registry.admin_token) as client:
        await client.delete_service("transport-bus-tracker")

    async def probe() -> bool:
        async with RegistryClient(registry.url, registry.admin_token) as client:
            return await client.get_service("transport-bus-tracker") is not None

    await eventually_async(probe, what="the registry entry restored")


async def test_rotation_annotation_rotates_the_secret_and_rolls_the_pods(
    kube: KubeEmulator, registry: RunningRegistry, hub: HubDouble, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token, hub=hub)
    await create(kube, example())
    await registered(kube)
    first = hub.secrets["transport.bus-tracker"]

    def template_revision() -> str:
        live = kube.stored("apps/v1/deployments", NS, NAME) or {}
        return str(
            live["spec"]["template"]["metadata"]["annotations"]["cityplane.io/oidc-secret-revision"]
        )

    assert template_revision() == "1"

    await patch(kube, {"metadata": {"annotations": {"cityplane.io/rotate-secret": "2026-11-21"}}})

    def rotated() -> bool:
        secret = kube.stored("v1/secrets", NS, f"{NAME}-oidc") or {}
        return bool(secret) and secret_value(secret, "client_secret") != first

    await eventually(rotated, what="a new secret in the Secret")
    secret = kube.stored("v1/secrets", NS, f"{NAME}-oidc")
    assert secret is not None
    assert secret_value(secret, "client_secret") == hub.secrets["transport.bus-tracker"]
    await eventually(lambda: template_revision() == "2", what="the pod template to roll")
    # the same annotation value again (drift checks, resumes) rotates nothing more
    rotations = len([p for _, p in hub.requests if p.endswith("/secret")])
    await patch(kube, {"spec": {"env": [{"name": "LOG_LEVEL", "value": "warn"}]}})
    await eventually(
        lambda: (
            (kube.stored(CITYAPPS, NS, NAME) or {}).get("status", {}).get("observedGeneration") == 2
        ),
        what="generation 2",
    )
    assert len([p for _, p in hub.requests if p.endswith("/secret")]) == rotations


async def test_lost_secret_is_replaced_with_a_new_one(
    kube: KubeEmulator, registry: RunningRegistry, hub: HubDouble, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token, hub=hub)
    await create(kube, example())
    await registered(kube)
    first = hub.secrets["transport.bus-tracker"]
    async with kube.delete(f"/api/v1/namespaces/{NS}/secrets/{NAME}-oidc") as resp:
        assert resp.status == 200

    def replaced() -> bool:
        secret = kube.stored("v1/secrets", NS, f"{NAME}-oidc") or {}
        return (
            bool(secret)
            and secret_value(secret, "client_secret") == hub.secrets["transport.bus-tracker"]
        )

    await eventually(replaced, what="a new Secret")
    assert hub.secrets["transport.bus-tracker"] != first


async def test_deleting_a_cityapp_removes_its_registry_entry_and_oidc_client(
    kube: KubeEmulator, registry: RunningRegistry, hub: HubDouble, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token, hub=hub)
    await create(kube, example())
    app = await registered(kube)
    assert "cityplane.io/finalizer" in app["metadata"]["finalizers"]

    async with kube.delete(f"/apis/cityplane.io/v1alpha1/namespaces/{NS}/cityapps/{NAME}") as resp:
        assert resp.status == 200
    await eventually(lambda: kube.stored(CITYAPPS, NS, NAME) is None, what="the CityApp to go")
    assert "transport.bus-tracker" not in hub.clients
    async with RegistryClient(registry.url, registry.admin_token) as client:
        assert await client.get_service("transport-bus-tracker") is None


async def test_removing_identity_deletes_the_client_and_its_secret(
    kube: KubeEmulator, registry: RunningRegistry, hub: HubDouble, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token, hub=hub)
    await create(kube, example())
    await registered(kube)
    await patch(kube, {"spec": {"identity": None}})

    await eventually(
        lambda: kube.stored("v1/secrets", NS, f"{NAME}-oidc") is None, what="no Secret"
    )
    assert "transport.bus-tracker" not in hub.clients
    identity = await eventually(
        lambda: (
            (c := condition(kube.stored(CITYAPPS, NS, NAME), "IdentityProvisioned"))
            and c["reason"] == "NotRequested"
            and c
        ),
        what="IdentityProvisioned=NotRequested",
    )
    assert identity["status"] == "True"
    deployment = kube.stored("apps/v1/deployments", NS, NAME)
    assert deployment is not None
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    assert not [e for e in env if e["name"].startswith("CITYPLANE_OIDC_")]


async def test_a_restarted_operator_resumes_and_repairs(
    kube: KubeEmulator, registry: RunningRegistry, hub: HubDouble, start_operator: StartOperator
) -> None:
    slow = Timing(drift_interval=60, retry_delay=0.2, max_retry_delay=0.5)
    await start_operator(
        registry_url=registry.url, registry_token=registry.admin_token, hub=hub, timing=slow
    )
    await create(kube, example())
    await registered(kube)
    await start_operator.stop_all()  # type: ignore[attr-defined]
    async with kube.delete(f"/api/v1/namespaces/{NS}/services/{NAME}") as resp:
        assert resp.status == 200

    await start_operator(
        registry_url=registry.url, registry_token=registry.admin_token, hub=hub, timing=slow
    )
    await eventually(lambda: kube.stored("v1/services", NS, NAME) is not None, what="resume")


async def test_public_client_gets_no_secret_and_a_draft_is_not_routed(
    kube: KubeEmulator, registry: RunningRegistry, hub: HubDouble, start_operator: StartOperator
) -> None:
    await start_operator(registry_url=registry.url, registry_token=registry.admin_token, hub=hub)
    document = example()
    document["spec"]["lifecycle"] = "draft"
    document["spec"]["identity"] = {
        "redirectUris": ["http://localhost:3000/cb"],
        "publicClient": True,
    }
    await create(kube, document)
    await registered(kube)
    secret = kube.stored("v1/secrets", NS, f"{NAME}-oidc")
    assert secret is not None and "client_secret" not in secret["data"]
    assert hub.clients["transport.bus-tracker"]["public"] is True
    routes = condition(kube.stored(CITYAPPS, NS, NAME), "RoutesProgrammed")
    assert routes is not None and (routes["status"], routes["reason"]) == ("False", "Draft")


async def test_a_namespaced_operator_leaves_other_namespaces_alone(
    kube: KubeEmulator, registry: RunningRegistry, hub: HubDouble, start_operator: StartOperator
) -> None:
    kube.namespaces.update({NS, "parks"})
    await start_operator(
        registry_url=registry.url, registry_token=registry.admin_token, hub=hub, namespace=NS
    )
    elsewhere = example()
    elsewhere["metadata"]["namespace"] = "parks"
    async with kube.post(
        "/apis/cityplane.io/v1alpha1/namespaces/parks/cityapps", json=elsewhere
    ) as resp:
        assert resp.status == 200
    await create(kube, example())
    await registered(kube)
    assert kube.stored("apps/v1/deployments", "parks", NAME) is None
    assert kube.stored(CITYAPPS, "parks", NAME).get("status") is None
