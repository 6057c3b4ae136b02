"""Lifecycle transitions through /v1/services/{name}/lifecycle and through PUT."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from registry.lifecycle import ALLOWED, LIFECYCLES
from tests.registry.support import Api, document

FUTURE = (datetime.now(UTC) + timedelta(days=365)).replace(microsecond=0)
FUTURE_TEXT = FUTURE.isoformat().replace("+00:00", "Z")


async def move(api: Api, name: str, to: str, **body: object) -> tuple[int, dict]:
    reply = await api.post(f"/v1/services/{name}/lifecycle", json={"to": to, **body})
    return reply.status, reply.json


async def test_a_service_walks_from_draft_to_retired_and_every_step_is_audited(api: Api) -> None:
    await api.post("/v1/services", json=document("bus", lifecycle="draft"))
    assert (await move(api, "bus", "published"))[0] == 200

    status, doc = await move(api, "bus", "deprecated", sunset=FUTURE_TEXT)
    assert status == 200
    assert doc["spec"]["lifecycle"] == "deprecated"
    assert datetime.fromisoformat(doc["spec"]["sunset"]) == FUTURE
    assert "deprecatedSince" in doc["spec"]

    status, doc = await move(api, "bus", "published")  # un-deprecate clears the dates
    assert status == 200
    assert "sunset" not in doc["spec"] and "deprecatedSince" not in doc["spec"]

    assert (await move(api, "bus", "deprecated"))[0] == 200  # a sunset is optional
    status, doc = await move(api, "bus", "retired")
    assert status == 200 and doc["spec"]["lifecycle"] == "retired"
    assert doc["metadata"]["resourceVersion"] == "6"

    audit = (await api.get("/v1/audit?service=bus")).json["items"]
    assert [i["action"] for i in audit] == ["lifecycle"] * 5 + ["create"]
    assert audit[0]["before"]["spec"]["lifecycle"] == "deprecated"
    assert audit[0]["after"]["spec"]["lifecycle"] == "retired"
    assert (await api.get("/v1/services?lifecycle=retired")).json["items"][0] == doc


async def test_every_transition_outside_the_allowed_list_is_refused(api: Api) -> None:
    refused = [(a, b) for a in LIFECYCLES for b in LIFECYCLES if (a, b) not in ALLOWED]
    for current in LIFECYCLES:
        await api.post("/v1/services", json=document(current, lifecycle=current))
    before = await api.revision()
    for current, to in refused:
        status, problem = await move(api, current, to)
        assert status == 422, (current, to)
        assert problem["type"].endswith("/invalid-transition")
    assert await api.revision() == before
    assert len((await api.get("/v1/audit")).json["items"]) == len(LIFECYCLES)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"to": "retired", "sunset": FUTURE_TEXT}, "only with to: deprecated"),
        ({"to": "deprecated", "sunset": "2001-01-01T00:00:00Z"}, "in the future"),
    ],
)
async def test_sunset_comes_only_with_deprecation_and_only_in_the_future(
    api: Api, body: dict, why: str
) -> None:
    await api.post("/v1/services", json=document("bus"))
    reply = await api.post("/v1/services/bus/lifecycle", json=body)
    assert reply.status == 422 and reply.problem_type == "invalid-transition"
    assert why in reply.json["detail"]
    assert (await api.get("/v1/services/bus")).json["spec"].get("lifecycle") is None


async def test_a_sunset_without_a_time_zone_or_an_unknown_target_is_an_invalid_document(
    api: Api,
) -> None:
    await api.post("/v1/services", json=document("bus"))
    naive = await api.post(
        "/v1/services/bus/lifecycle", json={"to": "deprecated", "sunset": "2030-01-01T00:00:00"}
    )
    assert naive.status == 422 and naive.json["errors"][0]["field"] == "sunset"
    unknown = await api.post("/v1/services/bus/lifecycle", json={"to": "archived"})
    assert unknown.status == 422 and unknown.json["errors"][0]["field"] == "to"
    extra = await api.post("/v1/services/bus/lifecycle", json={"to": "retired", "why": "x"})
    assert extra.status == 422 and extra.json["errors"][0] == {
        "field": "why",
        "message": "unknown field",
    }
    assert await api.revision() == 1


async def test_moving_a_service_that_does_not_exist_is_not_found(api: Api) -> None:
    status, problem = await move(api, "ghost", "published")
    assert status == 404 and problem["type"].endswith("/not-found")


async def test_put_that_changes_the_lifecycle_follows_the_same_rules(api: Api) -> None:
    await api.put("/v1/services/bus", json=document("bus", lifecycle="draft"))
    skip = await api.put("/v1/services/bus", json=document("bus", lifecycle="retired"))
    assert skip.status == 422 and skip.problem_type == "invalid-transition"
    publish = await api.put("/v1/services/bus", json=document("bus", lifecycle="published"))
    assert publish.status == 200
    past = document("bus", lifecycle="deprecated", sunset="2001-01-01T00:00:00Z")
    assert (await api.put("/v1/services/bus", json=past)).status == 422
    later = document("bus", lifecycle="deprecated", sunset=FUTURE_TEXT)
    assert (await api.put("/v1/services/bus", json=later)).status == 200
    assert await api.revision() == 3


async def test_a_draft_or_published_document_cannot_carry_a_sunset(api: Api) -> None:
    reply = await api.post("/v1/services", json=document("bus", sunset=FUTURE_TEXT))
    assert reply.status == 422 and reply.problem_type == "invalid-document"
    assert reply.json["errors"][0]["field"] == "spec.sunset"


async def test_a_service_can_be_created_deprecated_with_a_past_sunset(api: Api) -> None:
    # Restoring a city's files from git must work even after their sunset dates.
    old = document("bus", lifecycle="deprecated", sunset="2001-01-01T00:00:00Z")
    assert (await api.post("/v1/services", json=old)).status == 201
