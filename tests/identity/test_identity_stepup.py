"""Trust levels and step-up as a relying party and a person see them: only the missing methods
are asked for, requests can raise but never lower a client's level, and the gateway's RFC 9470
challenge is answered end to end."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import jwt
import pytest

from identity.app import RunningIdentity
from identity.demo import DEMO_ACCOUNTS
from tests.conftest import service
from tests.identity.conftest import CALLBACK, FormBrowser, basic, pkce, sign_in

pytestmark = pytest.mark.timeout(60)
CITIZEN2 = next(a for a in DEMO_ACCOUNTS if a["username"] == "citizen2")
REALNAME = (CITIZEN2["real_name"], CITIZEN2["resident_id"])


async def _sign_in(
    hub: RunningIdentity, browser: FormBrowser, answers: dict[str, Any], **extra: str
) -> tuple[list[str], dict[str, Any]]:
    walk, tokens = await sign_in(hub, browser, answers, scope="openid profile bus:read", **extra)
    return walk.steps, jwt.decode(tokens["access_token"], options={"verify_signature": False}) | {
        "_raw": tokens["access_token"]
    }


async def test_level_one_session_steps_up_to_three_asking_only_for_what_is_missing(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    answers = {
        "password": ("citizen2", "demo-citizen-2"),
        "choose": "otp",
        "otp": "citizen2",
        "realname": REALNAME,
    }
    steps, token = await _sign_in(hub, browser, answers)
    assert steps == ["password", "consent"] and token["acr"] == "urn:cityplane:loa:1"
    steps, token = await _sign_in(hub, browser, answers, acr_values="urn:cityplane:loa:3")
    # the password is not asked again: a second factor (the person chooses which), then real-name
    assert steps == ["choose", "otp", "realname"]
    assert token["acr"] == "urn:cityplane:loa:3"
    assert {"pwd", "otp"} <= set(token["amr"])


async def test_request_cannot_lower_the_clients_minimum_level(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    admin = {"Authorization": f"Bearer {hub.admin_token}"}
    spec = {
        "name": "Tax office",
        "redirect_uris": [CALLBACK],
        "scopes": ["openid"],
        "min_trust_level": 2,
    }
    async with (
        aiohttp.ClientSession() as http,
        http.put(f"{hub.issuer}/admin/clients/tax-office", json=spec, headers=admin) as r,
    ):
        assert r.status == 201
        secret = (await r.json())["client_secret"]
    verifier, challenge = pkce()
    walk = await browser.authorize(
        {"password": ("citizen2", "demo-citizen-2"), "choose": "otp", "otp": "citizen2"},
        response_type="code",
        client_id="tax-office",
        redirect_uri=CALLBACK,
        scope="openid",
        acr_values="urn:cityplane:loa:1",
        code_challenge=challenge,
        code_challenge_method="S256",
    )
    assert walk.steps == ["password", "choose", "otp", "consent"]
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{hub.issuer}/token",
            data={
                "grant_type": "authorization_code",
                "code": walk.query["code"],
                "redirect_uri": CALLBACK,
                "code_verifier": verifier,
            },
            headers=basic("tax-office", secret),
        ) as r,
    ):
        tokens = await r.json()
    assert jwt.decode(tokens["id_token"], options={"verify_signature": False})["acr"] == (
        "urn:cityplane:loa:2"
    )


async def test_essential_acr_the_hub_cannot_reach_fails_with_the_standard_error(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    claims = '{"id_token": {"acr": {"essential": true, "values": ["urn:elsewhere:loa:9"]}}}'
    _, challenge = pkce()
    walk = await browser.authorize(
        {},
        response_type="code",
        client_id="demo-web",
        redirect_uri=CALLBACK,
        scope="openid",
        state="st",
        claims=claims,
        code_challenge=challenge,
        code_challenge_method="S256",
    )
    assert walk.query["error"] == "unmet_authentication_requirements"
    assert walk.query["state"] == "st"


async def test_level_no_method_of_the_account_can_reach_is_unmet(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    # citizen1 has only a password: level 2 is out of reach, and the hub says so.
    _, challenge = pkce()
    walk = await browser.authorize(
        {"password": ("citizen1", "demo-citizen-1")},
        response_type="code",
        client_id="demo-web",
        redirect_uri=CALLBACK,
        scope="openid",
        acr_values="urn:cityplane:loa:2",
        code_challenge=challenge,
        code_challenge_method="S256",
    )
    assert walk.query["error"] == "unmet_authentication_requirements"


async def test_max_age_zero_asks_for_the_password_again(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    answers = {"password": ("citizen1", "demo-citizen-1")}
    await _sign_in(hub, browser, answers)
    steps, token = await _sign_in(hub, browser, answers, max_age="0")
    assert steps == ["password"]
    assert token["acr"] == "urn:cityplane:loa:1"


async def test_prompt_none_without_a_session_is_login_required(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    _, challenge = pkce()
    walk = await browser.authorize(
        {},
        response_type="code",
        client_id="demo-web",
        redirect_uri=CALLBACK,
        scope="openid",
        prompt="none",
        code_challenge=challenge,
        code_challenge_method="S256",
    )
    assert walk.query["error"] == "login_required"


async def test_one_real_name_identity_links_to_one_account_only(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    # citizen3 is verified with its own identity; claiming citizen2's works once, for citizen2.
    answers = {
        "password": ("citizen2", "demo-citizen-2"),
        "choose": "otp",
        "otp": "citizen2",
        "realname": REALNAME,
    }
    await _sign_in(hub, browser, answers, acr_values="urn:cityplane:loa:3")
    account3 = await hub.hub.store.account_by_username("citizen3")
    assert account3 is not None
    from identity.store import DuplicateError
    from identity.trust.resident_id import parse_resident_id

    fingerprint = parse_resident_id(REALNAME[1]).fingerprint(hub.hub.pepper)
    with pytest.raises(DuplicateError):
        await hub.hub.store.update_account(account3.id, resident_fingerprint=fingerprint)


async def test_wrong_passwords_are_throttled_per_account(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    _, location, _ = await browser.get(
        "/authorize?response_type=code&client_id=demo-web&scope=openid&redirect_uri="
        + CALLBACK
        + "&code_challenge="
        + pkce()[1]
        + "&code_challenge_method=S256"
    )
    messages = []
    for _ in range(7):
        _, _, page = await browser.get(location)
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        flow = re.search(r'name="flow" value="([^"]+)"', page)
        assert csrf and flow
        await browser.post(
            "/login",
            {
                "csrf": csrf.group(1),
                "flow": flow.group(1),
                "action": "password",
                "username": "citizen1",
                "password": "wrong",
            },
        )
        _, _, page = await browser.get(location)
        messages.append(re.search(r'id="message">([^<]*)<', page).group(1))
    assert messages[0] == "The username or password is not right."
    assert messages[-1].startswith("Too many attempts.")


async def test_audit_log_chain_is_intact_after_logins_and_admin_changes(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    await _sign_in(hub, browser, {"password": ("citizen1", "demo-citizen-1")})
    admin = {"Authorization": f"Bearer {hub.admin_token}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{hub.issuer}/admin/audit/verify", headers=admin) as r,
    ):
        assert await r.json() == {"intact": True, "first_bad_entry": None}
    actions = {e["action"] for e in await hub.hub.audit.entries(limit=100)}
    assert {"login.password", "consent.granted", "login.authorized", "token.issued"} <= actions


async def test_gateway_step_up_loop_from_challenge_to_a_passing_token(
    hub: RunningIdentity, browser: FormBrowser, upstreams: Any, gateway_factory: Any
) -> None:
    up = await upstreams("permits")
    route = {
        "name": "apply",
        "match": {"pathPrefix": "/permits/"},
        "auth": {"scopes": ["bus:read"], "minTrustLevel": 3},
    }
    gw = await gateway_factory(
        [service("permits", [up.url], [route])], issuer=hub.issuer, audience="demo-web"
    )
    answers = {
        "password": ("citizen2", "demo-citizen-2"),
        "choose": "otp",
        "otp": "citizen2",
        "realname": REALNAME,
    }
    _, token = await _sign_in(hub, browser, answers)
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            gw.url + "/permits/new", headers={"Authorization": f"Bearer {token['_raw']}"}
        ) as r,
    ):
        assert r.status == 401
        challenge = r.headers["WWW-Authenticate"]
    assert 'error="insufficient_user_authentication"' in challenge
    acr = re.search(r'acr_values="([^"]+)"', challenge).group(1)
    assert acr == "urn:cityplane:loa:3"
    steps, token = await _sign_in(hub, browser, answers, acr_values=acr)
    assert steps == ["choose", "otp", "realname"]
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            gw.url + "/permits/new", headers={"Authorization": f"Bearer {token['_raw']}"}
        ) as r,
    ):
        assert r.status == 200
        seen = await r.json()
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-cityplane-level"] == "3"
    assert headers["x-cityplane-client"] == "demo-web"


async def test_level_four_needs_a_face_match_bound_to_the_device_it_was_made_on(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    answers = {"password": ("citizen4", "demo-citizen-4"), "choose": "otp", "otp": "citizen4"}
    steps, token = await _sign_in(hub, browser, answers, acr_values="urn:cityplane:loa:4")
    assert steps == ["password", "choose", "otp", "face", "consent"]
    assert token["acr"] == "urn:cityplane:loa:4" and "face" in token["amr"]
    # The session cookie alone, on another device: the face match does not come along.
    other = FormBrowser(hub.issuer)
    try:
        for cookie in browser.http.cookie_jar:
            if cookie.key.endswith("cityplane_session"):
                other.http.cookie_jar.update_cookies({cookie.key: cookie.value})
        steps, token = await _sign_in(hub, other, answers, acr_values="urn:cityplane:loa:4")
        assert steps == ["face"]
        assert token["acr"] == "urn:cityplane:loa:4"
    finally:
        await other.close()


async def _to_factor_page(browser: FormBrowser, method: str) -> str:
    """Sign citizen2 in for level 2 and stop on the `method` page; return its URL."""
    _, challenge = pkce()
    _, location, _ = await browser.get(
        "/authorize?response_type=code&client_id=demo-web&scope=openid&redirect_uri="
        + CALLBACK
        + "&acr_values=urn:cityplane:loa:2&code_challenge="
        + challenge
        + "&code_challenge_method=S256"
    )
    _, _, page = await browser.get(location)
    await browser.post(
        "/login",
        {
            "csrf": re.search(r'name="csrf" value="([^"]+)"', page).group(1),
            "flow": re.search(r'name="flow" value="([^"]+)"', page).group(1),
            "action": "password",
            "username": "citizen2",
            "password": "demo-citizen-2",
        },
    )
    return f"{location}&method={method}"


async def _submit_code(browser: FormBrowser, page_url: str, action: str, code: str) -> str:
    _, _, page = await browser.get(page_url)
    _, location, _ = await browser.post(
        "/login",
        {
            "csrf": re.search(r'name="csrf" value="([^"]+)"', page).group(1),
            "flow": re.search(r'name="flow" value="([^"]+)"', page).group(1),
            "action": action,
            "code": code,
        },
    )
    _, _, after = await browser.get(location)
    message = re.search(r'id="message">([^<]*)<', after)
    return message.group(1) if message else ""


async def test_sms_code_from_the_outbox_completes_the_second_factor(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    url = await _to_factor_page(browser, "sms")
    _, _, page = await browser.get(url)
    assert "+86 138****0002" in page or "138****0002" in page
    outbox = hub.hub.settings.data_dir / "identity" / "sms-outbox.jsonl"
    code = re.findall(r"code: (\d{6})", outbox.read_text())[-1]
    assert await _submit_code(browser, url, "sms", code) == ""
    _, location, page = await browser.get(url.replace("&method=sms", ""))
    assert 'id="consent-form"' in page or location.startswith(CALLBACK)


async def test_second_factor_guessing_is_throttled(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    url = await _to_factor_page(browser, "otp")
    messages = [await _submit_code(browser, url, "otp", "000000") for _ in range(7)]
    assert messages[0] == "That code is not right or has expired."
    assert messages[-1].startswith("Too many attempts.")
