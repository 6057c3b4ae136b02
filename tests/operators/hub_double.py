"""A contract double of the identity hub's admin API for OIDC clients.

It implements docs/identity-api.md ("Admin API for clients") and the discovery document's
``issuer``, nothing more, so the operator's tests can run before the hub exists. It is the only
place the operator's tests know the hub from: when the real hub lands, ``start_hub_double``
is the one function to replace (start the real hub, answer its URL, admin token and a way to
read a client's current secret).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

_CLIENT_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{1,62}$")
_GRANTS = {"authorization_code", "refresh_token", "client_credentials"}
_FIELDS = {
    "name",
    "redirect_uris",
    "scopes",
    "grant_types",
    "public",
    "min_trust_level",
    "owner",
    "post_logout_redirect_uris",
    "backchannel_logout_uri",
}


def _problem(status: int, title: str, detail: str) -> web.Response:
    return web.json_response(
        {"type": "about:blank", "title": title, "status": status, "detail": detail},
        status=status,
        content_type="application/problem+json",
    )


@dataclass
class HubDouble:
    token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    issuer: str = "https://id.city.example"
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/admin/clients", self._list)
        app.router.add_put("/admin/clients/{client_id}", self._put)
        app.router.add_get("/admin/clients/{client_id}", self._get)
        app.router.add_delete("/admin/clients/{client_id}", self._delete)
        app.router.add_post("/admin/clients/{client_id}/secret", self._rotate)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        authorized = request.headers.get("Authorization") == f"Bearer {self.token}"
        if request.path.startswith("/admin/") and not authorized:
            return _problem(401, "Unauthorized", "a valid admin token is required")
        response: web.StreamResponse = await handler(request)
        return response

    async def _discovery(self, _: web.Request) -> web.Response:
        return web.json_response({"issuer": self.issuer, "jwks_uri": self.issuer + "/jwks.json"})

    async def _list(self, _: web.Request) -> web.Response:
        return web.json_response({"items": list(self.clients.values())})

    async def _put(self, request: web.Request) -> web.Response:
        client_id = request.match_info["client_id"]
        if not _CLIENT_ID.match(client_id):
            return _problem(422, "Invalid client", f"client_id {client_id!r} is not allowed")
        spec = await request.json()
        if not isinstance(spec, dict) or set(spec) - _FIELDS:
            return _problem(422, "Invalid client", f"unknown fields: {sorted(set(spec) - _FIELDS)}")
        grants = set(spec.get("grant_types") or [])
        if grants - _GRANTS:
            return _problem(
                422, "Invalid client", f"unknown grant types {sorted(grants - _GRANTS)}"
            )
        if spec.get("public") and "client_credentials" in grants:
            return _problem(422, "Invalid client", "public clients cannot use client_credentials")
        created = client_id not in self.clients
        stamp = self.clients.get(client_id, {}).get("created_at") or datetime.now(UTC).isoformat()
        self.clients[client_id] = {**spec, "client_id": client_id, "created_at": stamp}
        body = dict(self.clients[client_id])
        if created and not spec.get("public"):
            self.secrets[client_id] = body["client_secret"] = secrets.token_urlsafe(32)
        return web.json_response(body, status=201 if created else 200)

    async def _get(self, request: web.Request) -> web.Response:
        client = self.clients.get(request.match_info["client_id"])
        if client is None:
            return _problem(404, "Not found", "no such client")
        return web.json_response(client)

    async def _delete(self, request: web.Request) -> web.Response:
        client_id = request.match_info["client_id"]
        if self.clients.pop(client_id, None) is None:
            return _problem(404, "Not found", "no such client")
        self.secrets.pop(client_id, None)
        return web.Response(status=204)

    async def _rotate(self, request: web.Request) -> web.Response:
        client_id = request.match_info["client_id"]
        client = self.clients.get(client_id)
        if client is None:
            return _problem(404, "Not found", "no such client")
        if client.get("public"):
            return _problem(422, "Invalid client", "a public client has no secret")
        self.secrets[client_id] = secrets.token_urlsafe(32)
        return web.json_response({"client_id": client_id, "client_secret": self.secrets[client_id]})

    async def start(self, port: int = 0) -> HubDouble:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server: Any = site._server
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def start_hub_double(port: int = 0) -> HubDouble:
    return await HubDouble().start(port)
