"""/healthz, /readyz, /metrics and /openapi.json."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiohttp import ClientSession

from cityplane.schema import service_json_schema
from registry.app import RunningRegistry
from tests.registry.conftest import StartRegistry
from tests.registry.support import Api, document, sql


async def test_live_and_ready_once_migrated_with_the_revision(api: Api) -> None:
    assert (await api.get("/healthz")).json == {"status": "ok"}
    await api.post("/v1/services", json=document())
    assert (await api.get("/readyz")).json == {"status": "ready", "revision": 1}


async def test_not_ready_while_the_database_refuses_connections(
    start_on_postgres: StartRegistry, postgres_url: str, session: ClientSession
) -> None:
    database_url = postgres_url
    registry = await start_on_postgres()
    api = Api(session, registry.url, registry.admin_token)
    name = database_url.rsplit("/", 1)[1]
    admin = database_url.rsplit("/", 1)[0] + "/postgres"
    await sql(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    await sql(
        admin,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = $1 AND pid <> pg_backend_pid()",
        name,
    )
    try:
        not_ready = await api.get("/readyz")
        assert not_ready.status == 503
        assert not_ready.json["status"] == "database unavailable"
        assert (await api.get("/healthz")).status == 200
    finally:
        await sql(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    for _ in range(20):
        if (await api.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.05)
    assert (await api.get("/readyz")).status == 200
    assert (await api.post("/v1/services", json=document())).status == 201


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    assert found, f"{name}{labels} not in metrics"
    return float(found.group(1))


async def test_metrics_count_requests_by_method_and_status_and_show_the_revision(
    api: Api,
) -> None:
    await api.post("/v1/services", json=document("bus"))
    await api.post("/v1/services", json=document("bus"))
    await api.put("/v1/services/bus", json=document("bus", version="v2"))
    text = (await api.get("/metrics")).body.decode()
    assert metric(text, "cityplane_registry_revision") == 2
    assert metric(text, "cityplane_registry_requests_total", method="POST", status="201") == 1
    assert metric(text, "cityplane_registry_requests_total", method="POST", status="409") == 1
    assert metric(text, "cityplane_registry_requests_total", method="PUT", status="200") == 1
    assert metric(text, "cityplane_registry_changes_total", action="update") == 1
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    assert all(n.startswith("cityplane_registry_") for n in names), names


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


async def test_openapi_document_is_3_1_and_uses_the_one_service_schema(
    registry: RunningRegistry, api: Api
) -> None:
    spec = (await api.get("/openapi.json")).json
    assert spec["openapi"].startswith("3.1")
    schemas = spec["components"]["schemas"]
    original = service_json_schema()
    assert schemas["CityService"]["properties"].keys() == original["properties"].keys()
    for name in original["$defs"]:
        assert name in schemas
    assert schemas["Metadata"]["properties"] == original["$defs"]["Metadata"]["properties"]
    for ref in refs(spec):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref

    routes = {
        (r.method, r.resource.canonical)
        for r in registry.app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    documented = {
        (m.upper(), p) for p, item in spec["paths"].items() for m in item if m != "parameters"
    }
    assert routes == documented
