"""The admin API for OAuth clients (docs/identity-api.md), used by operators and the Kubernetes
operator. Every change is audited; secrets are shown once and never logged."""

from __future__ import annotations

import hmac
import json
import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cityplane.problem import Problem
from identity.clients import CLIENT_ID_PATTERN, ClientSpec
from identity.hub import HUB, Hub
from identity.oidc.endpoints import verify_access_token
from identity.store import DuplicateError
from identity.trust.password import check_new_password
from identity.trust.sms import InvalidPhone, normalize_phone

ADMIN_SCOPE = "identity:admin"
_CLIENT_ID = re.compile(CLIENT_ID_PATTERN)
_REALM = 'Bearer realm="cityplane-identity"'


async def _admin(request: web.Request) -> str:
    """Who is calling, or a 401/403 problem."""
    hub: Hub = request.app[HUB]
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if not token:
        raise Problem(
            401, "unauthorized", "a bearer token is required", headers={"WWW-Authenticate": _REALM}
        )
    if hmac.compare_digest(token.encode(), hub.admin_token.encode()):
        return "admin"
    claims = verify_access_token(hub, token)
    if claims is None or await hub.store.jti_revoked(claims["jti"]):
        raise Problem(
            401,
            "unauthorized",
            "the token is not valid",
            headers={"WWW-Authenticate": f'{_REALM}, error="invalid_token"'},
        )
    if ADMIN_SCOPE not in str(claims.get("scope", "")).split():
        raise Problem(
            403,
            "forbidden",
            f"the token lacks the {ADMIN_SCOPE} scope",
            headers={
                "WWW-Authenticate": f'{_REALM}, error="insufficient_scope", scope="{ADMIN_SCOPE}"'
            },
        )
    return str(claims["sub"])


def _client_id(request: web.Request) -> str:
    client_id = request.match_info["client_id"]
    if not _CLIENT_ID.match(client_id):
        raise Problem(422, "invalid-client-id", f"client_id must match {CLIENT_ID_PATTERN}")
    return client_id


async def _spec(request: web.Request) -> ClientSpec:
    if request.content_type != "application/json":
        raise Problem(415, "unsupported-media-type", "send application/json")
    try:
        body = json.loads(await request.read())
    except ValueError:
        raise Problem(400, "malformed-json", "the body is not valid JSON") from None
    try:
        return ClientSpec.model_validate(body)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]) or "(body)", "message": e["msg"]}
            for e in exc.errors()
        ]
        first = errors[0]
        raise Problem(
            422, "invalid-client", f"{first['field']}: {first['message']}", errors=errors
        ) from None


