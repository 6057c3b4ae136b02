"""Federation: a peer hub (here: a "national" platform, another CityPlane hub) as a sign-in
method. Its acr is mapped to a local level; the local account is made on first sign-in and found
again by (issuer, subject) afterwards."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jwt
import pytest

from identity.app import RunningIdentity, start_identity
from identity.hub import IdentitySettings
from tests.identity.conftest import CALLBACK, FormBrowser, basic, demo_secret, pkce

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def hubs(tmp_path: Path) -> AsyncIterator[tuple[RunningIdentity, RunningIdentity]]:
    national = await start_identity(
        IdentitySettings(port=0, data_dir=tmp_path / "national", demo=True)
    )
    # The city hub runs on "localhost" so the two hubs' cookies stay apart (cookies ignore ports).
    port = _free_port()
    city_issuer = f"http://localhost:{port}"
    admin = {"Authorization": f"Bearer {national.admin_token}"}
    spec = {
        "name": "City of Example (federation)",
        "redirect_uris": [f"{city_issuer}/login/federated/callback"],
        "scopes": ["openid", "profile"],
        "grant_types": ["authorization_code"],
    }
    async with (
        aiohttp.ClientSession() as http,
        http.put(f"{national.issuer}/admin/clients/city-example", json=spec, headers=admin) as r,
    ):
        secret = (await r.json())["client_secret"]
    provider = {
        "id": "national",
        "name": "National identity platform",
        "issuer": national.issuer,
        "client_id": "city-example",
        "client_secret": secret,
        "acr_values": "urn:cityplane:loa:2",
        "acr_map": {"urn:cityplane:loa:2": 2, "urn:cityplane:loa:3": 2, "urn:cityplane:loa:4": 2},
    }
    city = await start_identity(
        IdentitySettings(
            host="localhost",
            port=port,
            data_dir=tmp_path / "city",
            demo=True,
            federation=[provider],
        )
    )
    try:
        yield national, city
    finally:
        await city.stop()
        await national.stop()


async def _federated_sign_in(
    national: RunningIdentity, city: RunningIdentity, otp_ahead: int = 0
) -> tuple[list[str], dict]:
    browser = FormBrowser(city.issuer, national.issuer)
    try:
        verifier, challenge = pkce()
        walk = await browser.authorize(
            {
                "federated": "national",
                "password": ("citizen2", "demo-citizen-2"),
                "choose": "otp",
                "otp": ("citizen2", otp_ahead),
            },
            response_type="code",
            client_id="demo-web",
            redirect_uri=CALLBACK,
            scope="openid profile",
            code_challenge=challenge,
            code_challenge_method="S256",
        )
    finally:
        await browser.close()
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{city.issuer}/token",
            headers=basic("demo-web", demo_secret(city)),
            data={
                "grant_type": "authorization_code",
                "code": walk.query["code"],
                "redirect_uri": CALLBACK,
                "code_verifier": verifier,
            },
        ) as r,
    ):
        tokens = await r.json()
        assert r.status == 200, tokens
    return walk.steps, jwt.decode(tokens["id_token"], options={"verify_signature": False})


async def test_peer_hub_sign_in_maps_its_acr_to_a_local_level(
    hubs: tuple[RunningIdentity, RunningIdentity],
) -> None:
    national, city = hubs
    steps, claims = await _federated_sign_in(national, city)
    # at the city: choose the national platform; there: password + second factor (it was asked
    # for level 2) and consent; back at the city: consent
    assert steps == ["fed", "password", "choose", "otp", "consent", "consent"]
    assert claims["acr"] == "urn:cityplane:loa:2"
    assert claims["amr"] == ["fed"]
    assert claims["name"] == "Han Meimei"
    # the second time, the same local account
    _, again = await _federated_sign_in(national, city, otp_ahead=1)
    assert again["sub"] == claims["sub"]


async def test_a_callback_this_hub_did_not_start_is_refused(
    hubs: tuple[RunningIdentity, RunningIdentity],
) -> None:
    _, city = hubs
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{city.issuer}/login/federated/callback?code=stolen&state=guess") as r,
    ):
        assert r.status == 400
        assert "does not belong" in await r.text()
