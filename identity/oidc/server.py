"""Authlib's authorization server, fed by aiohttp, with the event loop kept free.

Authlib's grants are synchronous and ask for data through hooks (`query_client`,
`query_authorization_code`, `save_token`, …). We never block in those hooks: the async handler
loads everything a grant can ask for first (the client, the code or refresh token row, the
account) into a `GrantContext`, runs Authlib's grant code (pure CPU: validation, PKCE, token
signing) against it, and collects the writes the grant wants in the context; the handler then
commits them in one transaction. See ADR 0007 for the measurements behind this choice.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from authlib.oauth2.rfc6749 import AuthorizationServer, OAuth2Request
from authlib.oauth2.rfc6749 import grants as oauth2_grants
from authlib.oauth2.rfc6749.requests import JsonPayload, JsonRequest, OAuth2Payload
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oidc.core.grants import OpenIDCode
from sqlalchemy import bindparam, insert, update

from identity.clients import HubClient, digest
from identity.keys import KeyRing
from identity.models import authorization_codes, refresh_tokens
from identity.store import Account, Write

ACCESS_TOKEN_TYPE = "at+jwt"  # RFC 9068 §2.1

# The grants' writes, built once (see `Write`). The conditional updates are the single-use
# rules: a code (RFC 6749 §4.1.2) and a rotated refresh token (RFC 9700 §4.14.2) are used once.
_INSERT_CODE = insert(authorization_codes)
_MARK_CODE_USED = (
    update(authorization_codes)
    .where(authorization_codes.c.digest == bindparam("presented"))
    .where(authorization_codes.c.used.is_(False))
    .values(used=True)
)
_INSERT_REFRESH_TOKEN = insert(refresh_tokens)
_MARK_REFRESH_TOKEN_USED = (
    update(refresh_tokens)
    .where(refresh_tokens.c.digest == bindparam("presented"))
    .where(refresh_tokens.c.used_at.is_(None))
    .values(used_at=bindparam("now"))
)


@dataclass(slots=True)
class GrantContext:
    """What one grant may read (loaded before it runs) and write (committed after)."""

    client: HubClient | None = None
    account: Account | None = None
    code: dict[str, Any] | None = None
    refresh: dict[str, Any] | None = None
    # acr, amr, auth_time, org, org_roles, sid: the authentication behind this grant
    auth: dict[str, Any] = field(default_factory=dict)
    session_id: str | None = None
    family: str | None = None
    writes: list[Write] = field(default_factory=list)
    issued: dict[str, Any] = field(default_factory=dict)
    server: HubAuthorizationServer | None = None


_context: ContextVar[GrantContext] = ContextVar("grant_context")


def current() -> GrantContext:
    return _context.get()


class _Payload(OAuth2Payload):
    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._datalist: dict[str, list[str]] = {}
        for key, value in pairs:
            self._datalist.setdefault(key, []).append(value)
        self._data = {k: v[0] for k, v in self._datalist.items()}

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> Any:
        return self._datalist


class _JsonPayload(JsonPayload):
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    @property
    def data(self) -> dict[str, Any]:
        return self._data


class HubRequest(OAuth2Request):
    """An already-read aiohttp request in the shape Authlib expects."""

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Mapping[str, str],
        query: list[tuple[str, str]],
        form: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(method, uri, headers=dict(headers))
        self._args = dict(query)
        self._form = dict(form or [])
        self.payload = _Payload(query if method == "GET" else (form or []))

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


class HubAuthorizationServer(AuthorizationServer):
    def __init__(
        self,
        *,
        issuer: str,
        keys: KeyRing,
        access_token_ttl: int,
        refresh_token_ttl: int,
        code_ttl: int,
        id_token_ttl: int,
        userinfo: Any,
        audiences: list[str] | None = None,
    ) -> None:
        super().__init__(scopes_supported=None)
        self.issuer = issuer
        self.keys = keys
        self.access_token_ttl = access_token_ttl
        self.refresh_token_ttl = refresh_token_ttl
        self.code_ttl = code_ttl
        self.id_token_ttl = id_token_ttl
        self.userinfo = userinfo  # (account, scopes) -> claims
        self.audiences: list[str] | str | None = (
            audiences[0] if audiences and len(audiences) == 1 else (audiences or None)
        )
        self.register_token_generator("default", self._generate_token)
        self.register_grant(AuthorizationCodeGrant, [HubOpenIDCode(), CodeChallenge(required=True)])
        self.register_grant(RefreshTokenGrant)
        self.register_grant(oauth2_grants.ClientCredentialsGrant)

    def run(self, context: GrantContext, call: Any, *args: Any, **kwargs: Any) -> Any:
        context.server = self
        token = _context.set(context)
        try:
            return call(*args, **kwargs)
        finally:
            _context.reset(token)

    # --- Authlib's framework hooks
    def query_client(self, client_id: str) -> HubClient | None:
        client = current().client
        return client if client is not None and client.client_id == client_id else None

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        ctx = current()
        refresh = token.get("refresh_token")
        if refresh:
            now = time.time()
            ctx.writes.append(
                Write(
                    _INSERT_REFRESH_TOKEN,
                    {
                        "digest": digest(refresh),
                        "family": ctx.family or secrets.token_hex(16),
                        "client_id": request.client.client_id,
                        "account_id": ctx.account.id if ctx.account else None,
                        "session_id": ctx.session_id,
                        "scope": token.get("scope", ""),
                        "auth": ctx.auth,
                        "created_at": now,
                        "expires_at": now + self.refresh_token_ttl,
                        "used_at": None,
                        "revoked": False,
                    },
                )
            )

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass  # Authlib's optional instrumentation hooks; our audit log records grants instead

    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        assert isinstance(request, OAuth2Request)
        return request

    def create_json_request(self, request: Any) -> JsonRequest:
        # Authlib's JSON endpoints (e.g. RFC 7591 registration) would come through here; the
        # hub serves none of them today, but the adapter is complete.
        assert isinstance(request, HubRequest)
        json_request = JsonRequest(request.method, request.uri, request.headers)
        json_request.payload = _JsonPayload(request.form or request.args)
        return json_request

    def handle_response(self, status: int, body: Any, headers: Any) -> tuple[int, Any, Any]:
        return status, body, headers

    # --- tokens: RFC 9068 JWT access tokens, opaque rotating refresh tokens
    def _generate_token(
        self,
        grant_type: str,
        client: HubClient,
        user: Account | None = None,
        scope: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        ctx = current()
        now = int(time.time())
        ttl = expires_in or self.access_token_ttl
        jti = secrets.token_urlsafe(16)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": user.id if user else client.client_id,
            # RFC 9068 §3: aud names the resource servers the token is for (the gateway, the
            # registry) when the hub is told them; otherwise the client itself.
            "aud": self.audiences or client.client_id,
            "exp": now + ttl,
            "iat": now,
            "jti": jti,
            "client_id": client.client_id,
        }
        if scope:
            claims["scope"] = scope
        if user is not None:
            for name in ("acr", "amr", "auth_time", "org", "org_roles", "sid"):
                if ctx.auth.get(name) is not None:
                    claims[name] = ctx.auth[name]
        elif client.spec.owner:
            claims["org"] = client.spec.owner
        token: dict[str, Any] = {
            "token_type": "Bearer",
            "access_token": self.keys.sign(claims, typ=ACCESS_TOKEN_TYPE),
            "expires_in": ttl,
        }
        if scope:
            token["scope"] = scope
        if include_refresh_token and user is not None and client.check_grant_type("refresh_token"):
            token["refresh_token"] = secrets.token_urlsafe(32)
        ctx.issued = {"jti": jti, "sub": claims["sub"], "scope": scope or ""}
        return token


class AuthorizationCodeGrant(oauth2_grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        ctx = current()
        server: HubAuthorizationServer = self.server
        data = request.payload.data
        assert ctx.account is not None
        ctx.writes.append(
            Write(
                _INSERT_CODE,
                {
                    "digest": digest(code),
                    "client_id": request.client.client_id,
                    "account_id": ctx.account.id,
                    "session_id": ctx.session_id,
                    "redirect_uri": request.payload.redirect_uri or "",
                    "scope": request.scope or "",
                    "nonce": data.get("nonce"),
                    "code_challenge": data.get("code_challenge"),
                    "code_challenge_method": data.get("code_challenge_method"),
                    "auth": ctx.auth,
                    "expires_at": time.time() + server.code_ttl,
                    "used": False,
                },
            )
        )

    def query_authorization_code(self, code: str, client: HubClient) -> _Code | None:
        row = current().code
        if row is None or row["digest"] != digest(code) or row["client_id"] != client.client_id:
            return None
        if row["used"] or row["expires_at"] <= time.time():
            return None
        return _Code(row)

    def delete_authorization_code(self, authorization_code: _Code) -> None:
        # Single use (RFC 6749 §4.1.2): a concurrent exchange of the same code loses the race.
        current().writes.append(
            Write(_MARK_CODE_USED, {"presented": authorization_code.row["digest"]}, True)
        )

    def authenticate_user(self, authorization_code: _Code) -> Account | None:
        return current().account


class _Code:
    """An authorization code row in the shape Authlib's grant and OIDC extension read."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.row = row

    def get_redirect_uri(self) -> str:
        return str(self.row["redirect_uri"])

    def get_scope(self) -> str:
        return str(self.row["scope"])

    def get_nonce(self) -> str | None:
        return self.row["nonce"]

    def get_auth_time(self) -> int | None:
        return self.row["auth"].get("auth_time")

    def get_acr(self) -> str | None:
        return self.row["auth"].get("acr")

    def get_amr(self) -> list[str] | None:
        return self.row["auth"].get("amr")

    @property
    def code_challenge(self) -> str | None:
        return self.row["code_challenge"]

    @property
    def code_challenge_method(self) -> str | None:
        return self.row["code_challenge_method"]


