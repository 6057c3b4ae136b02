"""The sign-in pages in a real headless Chromium (Debian's), as a person uses them: a full
step-up from level 1 to level 3, a passkey registered on the account page and then used to sign
in, and the Chinese pages."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import jwt
import pytest
from playwright.async_api import Page, Route, expect

from identity.app import RunningIdentity, start_identity
from identity.demo import DEMO_ACCOUNTS
from identity.hub import IdentitySettings

pytest.register_assert_rewrite("tests.browser")
from tests.browser import virtual_authenticator  # noqa: E402
from tests.conftest import service  # noqa: E402
from tests.identity.conftest import CALLBACK, basic, demo_secret, pkce, totp_now  # noqa: E402

pytest_plugins = ["tests.browser"]
pytestmark = pytest.mark.timeout(90)
CITIZEN2 = next(a for a in DEMO_ACCOUNTS if a["username"] == "citizen2")


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[RunningIdentity]:
    # WebAuthn needs a domain as relying-party id (never an IP address): serve on "localhost".
    running = await start_identity(
        IdentitySettings(host="localhost", port=0, data_dir=tmp_path, demo=True)
    )
    try:
        yield running
    finally:
        await running.stop()


class RelyingParty:
    """The demo client's callback, answered inside the browser (nothing listens on 8765)."""

    def __init__(self, hub: RunningIdentity) -> None:
        self.hub = hub
        self.codes: list[str] = []
        self.access_token = ""

    async def attach(self, page: Page) -> None:
        async def callback(route: Route) -> None:
            query = parse_qs(urlsplit(route.request.url).query)
            self.codes.append(query.get("code", [""])[0])
            await route.fulfill(status=200, content_type="text/html", body="<p id=rp>back</p>")

        await page.route("http://localhost:8765/**", callback)

    def authorize_url(self, verifier_challenge: tuple[str, str], **extra: str) -> str:
        params = {
            "response_type": "code",
            "client_id": "demo-web",
            "redirect_uri": CALLBACK,
            "scope": "openid profile",
            "state": "st",
            "code_challenge": verifier_challenge[1],
            "code_challenge_method": "S256",
            **extra,
        }
        return f"{self.hub.issuer}/authorize?{urlencode(params)}"

    async def tokens(self, verifier: str) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{self.hub.issuer}/token",
                data={
                    "grant_type": "authorization_code",
                    "code": self.codes[-1],
                    "redirect_uri": CALLBACK,
                    "code_verifier": verifier,
                },
                headers=basic("demo-web", demo_secret(self.hub)),
            ) as r,
        ):
            body = await r.json()
            assert r.status == 200, body
        self.access_token = body["access_token"]
        return jwt.decode(body["id_token"], options={"verify_signature": False})


async def _password(page: Page, username: str, password: str) -> None:
    await page.fill("#username", username)
    await page.fill("#password", password)
    await page.click("#submit")


