"""The protocol endpoints that are not pages: discovery, JWKS, token, userinfo, introspection
(RFC 7662) and revocation (RFC 7009)."""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any
from urllib.parse import unquote

import jwt
from aiohttp import web

from identity.clients import HubClient, digest
from identity.hub import HUB, Hub
from identity.oidc.server import GrantContext, HubRequest

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1


def oauth_error(status: int, error: str, description: str, **headers: str) -> web.Response:
    return web.json_response(
        {"error": error, "error_description": description},
        status=status,
        headers={**NO_STORE, **headers},
    )


async def discovery(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    iss = hub.issuer
    levels = range(1, 5)
    doc = {
        "issuer": iss,
        "authorization_endpoint": f"{iss}/authorize",
        "token_endpoint": f"{iss}/token",
        "userinfo_endpoint": f"{iss}/userinfo",
        "jwks_uri": f"{iss}/jwks.json",
        "end_session_endpoint": f"{iss}/logout",
        "introspection_endpoint": f"{iss}/introspect",
        "revocation_endpoint": f"{iss}/revoke",
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": list(hub.keys.algorithms),
        "token_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
            "none",
        ],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": ["openid", "profile", "email", "phone", "offline_access"],
        "claims_supported": [
            "sub",
            "iss",
            "aud",
            "exp",
            "iat",
            "auth_time",
            "nonce",
            "acr",
            "amr",
            "sid",
            "org",
            "name",
            "preferred_username",
            "email",
            "phone_number",
            "locale",
        ],
        "claims_parameter_supported": True,
        "acr_values_supported": [hub.policy.acr(level) for level in levels],
        # ARCHITECTURE.md: each level mapped to an eIDAS level of assurance.
        "cityplane_acr_eidas": {hub.policy.acr(level): hub.eidas(level) for level in levels},
        "backchannel_logout_supported": True,
        "backchannel_logout_session_supported": True,
        "frontchannel_logout_supported": False,
        "request_parameter_supported": False,
        "ui_locales_supported": ["en", "zh-CN"],
    }
    return web.json_response(doc, headers={"Cache-Control": "public, max-age=300"})