class HubOpenIDCode(OpenIDCode):
    """ID tokens (OIDC Core §2) signed by the hub's key ring, with acr/amr/auth_time."""

    def __init__(self) -> None:
        super().__init__(require_nonce=False)

    def exists_nonce(self, nonce: str, request: OAuth2Request) -> bool:
        return False  # codes are single-use, so a nonce cannot be replayed through them

    def generate_user_info(self, user: Account, scope: str) -> dict[str, Any]:
        return dict(current_server().userinfo(user, scope.split()))

    def encode_id_token(self, token: dict[str, Any], request: OAuth2Request) -> str:
        server = current_server()
        ctx = current()
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": server.issuer,
            "aud": request.client.client_id,
            "iat": now,
            "exp": now + server.id_token_ttl,
        }
        code = request.authorization_code
        if code is not None and code.get_nonce():
            claims["nonce"] = code.get_nonce()
        for name in ("acr", "amr", "auth_time", "sid", "org"):
            if ctx.auth.get(name) is not None:
                claims[name] = ctx.auth[name]
        # OIDC Core §3.1.3.6 at_hash: left half of SHA-256 of the access token (ES256/RS256).
        half = hashlib.sha256(token["access_token"].encode()).digest()[:16]
        claims["at_hash"] = base64.urlsafe_b64encode(half).rstrip(b"=").decode()
        claims.update(self.generate_user_info(request.user, token["scope"]))
        alg = request.client.spec.id_token_signed_response_alg
        # at_hash uses the hash of the ID token's alg; SHA-256 for both ES256 and RS256.
        return server.keys.sign(claims, alg=alg)


