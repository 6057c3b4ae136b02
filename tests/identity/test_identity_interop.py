"""The hub against an independent OpenID Connect client library (idpyoidc, not the Authlib the
hub is built on): code + PKCE, ID token validation, userinfo, refresh and RP-initiated logout,
all driven by idpyoidc's own relying-party code (issue #3 acceptance).

idpyoidc is synchronous and does its own HTTP with `requests`; every call into it runs in a
thread so the in-process hub's event loop keeps answering."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from cryptojwt.exception import BadSignature
from idpyoidc.client.client_auth import ClientAuthnMethod
from idpyoidc.client.exception import OidcServiceError
from idpyoidc.client.oauth2.stand_alone_client import StandAloneClient
from idpyoidc.message import Message
from idpyoidc.message.oidc import AtHashError

from identity.app import RunningIdentity, start_identity
from identity.hub import IdentitySettings
from tests.identity.conftest import CALLBACK, SPA_CALLBACK, FormBrowser, demo_secret

pytestmark = pytest.mark.timeout(30)

WEB_HOME = "http://localhost:8765/"  # demo-web's registered post_logout_redirect_uri
CITIZEN1 = {"password": ("citizen1", "demo-citizen-1")}  # level 1: password only

SERVICES = {
    name: {"class": f"idpyoidc.client.oidc.{module}"}
    for name, module in {
        "discovery": "provider_info_discovery.ProviderInfoDiscovery",
        "authorization": "authorization.Authorization",
        "access_token": "access_token.AccessToken",
        "refresh_access_token": "refresh_access_token.RefreshAccessToken",
        "userinfo": "userinfo.UserInfo",
        "end_session": "end_session.EndSession",
    }.items()
}
PKCE_S256 = {
    "pkce": {
        "function": "idpyoidc.client.oauth2.add_on.pkce.add_support",
        "kwargs": {"code_challenge_length": 64, "code_challenge_method": "S256"},
    }
}

T = TypeVar("T")


async def off_loop(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """idpyoidc blocks on `requests`; the hub answers on this thread's event loop."""
    return await asyncio.to_thread(call, *args, **kwargs)


class PublicClientAuthn(ClientAuthnMethod):
    """Token endpoint auth method `none`, which idpyoidc does not ship: a public client does not
    authenticate, it names itself with client_id in the body (RFC 6749 §2.3, §3.2.1)."""

    def construct(
        self,
        request: Message,
        service: Any = None,
        http_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        request["client_id"] = service.upstream_get("context").get_client_id()
        return http_args or {}


async def discovery_document(hub: RunningIdentity) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{hub.issuer}/.well-known/openid-configuration") as r,
    ):
        doc: dict[str, Any] = await r.json()
        return doc


async def relying_party(
    hub: RunningIdentity,
    client_id: str = "demo-web",
    *,
    discover: bool = True,
    logout_redirect: bool = True,
    scope: str = "openid profile email offline_access",
) -> StandAloneClient:
    """An idpyoidc RP statically registered as one of the demo clients.

    With discover=True (the default) idpyoidc fetches and checks the discovery document itself
    (OIDC Discovery 1.0 §3, §4.3); discover=False hands it over as static provider info."""
    public = client_id != "demo-web"
    config: dict[str, Any] = {
        "issuer": hub.issuer,
        "client_id": client_id,
        "client_type": "oidc",
        "redirect_uris": [SPA_CALLBACK if public else CALLBACK],
        "preference": {
            "response_types": ["code"],
            "scopes_supported": scope.split(),
            "token_endpoint_auth_method": "client_secret_basic",
        },
        # the refresh service has no authn methods of its own; these are the client's, for all
        "client_authn_methods": {"none": PublicClientAuthn} if public else ["client_secret_basic"],
        "add_ons": PKCE_S256,
    }
    if not public:
        config["client_secret"] = demo_secret(hub, client_id)
    if logout_redirect and not public:
        config["post_logout_redirect_uris"] = [WEB_HOME]
    if not discover:
        doc = await discovery_document(hub)
        config["provider_info"] = {**doc, "keys": {"url": {doc["issuer"]: doc["jwks_uri"]}}}
    rp = await off_loop(StandAloneClient, config=config, services=SERVICES)
    assert await off_loop(rp.do_provider_info) == hub.issuer
    await off_loop(rp.do_client_registration)  # static: maps preferences to "registered"
    if public:
        # idpyoidc only keeps auth methods it ships; `none` has to be chosen after the mapping
        rp.get_context().set_usage("token_endpoint_auth_method", "none")
    # at_hash is optional for the code flow (OIDC Core §3.1.3.6) so idpyoidc skips it unless
    # asked; the hub sends it, so hold it to it.
    rp.get_context().set_usage("verify_args", {"check_hash": True})
    return rp


