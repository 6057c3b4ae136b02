"""Bad input gets the right 4xx problem+json and writes nothing (never a 500)."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from tests.registry.support import Api, document


async def assert_nothing_written(api: Api) -> None:
    assert await api.revision() == 0
    assert (await api.get("/v1/audit")).json["items"] == []


async def test_malformed_json_is_400(api: Api) -> None:
    for body in (b'{"kind": ', b"", b"\xff\xfe", b'{"a": 1, "a": 2}', b"NaN", b"[" * 100_000):
        reply = await api.post(
            "/v1/services", data=body, headers={"Content-Type": "application/json"}
        )
        assert reply.status == 400, body[:20]
        assert reply.problem_type == "malformed-document"
    await assert_nothing_written(api)


async def test_an_unknown_field_is_422_naming_the_field(api: Api) -> None:
    doc = document("bus")
    doc["spec"]["upstream"]["timeouts"] = {"conect": "1s"}
    reply = await api.post("/v1/services", json=doc)
    assert reply.status == 422 and reply.problem_type == "invalid-document"
    assert reply.json["errors"] == [
        {"field": "spec.upstream.timeouts.conect", "message": "unknown field"}
    ]
    assert "spec.upstream.timeouts.conect" in reply.json["detail"]
    await assert_nothing_written(api)


async def test_bad_values_are_422_with_one_error_per_field(api: Api) -> None:
    doc = document("bus")
    doc["spec"]["upstream"]["targets"] = [{"url": "ftp://x"}]
    doc["spec"]["routes"][0]["match"]["pathPrefix"] = "no-slash"
    reply = await api.put("/v1/services/bus", json=doc)
    assert reply.status == 422
    fields = {e["field"] for e in reply.json["errors"]}
    assert fields == {"spec.upstream.targets.0.url", "spec.routes.0.match.pathPrefix"}
    await assert_nothing_written(api)


@pytest.mark.parametrize(
    ("change", "field"),
    [({"kind": "CityApp"}, "kind"), ({"apiVersion": "cityplane.io/v9"}, "apiVersion")],
)
async def test_a_wrong_kind_or_api_version_is_422(api: Api, change: dict, field: str) -> None:
    reply = await api.post("/v1/services", json={**document("bus"), **change})
    assert reply.status == 422 and reply.json["errors"][0]["field"] == field
    await assert_nothing_written(api)


async def test_a_json_value_that_is_not_an_object_is_422(api: Api) -> None:
    reply = await api.post("/v1/services", json=[document("bus")])
    assert reply.status == 422 and reply.json["errors"][0]["field"] == "(document)"


async def test_a_body_over_one_mebibyte_is_413(api: Api) -> None:
    doc = document("bus", metadata={"annotations": {"x": "y" * (1024 * 1024)}})
    reply = await api.post("/v1/services", json=doc)
    assert reply.status == 413 and reply.problem_type == "too-large"

    async def chunked() -> object:
        body = json.dumps(doc).encode()
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    streamed = await api.put(
        "/v1/services/bus", data=chunked(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status == 413
    await assert_nothing_written(api)


async def test_yaml_bodies_get_the_same_answers(api: Api) -> None:
    headers = {"Content-Type": "application/yaml"}
    broken = await api.post("/v1/services", data="metadata: [unclosed", headers=headers)
    assert broken.status == 400 and broken.problem_type == "malformed-document"
    doc = document("bus")
    doc["spec"]["stripPrefx"] = True
    unknown = await api.post("/v1/services", data=yaml.safe_dump(doc), headers=headers)
    assert unknown.status == 422
    assert unknown.json["errors"][0]["field"] == "spec.stripPrefx"
    assert unknown.json["errors"][0]["message"].startswith("unknown field (line ")
    wrong_kind = yaml.safe_dump({**document("bus"), "kind": "CityApp"})
    reply = await api.post("/v1/services", data=wrong_kind, headers=headers)
    assert reply.status == 422 and reply.json["errors"][0]["field"] == "kind"
    two = yaml.safe_dump_all([document("a"), document("b")])
    assert (await api.post("/v1/services", data=two, headers=headers)).status == 422
    await assert_nothing_written(api)


async def test_another_media_type_is_415(api: Api) -> None:
    reply = await api.post(
        "/v1/services", data=b"<service/>", headers={"Content-Type": "application/xml"}
    )
    assert reply.status == 415 and reply.problem_type == "unsupported-media-type"


async def test_bad_query_parameters_are_400(api: Api) -> None:
    for path in (
        "/v1/services?lifecycle=archived",
        "/v1/services?label=novalue",
        "/v1/audit?limit=abc",
        "/v1/audit?limit=0",
        "/v1/audit?limit=100000",
    ):
        reply = await api.get(path)
        assert reply.status == 400 and reply.problem_type == "invalid-query", path


async def test_unknown_routes_and_methods_are_problems(api: Api) -> None:
    missing = await api.get("/v2/services")
    assert missing.status == 404 and missing.problem_type == "not-found"
    method = await api.request("PATCH", "/v1/services/bus", json={})
    assert method.status == 405 and method.problem_type == "method-not-allowed"
    assert "PUT" in method.headers["Allow"]
    unknown_service = await api.get("/v1/services/" + "x" * 300)
    assert unknown_service.status == 404


async def test_random_bodies_never_get_a_server_error(api: Api) -> None:
    rng = os.urandom
    bodies = [rng(n) for n in (1, 17, 300, 4096)] + [
        b"{}",
        b'{"metadata": null}',
        b'{"metadata": {"name": 7}, "spec": []}',
        json.dumps({**document("bus"), "spec": {"routes": "x"}}).encode(),
        b'"just a string"',
        b"1e999999",
    ]
    for body in bodies:
        for method, path in (
            ("POST", "/v1/services"),
            ("PUT", "/v1/services/bus"),
            ("POST", "/v1/services/bus/lifecycle"),
        ):
            for content_type in ("application/json", "application/yaml"):
                reply = await api.request(
                    method, path, data=body, headers={"Content-Type": content_type}
                )
                assert 400 <= reply.status < 500, (method, body[:30], reply.body[:200])
    await assert_nothing_written(api)


# --- found by fuzzing the admin API (test_registry_fuzz.py) and probing what it found ---------


async def test_a_name_that_cannot_exist_is_404_without_asking_the_database(api: Api) -> None:
    # PostgreSQL refuses a NUL in a text parameter: this was a 500 there.
    for method, path in (
        ("GET", "/v1/services/a%00b"),
        ("DELETE", "/v1/services/a%00b"),
        ("POST", "/v1/services/a%00b/lifecycle"),
        ("GET", "/v1/services/Bus"),
    ):
        reply = await api.request(method, path, json={"to": "published"})
        assert reply.status == 404 and reply.problem_type == "not-found", (method, path)
    put = await api.put("/v1/services/a%00b", json=document("bus"))
    assert put.status == 422 and put.json["errors"][0]["field"] == "metadata.name"
    await assert_nothing_written(api)


async def test_a_nul_in_a_query_parameter_is_400(api: Api) -> None:
    for path in ("/v1/services?owner=a%00", "/v1/audit?service=a%00", "/v1/services?lifecycle=%00"):
        reply = await api.get(path)
        assert reply.status == 400 and reply.problem_type == "invalid-query", path


async def test_a_query_parameter_that_takes_one_value_is_400_when_repeated_or_empty(
    api: Api,
) -> None:
    # `lifecycle=&lifecycle=null` listed every service.
    for path in (
        "/v1/services?lifecycle=&lifecycle=null",
        "/v1/services?lifecycle=draft&lifecycle=retired",
        "/v1/services?lifecycle=",
        "/v1/services?owner=a&owner=b",
        "/v1/audit?limit=1&limit=2",
        "/v1/audit?limit=",
        "/v1/watch?since=0&since=1",
    ):
        reply = await api.get(path)
        assert reply.status == 400 and reply.problem_type == "invalid-query", path


async def test_since_is_checked_even_when_last_event_id_wins(api: Api) -> None:
    # int() would also take "+1" and "1_0".
    for query, last_event_id in (("?since=-1", "0"), ("?since=x", "0"), ("", "+1"), ("", "1_0")):
        reply = await api.get("/v1/watch" + query, headers={"Last-Event-ID": last_event_id})
        assert reply.status == 400 and reply.problem_type == "invalid-query", (query, last_event_id)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        # A NUL: PostgreSQL cannot store one in the owner column (a 500), nor anywhere in text.
        ({"spec": {"owner": "transport\u0000"}}, "spec.owner"),
        ({"metadata": {"annotations": {"note": "a\u0000b"}}}, "metadata.annotations.note"),
        ({"metadata": {"labels": {"team\u0000": "x"}}}, "metadata.labels"),
        # A lone surrogate: not UTF-8 encodable. In the owner column it was a 500 on both
        # databases; in an annotation it was stored and then ended every watch stream that
        # had to send it, snapshot or change, at once and again on every reconnect.
        ({"spec": {"owner": "\ud800"}}, "spec.owner"),
        ({"metadata": {"annotations": {"note": "\udfff"}}}, "metadata.annotations.note"),
    ],
)
async def test_text_the_registry_cannot_store_or_send_is_422(
    api: Api, change: dict, field: str
) -> None:
    doc = document("bus")
    doc["metadata"].update(change.get("metadata", {}))
    doc["spec"].update(change.get("spec", {}))
    reply = await api.post("/v1/services", json=doc)
    assert reply.status == 422 and reply.problem_type == "invalid-document", reply.body[:300]
    assert reply.json["errors"][0]["field"] == field
    await assert_nothing_written(api)
    async with api.watch() as events:
        assert (await events.next()).event == "snapshot"


async def test_yaml_escapes_that_make_text_the_registry_cannot_store_are_422(api: Api) -> None:
    body = yaml.safe_dump(document("bus"))
    body = body.replace("name: bus\n", 'name: bus\n  annotations: {n: "a\\0b"}\n', 1)
    reply = await api.post("/v1/services", data=body, headers={"Content-Type": "application/yaml"})
    assert reply.status == 422, reply.body[:300]
    assert reply.json["errors"][0]["field"] == "metadata.annotations.n"
    await assert_nothing_written(api)


async def test_an_owner_longer_than_the_owner_column_is_422(api: Api) -> None:
    # PostgreSQL refused it with a 500 (varchar(253)); SQLite stored it.
    reply = await api.post("/v1/services", json=document("bus", owner="o" * 254))
    assert reply.status == 422 and reply.json["errors"][0]["field"] == "spec.owner"
    assert (await api.post("/v1/services", json=document("bus", owner="o" * 253))).status == 201


@pytest.mark.parametrize("timeouts", [{"connect": "0.0001s"}, {"connect": 1e300}])
async def test_a_duration_out_of_range_is_422(api: Api, timeouts: dict) -> None:
    # Before durations had bounds, such a value was stored in a form the schema refused when
    # read back: every later PUT of the service was a 500 and the gateway refused the snapshot.
    doc = document("bus")
    doc["spec"]["upstream"]["timeouts"] = timeouts
    reply = await api.post("/v1/services", json=doc)
    assert reply.status == 422 and reply.problem_type == "invalid-document"
    error = reply.json["errors"][0]
    assert error["field"] == f"spec.upstream.timeouts.{next(iter(timeouts))}"
    await assert_nothing_written(api)


async def test_a_long_duration_is_stored_in_a_form_that_reads_back(api: Api) -> None:
    doc = document("bus")
    doc["spec"]["upstream"]["timeouts"] = {"request": "1234567s"}
    assert (await api.post("/v1/services", json=doc)).status == 201
    again = await api.get("/v1/services/bus")
    assert again.json["spec"]["upstream"]["timeouts"]["request"] == "1234567s"
    assert (await api.put("/v1/services/bus", json=again.json)).status == 200


async def test_an_infinite_duration_is_422(api: Api) -> None:
    body = json.dumps(document("bus")).replace(
        '"targets"', '"timeouts": {"connect": 1e999}, "targets"'
    )
    reply = await api.post("/v1/services", data=body, headers={"Content-Type": "application/json"})
    assert reply.status == 422, reply.body[:300]
    await assert_nothing_written(api)