async def jwks(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    return web.json_response(hub.keys.jwks(), headers={"Cache-Control": "public, max-age=300"})


def _basic_credentials(request: web.Request) -> tuple[str, str] | None:
    header = request.headers.get("Authorization", "")
    if header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        return None
    # RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
    return unquote(client_id), unquote(secret)


async def _form(request: web.Request) -> list[tuple[str, str]]:
    if request.content_type != "application/x-www-form-urlencoded":
        raise web.HTTPUnsupportedMediaType(
            text=json.dumps(
                {
                    "error": "invalid_request",
                    "error_description": "use application/x-www-form-urlencoded",
                }
            ),
            content_type="application/json",
        )
    form = await request.post()
    return [(k, v) for k, v in form.items() if isinstance(v, str)]


async def token(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    pairs = await _form(request)
    form = dict(pairs)
    basic = _basic_credentials(request)
    client_id = basic[0] if basic else form.get("client_id")
    ctx = GrantContext()
    if client_id:
        ctx.client = await hub.store.client(client_id)
    grant_type = form.get("grant_type")
    if grant_type == "authorization_code" and form.get("code"):
        row = await hub.store.code(digest(form["code"]))
        if row is not None and row["used"]:
            # RFC 6749 §4.1.2: a code used twice revokes what was issued from it.
            if row["session_id"]:
                await hub.store.revoke_session_tokens(row["session_id"])
            await hub.audit.record(
                "token.code_replayed", subject=row["account_id"], client_id=client_id
            )
        elif row is not None:
            ctx.code = row
            ctx.account = await hub.store.account_cached(row["account_id"])
            ctx.auth = dict(row["auth"])
            ctx.session_id = row["session_id"]
    elif grant_type == "refresh_token" and form.get("refresh_token"):
        row = await hub.store.refresh_token(digest(form["refresh_token"]))
        if row is not None and row["used_at"] is not None and not row["revoked"]:
            # RFC 9700 §4.14.2: a rotated refresh token presented again means it leaked;
            # revoke the whole family so neither the thief nor the client can go on.
            await hub.store.revoke_family(row["family"])
            await hub.audit.record(
                "token.refresh_reused", subject=row["account_id"], client_id=row["client_id"]
            )
            return oauth_error(400, "invalid_grant", "refresh token reuse detected; revoked")
        if row is not None:
            ctx.refresh = row
            ctx.account = row["account_id"] and await hub.store.account_cached(row["account_id"])
            ctx.auth = dict(row["auth"])
            ctx.family = row["family"]
            ctx.session_id = row["session_id"]
    req = HubRequest("POST", f"{hub.issuer}/token", request.headers, [], pairs)
    status, body, headers = hub.server.run(ctx, hub.server.create_token_response, req)
    if status == 200:
        # The grant's writes (code used, refresh token rotated, new refresh token) commit with
        # the audit entry, in the audit writer's batch: one transaction for many grants.
        held = await hub.audit.record(
            "token.issued",
            subject=ctx.account.id if ctx.account else None,
            client_id=ctx.client.client_id if ctx.client else None,
            ip=request.remote,
            writes=ctx.writes,
            grant_type=grant_type,
            jti=ctx.issued.get("jti"),
            scope=ctx.issued.get("scope"),
        )
        if not held:
            return oauth_error(400, "invalid_grant", "the grant was used concurrently")
        hub.metrics.tokens.labels(grant_type or "").inc()
    else:
        hub.metrics.token_errors.labels(grant_type or "", str(body.get("error", ""))).inc()
    out = dict(headers)
    out.update(NO_STORE)
    out.pop("Content-Type", None)
    return web.json_response(body, status=status, headers=out)


def verify_access_token(hub: Hub, token: str) -> dict[str, Any] | None:
    """Our own JWT access token's claims, or None (bad signature, expired, not ours)."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return None
    key = hub.keys.public_keys().get(header.get("kid", ""))
    if key is None or header.get("typ") != "at+jwt":
        return None
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[hub.keys.alg],
            issuer=hub.issuer,
            options={"verify_aud": False, "require": ["exp", "iat", "sub", "jti"]},
        )
    except jwt.PyJWTError:
        return None
    return claims


async def userinfo(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    claims = verify_access_token(hub, token) if token else None
    challenge = 'Bearer realm="cityplane", error="invalid_token"'
    if claims is None or await hub.store.jti_revoked(claims["jti"]):
        return oauth_error(
            401, "invalid_token", "the access token is not valid", **{"WWW-Authenticate": challenge}
        )
    scopes = str(claims.get("scope", "")).split()
    if "openid" not in scopes:
        return oauth_error(
            403,
            "insufficient_scope",
            "the token lacks the openid scope",
            **{"WWW-Authenticate": 'Bearer realm="cityplane", error="insufficient_scope"'},
        )
    account = await hub.store.account(claims["sub"])
    if account is None:
        return oauth_error(
            401, "invalid_token", "the account is gone", **{"WWW-Authenticate": challenge}
        )
    await hub.audit.record(
        "userinfo.read",
        subject=account.id,
        client_id=claims.get("client_id"),
        ip=request.remote,
        scope=" ".join(scopes),
    )
    return web.json_response(hub.userinfo(account, scopes), headers=NO_STORE)


async def _authenticated_client(request: web.Request, form: dict[str, str]) -> HubClient | None:
    hub: Hub = request.app[HUB]
    basic = _basic_credentials(request)
    client_id, secret = basic if basic else (form.get("client_id"), form.get("client_secret"))
    if not client_id:
        return None
    client = await hub.store.client(client_id)
    if client is None:
        return None
    if client.spec.public:
        return client if not secret else None
    return client if secret and client.check_client_secret(secret) else None


async def introspect(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    form = dict(await _form(request))
    client = await _authenticated_client(request, form)
    if client is None or client.spec.public:
        return oauth_error(
            401,
            "invalid_client",
            "introspection needs a confidential client",
            **{"WWW-Authenticate": 'Basic realm="cityplane"'},
        )
    value = form.get("token", "")
    claims = verify_access_token(hub, value)
    if claims is not None and not await hub.store.jti_revoked(claims["jti"]):
        return web.json_response(
            {"active": True, "token_type": "Bearer", **claims}, headers=NO_STORE
        )
    row = await hub.store.refresh_token(digest(value)) if value else None
    if (
        row is not None
        and not row["revoked"]
        and row["used_at"] is None
        and row["expires_at"] > time.time()
    ):
        return web.json_response(
            {
                "active": True,
                "token_type": "refresh_token",
                "client_id": row["client_id"],
                "sub": row["account_id"],
                "scope": row["scope"],
                "exp": int(row["expires_at"]),
                "iss": hub.issuer,
            },
            headers=NO_STORE,
        )
    return web.json_response({"active": False}, headers=NO_STORE)


async def revoke(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    form = dict(await _form(request))
    client = await _authenticated_client(request, form)
    if client is None:
        return oauth_error(
            401,
            "invalid_client",
            "client authentication failed",
            **{"WWW-Authenticate": 'Basic realm="cityplane"'},
        )
    value = form.get("token", "")
    row = await hub.store.refresh_token(digest(value)) if value else None
    if row is not None and row["client_id"] == client.client_id:
        await hub.store.revoke_family(row["family"])
        await hub.audit.record(
            "token.revoked", subject=row["account_id"], client_id=client.client_id
        )
    else:
        claims = verify_access_token(hub, value)
        if claims is not None and claims.get("client_id") == client.client_id:
            await hub.store.revoke_jti(claims["jti"], float(claims["exp"]))
            await hub.audit.record(
                "token.revoked", subject=claims["sub"], client_id=client.client_id
            )
    # RFC 7009 §2.2: 200 whether or not the token was valid.
    return web.Response(status=200, headers=NO_STORE)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/jwks.json", jwks)
    app.router.add_post("/token", token)
    app.router.add_route("GET", "/userinfo", userinfo)
    app.router.add_route("POST", "/userinfo", userinfo)
    app.router.add_post("/introspect", introspect)
    app.router.add_post("/revoke", revoke)
