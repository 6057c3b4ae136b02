"""The hub as an OpenID Provider: discovery, code + PKCE, refresh rotation, client credentials,
userinfo, introspection, revocation — over real sockets with the demo accounts."""

from __future__ import annotations

from typing import Any

import aiohttp
import jwt
import pytest

from identity.app import RunningIdentity
from tests.identity.conftest import (
    SPA_CALLBACK,
    FormBrowser,
    basic,
    demo_secret,
    pkce,
    sign_in,
)

pytestmark = pytest.mark.timeout(60)


async def _token(hub: RunningIdentity, data: dict[str, str], auth: tuple[str, str] | None = None):
    async with aiohttp.ClientSession() as http:
        headers = basic(*auth) if auth else {}
        async with http.post(f"{hub.issuer}/token", data=data, headers=headers) as r:
            return r.status, await r.json(), r.headers


async def _jwks_key(hub: RunningIdentity, token: str):
    async with aiohttp.ClientSession() as http, http.get(f"{hub.issuer}/jwks.json") as r:
        jwks = await r.json()
    kid = jwt.get_unverified_header(token)["kid"]
    return jwt.PyJWK(next(k for k in jwks["keys"] if k["kid"] == kid)).key


async def test_discovery_names_every_endpoint_and_the_trust_levels(hub: RunningIdentity) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{hub.issuer}/.well-known/openid-configuration") as r,
    ):
        doc = await r.json()
    assert doc["issuer"] == hub.issuer
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["response_types_supported"] == ["code"]  # no implicit flow
    assert doc["acr_values_supported"] == [f"urn:cityplane:loa:{n}" for n in range(1, 5)]
    assert doc["id_token_signing_alg_values_supported"] == ["ES256", "RS256"]
    assert set(doc["cityplane_acr_eidas"]) == set(doc["acr_values_supported"])


async def test_client_credentials_token_is_an_rfc9068_jwt(hub: RunningIdentity) -> None:
    status, body, headers = await _token(
        hub,
        {"grant_type": "client_credentials", "scope": "bus:read"},
        ("demo-web", demo_secret(hub)),
    )
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    assert jwt.get_unverified_header(body["access_token"])["typ"] == "at+jwt"
    claims = jwt.decode(
        body["access_token"],
        await _jwks_key(hub, body["access_token"]),
        algorithms=["ES256"],
        audience="demo-web",
        issuer=hub.issuer,
    )
    assert claims["sub"] == "demo-web" and claims["client_id"] == "demo-web"
    assert claims["scope"] == "bus:read" and claims["org"] == "org-transport"
    assert "acr" not in claims and "refresh_token" not in body


async def test_wrong_client_secret_is_invalid_client(hub: RunningIdentity) -> None:
    status, body, _ = await _token(hub, {"grant_type": "client_credentials"}, ("demo-web", "nope"))
    assert status == 401 and body["error"] == "invalid_client"