async def put_client(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    actor = await _admin(request)
    client_id = _client_id(request)
    spec = await _spec(request)
    client, secret, created = await hub.store.put_client(client_id, spec)
    await hub.audit.record(
        "admin.client_created" if created else "admin.client_updated",
        actor=actor,
        client_id=client_id,
        spec=spec.model_dump(),
    )
    body = client.as_json()
    if secret:
        body["client_secret"] = secret
    return web.json_response(
        body, status=201 if created else 200, headers={"Cache-Control": "no-store"}
    )


async def get_client(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    await _admin(request)
    client_id = _client_id(request)
    client = await hub.store.client(client_id)
    if client is None:
        raise Problem(404, "not-found", f"no client {client_id!r}")
    return web.json_response(client.as_json())


async def list_clients(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    await _admin(request)
    return web.json_response({"items": [c.as_json() for c in await hub.store.list_clients()]})


async def rotate_secret(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    actor = await _admin(request)
    client_id = _client_id(request)
    client = await hub.store.client(client_id)
    if client is None:
        raise Problem(404, "not-found", f"no client {client_id!r}")
    if client.spec.public:
        raise Problem(409, "public-client", "a public client has no secret to rotate")
    secret = await hub.store.rotate_client_secret(client_id)
    await hub.audit.record("admin.client_secret_rotated", actor=actor, client_id=client_id)
    return web.json_response(
        {"client_id": client_id, "client_secret": secret}, headers={"Cache-Control": "no-store"}
    )


async def delete_client(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    actor = await _admin(request)
    client_id = _client_id(request)
    if not await hub.store.delete_client(client_id):
        raise Problem(404, "not-found", f"no client {client_id!r}")
    await hub.audit.record("admin.client_deleted", actor=actor, client_id=client_id)
    return web.Response(status=204)


async def rotate_keys(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    actor = await _admin(request)
    keys = await hub.keys.rotate()
    await hub.audit.record("admin.key_rotated", actor=actor, kids=[k.kid for k in keys])
    return web.json_response(
        {"keys": [{"kid": k.kid, "alg": k.alg, "active_from": k.active_from} for k in keys]}
    )


async def verify_audit(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    await _admin(request)
    broken = await hub.audit.verify()
    return web.json_response({"intact": broken is None, "first_bad_entry": broken})


class OrganizationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)


class MemberSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    roles: list[str] = Field(default=[], max_length=16)


class AccountSpec(BaseModel):
    """An account made by an administrator (people sign up through federation or here)."""

    model_config = ConfigDict(extra="forbid")
    username: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{1,63}$")
    display_name: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=1024)
    email: str | None = Field(default=None, max_length=254)
    phone: str | None = None


_ORG_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


async def _body(request: web.Request, model: type[Any]) -> Any:
    if request.content_type != "application/json":
        raise Problem(415, "unsupported-media-type", "send application/json")
    try:
        return model.model_validate_json(await request.read())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(body)"
        raise Problem(422, "invalid-body", f"{where}: {first['msg']}") from None


def _org_id(request: web.Request) -> str:
    org_id = request.match_info["org_id"]
    if not _ORG_ID.match(org_id):
        raise Problem(422, "invalid-organization-id", "organization ids are DNS labels")
    return org_id


async def put_organization(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    actor = await _admin(request)
    org_id = _org_id(request)
    spec = await _body(request, OrganizationSpec)
    created = await hub.store.put_organization(org_id, spec.name)
    await hub.audit.record("admin.organization_put", actor=actor, org=org_id, name=spec.name)
    return web.json_response({"id": org_id, "name": spec.name}, status=201 if created else 200)


async def put_member(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    actor = await _admin(request)
    org_id = _org_id(request)
    spec = await _body(request, MemberSpec)
    account = await hub.store.account_by_username(request.match_info["username"])
    if account is None:
        raise Problem(404, "not-found", "no such account")
    if not await hub.store.organization_exists(org_id):
        raise Problem(404, "not-found", f"no organization {org_id!r}")
    await hub.store.add_member(org_id, account.id, spec.roles)
    await hub.audit.record(
        "admin.member_put", actor=actor, subject=account.id, org=org_id, roles=spec.roles
    )
    return web.json_response(
        {"organization": org_id, "username": account.username, "roles": spec.roles}
    )


async def delete_member(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    actor = await _admin(request)
    org_id = _org_id(request)
    account = await hub.store.account_by_username(request.match_info["username"])
    if account is None or not await hub.store.remove_member(org_id, account.id):
        raise Problem(404, "not-found", "no such member")
    await hub.audit.record("admin.member_removed", actor=actor, subject=account.id, org=org_id)
    return web.Response(status=204)


async def create_account(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    actor = await _admin(request)
    spec = await _body(request, AccountSpec)
    reason = check_new_password(spec.password, username=spec.username)
    if reason:
        raise Problem(422, "weak-password", reason)
    phone = None
    if spec.phone:
        try:
            phone = normalize_phone(spec.phone)
        except InvalidPhone as exc:
            raise Problem(422, "invalid-phone", str(exc)) from None
    try:
        account = await hub.store.create_account(
            spec.username,
            spec.display_name,
            password_hash=await hub.hasher.hash(spec.password),
            phone=phone,
            email=spec.email,
        )
    except DuplicateError as exc:
        raise Problem(409, "username-taken", str(exc)) from None
    await hub.audit.record("admin.account_created", actor=actor, subject=account.id)
    return web.json_response({"id": account.id, "username": account.username}, status=201)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/admin/accounts", create_account)
    app.router.add_put("/admin/organizations/{org_id}", put_organization)
    app.router.add_put("/admin/organizations/{org_id}/members/{username}", put_member)
    app.router.add_delete("/admin/organizations/{org_id}/members/{username}", delete_member)
    app.router.add_get("/admin/clients", list_clients)
    app.router.add_put("/admin/clients/{client_id}", put_client)
    app.router.add_get("/admin/clients/{client_id}", get_client)
    app.router.add_delete("/admin/clients/{client_id}", delete_client)
    app.router.add_post("/admin/clients/{client_id}/secret", rotate_secret)
    app.router.add_post("/admin/keys/rotate", rotate_keys)
    app.router.add_get("/admin/audit/verify", verify_audit)
