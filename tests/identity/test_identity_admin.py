"""The hub's admin API (docs/identity-api.md) and the registry dogfooding the hub: an
organization and its engineer made through the admin API, the engineer's user token acting for
the organization manages that organization's services in the registry — and only those."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from identity.app import RunningIdentity
from registry.app import RegistrySettings, RunningRegistry, start_registry
from tests.conftest import service
from tests.identity.conftest import CALLBACK, FormBrowser, basic, demo_secret, sign_in

pytestmark = pytest.mark.timeout(60)


def _admin(hub: RunningIdentity) -> dict[str, str]:
    return {"Authorization": f"Bearer {hub.admin_token}"}


async def _call(
    method: str, url: str, headers: dict[str, str], body: Any = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, json=body, headers=headers) as r,
    ):
        text = await r.text()
        try:
            return r.status, await r.json(content_type=None)
        except ValueError:
            return r.status, text


async def test_client_admin_api_create_update_rotate_delete(hub: RunningIdentity) -> None:
    url = f"{hub.issuer}/admin/clients/parking-app"
    spec = {"name": "Parking", "redirect_uris": [CALLBACK], "scopes": ["openid"]}
    status, created = await _call("PUT", url, _admin(hub), spec)
    assert status == 201 and created["client_secret"]
    status, updated = await _call("PUT", url, _admin(hub), {**spec, "name": "Parking (new)"})
    assert status == 200 and "client_secret" not in updated and updated["name"] == "Parking (new)"
    status, rotated = await _call("POST", url + "/secret", _admin(hub))
    assert status == 200 and rotated["client_secret"] != created["client_secret"]
    status, _ = await _call("DELETE", url, _admin(hub))
    assert status == 204
    status, problem = await _call("DELETE", url, _admin(hub))
    assert status == 404 and problem["status"] == 404


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"name": "x", "redirect_uris": ["https://a/cb"], "colour": "red"}, 422, "colour"),
        ({"name": "x", "public": True, "grant_types": ["client_credentials"]}, 422, "public"),
        ({"name": "x", "redirect_uris": ["https://a/*"]}, 422, "redirect_uris"),
    ],
)
async def test_bad_client_specs_are_refused_with_the_field(
    hub: RunningIdentity, body: dict[str, Any], status: int, fragment: str
) -> None:
    got, problem = await _call("PUT", f"{hub.issuer}/admin/clients/bad-one", _admin(hub), body)
    assert got == status and fragment in problem["detail"]


async def test_admin_api_needs_the_admin_token_or_the_admin_scope(hub: RunningIdentity) -> None:
    url = f"{hub.issuer}/admin/clients"
    status, _ = await _call("GET", url, {})
    assert status == 401
    status, _ = await _call("GET", url, {"Authorization": "Bearer nope"})
    assert status == 401
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{hub.issuer}/token",
            headers=basic("demo-web", demo_secret(hub)),
            data={"grant_type": "client_credentials", "scope": "bus:read"},
        ) as r,
    ):
        machine = (await r.json())["access_token"]
    status, problem = await _call("GET", url, {"Authorization": f"Bearer {machine}"})
    assert status == 403 and "identity:admin" in problem["detail"]


async def test_accounts_need_a_strong_unique_password_and_name(hub: RunningIdentity) -> None:
    url = f"{hub.issuer}/admin/accounts"
    weak = {"username": "zhao", "display_name": "Zhao", "password": "password"}
    status, problem = await _call("POST", url, _admin(hub), weak)
    assert status == 422 and problem["type"].endswith("weak-password")
    taken = {"username": "citizen1", "display_name": "X", "password": "a-long-river-stone-93"}
    status, _ = await _call("POST", url, _admin(hub), taken)
    assert status == 409


@pytest.fixture
async def registry(hub: RunningIdentity, tmp_path: Path) -> AsyncIterator[RunningRegistry]:
    running = await start_registry(
        RegistrySettings(port=0, data_dir=tmp_path / "registry", issuer=hub.issuer)
    )
    try:
        yield running
    finally:
        await running.stop()


async def test_an_engineer_acting_for_an_organization_manages_only_its_services(
    hub: RunningIdentity, registry: RunningRegistry, browser: FormBrowser
) -> None:
    admin = _admin(hub)
    assert (
        await _call(
            "PUT", f"{hub.issuer}/admin/organizations/org-water", admin, {"name": "Water Works"}
        )
    )[0] == 201
    account = {
        "username": "engineer",
        "display_name": "Liu Yang",
        "password": "a-long-river-stone-93",
    }
    assert (await _call("POST", f"{hub.issuer}/admin/accounts", admin, account))[0] == 201
    status, member = await _call(
        "PUT",
        f"{hub.issuer}/admin/organizations/org-water/members/engineer",
        admin,
        {"roles": ["developer"]},
    )
    assert status == 200 and member["roles"] == ["developer"]

    _, tokens = await sign_in(
        hub,
        browser,
        {"password": ("engineer", "a-long-river-stone-93"), "consent": "org-water"},
        scope="openid registry:write",
    )
    token = tokens["access_token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["org"] == "org-water" and claims["org_roles"] == ["developer"]

    as_engineer = {"Authorization": f"Bearer {token}"}
    pipes = service(
        "pipes", ["http://127.0.0.1:9"], [{"name": "all", "match": {"pathPrefix": "/pipes/"}}]
    )
    status, stored = await _call("PUT", f"{registry.url}/v1/services/pipes", as_engineer, pipes)
    assert status == 201 and stored["spec"]["owner"] == "org-water"
    buses = service(
        "buses",
        ["http://127.0.0.1:9"],
        [{"name": "all", "match": {"pathPrefix": "/buses/"}}],
        owner="org-transport",
    )
    status, problem = await _call("PUT", f"{registry.url}/v1/services/buses", as_engineer, buses)
    assert status == 403 and "org-transport" in problem["detail"]


@pytest.mark.parametrize(
    ("path", "headers", "status", "slug"),
    [
        ("/authorize?x=" + "a" * 9000, {}, 414, "uri-too-long"),
        ("/healthz", {"X-Big": "b" * 9000}, 431, "headers-too-large"),
    ],
)
async def test_oversized_requests_get_problem_json_not_a_traceback(
    hub: RunningIdentity,
    path: str,
    headers: dict[str, str],
    status: int,
    slug: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with aiohttp.ClientSession() as http, http.get(hub.issuer + path, headers=headers) as r:
        assert r.status == status
        assert r.content_type == "application/problem+json"
        assert (await r.json())["type"].endswith(slug)
    assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text
