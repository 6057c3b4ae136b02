"""The emulator subclass closes kmock 0.8's gaps the operator's tests depend on."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.operators.kube_emulator import KubeEmulator

PATH = "/api/v1/namespaces/ns/configmaps"


async def post(kube: KubeEmulator, name: str, data: dict[str, str]) -> dict[str, Any]:
    async with kube.post(PATH, json={"metadata": {"name": name}, "data": data}) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def test_objects_get_uid_resource_version_generation_and_creation_time(
    kube: KubeEmulator,
) -> None:
    first = await post(kube, "a", {"k": "v"})
    second = await post(kube, "b", {"k": "v"})
    for obj in (first, second):
        meta = obj["metadata"]
        assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    async with kube.post(PATH, json={"metadata": {"name": "a"}}) as resp:
        assert resp.status == 409


async def test_failed_json_patch_test_is_422_and_status_is_only_written_via_its_subresource(
    kube: KubeEmulator,
) -> None:
    created = await post(kube, "a", {"k": "v"})
    stale = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
        {"op": "add", "path": "/data/x", "value": "y"},
    ]
    headers = {"Content-Type": "application/json-patch+json"}
    async with kube.patch(f"{PATH}/a", data=json.dumps(stale), headers=headers) as resp:
        assert resp.status == 422
    fresh = [{**stale[0], "value": created["metadata"]["resourceVersion"]}, stale[1]]
    async with kube.patch(f"{PATH}/a", data=json.dumps(fresh), headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.json())["data"] == {"k": "v", "x": "y"}
    async with kube.patch(f"{PATH}/a", json={"status": {"ok": True}}) as resp:
        assert "status" not in await resp.json()
    async with kube.patch(
        f"{PATH}/a/status", json={"status": {"ok": True}, "data": {"k": "w"}}
    ) as resp:
        body = await resp.json()
        assert body["status"] == {"ok": True} and body["data"]["k"] == "v"


async def test_watch_resumes_after_the_listed_resource_version(kube: KubeEmulator) -> None:
    await post(kube, "before", {})
    async with kube.get(PATH) as resp:
        version = (await resp.json())["metadata"]["resourceVersion"]
    await post(kube, "meanwhile", {})  # between the list and the watch
    async with kube.get(PATH, params={"watch": "true", "resourceVersion": version}) as resp:
        line = await asyncio.wait_for(resp.content.readline(), 2)
        while not line.strip():
            line = await asyncio.wait_for(resp.content.readline(), 2)
        event = json.loads(line)
    assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "meanwhile")


async def test_finalizers_hold_deletion_until_removed(kube: KubeEmulator) -> None:
    async with kube.post(PATH, json={"metadata": {"name": "f", "finalizers": ["x/y"]}}) as resp:
        assert resp.status == 200
    async with kube.delete(f"{PATH}/f") as resp:
        assert resp.status == 200
    held = kube.stored("v1/configmaps", "ns", "f")
    assert held is not None and held["metadata"]["deletionTimestamp"]
    async with kube.patch(f"{PATH}/f", json={"metadata": {"finalizers": None}}) as resp:
        assert resp.status == 200
    assert kube.stored("v1/configmaps", "ns", "f") is None
