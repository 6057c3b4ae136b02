"""Routes with `auth`: JWT access tokens checked against a real JWKS server, real gateways.

The identity hub does not exist yet, so `Issuer` stands in for it: an aiohttp server on
127.0.0.1 with OpenID Connect discovery and a JWK Set of keys generated here, and tokens
minted with PyJWT in the RFC 9068 profile.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import re
import time
import timeit
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import jwt
import pytest
import yaml
from aiohttp import ClientSession, web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from multidict import CIMultiDict

from cityplane.schema import Auth
from gateway.exchange import Exchange
from gateway.h1server import detached_request
from gateway.jwks import LEEWAY, TokenVerifier, refresh_interval
from gateway.policies.auth import AuthPolicy
from tests.cli_process import run_cli
from tests.conftest import Upstream, problem, service
from tests.gateway.procs import free_port
from tests.gateway.raw_http import RawClient

# Every test here runs on both request drivers (ADR 14): inline and on the connection's task.
GATEWAY_DRIVERS = ("inline", "task")

ROOT = Path(__file__).resolve().parents[2]
AUDIENCE = "https://api.city.example"
INVALID = 'Bearer realm="cityplane", error="invalid_token", error_description="'


# --- a stand-in identity hub ------------------------------------------------------------------


@functools.cache
def private_key(kind: str, slot: int = 0) -> Any:
    """Keys are generated once per test session (RSA takes ~100 ms)."""
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def public_jwk(key: Any, kid: str) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**jwk, "kid": kid, "use": "sig"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(
    header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]
) -> str:
    """A token PyJWT would refuse to make (alg=none, HS256 keyed with a public key)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


