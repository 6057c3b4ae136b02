"""The gateway's side of the registry watch: the event-stream parser and the saved snapshot."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

from gateway.registry_source import SNAPSHOT_FILE, RegistrySource, read_events


async def lines(*items: bytes) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def test_event_stream_parser_reads_events_ids_and_skips_heartbeats() -> None:
    stream = lines(
        b": heartbeat\n",
        b"\n",
        b"event: snapshot\n",
        b"id: 7\n",
        b'data: {"revision": 7,\n',
        b'data:  "services": []}\n',
        b"\n",
        b"event: change\r\n",
        b"id: 8\r\n",
        b'data: {"revision": 8}\r\n',
        b"\r\n",
    )
    events = [e async for e in read_events(stream)]
    assert [(e.event, e.id) for e in events] == [("snapshot", "7"), ("change", "8")]
    assert json.loads(events[0].data) == {"revision": 7, "services": []}


async def test_unreachable_registry_falls_back_to_the_saved_snapshot(tmp_path: Path) -> None:
    doc = {
        "apiVersion": "cityplane.io/v1alpha1",
        "kind": "CityService",
        "metadata": {"name": "bus"},
        "spec": {
            "upstream": {"targets": [{"url": "http://127.0.0.1:1"}]},
            "routes": [{"name": "r", "match": {"pathPrefix": "/bus"}}],
        },
    }
    (tmp_path / SNAPSHOT_FILE).write_text(json.dumps({"revision": 41, "services": [doc]}))
    source = RegistrySource("http://127.0.0.1:1", state_dir=tmp_path, first_snapshot_wait=0.2)
    try:
        services = await source.load()
    finally:
        await source.close()
    assert [s.metadata.name for s in services] == ["bus"]
    assert source.revision == 41 and source.ready


async def test_no_registry_and_no_snapshot_is_not_ready(tmp_path: Path) -> None:
    source = RegistrySource("http://127.0.0.1:1", state_dir=tmp_path, first_snapshot_wait=0.2)
    try:
        assert await source.load() == []
    finally:
        await source.close()
    assert not source.ready
