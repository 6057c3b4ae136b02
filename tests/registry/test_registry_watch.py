"""GET /v1/watch: snapshot, replay, live changes, resume, snapshot-on-lag, heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiohttp import ClientSession

from registry.app import RunningRegistry
from tests.registry.conftest import StartRegistry
from tests.registry.support import Api, document


async def test_watch_without_since_starts_with_a_snapshot_of_everything(api: Api) -> None:
    await api.post("/v1/services", json=document("bus"))
    await api.post("/v1/services", json=document("trams", lifecycle="draft"))
    async with api.watch() as events:
        first = await events.next()
    assert (first.event, first.id) == ("snapshot", "2")
    assert first.data["revision"] == 2
    assert [s["metadata"]["name"] for s in first.data["services"]] == ["bus", "trams"]


async def test_watch_since_replays_the_changes_after_it_then_streams_new_ones(api: Api) -> None:
    await api.post("/v1/services", json=document("bus"))
    await api.put("/v1/services/bus", json=document("bus", version="v2"))
    await api.post("/v1/services", json=document("trams"))
    async with api.watch("?since=1") as events:
        replayed = [await events.next(), await events.next()]
        await api.delete("/v1/services/bus")
        live = await events.next()
    assert [(e.event, e.id, e.data["type"], e.data["name"]) for e in replayed] == [
        ("change", "2", "MODIFIED", "bus"),
        ("change", "3", "ADDED", "trams"),
    ]
    assert replayed[0].data["service"]["spec"]["version"] == "v2"
    assert replayed[0].data["service"]["metadata"]["resourceVersion"] == "2"
    assert (live.id, live.data["type"], live.data["service"]) == ("4", "DELETED", None)
    assert live.data["revision"] == 4


async def test_live_changes_are_pushed_right_after_the_commit(api: Api) -> None:
    async with api.watch("?since=0") as events:
        delays = []
        for i in range(20):
            # From before the request is sent: an upper bound of commit → event.
            sent = time.perf_counter()
            write = asyncio.create_task(
                api.put("/v1/services/bus", json=document("bus", version=f"v{i}"))
            )
            event = await events.next(within=1.0)
            delays.append(time.perf_counter() - sent)
            reply = await write
            assert event.id == reply.headers["X-CityPlane-Revision"]
    # Typically ~2-10 ms. The median tells a push from a poll; the tail is the VM's (a stall
    # of this CI machine once put two of 20 over 100 ms). The 100 ms p99 target is measured by
    # `python -m bench.propagation`, not here.
    delays.sort()
    assert delays[len(delays) // 2] < 0.05, delays
    assert delays[-1] < 1.0, delays


async def test_a_stream_resumes_with_last_event_id_after_a_disconnect(api: Api) -> None:
    async with api.watch() as events:
        assert (await events.next()).event == "snapshot"
        await api.post("/v1/services", json=document("bus"))
        last_seen = (await events.next()).id
    # Disconnected; three changes happen meanwhile.
    await api.put("/v1/services/bus", json=document("bus", version="v2"))
    await api.post("/v1/services", json=document("trams"))
    await api.delete("/v1/services/bus")
    # A reconnecting EventSource repeats its first URL and adds Last-Event-ID, which wins.
    async with api.watch("?since=0", headers={"Last-Event-ID": str(last_seen)}) as events:
        missed = [await events.next() for _ in range(3)]
    assert [e.id for e in missed] == ["2", "3", "4"]
    assert [e.event for e in missed] == ["change"] * 3


async def test_since_older_than_the_kept_window_gets_a_snapshot_then_live_changes(
    start: StartRegistry, session: ClientSession
) -> None:
    registry = await start(changes_kept=3)
    api = Api(session, registry.url, registry.admin_token)
    for i in range(6):
        await api.put(f"/v1/services/s{i}", json=document(f"s{i}"))
    async with api.watch("?since=1") as events:
        snapshot = await events.next()
        assert (snapshot.event, snapshot.id) == ("snapshot", "6")
        assert len(snapshot.data["services"]) == 6
        await api.delete("/v1/services/s0")
        live = await events.next()
    assert (live.event, live.id) == ("change", "7")
    # Inside the window, the same registry replays instead.
    async with api.watch("?since=4") as events:
        assert [(await events.next()).id for _ in range(3)] == ["5", "6", "7"]


async def test_a_revision_from_the_future_is_a_conflict(api: Api) -> None:
    await api.post("/v1/services", json=document("bus"))
    reply = await api.get("/v1/watch?since=2")
    assert reply.status == 409 and reply.problem_type == "revision-from-the-future"
    assert reply.json["revision"] == 1
    by_header = await api.get("/v1/watch", headers={"Last-Event-ID": "99"})
    assert by_header.status == 409


async def test_since_that_is_not_a_revision_is_a_bad_request(api: Api) -> None:
    for query in ("?since=abc", "?since=-1"):
        reply = await api.get("/v1/watch" + query)
        assert reply.status == 400 and reply.problem_type == "invalid-query"


async def test_an_idle_stream_gets_heartbeats(start: StartRegistry, session: ClientSession) -> None:
    registry = await start(heartbeat=0.1)
    api = Api(session, registry.url, registry.admin_token)
    async with api.watch("?since=0") as events:
        began = time.perf_counter()
        assert await events.comment(within=1.0) == "heartbeat"
        assert await events.comment(within=1.0) == "heartbeat"
        assert 0.15 <= time.perf_counter() - began < 1.0
        await api.post("/v1/services", json=document("bus"))
        assert (await events.next()).id == "1"


async def test_stopping_the_registry_ends_open_streams_at_once(
    registry: RunningRegistry, api: Api
) -> None:
    async with api.watch("?since=0") as events:
        began = time.perf_counter()
        await registry.stop()
        with contextlib.suppress(EOFError):
            await events.next(within=2.0)
        assert time.perf_counter() - began < 1.0


async def test_open_streams_are_counted_in_the_metrics(api: Api) -> None:
    async def watchers() -> float:
        text = (await api.get("/metrics")).body.decode()
        line = next(x for x in text.splitlines() if x.startswith("cityplane_registry_watchers "))
        return float(line.split()[1])

    async with api.watch() as events:
        await events.next()
        assert await watchers() == 1.0
