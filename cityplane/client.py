"""An async client of the registry admin API (docs/registry-api.md), one method per endpoint.

Answers of 4xx/5xx become :class:`RegistryError` (status, problem type, detail, field errors),
a registry that cannot be reached or does not answer in time becomes
:class:`RegistryUnavailable`; both print as one line. Documents travel as :class:`CityService`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from types import TracebackType
from typing import Any
from urllib.parse import quote

from aiohttp import ClientConnectorError, ClientError, ClientSession, ClientTimeout
from pydantic import ValidationError

from cityplane.problem import PROBLEM_BASE
from cityplane.schema import CityService, Lifecycle

REVISION_HEADER = "X-CityPlane-Revision"
USER_AGENT = "cityplane-cli/0.1"


class RegistryError(Exception):
    """The registry answered with an error (``application/problem+json``, RFC 9457)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        type: str = "about:blank",
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        self.errors = errors or []
        super().__init__(str(self))

    @property
    def slug(self) -> str:
        """The problem type without the CityPlane base: ``conflict``, ``invalid-document`` …"""
        return self.type.removeprefix(PROBLEM_BASE)

    def __str__(self) -> str:
        text = f"{self.status} {self.title}"
        if self.detail:
            text += f": {self.detail}"
        fields = "; ".join(
            f"{e.get('field', '?')}: {e.get('message', '?')}"
            for e in self.errors
            if isinstance(e, dict)
        )
        if fields:
            text += f" ({fields})"
        return " ".join(text.split())  # one line, whatever the registry put in it


class RegistryUnavailable(Exception):
    """No usable answer: connection refused, DNS, timeout, or a body that is not the contract."""


@dataclass(frozen=True, slots=True)
class ServiceList:
    revision: int
    items: list[CityService]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    revision: int
    at: str
    actor: str
    action: str
    service: str
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


@dataclass(slots=True)
class _Answer:
    status: int
    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)


def service_body(service: CityService) -> dict[str, Any]:
    """The JSON body for a write: the fields the author set (the registry keeps the document
    as written, so defaults stay defaults), ``resourceVersion`` only when there is one."""
    body = service.model_dump(mode="json", exclude_unset=True)
    if body["metadata"].get("resourceVersion") is None:
        body["metadata"].pop("resourceVersion", None)
    return {"apiVersion": service.apiVersion, "kind": service.kind, **body}


def _path(name: str) -> str:
    return "/v1/services/" + quote(name, safe="")


