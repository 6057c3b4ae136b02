"""Instances that register themselves with a TTL heartbeat (Consul/Nacos style), both backends."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import ClientSession

from tests.registry.conftest import StartRegistry
from tests.registry.support import Api, document

TTL = 1.0
REMOVE_AFTER = 1.8
INSTANCE = {"url": "http://10.0.0.5:8080", "weight": 2}


def with_instances(name: str = "bus", **policy: Any) -> dict[str, Any]:
    doc = document(name)
    doc["spec"]["upstream"] = {
        "targets": [],
        "instances": {"ttl": f"{TTL}s", "removeAfter": f"{REMOVE_AFTER}s", **policy},
    }
    return doc


async def started(start: StartRegistry, session: ClientSession, **policy: Any) -> Api:
    registry = await start(reap_interval=0.1)
    api = Api(session, registry.url, registry.admin_token)
    reply = await api.put("/v1/services/bus", json=with_instances(**policy))
    assert reply.status == 201, reply.body
    return api


async def routed_targets(api: Api, name: str = "bus") -> list[dict[str, Any]]:
    snapshot = (await api.get("/v1/snapshot")).json
    (service,) = [s for s in snapshot["services"] if s["metadata"]["name"] == name]
    return list(service["spec"]["upstream"]["targets"])


async def instances(api: Api) -> list[dict[str, Any]]:
    reply = await api.get("/v1/services/bus/instances")
    assert reply.status == 200, reply.body
    return list(reply.json["items"])


async def eventually(check: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_register_heartbeat_expire_recover_deregister(
    start: StartRegistry, session: ClientSession
) -> None:
    # Removal is another test's: here the expired instance must still be there when it
    # heartbeats again, however slow the machine is between the two (it once took > 0.8 s).
    api = await started(start, session, removeAfter="60s")
    stored = (await api.get("/v1/services/bus")).json

    reply = await api.put("/v1/services/bus/instances/pod-a.1", json=INSTANCE)
    assert reply.status == 201, reply.body
    registered = int(reply.headers["X-CityPlane-Revision"])
    assert reply.json["healthy"] is True
    # A heartbeat that changes nothing: no new revision. Sent at once, well within the TTL
    # (a slow machine once took longer than the TTL over the checks below).
    reply = await api.put("/v1/services/bus/instances/pod-a.1", json=INSTANCE)
    assert reply.status == 200, reply.body
    assert await api.revision() == registered
    [listed] = await instances(api)
    assert listed["id"] == "pod-a.1" and listed["url"] == INSTANCE["url"] and listed["healthy"]
    assert listed["weight"] == 2 and listed["lastSeen"].endswith("Z")
    assert await routed_targets(api) == [INSTANCE]
    # What `apply` manages does not change: the stored document stays as written.
    assert (await api.get("/v1/services/bus")).json == stored
    listing = (await api.get("/v1/services")).json["items"]
    assert listing[0]["spec"]["upstream"]["targets"] == []

    # Heartbeats stop: unhealthy after the TTL, gone from the routed targets, a new revision.
    async def unhealthy() -> bool:
        return not (await instances(api))[0]["healthy"]

    await eventually(unhealthy)
    expired = await api.revision()
    assert expired == registered + 1
    assert await routed_targets(api) == []
    audit = (await api.get("/v1/audit?service=bus&limit=1")).json["items"][0]
    assert audit["actor"] == "instance:pod-a.1" and audit["action"] == "expire"

    # It heartbeats again: healthy again, routed again, a new revision.
    reply = await api.put("/v1/services/bus/instances/pod-a.1", json=INSTANCE)
    assert reply.status == 200 and reply.json["healthy"] is True
    assert int(reply.headers["X-CityPlane-Revision"]) == expired + 1
    assert await routed_targets(api) == [INSTANCE]

    reply = await api.delete("/v1/services/bus/instances/pod-a.1")
    assert reply.status == 204
    assert int(reply.headers["X-CityPlane-Revision"]) == expired + 2
    assert await instances(api) == []
    assert await routed_targets(api) == []
    assert (await api.delete("/v1/services/bus/instances/pod-a.1")).status == 404


async def test_removed_after_remove_after_and_watchers_see_effective_targets(
    start: StartRegistry, session: ClientSession
) -> None:
    api = await started(start, session)
    since = await api.revision()
    async with api.watch(f"?since={since}") as events:
        reply = await api.put("/v1/services/bus/instances/a", json={"url": "http://10.0.0.7"})
        assert reply.status == 201
        event = await events.next()
        assert event.data["type"] == "MODIFIED"
        targets = event.data["service"]["spec"]["upstream"]["targets"]
        assert targets == [{"url": "http://10.0.0.7", "weight": 1}]
        # Generous bounds: they only matter when the event never comes (a slow machine once
        # took longer than 3 s).
        expired = await events.next(within=15)
        assert expired.data["service"]["spec"]["upstream"]["targets"] == []
        removed = await events.next(within=15)
        assert removed.data["revision"] == expired.data["revision"] + 1
    assert await instances(api) == []
    audit = (await api.get("/v1/audit?service=bus&limit=1")).json["items"][0]
    assert audit["action"] == "remove"


async def test_service_changes_keep_instances_and_a_delete_drops_them(
    start: StartRegistry, session: ClientSession
) -> None:
    api = await started(start, session)
    await api.put("/v1/services/bus/instances/a", json=INSTANCE)
    updated = with_instances(ttl="30s", removeAfter="60s")
    updated["spec"]["upstream"]["targets"] = [{"url": "http://127.0.0.1:9001"}]
    assert (await api.put("/v1/services/bus", json=updated)).status == 200
    assert await routed_targets(api) == [{"url": "http://127.0.0.1:9001"}, INSTANCE]
    assert (await api.delete("/v1/services/bus")).status == 200
    assert (await api.put("/v1/services/bus", json=with_instances())).status == 201
    assert await instances(api) == []


async def test_refusals(start: StartRegistry, session: ClientSession) -> None:
    api = await started(start, session)
    assert (await api.put("/v1/services/plain", json=document("plain"))).status == 201
    reply = await api.put("/v1/services/plain/instances/a", json=INSTANCE)
    assert reply.status == 409 and reply.problem_type == "instances-not-enabled"
    reply = await api.get("/v1/services/plain/instances")
    assert reply.status == 409 and reply.problem_type == "instances-not-enabled"
    reply = await api.put("/v1/services/nope/instances/a", json=INSTANCE)
    assert reply.status == 404 and reply.problem_type == "not-found"
    assert (await api.get("/v1/services/nope/instances")).status == 404
    for body in (
        {"url": "ftp://10.0.0.5"},
        {"url": "http://10.0.0.5?x=1"},
        {"url": "http://10.0.0.5", "weight": -1},
        {"url": "http://10.0.0.5", "extra": 1},
        {},
        [],
    ):
        reply = await api.put("/v1/services/bus/instances/a", json=body)
        assert reply.status == 422, (body, reply.body)
        assert reply.problem_type == "invalid-document"
    assert (await api.put("/v1/services/bus/instances/a", data=b"{")).status == 400
    for bad in ("a" * 129, "a%20b", "a:b"):
        reply = await api.put(f"/v1/services/bus/instances/{bad}", json=INSTANCE)
        assert reply.status in (400, 404), (bad, reply.status)
    assert (await api.put("/v1/services/bus/instances/" + "a" * 128, json=INSTANCE)).status == 201
    # Without `instances`, a service still needs a target; removeAfter must exceed ttl.
    doc = document("empty")
    doc["spec"]["upstream"]["targets"] = []
    reply = await api.put("/v1/services/empty", json=doc)
    assert reply.status == 422 and "unless instances is set" in reply.json["detail"]
    reply = await api.put("/v1/services/x", json=with_instances("x", ttl="5s", removeAfter="2s"))
    assert reply.status == 422 and "removeAfter" in reply.json["detail"]
    assert await api.revision() == 3  # bus, plain, one instance: nothing half-written


async def test_reapers_on_several_replicas_make_each_change_once(
    start_on_postgres: StartRegistry, session: ClientSession
) -> None:
    api = await started(start_on_postgres, session)
    await start_on_postgres(reap_interval=0.05)
    await start_on_postgres(reap_interval=0.05)
    reply = await api.put("/v1/services/bus/instances/a", json=INSTANCE)
    assert reply.status == 201
    registered = int(reply.headers["X-CityPlane-Revision"])

    async def removed() -> bool:
        return await instances(api) == []

    await eventually(removed, within=4)
    await asyncio.sleep(0.3)
    assert await api.revision() == registered + 2  # one expire, one remove
    actions = [e["action"] for e in (await api.get("/v1/audit?service=bus")).json["items"]]
    assert actions == ["remove", "expire", "register", "create"]
