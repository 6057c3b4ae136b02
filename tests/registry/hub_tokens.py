"""A contract double of the identity hub for registry tests: discovery, a JWKS with an ES256
key generated here, and access tokens shaped like docs/identity-api.md says the hub's are.

Everything the registry tests need from the hub goes through `TestHub`, so the same tests can
later run against the real hub: replace `TestHub.start` with one that mints through the hub's
client-credentials grant.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TestHub:
    """An issuer on a real socket: `/.well-known/openid-configuration` and `/jwks.json`."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.kid = "hub-key-1"
        self.url = ""
        self.jwks_fetches = 0
        self._runner: web.AppRunner | None = None

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(self.key.public_key()))
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "ES256"}

    async def start(self) -> TestHub:
        async def discovery(_: web.Request) -> web.Response:
            return web.json_response({"issuer": self.url, "jwks_uri": self.url + "/jwks.json"})

        async def jwks(_: web.Request) -> web.Response:
            self.jwks_fetches += 1
            return web.json_response({"keys": [self.public_jwk()]})

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks.json", jwks)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.url,
            "sub": "alice",
            "aud": "cityplane-registry",
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            "client_id": "cityplane-cli",
            "scope": "registry:read registry:write",
            "org": "org-transport",
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, *, header: dict[str, Any] | None = None, **claims: Any) -> str:
        """An access token signed by the hub's key (claim=None leaves a claim out)."""
        headers = {"typ": "at+jwt", "kid": self.kid, **(header or {})}
        return jwt.encode(self.claims(**claims), self.key, algorithm="ES256", headers=headers)

    def client_token(self, client_id: str, org: str, scope: str) -> str:
        """A client-credentials token: `sub` is the client id, `org` the client's organization."""
        return self.token(sub=client_id, client_id=client_id, org=org, scope=scope)

    # --- forgeries ----------------------------------------------------------------------------

    def unsigned(self, **claims: Any) -> str:
        """alg=none (RFC 7519 §6): no signature at all."""
        header = {"alg": "none", "typ": "at+jwt", "kid": self.kid}
        body = self.claims(**claims)
        return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(body).encode())}."

    def hmac_with_public_key(self, **claims: Any) -> str:
        """HS256 'signed' with the hub's public key as the shared secret (key confusion)."""
        secret = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        header = {"alg": "HS256", "typ": "at+jwt", "kid": self.kid}
        body = self.claims(**claims)
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(body).encode())}"
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64(signature)}"

    def signed_by_another_key(self, **claims: Any) -> str:
        """Right kid, right shape, signed by a key the hub never published."""
        other = ec.generate_private_key(ec.SECP256R1())
        headers = {"typ": "at+jwt", "kid": self.kid}
        return jwt.encode(self.claims(**claims), other, algorithm="ES256", headers=headers)
