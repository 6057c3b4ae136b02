"""CRUD, list filters and optimistic concurrency of /v1/services (SQLite and PostgreSQL)."""

from __future__ import annotations

import yaml

from registry.app import RunningRegistry
from tests.registry.conftest import StartRegistry
from tests.registry.support import Api, Reply, document


async def test_created_service_reads_back_with_resource_version_and_etag(api: Api) -> None:
    created = await api.post("/v1/services", json=document("bus"))
    assert created.status == 201
    assert created.headers["Location"] == "/v1/services/bus"
    assert created.headers["X-CityPlane-Revision"] == "1"
    assert created.json["metadata"]["resourceVersion"] == "1"

    read = await api.get("/v1/services/bus")
    assert read.status == 200
    assert read.headers["ETag"] == '"1"'
    assert read.json == created.json
    assert read.json["spec"]["routes"] == document("bus")["spec"]["routes"]


async def test_creating_a_name_that_exists_is_a_conflict(api: Api) -> None:
    assert (await api.post("/v1/services", json=document("bus"))).status == 201
    again = await api.post("/v1/services", json=document("bus", version="v2"))
    assert again.status == 409 and again.problem_type == "conflict"
    assert (await api.get("/v1/services/bus")).json["spec"].get("version") is None
    assert await api.revision() == 1


async def test_put_creates_then_replaces_and_each_write_bumps_the_revision(api: Api) -> None:
    first = await api.put("/v1/services/bus", json=document("bus"))
    assert first.status == 201 and first.headers["X-CityPlane-Revision"] == "1"
    second = await api.put("/v1/services/bus", json=document("bus", version="v2"))
    assert second.status == 200
    assert second.json["metadata"]["resourceVersion"] == "2"
    assert second.json["spec"]["version"] == "v2"
    assert second.headers["ETag"] == '"2"'
    assert await api.revision() == 2


async def test_identical_put_is_a_no_op_without_a_new_revision(api: Api) -> None:
    await api.put("/v1/services/bus", json=document("bus"))
    await api.put("/v1/services/other", json=document("other"))
    again = await api.put("/v1/services/bus", json=document("bus"))
    assert again.status == 200
    assert again.json["metadata"]["resourceVersion"] == "1"
    assert again.headers["X-CityPlane-Revision"] == "2"
    assert await api.revision() == 2
    assert len((await api.get("/v1/audit")).json["items"]) == 2


async def test_stale_resource_version_in_the_body_is_a_conflict_and_changes_nothing(
    api: Api,
) -> None:
    await api.put("/v1/services/bus", json=document("bus"))
    await api.put("/v1/services/bus", json=document("bus", version="v2"))
    stale = document("bus", version="v3", metadata={"resourceVersion": "1"})
    reply = await api.put("/v1/services/bus", json=stale)
    assert reply.status == 409 and reply.problem_type == "conflict"
    assert "resourceVersion 1" in reply.json["detail"]
    assert (await api.get("/v1/services/bus")).json["spec"]["version"] == "v2"

    fresh = document("bus", version="v3", metadata={"resourceVersion": "2"})
    assert (await api.put("/v1/services/bus", json=fresh)).status == 200


async def test_stale_if_match_is_a_conflict_for_put_delete_and_lifecycle(api: Api) -> None:
    await api.put("/v1/services/bus", json=document("bus"))
    await api.put("/v1/services/bus", json=document("bus", version="v2"))
    stale = {"If-Match": '"1"'}
    put = await api.put("/v1/services/bus", json=document("bus"), headers=stale)
    delete = await api.delete("/v1/services/bus", headers=stale)
    move = await api.post("/v1/services/bus/lifecycle", json={"to": "retired"}, headers=stale)
    assert [r.status for r in (put, delete, move)] == [409, 409, 409]
    assert await api.revision() == 2

    current = {"If-Match": '"2"'}
    assert (await api.delete("/v1/services/bus", headers=current)).status == 200


async def test_if_match_on_a_service_that_does_not_exist_is_a_conflict(api: Api) -> None:
    reply = await api.put("/v1/services/bus", json=document("bus"), headers={"If-Match": "*"})
    assert reply.status == 409
    assert (await api.get("/v1/services/bus")).status == 404


