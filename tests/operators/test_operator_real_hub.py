"""The wiring test the operator waited for: a CityApp provisions its OIDC client at the REAL
identity hub (not the contract double), the Secret's credentials work there, a rotation makes
the old secret stop working, and deleting the CityApp removes the client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from identity.app import RunningIdentity, start_identity
from identity.hub import IdentitySettings
from registry.app import RunningRegistry
from tests.operators.conftest import StartOperator, eventually
from tests.operators.kube_emulator import CITYAPPS, KubeEmulator
from tests.operators.test_operator_lifecycle import NAME, NS, create, example, patch, secret_value

pytestmark = pytest.mark.timeout(60)
CLIENT_ID = "transport.bus-tracker"


@pytest.fixture
async def real_hub(tmp_path: Path) -> AsyncIterator[RunningIdentity]:
    running = await start_identity(IdentitySettings(port=0, data_dir=tmp_path / "hub"))
    try:
        yield running
    finally:
        await running.stop()


async def _discovery(url: str) -> dict[str, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 200
        return dict(await r.json())


async def test_cityapp_client_lives_at_the_real_hub_and_its_secret_works(
    kube: KubeEmulator,
    registry: RunningRegistry,
    real_hub: RunningIdentity,
    start_operator: StartOperator,
) -> None:
    await start_operator(
        registry_url=registry.url,
        registry_token=registry.admin_token,
        hub_url=real_hub.issuer,
        hub_token=real_hub.admin_token,
    )
    await create(kube, example())
    secret = await eventually(
        lambda: kube.stored("v1/secrets", NS, f"{NAME}-oidc"), what="the OIDC Secret"
    )
    assert secret_value(secret, "client_id") == CLIENT_ID
    assert secret_value(secret, "issuer") == real_hub.issuer
    discovery = await _discovery(secret_value(secret, "discovery_url"))
    assert discovery["issuer"] == real_hub.issuer
    client = await real_hub.hub.store.client(CLIENT_ID)
    assert client is not None
    assert client.check_client_secret(secret_value(secret, "client_secret"))
    spec = example()["spec"]["identity"]
    assert client.spec.redirect_uris == spec["redirectUris"]

    first = secret_value(secret, "client_secret")
    await patch(kube, {"metadata": {"annotations": {"cityplane.io/rotate-secret": "1"}}})

    def rotated() -> dict | None:
        now = kube.stored("v1/secrets", NS, f"{NAME}-oidc")
        return now if now and secret_value(now, "client_secret") != first else None

    secret = await eventually(rotated, what="a rotated secret")
    real_hub.hub.store._client_cache.clear()  # the hub's 5 s client cache, not the point here
    client = await real_hub.hub.store.client(CLIENT_ID)
    assert client is not None
    assert client.check_client_secret(secret_value(secret, "client_secret"))
    assert not client.check_client_secret(first)

    async with kube.delete(f"/apis/cityplane.io/v1alpha1/namespaces/{NS}/cityapps/{NAME}") as r:
        assert r.status in (200, 202)
    await eventually(lambda: kube.stored(CITYAPPS, NS, NAME) is None or None, what="the finalizer")
    real_hub.hub.store._client_cache.clear()
    assert await real_hub.hub.store.client(CLIENT_ID) is None