async def test_code_flow_with_pkce_gives_level_one_tokens_with_acr_amr_auth_time(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    verifier, challenge = pkce()
    walk = await browser.authorize(
        {"password": ("citizen1", "demo-citizen-1")},
        response_type="code",
        client_id="demo-spa",
        redirect_uri=SPA_CALLBACK,
        scope="openid profile offline_access",
        state="s1",
        nonce="n1",
        code_challenge=challenge,
        code_challenge_method="S256",
    )
    assert walk.steps == ["password", "consent"]
    assert walk.location.startswith(SPA_CALLBACK) and walk.query["state"] == "s1"
    status, body, _ = await _token(
        hub,
        {
            "grant_type": "authorization_code",
            "code": walk.query["code"],
            "client_id": "demo-spa",
            "redirect_uri": SPA_CALLBACK,
            "code_verifier": verifier,
        },
    )
    assert status == 200, body
    id_token = jwt.decode(
        body["id_token"],
        await _jwks_key(hub, body["id_token"]),
        algorithms=["ES256"],
        audience="demo-spa",
    )
    assert id_token["nonce"] == "n1" and id_token["acr"] == "urn:cityplane:loa:1"
    assert id_token["amr"] == ["pwd"] and isinstance(id_token["auth_time"], int)
    assert id_token["preferred_username"] == "citizen1"
    access = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert access["acr"] == "urn:cityplane:loa:1" and access["client_id"] == "demo-spa"
    # the code is single use
    again, body2, _ = await _token(
        hub,
        {
            "grant_type": "authorization_code",
            "code": walk.query["code"],
            "client_id": "demo-spa",
            "redirect_uri": SPA_CALLBACK,
            "code_verifier": verifier,
        },
    )
    assert again == 400 and body2["error"] == "invalid_grant"


async def test_public_client_without_pkce_is_refused(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    status, location, _ = await browser.get(
        "/authorize?response_type=code&client_id=demo-spa&redirect_uri="
        f"{SPA_CALLBACK}&scope=openid&state=x&code_challenge=abc&code_challenge_method=plain"
    )
    assert status == 302 and "error=invalid_request" in location


async def test_unregistered_redirect_uri_is_never_redirected_to(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    status, location, _page = await browser.get(
        "/authorize?response_type=code&client_id=demo-web&redirect_uri=https://evil.example/cb&scope=openid"
    )
    assert status == 400 and not location and "evil" not in location


async def test_refresh_rotates_and_a_reused_refresh_token_revokes_the_family(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    _, first = await sign_in(
        hub, browser, {"password": ("citizen1", "demo-citizen-1")}, scope="openid offline_access"
    )
    auth = ("demo-web", demo_secret(hub))
    status, second, _ = await _token(
        hub, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}, auth
    )
    assert status == 200 and second["refresh_token"] != first["refresh_token"]
    assert (
        jwt.decode(second["access_token"], options={"verify_signature": False})["acr"]
        == "urn:cityplane:loa:1"
    )
    # the first refresh token again: reuse -> the whole family is revoked
    status, body, _ = await _token(
        hub, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}, auth
    )
    assert status == 400 and body["error"] == "invalid_grant"
    status, body, _ = await _token(
        hub, {"grant_type": "refresh_token", "refresh_token": second["refresh_token"]}, auth
    )
    assert status == 400 and body["error"] == "invalid_grant"


async def test_userinfo_introspection_and_revocation(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    _, tokens = await sign_in(
        hub, browser, {"password": ("citizen1", "demo-citizen-1")}, scope="openid profile email"
    )
    auth = ("demo-web", demo_secret(hub))
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{hub.issuer}/userinfo", headers=bearer) as r:
            info = await r.json()
            assert r.status == 200 and info["preferred_username"] == "citizen1"
            assert info["email"] == "citizen1@demo.city.example"
        form = {"token": tokens["access_token"]}
        async with http.post(f"{hub.issuer}/introspect", data=form, headers=basic(*auth)) as r:
            assert (await r.json())["active"] is True
        async with http.post(f"{hub.issuer}/revoke", data=form, headers=basic(*auth)) as r:
            assert r.status == 200
        async with http.post(f"{hub.issuer}/introspect", data=form, headers=basic(*auth)) as r:
            assert (await r.json())["active"] is False
        async with http.get(f"{hub.issuer}/userinfo", headers=bearer) as r:
            assert r.status == 401 and "invalid_token" in r.headers["WWW-Authenticate"]
        async with http.get(
            f"{hub.issuer}/userinfo", headers={"Authorization": "Bearer x.y.z"}
        ) as r:
            assert r.status == 401


async def test_hub_traces_requests_and_counts_grants(tmp_path: Any) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from identity.app import start_identity
    from identity.hub import IdentitySettings

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    hub = await start_identity(
        IdentitySettings(port=0, data_dir=tmp_path, demo=True, tracer_provider=provider)
    )
    try:
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        parent = f"00-{trace_id}-00f067aa0ba902b7-01"
        async with aiohttp.ClientSession() as http:
            async with http.get(
                f"{hub.issuer}/.well-known/openid-configuration", headers={"traceparent": parent}
            ) as r:
                assert r.status == 200
            status, _, _ = await _token(
                hub, {"grant_type": "client_credentials"}, ("demo-web", demo_secret(hub))
            )
            assert status == 200
            async with http.get(f"{hub.issuer}/metrics") as r:
                metrics = await r.text()
        spans = {s.name: s for s in exporter.get_finished_spans()}
        discovery = spans["GET /.well-known/openid-configuration"]
        assert f"{discovery.context.trace_id:032x}" == trace_id
        assert discovery.attributes["http.response.status_code"] == 200
        assert "POST /token" in spans
        assert 'cityplane_identity_tokens_issued_total{grant_type="client_credentials"} 1.0' in (
            metrics
        )
    finally:
        await hub.stop()


async def test_implicit_flow_is_not_offered(hub: RunningIdentity, browser: FormBrowser) -> None:
    # RFC 9700 §2.1.2: no implicit grant; the error goes back to the (registered) redirect URI.
    status, location, _ = await browser.get(
        "/authorize?response_type=token&client_id=demo-spa&scope=openid&state=s&redirect_uri="
        + SPA_CALLBACK
    )
    assert status == 302 and "error=unsupported_response_type" in location


async def test_access_tokens_name_the_configured_resource_servers(tmp_path: Any) -> None:
    from identity.app import start_identity
    from identity.hub import IdentitySettings

    hub = await start_identity(
        IdentitySettings(
            port=0, data_dir=tmp_path, demo=True, audiences=["urn:a:gateway", "urn:a:registry"]
        )
    )
    try:
        status, body, _ = await _token(
            hub, {"grant_type": "client_credentials"}, ("demo-web", demo_secret(hub))
        )
        assert status == 200
        claims = jwt.decode(
            body["access_token"],
            await _jwks_key(hub, body["access_token"]),
            algorithms=["ES256"],
            audience="urn:a:registry",
            issuer=hub.issuer,
        )
        assert claims["aud"] == ["urn:a:gateway", "urn:a:registry"]
    finally:
        await hub.stop()


def test_authlib_json_requests_are_adapted_too() -> None:
    from identity.oidc.server import HubRequest

    request = HubRequest("POST", "https://id.example/register", {}, [], [("client_name", "x")])
    server = object.__new__(
        __import__("identity.oidc.server", fromlist=["x"]).HubAuthorizationServer
    )
    json_request = server.create_json_request(request)
    assert json_request.payload.data == {"client_name": "x"}
