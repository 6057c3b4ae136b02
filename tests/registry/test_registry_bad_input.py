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
