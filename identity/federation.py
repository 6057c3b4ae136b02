"""Upstream OpenID Providers as sign-in methods: a national identity platform, or a peer city's
hub ("log in once, valid nationwide").

The hub is an ordinary OIDC relying party of each upstream (code flow + PKCE S256, `state`,
`nonce`; OIDC Core §3.1). The upstream's `acr` is mapped to a local level by configuration; an
unknown `acr` gets the provider's `default_level`. The local account is found by the
(issuer, subject) pair, or created on first sign-in.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from typing import Any
from urllib.parse import urlencode

import aiohttp
import jwt
from pydantic import BaseModel, ConfigDict, Field

ALGORITHMS = ["ES256", "RS256", "PS256", "EdDSA"]  # never none, never HS* (RFC 8725 §3.1)
DISCOVERY_TTL = 300.0


class FederationError(Exception):
    """The upstream sign-in failed; the message is safe to show."""


class UpstreamProvider(BaseModel):
    """One upstream provider, as configured (`--federation FILE`, a YAML list of these)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    name: str
    issuer: str
    client_id: str
    client_secret: str | None = None
    scopes: list[str] = ["openid", "profile"]
    acr_values: str | None = None  # what to ask the upstream for, e.g. its highest level
    acr_map: dict[str, int] = {}  # upstream acr -> local level (1..4)
    default_level: int = Field(default=1, ge=1, le=4)

    def level_of(self, acr: str | None) -> int:
        return self.acr_map.get(acr or "", self.default_level)


class Upstream:
    """An upstream provider with its discovery document and keys (fetched, cached)."""

    def __init__(self, config: UpstreamProvider) -> None:
        self.config = config
        self._discovery: dict[str, Any] | None = None
        self._keys: dict[str, Any] = {}
        self._fetched = 0.0

    async def _discover(self, http: aiohttp.ClientSession, force: bool = False) -> dict[str, Any]:
        if self._discovery is None or force or time.monotonic() - self._fetched > DISCOVERY_TTL:
            url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                async with http.get(url) as r:
                    r.raise_for_status()
                    discovery = await r.json()
                async with http.get(discovery["jwks_uri"]) as r:
                    r.raise_for_status()
                    jwks = await r.json()
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
                raise FederationError(f"{self.config.name} cannot be reached: {exc}") from None
            if discovery.get("issuer") != self.config.issuer:  # OIDC Discovery §4.3
                raise FederationError(f"{self.config.name}: discovery names another issuer")
            self._keys = {k.get("kid", ""): jwt.PyJWK(k).key for k in jwks.get("keys", [])}
            self._discovery = discovery
            self._fetched = time.monotonic()
        return self._discovery

    async def start(
        self, http: aiohttp.ClientSession, redirect_uri: str
    ) -> tuple[str, dict[str, str]]:
        """The upstream authorization URL and what to keep in the session until the callback."""
        discovery = await self._discover(http)
        state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        params = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(self.config.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge.rstrip(b"=").decode(),
            "code_challenge_method": "S256",
        }
        if self.config.acr_values:
            params["acr_values"] = self.config.acr_values
        keep = {"state": state, "nonce": nonce, "verifier": verifier, "provider": self.config.id}
        return f"{discovery['authorization_endpoint']}?{urlencode(params)}", keep

    async def finish(
        self, http: aiohttp.ClientSession, *, code: str, kept: dict[str, str], redirect_uri: str
    ) -> dict[str, Any]:
        """Exchange the code and return the verified ID token's claims."""
        discovery = await self._discover(http)
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": kept["verifier"],
        }
        headers = {}
        if self.config.client_secret:
            headers["Authorization"] = aiohttp.encode_basic_auth(
                self.config.client_id, self.config.client_secret
            )
        else:
            form["client_id"] = self.config.client_id
        try:
            async with http.post(discovery["token_endpoint"], data=form, headers=headers) as r:
                body = await r.json()
                if r.status != 200:
                    raise FederationError(
                        f"{self.config.name} refused the sign-in: {body.get('error', r.status)}"
                    )
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise FederationError(f"{self.config.name} cannot be reached: {exc}") from None
        return await self._verify(http, str(body.get("id_token", "")), kept["nonce"])

    async def _verify(self, http: aiohttp.ClientSession, token: str, nonce: str) -> dict[str, Any]:
        try:
            kid = jwt.get_unverified_header(token).get("kid", "")
        except jwt.PyJWTError:
            raise FederationError("the upstream ID token is malformed") from None
        if kid not in self._keys:  # the upstream rotated: look once more
            await self._discover(http, force=True)
        key = self._keys.get(kid)
        if key is None:
            raise FederationError("the upstream ID token is signed with an unknown key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=ALGORITHMS,
                audience=self.config.client_id,
                issuer=self.config.issuer,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
                leeway=30,
            )
        except jwt.PyJWTError as exc:
            raise FederationError(f"the upstream ID token is not valid: {exc}") from None
        if claims.get("nonce") != nonce:  # OIDC Core §3.1.3.7 step 11
            raise FederationError("the upstream ID token does not answer this sign-in (nonce)")
        return claims
