"""An async client of the identity hub's admin API for OIDC clients (docs/identity-api.md).

Errors mirror :mod:`cityplane.client`: an answer of 4xx/5xx is :class:`HubError` (status,
problem type, detail), no usable answer at all is :class:`HubUnavailable`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

from aiohttp import ClientError, ClientSession, ClientTimeout

USER_AGENT = "cityplane-operator/0.1"


class HubError(Exception):
    """The hub answered with an error (``application/problem+json``, RFC 9457)."""

    def __init__(self, status: int, title: str, detail: str | None = None) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        super().__init__(f"{status} {title}" + (f": {detail}" if detail else ""))

    @property
    def transient(self) -> bool:
        """5xx, 429 and 401/403 (a token being rotated) may heal; other 4xx will not."""
        return self.status >= 500 or self.status in (401, 403, 408, 409, 429)


class HubUnavailable(Exception):
    """No usable answer: connection refused, DNS, timeout, or a body that is not the contract."""


@dataclass(frozen=True, slots=True)
class ClientWrite:
    """The answer to ``PUT /admin/clients/{id}``."""

    created: bool
    client_secret: str | None  # only when created, and never for a public client


class HubClient:
    """``async with HubClient(url, token) as hub: await hub.put_client(...)``."""

    def __init__(self, base_url: str, token: str | None, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._token = token
        self._session: ClientSession | None = None

    async def __aenter__(self) -> HubClient:
        self._session = ClientSession(
            timeout=ClientTimeout(total=self.timeout, connect=min(5.0, self.timeout)),
            headers={"User-Agent": USER_AGENT},
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def issuer(self) -> str:
        """The issuer from the discovery document (the public URL apps see in tokens, which may
        differ from the in-cluster URL the operator uses)."""
        _, body = await self._call("GET", "/.well-known/openid-configuration", admin=False)
        if not isinstance(body, dict) or not isinstance(body.get("issuer"), str):
            raise HubUnavailable(f"{self.base_url} serves no discovery document with an issuer")
        return str(body["issuer"])

    async def put_client(self, client_id: str, spec: dict[str, Any]) -> ClientWrite:
        status, body = await self._call("PUT", _path(client_id), body=spec)
        secret = body.get("client_secret") if isinstance(body, dict) else None
        return ClientWrite(created=status == 201, client_secret=secret or None)

    async def get_client(self, client_id: str) -> dict[str, Any] | None:
        status, body = await self._call("GET", _path(client_id), absent_ok=True)
        return body if status != 404 and isinstance(body, dict) else None

    async def rotate_secret(self, client_id: str) -> str:
        _, body = await self._call("POST", _path(client_id) + "/secret")
        if not isinstance(body, dict) or not isinstance(body.get("client_secret"), str):
            raise HubUnavailable("the hub rotated the secret but sent none back")
        return str(body["client_secret"])

    async def delete_client(self, client_id: str) -> bool:
        """True when it was deleted, False when there was none."""
        status, _ = await self._call("DELETE", _path(client_id), absent_ok=True)
        return status != 404

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        absent_ok: bool = False,
        admin: bool = True,
    ) -> tuple[int, Any]:
        if self._session is None:
            raise RuntimeError("use 'async with HubClient(...)'")
        headers = {"Accept": "application/json"}
        if admin and self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            async with self._session.request(
                method, self.base_url + path, json=body, headers=headers
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except TimeoutError:
            raise HubUnavailable(
                f"the identity hub at {self.base_url} did not answer within {self.timeout:g}s"
            ) from None
        except (ClientError, OSError) as exc:
            raise HubUnavailable(
                f"cannot reach the identity hub at {self.base_url}: {exc or type(exc).__name__}"
            ) from None
        if status == 404 and absent_ok:
            return status, None
        parsed = _json(raw)
        if status >= 400:
            title = detail = None
            if isinstance(parsed, dict):
                title, detail = parsed.get("title"), parsed.get("detail")
            raise HubError(status, str(title or "error"), str(detail) if detail else None)
        return status, parsed


def _path(client_id: str) -> str:
    return "/admin/clients/" + quote(client_id, safe="")


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None