async def test_delete_answers_the_service_as_it_was_then_it_is_gone(api: Api) -> None:
    await api.put("/v1/services/bus", json=document("bus"))
    deleted = await api.delete("/v1/services/bus")
    assert deleted.status == 200
    assert deleted.json["metadata"] == {"name": "bus", "resourceVersion": "1"}
    assert deleted.headers["X-CityPlane-Revision"] == "2"
    assert (await api.get("/v1/services/bus")).status == 404
    missing = await api.delete("/v1/services/bus")
    assert missing.status == 404 and missing.problem_type == "not-found"
    assert await api.revision() == 2


async def test_list_filters_by_lifecycle_owner_and_labels_sorted_by_name(api: Api) -> None:
    docs = [
        document("trams", owner="transit", metadata={"labels": {"tier": "gold", "area": "n"}}),
        document("bus", owner="transit", metadata={"labels": {"tier": "gold"}}),
        document("parks", owner="green", lifecycle="draft", metadata={"labels": {"tier": "x"}}),
    ]
    for doc in docs:
        assert (await api.post("/v1/services", json=doc)).status == 201

    def names(reply: Reply) -> list[str]:
        return [d["metadata"]["name"] for d in reply.json["items"]]

    everything = await api.get("/v1/services")
    assert names(everything) == ["bus", "parks", "trams"]
    assert everything.json["revision"] == 3
    assert everything.headers["X-CityPlane-Revision"] == "3"
    assert names(await api.get("/v1/services?lifecycle=draft")) == ["parks"]
    assert names(await api.get("/v1/services?owner=transit")) == ["bus", "trams"]
    assert names(await api.get("/v1/services?label=tier=gold")) == ["bus", "trams"]
    both = await api.get("/v1/services?label=tier=gold&label=area=n")
    assert names(both) == ["trams"]
    assert names(await api.get("/v1/services?owner=green&lifecycle=published")) == []


async def test_snapshot_holds_every_service_in_every_lifecycle_and_the_revision(
    api: Api,
) -> None:
    await api.post("/v1/services", json=document("a", lifecycle="draft"))
    await api.post("/v1/services", json=document("b"))
    await api.post("/v1/services", json=document("c", lifecycle="retired"))
    snapshot = await api.get("/v1/snapshot")
    assert snapshot.status == 200
    assert snapshot.json["revision"] == 3
    assert [s["metadata"]["name"] for s in snapshot.json["services"]] == ["a", "b", "c"]


async def test_audit_records_actor_action_before_and_after(api: Api) -> None:
    await api.post("/v1/services", json=document("bus"))
    await api.put("/v1/services/bus", json=document("bus", version="v2"))
    await api.post("/v1/services", json=document("other"))
    await api.delete("/v1/services/bus")

    items = (await api.get("/v1/audit?service=bus")).json["items"]
    assert [(i["revision"], i["action"], i["actor"]) for i in items] == [
        (4, "delete", "admin"),
        (2, "update", "admin"),
        (1, "create", "admin"),
    ]
    delete, update, create = items
    assert create["before"] is None and create["after"]["metadata"]["resourceVersion"] == "1"
    assert update["before"]["spec"].get("version") is None
    assert update["after"]["spec"]["version"] == "v2"
    assert delete["before"] == update["after"] and delete["after"] is None
    assert delete["at"].endswith("Z")
    newest = (await api.get("/v1/audit?limit=1")).json["items"]
    assert [i["revision"] for i in newest] == [4]


async def test_a_yaml_body_is_the_same_document(api: Api) -> None:
    body = yaml.safe_dump(document("bus", owner="transit"))
    reply = await api.post("/v1/services", data=body, headers={"Content-Type": "application/yaml"})
    assert reply.status == 201, reply.body
    assert reply.json["spec"]["owner"] == "transit"
    same = await api.put("/v1/services/bus", json=document("bus", owner="transit"))
    assert same.status == 200 and await api.revision() == 1


async def test_put_under_another_name_than_the_document_is_rejected(api: Api) -> None:
    reply = await api.put("/v1/services/trams", json=document("bus"))
    assert reply.status == 422 and reply.problem_type == "invalid-document"
    assert reply.json["errors"][0]["field"] == "metadata.name"
    assert await api.revision() == 0


async def test_revisions_continue_after_a_restart_on_the_same_database(
    start: StartRegistry, registry: RunningRegistry, api: Api
) -> None:
    await api.post("/v1/services", json=document("bus"))
    await registry.stop()
    again = await start()
    api.url, api.token = again.url, again.admin_token
    reply = await api.put("/v1/services/bus", json=document("bus", version="v2"))
    assert reply.json["metadata"]["resourceVersion"] == "2"
    assert await api.revision() == 2