class Issuer:
    """Discovery document and JWKS over real HTTP; counts how often it is asked."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}  # kid -> private key
        self.published: list[str] = []  # kids in the JWKS, in order
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.cache_control: str | None = None
        self.discovery_issuer: str | None = None  # None: the real URL
        self.url = ""
        self._runner: web.AppRunner | None = None

    def add_key(self, kid: str, kind: str = "ec", *, slot: int = 0, publish: bool = True) -> None:
        self.keys[kid] = private_key(kind, slot)
        if publish:
            self.published.append(kid)

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": "citizen-42",
            "client_id": "bus-app",
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            "scope": "bus:read",
            "acr": "urn:cityplane:loa:2",
            "amr": ["pwd", "otp"],
            "auth_time": now - 60,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self,
        kid: str = "k1",
        *,
        alg: str | None = None,
        typ: str | None = "at+jwt",
        key: Any = None,
        **claims: Any,
    ) -> str:
        key = key if key is not None else self.keys[kid]
        if alg is None:
            alg = {
                ec.EllipticCurvePrivateKey: "ES256",
                rsa.RSAPrivateKey: "RS256",
                ed25519.Ed25519PrivateKey: "EdDSA",
            }[next(t for t in (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey,
                               ed25519.Ed25519PrivateKey) if isinstance(key, t))]  # fmt: skip
        return jwt.encode(
            self.claims(**claims), key, algorithm=alg, headers={"kid": kid, "typ": typ}
        )

    def app(self) -> web.Application:
        async def discovery(_: web.Request) -> web.Response:
            self.discovery_fetches += 1
            return web.json_response(
                {"issuer": self.discovery_issuer or self.url, "jwks_uri": self.url + "/jwks"}
            )

        async def jwks(_: web.Request) -> web.Response:
            self.jwks_fetches += 1
            headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
            keys = [public_jwk(self.keys[kid], kid) for kid in self.published]
            return web.json_response({"keys": keys}, headers=headers)

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks", jwks)
        app.router.add_get("/other-jwks", jwks)
        return app

    async def start(self, port: int = 0) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def hub() -> AsyncIterator[Issuer]:
    issuer = Issuer()
    issuer.add_key("k1", "ec")
    await issuer.start()
    yield issuer
    await issuer.stop()


def bus_route(auth: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    route: dict[str, Any] = {"name": "read", "match": {"pathPrefix": "/bus/"}, "stripPrefix": True}
    if auth is not None:
        route["auth"] = auth
    return {**route, **extra}


Protected = tuple[Any, Upstream]


@pytest.fixture
def protected(
    hub: Issuer, upstreams: Any, gateway_factory: Any
) -> Callable[..., Awaitable[Protected]]:
    """A gateway in front of one upstream, with a route `/bus/` carrying the given `auth`."""

    async def make(auth: dict[str, Any] | None = None, **settings: Any) -> Protected:
        up = await upstreams("bus")
        rate_limit = settings.pop("rate_limit", None)
        extra = {"rateLimit": rate_limit} if rate_limit else {}
        settings.setdefault("issuer", hub.url)
        settings.setdefault("audience", AUDIENCE)
        gw = await gateway_factory(
            [service("bus-times", [up.url], [bus_route(auth or {}, **extra)])], **settings
        )
        return gw, up

    return make


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def identity_headers(seen: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in seen["headers"].items() if k.lower().startswith("x-cityplane-")}


# --- tokens that pass -------------------------------------------------------------------------


async def test_valid_token_reaches_upstream_with_the_verified_identity(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, _ = await protected({"scopes": ["bus:read"], "minTrustLevel": 2})
    auth_time = int(time.time()) - 120
    token = hub.token(
        acr="urn:cityplane:loa:3", auth_time=auth_time, org="org-7", scope="bus:read profile"
    )
    async with http.get(gw.url + "/bus/stops/1", headers=bearer(token)) as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert seen["path"] == "/stops/1"
    assert identity_headers(seen) == {
        "X-CityPlane-Subject": "citizen-42",
        "X-CityPlane-Client": "bus-app",
        "X-CityPlane-Level": "3",
        "X-CityPlane-Auth-Time": str(auth_time),
        "X-CityPlane-Organization": "org-7",
        "X-CityPlane-Scopes": "bus:read profile",
    }


@pytest.mark.parametrize(
    ("kind", "alg"),
    [("ec", "ES256"), ("rsa", "RS256"), ("rsa", "PS256"), ("ed25519", "EdDSA")],
)
async def test_every_allowed_algorithm_is_accepted(
    hub: Issuer, protected: Any, http: ClientSession, kind: str, alg: str
) -> None:
    hub.add_key("k2", kind)
    gw, _ = await protected()
    async with http.get(gw.url + "/bus/x", headers=bearer(hub.token("k2", alg=alg))) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("typ", ["at+jwt", "application/at+jwt", "JWT"])
async def test_access_token_typ_and_plain_jwt_typ_are_accepted(
    hub: Issuer, protected: Any, http: ClientSession, typ: str
) -> None:
    gw, _ = await protected()
    async with http.get(gw.url + "/bus/x", headers=bearer(hub.token(typ=typ))) as resp:
        assert resp.status == 200


async def test_clock_skew_within_thirty_seconds_is_tolerated(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, _ = await protected()
    now = int(time.time())
    for token in (hub.token(exp=now - 10), hub.token(nbf=now + 10, iat=now + 10)):
        async with http.get(gw.url + "/bus/x", headers=bearer(token)) as resp:
            assert resp.status == 200


async def test_consumer_is_the_subject_when_the_token_has_no_client_id(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, _ = await protected(rate_limit={"requests": 1, "window": "1m", "key": "consumer"})
    async with http.get(gw.url + "/bus/x", headers=bearer(hub.token(client_id=None))) as resp:
        seen = await resp.json()
    assert "X-CityPlane-Client" not in seen["headers"]
    assert seen["headers"]["X-CityPlane-Subject"] == "citizen-42"
    other = hub.token(client_id=None, sub="citizen-43")
    async with http.get(gw.url + "/bus/x", headers=bearer(other)) as resp:
        assert resp.status == 200  # its own bucket, not citizen-42's


# --- no token -----------------------------------------------------------------------------------


async def test_missing_token_gets_401_with_a_bare_bearer_challenge(
    protected: Any, http: ClientSession
) -> None:
    gw, up = await protected({"scopes": ["bus:read"], "minTrustLevel": 3})
    async with http.get(gw.url + "/bus/x") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="cityplane"'
        assert resp.content_type == "application/problem+json"
        body = problem(await resp.read())
    assert body["type"].endswith("/token-required")
    assert up.requests == []


async def test_token_in_the_query_string_is_not_looked_at(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, up = await protected()
    async with http.get(gw.url + "/bus/x", params={"access_token": hub.token()}) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="cityplane"'
    assert up.requests == []


async def test_other_authorization_schemes_count_as_no_token(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, _ = await protected()
    async with http.get(gw.url + "/bus/x", headers={"Authorization": "Basic YTpi"}) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="cityplane"'


# --- tokens that fail ---------------------------------------------------------------------------


def _none_alg(hub: Issuer) -> str:
    return hand_made({"alg": "none", "typ": "at+jwt", "kid": "k1"}, hub.claims(), lambda _: b"")


def _hs256_with_public_key(hub: Issuer) -> str:
    # The classic key-confusion attack: the issuer's public key (which anyone can fetch) used
    # as an HMAC secret, hoping the verifier passes "the key" to whatever alg the token names.
    pem = (
        hub.keys["k1"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return hand_made(
        {"alg": "HS256", "typ": "at+jwt", "kid": "k1"},
        hub.claims(),
        lambda data: hmac.new(pem, data, hashlib.sha256).digest(),
    )


def _forged(hub: Issuer) -> str:
    return hub.token("k1", key=private_key("ec", slot=1))  # another key, the real kid


REJECTED: dict[str, tuple[Callable[[Issuer], str], str]] = {
    "expired": (lambda h: h.token(exp=int(time.time()) - 60), "The access token expired"),
    "not-yet-valid": (
        lambda h: h.token(nbf=int(time.time()) + 120),
        "The access token is not valid yet",
    ),
    "wrong-issuer": (
        lambda h: h.token(iss="https://evil.example"),
        "The access token is from another issuer",
    ),
    "wrong-audience": (
        lambda h: h.token(aud="https://other-api.example"),
        "The access token is for another audience",
    ),
    "forged-signature-same-kid": (_forged, "The token signature is invalid"),
    "alg-none": (_none_alg, "The token's signing algorithm is not accepted"),
    "hs256-signed-with-the-public-key": (
        _hs256_with_public_key,
        "The token's signing algorithm is not accepted",
    ),
    "es384-outside-the-allowlist": (
        lambda h: h.token("k1", key=private_key("ec384"), alg="ES384"),
        "The token's signing algorithm is not accepted",
    ),
    "rs256-under-an-ec-key-id": (
        lambda h: h.token("k1", key=private_key("rsa"), alg="RS256"),
        "The token's algorithm does not match its signing key",
    ),
    "unknown-kid": (
        lambda h: h.token("nobody-knows", key=h.keys["k1"]),
        "The token's signing key is unknown",
    ),
    "no-kid": (
        lambda h: jwt.encode(h.claims(), h.keys["k1"], algorithm="ES256"),
        "The token does not name its signing key (kid)",
    ),
    "id-token-typ": (lambda h: h.token(typ="id+jwt"), "The token is not a JWT access token (typ)"),
    "no-typ": (lambda h: h.token(typ=None), "The token is not a JWT access token (typ)"),
    "no-subject": (lambda h: h.token(sub=None), "The access token has no sub claim"),
    "not-a-jwt": (lambda h: "not-a-jwt", "The access token is not a well-formed JWT"),
    "not-a-bearer-token": (
        lambda h: "a b",
        "The Authorization header does not carry a bearer token",
    ),
    "empty": (lambda h: "", "The Authorization header does not carry a bearer token"),
    "scope-not-a-string": (
        lambda h: h.token(scope=["bus:read"]),
        "The scope claim is not a string",
    ),
}


@pytest.mark.parametrize("case", list(REJECTED))
async def test_untrustworthy_token_is_refused_with_invalid_token(
    hub: Issuer, protected: Any, http: ClientSession, case: str
) -> None:
    make, description = REJECTED[case]
    gw, up = await protected()
    async with http.get(gw.url + "/bus/x", headers=bearer(make(hub))) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == f'{INVALID}{description}"'
        assert resp.content_type == "application/problem+json"
        body = problem(await resp.read())
    assert body["type"].endswith("/invalid-token")
    assert body["detail"] == description
    assert up.requests == []


async def test_two_authorization_headers_are_refused(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, up = await protected()
    headers = CIMultiDict([("Authorization", f"Bearer {hub.token()}"), ("Authorization", "x")])
    async with http.get(gw.url + "/bus/x", headers=headers) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith(INVALID)
    assert up.requests == []


async def test_each_request_on_a_connection_is_judged_by_its_own_authorization_field(
    hub: Issuer, protected: Any
) -> None:
    # The connection keeps its last Authorization field's text (one str, its hash kept for the
    # verified-token cache): a request with another token, none, an empty field, another
    # scheme or a second field must not be judged by the one before it.
    gw, up = await protected({"required": False})
    ann, bob = hub.token(sub="ann"), hub.token(sub="bob")

    def get(*fields: str) -> bytes:
        lines = "".join(f"{f}\r\n" for f in fields)
        return f"GET /bus/x HTTP/1.1\r\nHost: bus\r\n{lines}\r\n".encode()

    steps: list[tuple[bytes, int, str | None]] = [
        (get(f"Authorization: Bearer {ann}"), 200, "ann"),
        (get(f"Authorization: Bearer {ann}"), 200, "ann"),
        (get(f"authorization: Bearer {bob}"), 200, "bob"),
        (get(), 200, None),
        (get(f"Authorization: Bearer {ann}"), 200, "ann"),
        (get("Authorization:"), 200, None),
        (get("Authorization: Basic YTpi"), 200, None),
        (get(f"Authorization: Bearer {ann}", f"Authorization: Bearer {ann}"), 401, None),
        (get(f"Authorization: Bearer {bob}"), 200, "bob"),
        (get(f"AUTHORIZATION: bearer  {bob}"), 200, "bob"),
        (get("Authorization: Bearer not-a-token"), 401, None),
        (get(f"Authorization: Bearer {bob}"), 200, "bob"),
    ]
    async with await RawClient.open(gw.gateway.port) as client:
        for data, status, subject in steps:
            resp = await client.exchange(data)
            assert resp.status == status, (data, resp.body)
            if status == 200:
                seen = json.loads(resp.body)
                assert identity_headers(seen).get("X-CityPlane-Subject") == subject, data
    assert len(up.requests) == 10


# --- scopes and trust levels ----------------------------------------------------------------


async def test_missing_scope_gets_403_insufficient_scope(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, up = await protected({"scopes": ["bus:read", "bus:write"]})
    async with http.get(gw.url + "/bus/x", headers=bearer(hub.token(scope="bus:read"))) as resp:
        assert resp.status == 403
        assert resp.headers["WWW-Authenticate"] == (
            'Bearer realm="cityplane", error="insufficient_scope", scope="bus:read bus:write"'
        )
        body = problem(await resp.read())
    assert body["type"].endswith("/insufficient-scope")
    assert up.requests == []
    token = hub.token(scope="profile bus:write bus:read")
    async with http.get(gw.url + "/bus/x", headers=bearer(token)) as resp:
        assert resp.status == 200


async def test_level_two_token_on_level_three_route_gets_step_up_challenge(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, up = await protected({"minTrustLevel": 3})
    token = hub.token(acr="urn:cityplane:loa:2")
    async with http.get(gw.url + "/bus/x", headers=bearer(token)) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == (
            'Bearer realm="cityplane", error="insufficient_user_authentication", '
            'error_description="A higher trust level is required", '
            'acr_values="urn:cityplane:loa:3"'
        )
        body = problem(await resp.read())
    assert body["type"].endswith("/insufficient-user-authentication")
    assert body["acr_values"] == "urn:cityplane:loa:3"
    assert up.requests == []
    for level in (3, 4):
        token = hub.token(acr=f"urn:cityplane:loa:{level}")
        async with http.get(gw.url + "/bus/x", headers=bearer(token)) as resp:
            assert resp.status == 200
            assert (await resp.json())["headers"]["X-CityPlane-Level"] == str(level)


@pytest.mark.parametrize("acr", ["urn:other-city:loa:4", None, "urn:cityplane:loa:9"])
async def test_unknown_or_missing_acr_is_level_zero(
    hub: Issuer, protected: Any, http: ClientSession, acr: str | None
) -> None:
    gw, _ = await protected({"minTrustLevel": 1})
    async with http.get(gw.url + "/bus/x", headers=bearer(hub.token(acr=acr))) as resp:
        assert resp.status == 401
        assert 'acr_values="urn:cityplane:loa:1"' in resp.headers["WWW-Authenticate"]


async def test_authentication_older_than_max_age_gets_step_up_challenge_with_max_age(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, _ = await protected({"maxAge": "5m"})
    challenge = (
        'Bearer realm="cityplane", error="insufficient_user_authentication", '
        'error_description="A more recent authentication is required", max_age="300"'
    )
    for token in (hub.token(auth_time=int(time.time()) - 600), hub.token(auth_time=None)):
        async with http.get(gw.url + "/bus/x", headers=bearer(token)) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == challenge
            assert problem(await resp.read())["max_age"] == 300
    fresh = hub.token(auth_time=int(time.time()) - 10)
    async with http.get(gw.url + "/bus/x", headers=bearer(fresh)) as resp:
        assert resp.status == 200


async def test_low_level_and_old_authentication_get_one_challenge_naming_both(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, _ = await protected({"minTrustLevel": 3, "maxAge": 60})
    token = hub.token(acr="urn:cityplane:loa:1", auth_time=int(time.time()) - 3600)
    async with http.get(gw.url + "/bus/x", headers=bearer(token)) as resp:
        assert resp.status == 401
        header = resp.headers["WWW-Authenticate"]
    assert header.endswith('acr_values="urn:cityplane:loa:3", max_age="60"')
    assert 'error="insufficient_user_authentication"' in header


# --- optional auth, identity headers ----------------------------------------------------------


async def test_optional_auth_uses_a_valid_token_allows_none_and_refuses_an_invalid_one(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, _ = await protected({"required": False})
    async with http.get(gw.url + "/bus/x") as resp:
        assert resp.status == 200
        assert identity_headers(await resp.json()) == {}
    async with http.get(gw.url + "/bus/x", headers={"Authorization": "Basic YTpi"}) as resp:
        assert resp.status == 200
        seen = await resp.json()
        assert seen["headers"]["Authorization"] == "Basic YTpi"
        assert identity_headers(seen) == {}
    async with http.get(gw.url + "/bus/x", headers=bearer(hub.token())) as resp:
        assert resp.status == 200
        assert identity_headers(await resp.json())["X-CityPlane-Subject"] == "citizen-42"
    expired = hub.token(exp=int(time.time()) - 600)
    async with http.get(gw.url + "/bus/x", headers=bearer(expired)) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith(INVALID)


async def test_client_cannot_spoof_identity_headers(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, _ = await protected({"required": False})
    spoofed = {
        "x-cityplane-subject": "mayor",  # other case than the gateway's: both would show
        "X-CityPlane-Level": "4",
        "X-CityPlane-Organization": "city-hall",
        "X-Cityplane-Admin": "true",
    }
    async with http.get(gw.url + "/bus/x", headers=spoofed) as resp:
        assert identity_headers(await resp.json()) == {}
    async with http.get(gw.url + "/bus/x", headers={**spoofed, **bearer(hub.token())}) as resp:
        seen = identity_headers(await resp.json())
    assert seen == {
        "X-CityPlane-Subject": "citizen-42",
        "X-CityPlane-Client": "bus-app",
        "X-CityPlane-Level": "2",
        "X-CityPlane-Auth-Time": seen["X-CityPlane-Auth-Time"],
        "X-CityPlane-Scopes": "bus:read",
    }


async def test_identity_values_outside_ascii_are_percent_encoded(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, _ = await protected()
    token = hub.token(org="北京市交通委 50%", sub="a\r\nX-Injected: 1")
    async with http.get(gw.url + "/bus/x", headers=bearer(token)) as resp:
        seen = (await resp.json())["headers"]
    assert unquote(seen["X-CityPlane-Organization"]) == "北京市交通委 50%"
    assert seen["X-CityPlane-Organization"].isascii()
    assert unquote(seen["X-CityPlane-Subject"]) == "a\r\nX-Injected: 1"
    assert "X-Injected" not in seen


async def test_rate_limit_by_consumer_gives_each_client_its_own_quota(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, _ = await protected(rate_limit={"requests": 2, "window": "1m", "key": "consumer"})

    async def status(token: str) -> int:
        async with http.get(gw.url + "/bus/x", headers=bearer(token)) as resp:
            return resp.status

    app_a, app_b = hub.token(client_id="app-a"), hub.token(client_id="app-b")
    assert [await status(app_a) for _ in range(3)] == [200, 200, 429]
    assert [await status(app_b) for _ in range(2)] == [200, 200]
    # Another citizen using app A shares app A's quota: the consumer is the client.
    assert await status(hub.token(client_id="app-a", sub="citizen-43")) == 429
    # A refused token is not counted against anyone (auth runs before the rate limit).
    assert await status(hub.token(client_id="app-c", exp=1)) == 401
    assert [await status(hub.token(client_id="app-c")) for _ in range(2)] == [200, 200]


# --- the issuer's keys --------------------------------------------------------------------------


async def test_new_signing_key_is_picked_up_by_one_refetch_on_unknown_kid(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, _ = await protected()
    assert hub.jwks_fetches == 1
    hub.add_key("k2", "rsa")  # the hub rotates after the gateway started
    async with http.get(gw.url + "/bus/x", headers=bearer(hub.token("k2"))) as resp:
        assert resp.status == 200
    assert hub.jwks_fetches == 2
    async with http.get(gw.url + "/bus/x", headers=bearer(hub.token("k1"))) as resp:
        assert resp.status == 200
    assert hub.jwks_fetches == 2


async def test_unknown_kid_storm_refetches_at_most_once_per_ten_seconds(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, _ = await protected()
    forged = [hub.token(f"forged-{i}", key=hub.keys["k1"]) for i in range(60)]

    async def status(token: str) -> int:
        async with http.get(gw.url + "/bus/x", headers=bearer(token)) as resp:
            return resp.status

    statuses = await asyncio.gather(*(status(t) for t in forged[:30]))
    statuses += [await status(t) for t in forged[30:]]
    assert statuses == [401] * 60
    assert hub.jwks_fetches == 2  # the one at start, then one refetch for the whole storm
    # Within the 10 s, even a genuinely new key waits for the scheduled refresh.
    hub.add_key("k2", "ec", slot=2)
    assert await status(hub.token("k2")) == 401
    assert hub.jwks_fetches == 2


async def test_tokens_of_a_withdrawn_key_stop_working_after_the_next_fetch(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, _ = await protected()
    old = hub.token("k1")
    async with http.get(gw.url + "/bus/x", headers=bearer(old)) as resp:
        assert resp.status == 200  # now in the verified-token cache
    hub.add_key("k2", "ec", slot=2)
    hub.published = ["k2"]  # k1 withdrawn (say, compromised)
    async with http.get(gw.url + "/bus/x", headers=bearer(hub.token("k2"))) as resp:
        assert resp.status == 200
    async with http.get(gw.url + "/bus/x", headers=bearer(old)) as resp:
        assert resp.status == 401
        assert "signing key is unknown" in resp.headers["WWW-Authenticate"]


async def test_jwks_url_overrides_discovery(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, _ = await protected(jwks_url=hub.url + "/other-jwks")
    async with http.get(gw.url + "/bus/x", headers=bearer(hub.token())) as resp:
        assert resp.status == 200
    assert hub.discovery_fetches == 0 and hub.jwks_fetches == 1


async def test_jwks_down_at_start_gives_503_then_recovers_when_it_comes_up(
    upstreams: Any, gateway_factory: Any, http: ClientSession
) -> None:
    port = free_port()
    hub = Issuer()
    hub.add_key("k1", "ec")
    up = await upstreams()
    routes = [
        bus_route({}),
        {"name": "open", "match": {"path": "/open"}, "auth": {"required": False}},
    ]
    gw = await gateway_factory(
        [service("bus-times", [up.url], routes)],
        issuer=f"http://127.0.0.1:{port}",
        audience=AUDIENCE,
    )
    hub.url = f"http://127.0.0.1:{port}"  # tokens name the issuer before it listens
    token = hub.token()
    try:
        async with http.get(gw.url + "/bus/x", headers=bearer(token)) as resp:
            assert resp.status == 503
            assert int(resp.headers["Retry-After"]) >= 1
            assert resp.content_type == "application/problem+json"
            assert problem(await resp.read())["type"].endswith("/token-keys-unavailable")
        async with http.get(gw.url + "/open") as resp:
            assert resp.status == 200  # no token, nothing to check: served
        await hub.start(port)
        deadline = time.monotonic() + 10
        while True:
            async with http.get(gw.url + "/bus/x", headers=bearer(token)) as resp:
                if resp.status == 200:
                    break
                assert resp.status == 503
            assert time.monotonic() < deadline, "keys never fetched after the issuer came up"
            await asyncio.sleep(0.1)
    finally:
        await hub.stop()


async def test_discovery_naming_another_issuer_is_not_trusted(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    hub.discovery_issuer = "https://evil.example"
    gw, _ = await protected()
    async with http.get(gw.url + "/bus/x", headers=bearer(hub.token())) as resp:
        assert resp.status == 503
    assert hub.jwks_fetches == 0


def test_jwks_refresh_follows_cache_control_within_five_minutes_and_a_day() -> None:
    assert refresh_interval(None) == 3600
    assert refresh_interval("public, max-age=7200") == 7200
    assert refresh_interval("max-age=10") == 300
    assert refresh_interval("max-age=999999, must-revalidate") == 86400
    assert refresh_interval("no-store") == 3600


# --- the verified-token cache -------------------------------------------------------------------


@pytest.fixture
async def verifier(hub: Issuer) -> AsyncIterator[Callable[..., Awaitable[TokenVerifier]]]:
    made: list[TokenVerifier] = []

    async def make(**kwargs: Any) -> TokenVerifier:
        v = TokenVerifier(hub.url, audience=AUDIENCE, **kwargs)
        await v.start()
        made.append(v)
        return v

    yield make
    for v in made:
        await v.close()


async def test_verified_token_is_dropped_from_the_cache_when_it_expires(
    hub: Issuer, verifier: Any
) -> None:
    now = [time.time()]
    v = await verifier(clock=lambda: now[0])
    exp = int(now[0]) + 120
    token = hub.token(exp=exp)
    await v.verify(token)
    assert v.cached(token) is not None
    now[0] = exp + LEEWAY - 1
    assert v.cached(token) is not None
    now[0] = exp + LEEWAY
    assert v.cached(token) is None


async def test_verified_token_cache_is_bounded_and_evicts_the_oldest(
    hub: Issuer, verifier: Any
) -> None:
    v = await verifier(cache_size=3)
    tokens = [hub.token(sub=f"citizen-{i}") for i in range(4)]
    for token in tokens:
        await v.verify(token)
    assert v.cached(tokens[0]) is None
    assert all(v.cached(t) is not None for t in tokens[1:])


async def test_extra_spaces_after_bearer_still_use_the_verified_token_cache(
    hub: Issuer, verifier: Any
) -> None:
    v = await verifier()
    policy = AuthPolicy("bus-times/read", Auth(scopes=["bus:read"]), v)
    token = hub.token()
    await v.verify(token)
    for header in (f"Bearer {token}", f"Bearer  {token}", f"bearer   {token}"):
        request = detached_request("GET", "/bus/x", headers={"Authorization": header})
        exchange = Exchange(
            request, client_ip="127.0.0.1", path="/bus/x", route_id="r", request_id="1", start=0.0
        )
        # Decided from the cache, without the task that verifies a token not seen before.
        assert policy.check_now(exchange), header
        assert exchange.consumer == "bus-app"


async def test_cached_token_check_costs_under_fifty_microseconds(
    hub: Issuer, verifier: Any
) -> None:
    v = await verifier()
    policy = AuthPolicy("bus-times/read", Auth(scopes=["bus:read"], minTrustLevel=2, maxAge=600), v)
    token = hub.token()
    await v.verify(token)
    request = detached_request("GET", "/bus/x", headers=bearer(token))
    exchange = Exchange(
        request, client_ip="127.0.0.1", path="/bus/x", route_id="r", request_id="1", start=0.0
    )

    def check() -> None:
        exchange.upstream_block = b""
        coro = policy.check(exchange)
        try:
            coro.send(None)
        except StopIteration:
            return
        raise AssertionError("a cached token must not wait for anything")

    number = 20_000
    per_call = min(timeit.repeat(check, number=number, repeat=5)) / number
    print(f"AuthPolicy.check on a cached token: {per_call * 1e6:.2f} µs")
    assert exchange.consumer == "bus-app"
    assert per_call < 50e-6


# --- configuration ----------------------------------------------------------------------------


cli = run_cli  # the whole environment in `env`, as a deployment gives it


def _auth_config(tmp_path: Path) -> Path:
    path = tmp_path / "services.yaml"
    route = bus_route({"scopes": ["bus:read"], "minTrustLevel": 2})
    path.write_text(yaml.safe_dump(service("bus-times", ["http://127.0.0.1:9"], [route])))
    return path


def test_auth_route_without_issuer_is_one_line_and_exit_3(tmp_path: Path) -> None:
    result = cli("gateway", "--config", str(_auth_config(tmp_path)), "--port", "0")
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("cityplane: invalid config: ")
    assert "route 'read'" in result.stderr and "--issuer" in result.stderr


def test_jwks_url_without_issuer_is_a_usage_error(tmp_path: Path) -> None:
    result = cli(
        "gateway", "--config", str(_auth_config(tmp_path)), "--jwks-url", "http://127.0.0.1:9/k"
    )
    assert result.returncode == 2
    assert "--jwks-url needs --issuer" in result.stderr


def test_auth_route_with_issuer_passes_the_config_check_without_fetching_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cityplane.cli import _check_config, _gateway_settings, build_parser

    monkeypatch.setenv("CITYPLANE_ISSUER", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("CITYPLANE_AUDIENCE", AUDIENCE)
    args = build_parser().parse_args(["gateway", "--config", str(_auth_config(tmp_path))])
    settings = _gateway_settings(args)
    assert (settings.issuer, settings.audience, settings.jwks_url) == (
        "http://127.0.0.1:9",
        AUDIENCE,
        None,
    )
    _check_config(settings)


async def test_scope_that_is_not_an_oauth_scope_token_is_a_config_error(
    hub: Issuer, upstreams: Any, gateway_factory: Any
) -> None:
    from gateway.compiler import ConfigError

    up = await upstreams()
    with pytest.raises(ConfigError, match=re.escape("route 'read': auth.scopes: 'bus\"read'")):
        await gateway_factory(
            [service("svc", [up.url], [bus_route({"scopes": ['bus"read']})])], issuer=hub.url
        )


# --- machine tokens (client credentials: no acr) --------------------------------------------


def _machine_token(hub: Issuer) -> str:
    claims = hub.claims(sub="bus-app")
    for name in ("acr", "amr", "auth_time"):
        claims.pop(name, None)
    key = hub.keys["k1"]
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1", "typ": "at+jwt"})


async def test_machine_token_passes_a_route_open_to_machines(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, _ = await protected({"scopes": ["bus:read"], "minTrustLevel": 0})
    async with http.get(gw.url + "/bus/stops/1", headers=bearer(_machine_token(hub))) as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert identity_headers(seen)["X-CityPlane-Level"] == "0"


async def test_machine_token_on_a_route_for_people_gets_the_step_up_challenge(
    hub: Issuer, protected: Any, http: ClientSession
) -> None:
    gw, _ = await protected({"scopes": ["bus:read"], "minTrustLevel": 1})
    async with http.get(gw.url + "/bus/stops/1", headers=bearer(_machine_token(hub))) as resp:
        assert resp.status == 401
        assert 'acr_values="urn:cityplane:loa:1"' in resp.headers["WWW-Authenticate"]


def test_claims_with_cr_or_lf_cannot_add_upstream_fields() -> None:
    # The upstream head does not scan the identity block again: it must be clean when built.
    from gateway.jwks import VerifiedToken

    claims = {
        "sub": "citizen\r\nX-CityPlane-Level: 4",
        "client_id": "app\nX: 1",
        "org": "org\x00",
        "scope": "a b",
        "exp": 0,
    }
    block = VerifiedToken(claims, 0.0).header_block
    lines = block.split(b"\r\n")
    assert lines[-1] == b"" and not any(b"\r" in x or b"\n" in x or b"\x00" in x for x in lines)
    assert [x.partition(b":")[0] for x in lines[:-1]] == [
        b"X-CityPlane-Subject",
        b"X-CityPlane-Level",
        b"X-CityPlane-Client",
        b"X-CityPlane-Organization",
        b"X-CityPlane-Scopes",
    ]