async def _call_gateway(url: str, token: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        return r.status, r.headers.get("WWW-Authenticate", "")


async def test_step_up_from_level_one_to_level_three_in_chromium(
    hub: RunningIdentity, page: Page, upstreams: Any, gateway_factory: Any
) -> None:
    """The loop of issue #3's acceptance, in a real browser: a level-1 token on a level-3 route
    gets the RFC 9470 challenge; the app re-authorizes with the challenge's acr_values; the person
    adds only the second factor and real-name verification; the new token passes."""
    up = await upstreams("permits")
    route = {"name": "apply", "match": {"pathPrefix": "/permits/"}, "auth": {"minTrustLevel": 3}}
    gw = await gateway_factory([service("permits", [up.url], [route])], issuer=hub.issuer)
    rp = RelyingParty(hub)
    await rp.attach(page)
    first = pkce()
    await page.goto(rp.authorize_url(first))
    assert await page.inner_text("#client-name") == "Demo city web app"
    await _password(page, "citizen2", "demo-citizen-2")
    await page.click("#allow")
    await page.wait_for_selector("#rp")
    assert (await rp.tokens(first[0]))["acr"] == "urn:cityplane:loa:1"
    status, challenge = await _call_gateway(gw.url + "/permits/new", rp.access_token)
    assert status == 401 and 'error="insufficient_user_authentication"' in challenge
    acr = challenge.split('acr_values="')[1].split('"')[0]

    second = pkce()
    await page.goto(rp.authorize_url(second, acr_values=acr))
    # no password again: the page asks for one more factor, the person picks the app code
    await page.click("#method-otp")
    await page.fill("#code", totp_now("citizen2"))
    await page.click("#submit")
    await page.fill("#name", CITIZEN2["real_name"])
    await page.fill("#resident_id", CITIZEN2["resident_id"])
    await page.click("#submit")
    await page.wait_for_selector("#rp")
    claims = await rp.tokens(second[0])
    assert claims["acr"] == "urn:cityplane:loa:3"
    assert {"pwd", "otp"} <= set(claims["amr"])
    assert (await _call_gateway(gw.url + "/permits/new", rp.access_token))[0] == 200


async def test_wrong_resident_id_is_explained_on_the_page(hub: RunningIdentity, page: Page) -> None:
    rp = RelyingParty(hub)
    await rp.attach(page)
    await page.goto(rp.authorize_url(pkce(), acr_values="urn:cityplane:loa:3"))
    await _password(page, "citizen2", "demo-citizen-2")
    await page.click("#method-otp")
    await page.fill("#code", totp_now("citizen2"))
    await page.click("#submit")
    await page.fill("#name", CITIZEN2["real_name"])
    await page.fill("#resident_id", CITIZEN2["resident_id"][:17] + "0")
    await page.click("#submit")
    message = await page.inner_text("#message")
    assert "check" in message.lower()


async def test_passkey_added_on_the_account_page_signs_in_at_level_two(
    hub: RunningIdentity, page: Page
) -> None:
    authenticator = await virtual_authenticator(page)
    await page.goto(f"{hub.issuer}/account")
    await _password(page, "citizen1", "demo-citizen-1")
    await page.wait_for_selector("#passkey-count")
    assert await page.inner_text("#passkey-count") == "0"
    await page.click("#add-passkey")
    await expect(page.locator("#passkey-count")).to_have_text("1")
    assert len(await authenticator.credentials()) == 1
    await page.click("#sign-out")

    rp = RelyingParty(hub)
    await rp.attach(page)
    verifier = pkce()
    await page.goto(rp.authorize_url(verifier, acr_values="urn:cityplane:loa:2"))
    await page.click("#passkey-login")  # usernameless: the authenticator names the account
    await page.click("#allow")
    await page.wait_for_selector("#rp")
    claims = await rp.tokens(verifier[0])
    assert claims["acr"] == "urn:cityplane:loa:2"
    assert "hwk" in claims["amr"] and claims["preferred_username"] == "citizen1"


async def test_the_pages_speak_chinese(hub: RunningIdentity, page: Page) -> None:
    rp = RelyingParty(hub)
    await page.goto(rp.authorize_url(pkce()))
    await page.click("#lang-zh")
    assert await page.inner_text("h1") == "登录"
    assert await page.get_attribute("html", "lang") == "zh-CN"
    # the choice sticks (cookie) for the next page
    await _password(page, "citizen1", "wrong-password")
    assert await page.inner_text("#message") == "用户名或密码不正确。"


async def test_every_form_field_has_a_label(hub: RunningIdentity, page: Page) -> None:
    await page.goto(RelyingParty(hub).authorize_url(pkce()))
    unlabeled = await page.evaluate(
        """() => [...document.querySelectorAll('input:not([type=hidden]), select')]
              .filter(el => !document.querySelector(`label[for="${el.id}"]`)).map(el => el.name)"""
    )
    assert unlabeled == []
    csp = json.dumps(
        await page.evaluate("() => document.querySelectorAll('script:not([src])').length")
    )
    assert csp == "0"  # no inline script: the CSP forbids it
