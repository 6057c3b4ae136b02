"""Several registries on one PostgreSQL: revisions stay global, changes fan out (LISTEN/NOTIFY)."""

from __future__ import annotations

import asyncio
import time

from aiohttp import ClientSession

from tests.registry.conftest import StartRegistry
from tests.registry.support import Api, document, sql


async def test_a_change_on_one_replica_reaches_the_watchers_of_another_pushed(
    start_on_postgres: StartRegistry, postgres_url: str, session: ClientSession
) -> None:
    one, two = await start_on_postgres(), await start_on_postgres()
    writer = Api(session, one.url, one.admin_token)
    reader = Api(session, two.url, two.admin_token)
    async with reader.watch("?since=0") as events:
        delays = []
        for i in range(10):
            sent = time.perf_counter()
            write = asyncio.create_task(
                writer.put("/v1/services/bus", json=document("bus", version=f"v{i}"))
            )
            event = await events.next(within=1.0)
            delays.append(time.perf_counter() - sent)
            assert event.id == (await write).headers["X-CityPlane-Revision"]
    # The median tells a push from a poll; the tail is the VM's (a stall of this CI machine
    # once put one over 100 ms). The 100 ms p99 target is `python -m bench.propagation`'s.
    delays.sort()
    assert delays[len(delays) // 2] < 0.05, delays
    assert delays[-1] < 1.0, delays


async def test_writes_through_both_replicas_share_one_gapless_revision_sequence(
    start_on_postgres: StartRegistry, postgres_url: str, session: ClientSession
) -> None:
    one, two = await start_on_postgres(), await start_on_postgres()
    apis = [Api(session, r.url, r.admin_token) for r in (one, two)]
    writes = [apis[i % 2].put(f"/v1/services/s{i}", json=document(f"s{i}")) for i in range(20)]
    replies = await asyncio.gather(*writes)
    assert sorted(int(r.headers["X-CityPlane-Revision"]) for r in replies) == list(range(1, 21))
    async with apis[1].watch("?since=0") as events:
        assert [(await events.next()).id for _ in range(20)] == [str(i) for i in range(1, 21)]


async def test_a_replica_whose_listen_connection_dies_reconnects_and_catches_up(
    start_on_postgres: StartRegistry, postgres_url: str, session: ClientSession
) -> None:
    one, two = await start_on_postgres(), await start_on_postgres()
    writer = Api(session, one.url, one.admin_token)
    reader = Api(session, two.url, two.admin_token)
    async with reader.watch("?since=0") as events:
        killed = await sql(
            postgres_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        assert len(killed) == 2  # one listener per replica
        await writer.post("/v1/services", json=document("bus"))
        event = await events.next(within=3.0)  # reconnect (1 s) publishes the current revision
    assert (event.id, event.data["name"]) == ("1", "bus")


async def test_replicas_starting_together_on_an_empty_database_migrate_once(
    start_on_postgres: StartRegistry, postgres_url: str
) -> None:
    started = await asyncio.gather(*(start_on_postgres() for _ in range(3)))
    versions = await sql(postgres_url, "SELECT version_num FROM alembic_version")
    assert [v["version_num"] for v in versions] == ["0003"]
    assert len({r.admin_token for r in started}) == 1  # one token file, created once
