"""Who is calling: bearer tokens (RFC 6750) checked by a chain of verifiers.

Two verifiers: the bootstrap admin token (`AdminTokenVerifier`) and the identity hub's JWT
access tokens (`registry.tokens.HubTokenVerifier`). Each turns a token into a `Principal`; what
a principal may do with which service is `registry.ownership`'s business.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from cityplane.problem import Problem

log = logging.getLogger(__name__)

PROTECTED_PREFIX = "/v1/"


# docs/identity-api.md, "Access tokens": the scopes the registry understands.
READ_SCOPE, WRITE_SCOPE, ADMIN_SCOPE = "registry:read", "registry:write", "registry:admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """A caller: the bootstrap admin, or the subject of a hub access token."""

    name: str  # what the audit log records as `actor`: the token's `sub`, or "admin"
    admin: bool = False  # the bootstrap token, or scope registry:admin: every service
    writes: bool = False  # scope registry:write: services owned by `organization`
    reads: bool = False  # registry:read (write and admin imply it)
    organization: str | None = None  # the token's `org`
    client_id: str | None = None  # the token's `client_id`

    @classmethod
    def from_scopes(
        cls,
        name: str,
        scopes: frozenset[str],
        *,
        organization: str | None = None,
        client_id: str | None = None,
    ) -> Principal:
        admin = ADMIN_SCOPE in scopes
        writes = admin or WRITE_SCOPE in scopes
        return cls(
            name,
            admin=admin,
            writes=writes,
            # A token that may change a service may read it: `cityplane apply` reads first.
            reads=writes or READ_SCOPE in scopes,
            organization=organization,
            client_id=client_id,
        )


ADMIN = Principal("admin", admin=True, writes=True, reads=True)
# aiohttp ≥ 3.13 wants typed request keys; older releases in our range take a plain string.
_PRINCIPAL: Any = (
    web.RequestKey("principal", Principal) if hasattr(web, "RequestKey") else "cityplane.principal"
)


def principal(request: web.Request) -> Principal:
    """The caller of a `/v1/*` request (set by the authentication middleware)."""
    found = request[_PRINCIPAL]
    assert isinstance(found, Principal)
    return found


class TokenVerifier(Protocol):
    async def verify(self, token: str) -> Principal | None:
        """The caller behind `token`, or None when this verifier does not know the token."""
        ...


class AdminTokenVerifier:
    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def verify(self, token: str) -> Principal | None:
        # Constant time: how much of a guess matched must not show in the answer's timing.
        return ADMIN if hmac.compare_digest(token.encode(), self._token) else None


REALM = 'Bearer realm="cityplane-registry"'


def unauthorized(detail: str, error: str | None, description: str | None = None) -> Problem:
    challenge = REALM
    if error:  # RFC 6750 §3.1: no error code when the request carried no token at all
        challenge += f', error="{error}"'
    if description:  # RFC 6750 §3: error_description, for the developer, not the end user
        challenge += f', error_description="{description}"'
    return Problem(401, "unauthorized", detail, headers={"WWW-Authenticate": challenge})


class Authenticator:
    def __init__(self, verifiers: Sequence[TokenVerifier]) -> None:
        self._verifiers = tuple(verifiers)

    async def authenticate(self, request: web.Request) -> Principal:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("send Authorization: Bearer <token>", None)
        for verifier in self._verifiers:
            principal = await verifier.verify(token)
            if principal is not None:
                return principal
        raise unauthorized("the token is not valid", "invalid_token")

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def authenticate(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            if request.path.startswith(PROTECTED_PREFIX):
                request[_PRINCIPAL] = await self.authenticate(request)
            return await handler(request)

        return authenticate
