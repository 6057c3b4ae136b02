"""The operator against kmock's emulator, the real registry and the hub double: create,
update, rotate, drift, delete."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml

from cityplane.client import RegistryClient
from registry.app import RunningRegistry
from tests.operators.conftest import StartOperator, eventually
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
        lambda: condition(kube.get(CITYAPPS, NS, NAME), "Registered"), what="Registered"
    )
    assert app["status"] == "True"
    deployment = kube.get("apps/v1/deployments", NS, NAME)
    assert deployment is not None
    owner = deployment["metadata"]["ownerReferences"][0]
    assert (
        owner["kind"] == "CityApp"
        and owner["uid"] == kube.get(CITYAPPS, NS, NAME)["metadata"]["uid"]
    )
    for plural in (
        "v1/services",
        "autoscaling/v2/horizontalpodautoscalers",
        "policy/v1/poddisruptionbudgets",
        "networking.k8s.io/v1/networkpolicies",
    ):
        assert kube.get(plural, NS, NAME) is not None, plural
    secret = kube.get("v1/secrets", NS, f"{NAME}-oidc")
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
    status = kube.get(CITYAPPS, NS, NAME)["status"]
    assert status["observedGeneration"] == 1
    ready = condition(kube.get(CITYAPPS, NS, NAME), "Ready")
    assert ready is not None and ready["status"] == "False" and ready["reason"] == "Progressing"