class RegistryClient:
    """``async with RegistryClient(url, token) as registry: await registry.get_service(...)``."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout: float = 30.0,
        session: ClientSession | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.last_revision: int | None = None
        self._token = token
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> RegistryClient:
        if self._session is None:
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
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # --- endpoints ---------------------------------------------------------------------------

    async def list_services(
        self,
        *,
        lifecycle: Lifecycle | None = None,
        owner: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> ServiceList:
        params: list[tuple[str, str]] = []
        if lifecycle:
            params.append(("lifecycle", lifecycle))
        if owner:
            params.append(("owner", owner))
        params.extend(("label", f"{k}={v}") for k, v in (labels or {}).items())
        answer = await self._call("GET", "/v1/services", params=params)
        body = self._object(answer, "items")
        return ServiceList(self._revision(body), self._services(body["items"]))

    async def get_service(self, name: str) -> CityService | None:
        """The service as stored, or None when the registry has no service of that name."""
        answer = await self._call("GET", _path(name), absent_ok=True)
        return None if answer.status == 404 else self._service(answer.body)

    async def create_service(self, service: CityService) -> CityService:
        answer = await self._call("POST", "/v1/services", body=service_body(service))
        return self._service(answer.body)

    async def replace_service(
        self, service: CityService, *, resource_version: str | None = None
    ) -> CityService:
        """PUT; with ``resource_version`` the write only happens if nobody changed it since."""
        if resource_version is not None:
            service = service.model_copy(
                update={
                    "metadata": service.metadata.model_copy(
                        update={"resourceVersion": resource_version}
                    )
                }
            )
        headers = {"If-Match": f'"{resource_version}"'} if resource_version is not None else {}
        answer = await self._call(
            "PUT", _path(service.metadata.name), body=service_body(service), headers=headers
        )
        return self._service(answer.body)

    async def delete_service(
        self, name: str, *, resource_version: str | None = None
    ) -> CityService | None:
        """The service as it was, or None when there was none."""
        headers = {"If-Match": f'"{resource_version}"'} if resource_version is not None else {}
        answer = await self._call("DELETE", _path(name), headers=headers, absent_ok=True)
        return None if answer.status == 404 else self._service(answer.body)

    async def transition(
        self, name: str, to: Lifecycle, *, sunset: datetime | None = None
    ) -> CityService:
        body: dict[str, Any] = {"to": to}
        if sunset is not None:
            body["sunset"] = sunset.astimezone(UTC).isoformat().replace("+00:00", "Z")
        answer = await self._call("POST", _path(name) + "/lifecycle", body=body)
        return self._service(answer.body)

    async def snapshot(self) -> ServiceList:
        body = self._object(await self._call("GET", "/v1/snapshot"), "services")
        return ServiceList(self._revision(body), self._services(body["services"]))

    async def audit(
        self, *, service: str | None = None, limit: int | None = None
    ) -> list[AuditEntry]:
        params = [("service", service)] if service else []
        if limit is not None:
            params.append(("limit", str(limit)))
        body = self._object(await self._call("GET", "/v1/audit", params=params), "items")
        try:
            return [AuditEntry(**item) for item in body["items"]]
        except TypeError as exc:
            raise RegistryUnavailable(
                f"the registry sent an unexpected audit entry: {exc}"
            ) from None

    # --- transport ---------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: list[tuple[str, str]] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        absent_ok: bool = False,
    ) -> _Answer:
        if self._session is None:
            raise RuntimeError("use 'async with RegistryClient(...)'")
        send = {"Accept": "application/json", **(headers or {})}
        if self._token:
            send["Authorization"] = f"Bearer {self._token}"
        url = self.base_url + path
        try:
            async with self._session.request(
                method, url, params=params, json=body, headers=send
            ) as resp:
                raw = await resp.read()
                status, content_type, got = resp.status, resp.content_type, resp.headers
        except ClientConnectorError as exc:
            reason = exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__
            raise RegistryUnavailable(
                f"cannot reach the registry at {self.base_url}: {reason}"
            ) from None
        except TimeoutError:
            raise RegistryUnavailable(
                f"the registry at {self.base_url} did not answer within {self.timeout:g}s"
            ) from None
        except ClientError as exc:
            raise RegistryUnavailable(
                f"talking to the registry at {self.base_url} failed: {exc or type(exc).__name__}"
            ) from None
        if (rev := got.get(REVISION_HEADER)) and rev.isdigit():
            self.last_revision = int(rev)
        if status == 404 and absent_ok:
            return _Answer(status, None, got)
        parsed = _json(raw) if raw and content_type.endswith("json") else None
        if status >= 400:
            raise _problem(status, parsed, raw)
        if parsed is None:
            raise RegistryUnavailable(
                f"{method} {url}: expected JSON, got {content_type or 'no body'} ({status})"
            )
        return _Answer(status, parsed, got)

    def _object(self, answer: _Answer, key: str) -> dict[str, Any]:
        body = answer.body
        if not isinstance(body, dict) or not isinstance(body.get(key), list):
            raise RegistryUnavailable(f"the registry answered without a list of {key!r}")
        return body

    @staticmethod
    def _revision(body: Mapping[str, Any]) -> int:
        revision = body.get("revision")
        if not isinstance(revision, int):
            raise RegistryUnavailable("the registry answered without a revision")
        return revision

    def _services(self, items: list[Any]) -> list[CityService]:
        return [self._service(item) for item in items]

    @staticmethod
    def _service(body: Any) -> CityService:
        try:
            return CityService.model_validate(body)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise RegistryUnavailable(
                f"the registry sent a document this CLI cannot read ({where}: {first['msg']}); "
                "is the CLI older than the registry?"
            ) from None


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _problem(status: int, body: Any, raw: bytes) -> RegistryError:
    if isinstance(body, dict):
        errors = body.get("errors")
        return RegistryError(
            status,
            str(body.get("title") or _phrase(status)),
            str(body["detail"]) if body.get("detail") else None,
            type=str(body.get("type") or "about:blank"),
            errors=errors if isinstance(errors, list) else None,
        )
    text = raw.decode("utf-8", "replace").strip()
    return RegistryError(status, _phrase(status), text[:200] or None)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
