"""The account page as its owner uses it: sign in, add an authenticator app, see which apps read
my data, revoke a consent; and logout reaching the apps (back-channel logout)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import jwt
import pyotp
import pytest
from aiohttp import web

from identity.app import RunningIdentity
from tests.identity.conftest import CALLBACK, FormBrowser, pkce, sign_in

pytestmark = pytest.mark.timeout(60)


def _field(page: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]+)"', page)
    assert found, page[:1500]
    return found.group(1)


async def _sign_in_to_account(browser: FormBrowser, username: str, password: str) -> str:
    """GET /account, sign in on the page it sends us to, land back on /account."""
    status, location, page = await browser.get("/account")
    for _ in range(6):
        if status in (302, 303):
            if location.endswith("/account") or location == "/account":
                status, location, page = await browser.get(location)
                return page
            status, location, page = await browser.get(location)
            continue
        form = {
            "csrf": _field(page, "csrf"),
            "flow": _field(page, "flow"),
            "action": "password",
            "username": username,
            "password": password,
        }
        status, location, page = await browser.post("/login", form)
    raise AssertionError(f"not back on /account: {status} {location}")


async def test_citizen_adds_an_authenticator_app_and_it_works_for_step_up(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    page = await _sign_in_to_account(browser, "citizen1", "demo-citizen-1")
    assert 'id="who"' in page
    status, _, page = await browser.get("/account/totp")
    assert status == 200
    secret = re.search(r'id="totp-secret">([A-Z2-7]+)<', page)
    assert secret and "<svg" in page
    wrong = {"csrf": _field(page, "csrf"), "code": "000000"}
    _, location, _ = await browser.post("/account/totp", wrong)
    assert location == "/account/totp?failed=1"
    ok = {"csrf": _field(page, "csrf"), "code": pyotp.TOTP(secret.group(1)).now()}
    _, location, _ = await browser.post("/account/totp", ok)
    assert location == "/account"
    account = await hub.hub.store.account_by_username("citizen1")
    assert account is not None and account.totp_secret == secret.group(1)
    actions = {e["action"] for e in await hub.hub.audit.entries(subject=account.id)}
    assert "account.totp_enrolled" in actions


async def test_account_page_shows_which_apps_read_my_data_and_consent_can_be_revoked(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    _, tokens = await sign_in(
        hub, browser, {"password": ("citizen1", "demo-citizen-1")}, scope="openid profile"
    )
    access = tokens["access_token"]
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{hub.issuer}/userinfo", headers={"Authorization": f"Bearer {access}"}) as r,
    ):
        assert r.status == 200
    status, _, page = await browser.get("/account")
    assert status == 200
    log = page[page.index('id="access-log"') :]
    assert "demo-web" in log and "userinfo.read" in log and "token.issued" in log
    consents = page[page.index('id="consents"') : page.index('id="access-log"')]
    assert "demo-web" in consents
    await browser.post(
        "/account/consents/revoke", {"csrf": _field(page, "csrf"), "client_id": "demo-web"}
    )
    _, _, page = await browser.get("/account")
    consents = page[page.index('id="consents"') : page.index('id="access-log"')]
    assert "demo-web" not in consents
    # the next sign-in asks for consent again
    walk = await browser.authorize(
        {},
        response_type="code",
        client_id="demo-web",
        redirect_uri=CALLBACK,
        scope="openid profile",
        code_challenge=pkce()[1],
        code_challenge_method="S256",
    )
    assert walk.steps == ["consent"]


async def test_logout_ends_the_session_and_tells_the_apps_over_the_back_channel(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    received: list[dict[str, Any]] = []

    async def backchannel(request: web.Request) -> web.Response:
        form = await request.post()
        received.append(jwt.decode(str(form["logout_token"]), options={"verify_signature": False}))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/backchannel", backchannel)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        admin = {"Authorization": f"Bearer {hub.admin_token}"}
        spec = {
            "name": "Library",
            "redirect_uris": [CALLBACK],
            "scopes": ["openid"],
            "backchannel_logout_uri": f"http://127.0.0.1:{port}/backchannel",
            "post_logout_redirect_uris": ["http://localhost:8765/bye"],
        }
        async with (
            aiohttp.ClientSession() as http,
            http.put(f"{hub.issuer}/admin/clients/library", json=spec, headers=admin) as r,
        ):
            assert r.status == 201
        _, challenge = pkce()
        await browser.authorize(
            {"password": ("citizen1", "demo-citizen-1")},
            response_type="code",
            client_id="library",
            redirect_uri=CALLBACK,
            scope="openid",
            code_challenge=challenge,
            code_challenge_method="S256",
        )
        _, _, page = await browser.get("/account")
        _, location, _ = await browser.post("/logout", {"csrf": _field(page, "csrf")})
        for _ in range(50):
            if received:
                break
            await asyncio.sleep(0.05)
        assert received, "no back-channel logout token arrived"
        token = received[0]
        assert token["aud"] == "library" and token["iss"] == hub.issuer
        assert "http://schemas.openid.net/event/backchannel-logout" in token["events"]
        assert token["sid"] and token["sub"]
        status, location, _ = await browser.get("/account")
        assert status == 302 and location.startswith("/login")  # signed out
    finally:
        await runner.cleanup()
