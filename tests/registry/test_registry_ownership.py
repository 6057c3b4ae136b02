"""Ownership with the hub's tokens, on SQLite and PostgreSQL: registry:write manages its own
organization's services, registry:admin all of them, registry:read reads; other
organizations' drafts stay invisible (docs/adr/0010-registry-ownership.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import ClientSession

from registry.app import RunningRegistry
from tests.registry.conftest import StartRegistry
from tests.registry.hub_tokens import TestHub
from tests.registry.support import Api, document

TRANSPORT, WATER = "org-transport", "org-water"


@pytest.fixture
async def hub() -> AsyncIterator[TestHub]:
    hub = await TestHub().start()
    yield hub
    await hub.stop()


@pytest.fixture
async def registry(start: StartRegistry, hub: TestHub) -> RunningRegistry:
    return await start(issuer=hub.url)


def _api(session: ClientSession, registry: RunningRegistry, token: str | None) -> Api:
    return Api(session, registry.url, token)


@pytest.fixture
def transport(session: ClientSession, registry: RunningRegistry, hub: TestHub) -> Api:
    """The transport department's deploy client (client credentials, registry:write)."""
    token = hub.client_token("transport-ci", TRANSPORT, "registry:write")
    return _api(session, registry, token)


@pytest.fixture
def water(session: ClientSession, registry: RunningRegistry, hub: TestHub) -> Api:
    return _api(session, registry, hub.client_token("water-ci", WATER, "registry:write"))


@pytest.fixture
def admin(session: ClientSession, registry: RunningRegistry, hub: TestHub) -> Api:
    token = hub.token(sub="platform-op", org="org-platform", scope="registry:admin")
    return _api(session, registry, token)


def _owned(name: str, owner: str | None = None, **spec: Any) -> dict[str, Any]:
    if owner is not None:
        spec["owner"] = owner
    return document(name, **spec)


async def test_a_writer_creates_services_for_its_own_organization_by_default(
    transport: Api,
) -> None:
    created = await transport.post("/v1/services", json=_owned("bus"))
    assert created.status == 201
    assert created.json["spec"]["owner"] == TRANSPORT


async def test_a_writer_cannot_create_a_service_for_another_organization(
    transport: Api,
) -> None:
    reply = await transport.put("/v1/services/pipes", json=_owned("pipes", WATER))
    assert reply.status == 403
    assert reply.problem_type == "not-owner"
    assert WATER in reply.json["detail"] and TRANSPORT in reply.json["detail"]
    assert (await transport.get("/v1/services/pipes")).status == 404


async def test_a_writer_cannot_change_delete_or_retire_another_organizations_service(
    transport: Api, water: Api
) -> None:
    assert (await water.post("/v1/services", json=_owned("pipes"))).status == 201
    attempts = [
        await transport.put("/v1/services/pipes", json=_owned("pipes", version="v2")),
        await transport.put("/v1/services/pipes", json=_owned("pipes", TRANSPORT)),
        await transport.delete("/v1/services/pipes"),
        await transport.post("/v1/services/pipes/lifecycle", json={"to": "retired"}),
    ]
    for reply in attempts:
        assert reply.status == 403, reply.body
        assert reply.problem_type == "not-owner"
        assert f"owned by '{WATER}'" in reply.json["detail"]
    after = await water.get("/v1/services/pipes")
    assert after.json["spec"]["owner"] == WATER and after.json["spec"].get("version") is None


async def test_a_writer_manages_its_own_service_through_its_whole_life(transport: Api) -> None:
    assert (
        await transport.post("/v1/services", json=_owned("bus", lifecycle="draft"))
    ).status == 201
    # A file without an owner keeps the current one (never takes a service from anyone).
    replaced = await transport.put("/v1/services/bus", json=_owned("bus", lifecycle="draft"))
    assert replaced.status == 200 and replaced.json["spec"]["owner"] == TRANSPORT
    published = await transport.post("/v1/services/bus/lifecycle", json={"to": "published"})
    assert published.status == 200
    assert (await transport.delete("/v1/services/bus")).status == 200


async def test_the_admin_scope_manages_every_organizations_services(
    transport: Api, admin: Api
) -> None:
    assert (await transport.post("/v1/services", json=_owned("bus"))).status == 201
    moved = await admin.put("/v1/services/bus", json=_owned("bus", WATER))
    assert moved.status == 200 and moved.json["spec"]["owner"] == WATER
    assert (await transport.delete("/v1/services/bus")).status == 403
    assert (await admin.delete("/v1/services/bus")).status == 200


async def test_a_reader_reads_and_watches_but_cannot_write(
    session: ClientSession, registry: RunningRegistry, hub: TestHub, transport: Api
) -> None:
    assert (await transport.post("/v1/services", json=_owned("bus"))).status == 201
    reader = _api(session, registry, hub.token(scope="registry:read", org=TRANSPORT))
    assert (await reader.get("/v1/services/bus")).status == 200
    assert (await reader.get("/v1/snapshot")).status == 200
    async with reader.watch() as events:
        assert (await events.next()).event == "snapshot"
    for reply in (
        await reader.post("/v1/services", json=_owned("tram")),
        await reader.delete("/v1/services/bus"),
    ):
        assert reply.status == 403
        assert reply.problem_type == "insufficient-scope"
        assert 'scope="registry:write' in reply.headers["WWW-Authenticate"]


