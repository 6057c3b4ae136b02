"""Who is calling: bearer tokens (RFC 6750) checked by a chain of verifiers.

Two verifiers: the bootstrap admin token (`AdminTokenVerifier`) and the identity hub's JWT
access tokens (`registry.tokens.HubTokenVerifier`). Each turns a token into a `Principal`; what
a principal may do with which service is `registry.ownership`'s business.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
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


class AdminTokenError(Exception):
    """The admin token file cannot be read or created; the message says why."""


def load_or_create_admin_token(path: Path) -> str:
    """Read the bootstrap admin token, or generate it (32 random bytes) into a new 0600 file."""
    try:
        return _read_token(path)
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_EXCL: never overwrite a token another process just wrote; 0o600 from the first
        # byte (the umask can only take bits away), not chmod after the fact.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_token(path)
    except OSError as exc:
        raise AdminTokenError(
            f"cannot create the admin token file {path}: {exc.strerror}"
        ) from None
    with os.fdopen(fd, "w", encoding="ascii") as file:
        file.write(token + "\n")
    log.info("generated the bootstrap admin token in %s", path)
    return token


def _read_token(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminTokenError(f"cannot read the admin token file {path}: {exc}") from None
    if not token:
        raise AdminTokenError(f"the admin token file {path} is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the admin token file %s is open to other users; chmod 600 it", path)
    return token


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