async def sign_in(rp: StandAloneClient, browser: FormBrowser, callback: str) -> dict[str, Any]:
    """idpyoidc builds the authorization request, the person answers the hub's pages, idpyoidc
    takes the redirect: checks state, redeems the code with its PKCE verifier, verifies the ID
    token and reads userinfo. Returns idpyoidc's result plus the request it sent."""
    url = await off_loop(rp.init_authorization)
    sent = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert url.startswith(f"{browser.issuer}/authorize?")
    assert sent["code_challenge_method"] == "S256" and sent["code_challenge"]
    assert sent["state"] and sent["nonce"]
    walk = await browser.authorize(CITIZEN1, **sent)
    assert walk.location.startswith(callback + "?") and walk.query["state"] == sent["state"]
    result: dict[str, Any] = await off_loop(rp.finalize, walk.query)
    assert "error" not in result, result
    result["sent"], result["steps"] = sent, walk.steps
    return result


@pytest.fixture
async def rs256_hub(tmp_path: Path) -> AsyncIterator[RunningIdentity]:
    running = await start_identity(
        IdentitySettings(port=0, data_dir=tmp_path, demo=True, signing_alg="RS256")
    )
    try:
        yield running
    finally:
        await running.stop()


async def test_idpyoidc_confidential_client_signs_in_with_pkce_and_verifies_the_id_token(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    rp = await relying_party(hub)
    result = await sign_in(rp, browser, CALLBACK)
    # verified by idpyoidc: ES256 signature against the hub's JWKS, iss, aud, exp/iat, the
    # nonce bound to this state, and at_hash against the access token it came with
    id_token = result["id_token"]
    assert id_token["iss"] == hub.issuer and id_token["aud"] == ["demo-web"]
    assert id_token["nonce"] == result["sent"]["nonce"]
    assert id_token.jws_header["alg"] == "ES256"
    assert id_token["acr"] == "urn:cityplane:loa:1" and id_token["amr"] == ["pwd"]
    assert id_token["at_hash"]
    # userinfo, fetched by idpyoidc with the access token, is about the same person
    assert result["userinfo"]["sub"] == id_token["sub"]
    assert result["userinfo"]["preferred_username"] == "citizen1"
    assert result["userinfo"]["email"] == "citizen1@demo.city.example"


async def test_idpyoidc_rejects_an_id_token_that_does_not_belong_to_its_access_token(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    """The validation above is real: the same signed ID token next to another access token fails
    idpyoidc's at_hash check, and a tampered signature fails its JWKS check."""
    rp = await relying_party(hub)
    result = await sign_in(rp, browser, CALLBACK)
    state = result["state"]
    session = rp.get_session_information(state)
    token_service = rp.get_service("accesstoken")

    def token_response(access_token: str, id_token: str) -> str:
        return json.dumps(
            {"access_token": access_token, "token_type": "Bearer", "id_token": id_token}
        )

    same = token_response(session["access_token"], session["id_token"])
    assert (await off_loop(token_service.parse_response, same, state=state))["__verified_id_token"]
    refreshed = await off_loop(rp.refresh_access_token, state)
    swapped = token_response(refreshed["access_token"], session["id_token"])
    with pytest.raises(AtHashError):
        await off_loop(token_service.parse_response, swapped, state=state)
    head, body, signature = session["id_token"].split(".")
    forged = f"{head}.{body}.{signature[::-1]}"
    with pytest.raises(BadSignature):
        await off_loop(
            token_service.parse_response,
            token_response(session["access_token"], forged),
            state=state,
        )


async def test_idpyoidc_refresh_rotates_the_refresh_token_and_the_new_access_token_works(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    rp = await relying_party(hub)
    result = await sign_in(rp, browser, CALLBACK)
    state = result["state"]
    first = rp.get_session_information(state)["refresh_token"]
    refreshed = await off_loop(rp.refresh_access_token, state)
    assert refreshed["refresh_token"] and refreshed["refresh_token"] != first
    assert refreshed["access_token"] != result["token"]
    # idpyoidc keeps the rotated token for the session and refreshes with it again
    assert rp.get_session_information(state)["refresh_token"] == refreshed["refresh_token"]
    again = await off_loop(rp.refresh_access_token, state)
    assert again["refresh_token"] not in (first, refreshed["refresh_token"])
    info = await off_loop(rp.get_user_info, state, access_token=again["access_token"])
    assert info["sub"] == result["id_token"]["sub"]


async def test_idpyoidc_public_client_signs_in_with_pkce_alone_and_refreshes(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    rp = await relying_party(hub, "demo-spa", scope="openid profile offline_access")
    result = await sign_in(rp, browser, SPA_CALLBACK)
    assert result["id_token"]["aud"] == ["demo-spa"]
    assert result["id_token"]["nonce"] == result["sent"]["nonce"]
    assert result["userinfo"]["preferred_username"] == "citizen1"
    first = rp.get_session_information(result["state"])["refresh_token"]
    refreshed = await off_loop(rp.refresh_access_token, result["state"])
    assert refreshed["refresh_token"] and refreshed["refresh_token"] != first


async def test_idpyoidc_end_session_with_id_token_hint_signs_out_and_refresh_stops_working(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    rp = await relying_party(hub, logout_redirect=False)
    result = await sign_in(rp, browser, CALLBACK)
    state = result["state"]
    await off_loop(rp.refresh_access_token, state)  # a rotated token, the one that must die
    logout = await off_loop(rp.logout, state)
    sent = {k: v[0] for k, v in parse_qs(urlsplit(logout["url"]).query).items()}
    assert logout["url"].startswith(f"{hub.issuer}/logout?")
    assert sent["id_token_hint"] == rp.get_session_information(state)["id_token"]
    status, _, page = await browser.get(logout["url"])
    assert status == 200 and "Sign out?" not in page  # the hint spoke for the session
    with pytest.raises(OidcServiceError, match="invalid_grant"):
        await off_loop(rp.refresh_access_token, state)
    # the hub's session is gone too: a new sign-in asks for the password again
    again = await sign_in(rp, browser, CALLBACK)
    assert again["steps"][0] == "password" and again["id_token"]["sub"] == result["id_token"]["sub"]


async def test_idpyoidc_logout_returns_to_the_post_logout_redirect_uri_with_its_state(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    rp = await relying_party(hub)
    result = await sign_in(rp, browser, CALLBACK)
    state = result["state"]
    logout = await off_loop(rp.logout, state, WEB_HOME)
    sent = {k: v[0] for k, v in parse_qs(urlsplit(logout["url"]).query).items()}
    assert sent["post_logout_redirect_uri"] == WEB_HOME and sent["id_token_hint"]
    status, location, page = await browser.get(logout["url"])
    assert status in (302, 303), page[:300]
    # OIDC RP-Initiated Logout 1.0 §3: back to the registered URI, with the RP's state
    assert urlsplit(location)._replace(query="").geturl() == WEB_HOME
    assert parse_qs(urlsplit(location).query) == {"state": [sent["state"]]}
    with pytest.raises(OidcServiceError, match="invalid_grant"):
        await off_loop(rp.refresh_access_token, state)


async def test_idpyoidc_accepts_the_hubs_discovery_document(hub: RunningIdentity) -> None:
    rp = await relying_party(hub, discover=True)
    assert rp.get_context().provider_info["end_session_endpoint"] == f"{hub.issuer}/logout"


async def test_idpyoidc_discovers_an_rs256_hub_and_verifies_its_id_tokens(
    rs256_hub: RunningIdentity,
) -> None:
    rp = await relying_party(rs256_hub, discover=True)  # RS256 listed: idpyoidc accepts it
    browser = FormBrowser(rs256_hub.issuer)
    try:
        result = await sign_in(rp, browser, CALLBACK)
    finally:
        await browser.close()
    assert result["id_token"].jws_header["alg"] == "RS256"
    assert result["id_token"]["nonce"] == result["sent"]["nonce"]