async def test_no_token_is_401_with_a_bearer_challenge(
    session: ClientSession, registry: RunningRegistry
) -> None:
    reply = await _api(session, registry, None).get("/v1/services")
    assert reply.status == 401
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")


async def test_another_organizations_draft_is_invisible_and_cannot_be_touched(
    session: ClientSession, registry: RunningRegistry, hub: TestHub, transport: Api, water: Api
) -> None:
    assert (
        await water.post("/v1/services", json=_owned("leak-map", lifecycle="draft"))
    ).status == 201
    assert (await water.post("/v1/services", json=_owned("pipes"))).status == 201
    names = [s["metadata"]["name"] for s in (await transport.get("/v1/services")).json["items"]]
    assert names == ["pipes"]
    snapshot = (await transport.get("/v1/snapshot")).json["services"]
    assert [s["metadata"]["name"] for s in snapshot] == ["pipes"]
    for reply in (
        await transport.get("/v1/services/leak-map"),
        await transport.delete("/v1/services/leak-map", headers={"If-Match": '"1"'}),
        await transport.post("/v1/services/leak-map/lifecycle", json={"to": "published"}),
        await transport.get("/v1/services/leak-map/instances"),
    ):
        assert reply.status == 404, reply.body
        assert reply.problem_type == "not-found"
    taken = await transport.put("/v1/services/leak-map", json=_owned("leak-map"))
    assert taken.status == 403
    assert WATER not in taken.json["detail"] and "taken" in taken.json["detail"]
    # Its owner and the admins see it.
    assert (await water.get("/v1/services/leak-map")).status == 200
    admin = _api(session, registry, registry.admin_token)
    assert len((await admin.get("/v1/services")).json["items"]) == 2


async def test_the_watch_stream_leaves_out_other_organizations_drafts_deletions_included(
    transport: Api, water: Api
) -> None:
    async with transport.watch() as events:
        assert (await events.next()).data["services"] == []
        assert (
            await water.post("/v1/services", json=_owned("secret", lifecycle="draft"))
        ).status == 201
        assert (await water.delete("/v1/services/secret")).status == 200
        assert (await water.post("/v1/services", json=_owned("pipes"))).status == 201
        shown = await events.next()
        assert (shown.data["type"], shown.data["name"]) == ("ADDED", "pipes")
        assert shown.data["revision"] == 3  # revisions 1 and 2 were the hidden draft


async def test_the_owner_filter_lists_one_organizations_services(
    transport: Api, water: Api
) -> None:
    assert (await transport.post("/v1/services", json=_owned("bus"))).status == 201
    assert (await water.post("/v1/services", json=_owned("pipes"))).status == 201
    mine = await transport.get(f"/v1/services?owner={TRANSPORT}")
    assert [s["metadata"]["name"] for s in mine.json["items"]] == ["bus"]


async def test_the_audit_records_who_did_it_and_owners_read_only_their_own(
    transport: Api, water: Api, admin: Api
) -> None:
    assert (await transport.post("/v1/services", json=_owned("bus"))).status == 201
    assert (await water.post("/v1/services", json=_owned("pipes"))).status == 201
    own = await transport.get("/v1/audit?service=bus")
    assert own.status == 200
    entry = own.json["items"][0]
    assert (entry["actor"], entry["clientId"], entry["org"]) == (
        "transport-ci",
        "transport-ci",
        TRANSPORT,
    )
    assert (await transport.get("/v1/audit?service=pipes")).status == 403
    assert (await transport.get("/v1/audit")).status == 403
    assert len((await admin.get("/v1/audit")).json["items"]) == 2


async def test_instances_register_with_the_owners_write_token_only(
    session: ClientSession, registry: RunningRegistry, hub: TestHub, transport: Api, water: Api
) -> None:
    spec = {"upstream": {"targets": [], "instances": {"ttl": "15s", "removeAfter": "60s"}}}
    assert (await transport.post("/v1/services", json=_owned("bus", **spec))).status == 201
    body = {"url": "http://10.0.0.5:8080"}
    assert (await transport.put("/v1/services/bus/instances/a", json=body)).status == 201
    assert (await water.put("/v1/services/bus/instances/b", json=body)).status == 403
    reader = _api(session, registry, hub.token(scope="registry:read"))
    assert (await reader.put("/v1/services/bus/instances/c", json=body)).status == 403
    assert (await reader.get("/v1/services/bus/instances")).status == 200
    entry = (await transport.get("/v1/audit?service=bus")).json["items"][0]
    assert (entry["actor"], entry["action"], entry["org"]) == ("instance:a", "register", TRANSPORT)