class RefreshTokenGrant(oauth2_grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]
    INCLUDE_NEW_REFRESH_TOKEN = True  # rotation (RFC 9700 §4.14.2)

    def authenticate_refresh_token(self, refresh_token: str) -> _Refresh | None:
        row = current().refresh
        if row is None or row["digest"] != digest(refresh_token):
            return None
        if row["revoked"] or row["used_at"] is not None or row["expires_at"] <= time.time():
            return None
        return _Refresh(row)

    def authenticate_user(self, refresh_token: _Refresh) -> Account | None:
        return current().account

    def revoke_old_credential(self, refresh_token: _Refresh) -> None:
        presented = refresh_token.row["digest"]
        current().writes.append(
            Write(_MARK_REFRESH_TOKEN_USED, {"presented": presented, "now": time.time()}, True)
        )


class _Refresh:
    def __init__(self, row: dict[str, Any]) -> None:
        self.row = row

    def get_scope(self) -> str:
        return str(self.row["scope"])

    def check_client(self, client: HubClient) -> bool:
        return bool(self.row["client_id"] == client.client_id)

    def is_expired(self) -> bool:
        return bool(self.row["expires_at"] <= time.time())

    def is_revoked(self) -> bool:
        return bool(self.row["revoked"])


def current_server() -> HubAuthorizationServer:
    server = current().server
    assert server is not None
    return server
