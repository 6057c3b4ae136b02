"""The admin API under `/v1` (docs/registry-api.md): services, lifecycle, instances, snapshot,
audit. Every handler asks the caller's `Authority` (registry.ownership) first."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from cityplane.schema import NAME_PATTERN
from registry.auth import principal
from registry.bodies import read_model, read_service
from registry.errors import invalid_document, invalid_query, not_found
from registry.instances import INSTANCE_ID_PATTERN, InstanceRegistration
from registry.lifecycle import LIFECYCLES, TransitionRequest
from registry.ownership import Authority
from registry.query import query_value
from registry.state import STATE
from registry.store import Written
from registry.watch import watch

REVISION_HEADER = "X-CityPlane-Revision"
AUDIT_LIMIT_MAX = 1000
_NAME = re.compile(NAME_PATTERN)
_INSTANCE_ID = re.compile(INSTANCE_ID_PATTERN)


def _etag(document: dict[str, Any]) -> str:
    return f'"{document["metadata"]["resourceVersion"]}"'


def _answer(written: Written, status: int = 200) -> web.Response:
    headers = {REVISION_HEADER: str(written.revision), "ETag": _etag(written.document)}
    return web.json_response(written.document, status=status, headers=headers)


def _authority(request: web.Request) -> Authority:
    return Authority(principal(request))


def _reader(request: web.Request) -> Authority:
    authority = _authority(request)
    authority.require_read()
    return authority


def _writer(request: web.Request) -> Authority:
    authority = _authority(request)
    authority.require_write()
    return authority


def _existing_name(request: web.Request) -> str:
    """The `{name}` of a service that must exist: a name the schema refuses cannot, so it is a
    404 without a query (PostgreSQL would refuse a NUL in it with an error, not an empty row)."""
    name = request.match_info["name"]
    if not _NAME.fullmatch(name):
        raise not_found(name)
    return name


def _labels(values: list[str]) -> list[tuple[str, str]]:
    selectors = []
    for value in values:
        key, eq, wanted = value.partition("=")
        if not eq or not key:
            raise invalid_query(f"label={value!r}: use label=key=value")
        selectors.append((key, wanted))
    return selectors


async def list_services(request: web.Request) -> web.Response:
    authority = _reader(request)
    lifecycle = query_value(request, "lifecycle")
    if lifecycle is not None and lifecycle not in LIFECYCLES:
        raise invalid_query(f"lifecycle={lifecycle!r}: one of {', '.join(LIFECYCLES)}")
    revision, items = await request.app[STATE].store.find(
        lifecycle=lifecycle,
        owner=query_value(request, "owner") or None,
        labels=_labels(request.query.getall("label", [])),
    )
    items = [item for item in items if authority.sees(item)]
    return web.json_response(
        {"revision": revision, "items": items}, headers={REVISION_HEADER: str(revision)}
    )


async def get_service(request: web.Request) -> web.Response:
    authority = _reader(request)
    name = _existing_name(request)
    document = await request.app[STATE].store.get(name)
    if document is None or not authority.sees(document):
        raise not_found(name)
    return web.json_response(document, headers={"ETag": _etag(document)})


async def create_service(request: web.Request) -> web.Response:
    state = request.app[STATE]
    authority = _writer(request)
    service = await read_service(request)
    written = await state.store.create(service, authority=authority)
    state.metrics.changes.labels("create").inc()
    response = _answer(written, 201)
    response.headers["Location"] = f"/v1/services/{service.metadata.name}"
    return response


async def put_service(request: web.Request) -> web.Response:
    state = request.app[STATE]
    authority = _writer(request)
    name = request.match_info["name"]
    service = await read_service(request)
    if service.metadata.name != name:
        raise invalid_document(
            [{"field": "metadata.name", "message": f"must match the name in the URL ({name!r})"}]
        )
    written = await state.store.put(
        name, service, authority=authority, if_match=request.headers.get("If-Match")
    )
    if written.changed:
        state.metrics.changes.labels("create" if written.created else "update").inc()
    return _answer(written, 201 if written.created else 200)


async def delete_service(request: web.Request) -> web.Response:
    state = request.app[STATE]
    authority = _writer(request)
    written = await state.store.delete(
        _existing_name(request),
        authority=authority,
        if_match=request.headers.get("If-Match"),
    )
    state.metrics.changes.labels("delete").inc()
    return web.json_response(written.document, headers={REVISION_HEADER: str(written.revision)})


async def transition_service(request: web.Request) -> web.Response:
    state = request.app[STATE]
    authority = _writer(request)
    name = _existing_name(request)
    transition = await read_model(request, TransitionRequest)
    written = await state.store.transition(
        name,
        transition,
        authority=authority,
        if_match=request.headers.get("If-Match"),
    )
    state.metrics.changes.labels("lifecycle").inc()
    return _answer(written)


def _instance_id(request: web.Request) -> str:
    instance = request.match_info["id"]
    if not _INSTANCE_ID.fullmatch(instance):
        raise invalid_query(f"instance id {instance!r}: 1 to 128 of A-Z a-z 0-9 . _ -")
    return instance


async def register_instance(request: web.Request) -> web.Response:
    state = request.app[STATE]
    authority = _writer(request)
    name = _existing_name(request)
    instance = _instance_id(request)
    body = await read_model(request, InstanceRegistration)
    view, revision, created = await state.instances.register(
        name, instance, body.url, body.weight, authority=authority
    )
    return web.json_response(
        view, status=201 if created else 200, headers={REVISION_HEADER: str(revision)}
    )


async def deregister_instance(request: web.Request) -> web.Response:
    state = request.app[STATE]
    authority = _writer(request)
    name = _existing_name(request)
    instance = _instance_id(request)
    revision = await state.instances.deregister(name, instance, authority=authority)
    return web.Response(status=204, headers={REVISION_HEADER: str(revision)})


async def list_instances(request: web.Request) -> web.Response:
    authority = _reader(request)
    items = await request.app[STATE].instances.list(_existing_name(request), authority=authority)
    return web.json_response({"items": items})


async def snapshot(request: web.Request) -> web.Response:
    authority = _reader(request)
    revision, services = await request.app[STATE].store.snapshot()
    services = [service for service in services if authority.sees(service)]
    return web.json_response(
        {"revision": revision, "services": services}, headers={REVISION_HEADER: str(revision)}
    )


async def audit_log(request: web.Request) -> web.Response:
    authority = _reader(request)
    service = query_value(request, "service") or None
    if not authority.admin:
        await _check_own_audit(request, authority, service)
    raw = query_value(request, "limit")
    raw = "100" if raw is None else raw
    try:
        limit = int(raw)
    except ValueError:
        raise invalid_query(f"limit={raw!r}: a number from 1 to {AUDIT_LIMIT_MAX}") from None
    if not 1 <= limit <= AUDIT_LIMIT_MAX:
        raise invalid_query(f"limit={raw!r}: a number from 1 to {AUDIT_LIMIT_MAX}")
    items = await request.app[STATE].store.audit(service=service, limit=limit)
    return web.json_response({"items": items})


async def _check_own_audit(request: web.Request, authority: Authority, service: str | None) -> None:
    """Owners read the audit of their own services (who changed them, from which client);
    the whole log, and other organizations' entries, are for registry:admin."""
    if service is None:
        authority.require_admin("the audit log of every service (without ?service=)")
        return
    document = await request.app[STATE].store.get(service) if _NAME.fullmatch(service) else None
    if document is None or not authority.sees(document):
        raise not_found(service)
    if not authority.owns(document):
        authority.require_admin(f"the audit log of another organization's service {service!r}")


def add_api_routes(app: web.Application) -> None:
    one = "/v1/services/{name}"
    app.router.add_get("/v1/services", list_services)
    app.router.add_post("/v1/services", create_service)
    app.router.add_get(one, get_service)
    app.router.add_put(one, put_service)
    app.router.add_delete(one, delete_service)
    app.router.add_post(one + "/lifecycle", transition_service)
    app.router.add_get(one + "/instances", list_instances)
    app.router.add_put(one + "/instances/{id}", register_instance)
    app.router.add_delete(one + "/instances/{id}", deregister_instance)
    app.router.add_get("/v1/snapshot", snapshot)
    app.router.add_get("/v1/audit", audit_log)
    app.router.add_get("/v1/watch", watch, allow_head=False)  # a HEAD would hold a stream open
