"""One transaction per change: revisions under concurrency, failures mid-change, pruning."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from aiohttp import ClientSession
from sqlalchemy import Row, Table, select

from registry.app import RunningRegistry
from registry.models import audit, changes, services
from tests.conftest import problem
from tests.registry.conftest import StartRegistry
from tests.registry.support import Api, document


async def rows(registry: RunningRegistry, table: Table) -> list[Row[Any]]:
    async with registry.state.engine.connect() as conn:
        return list((await conn.execute(select(table))).all())


async def test_twenty_concurrent_writers_get_strictly_increasing_gapless_revisions(
    registry: RunningRegistry, api: Api
) -> None:
    async with api.watch("?since=0") as events:
        creates = [api.put(f"/v1/services/s{i}", json=document(f"s{i}")) for i in range(20)]
        assert Counter(r.status for r in await asyncio.gather(*creates)) == {201: 20}
        updates = [
            api.put("/v1/services/s0", json=document("s0", version=f"v{i}")) for i in range(20)
        ]
        assert Counter(r.status for r in await asyncio.gather(*updates)) == {200: 20}
        seen = [int((await events.next()).id or 0) for _ in range(40)]

    assert seen == list(range(1, 41))
    assert sorted(r.revision for r in await rows(registry, changes)) == list(range(1, 41))
    assert sorted(r.revision for r in await rows(registry, audit)) == list(range(1, 41))
    assert await api.revision() == 40
    last_writer = (await api.get("/v1/services/s0")).json
    last_change = max(
        (r for r in await rows(registry, changes) if r.name == "s0"), key=lambda r: r.revision
    )
    assert last_writer == last_change.document


async def test_concurrent_creates_of_one_name_let_exactly_one_win(api: Api) -> None:
    replies = await asyncio.gather(
        *(api.post("/v1/services", json=document("bus", version=f"v{i}")) for i in range(10))
    )
    assert Counter(r.status for r in replies) == {201: 1, 409: 9}
    assert await api.revision() == 1


async def test_a_failure_after_the_revision_bump_writes_nothing(
    registry: RunningRegistry, api: Api
) -> None:
    # The audit insert is the last write of a change; make the database refuse it for "boom".
    engine = registry.state.engine
    async with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            await conn.exec_driver_sql(
                "CREATE TRIGGER refuse_boom BEFORE INSERT ON audit WHEN NEW.service = 'boom' "
                "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
            )
        else:
            await conn.exec_driver_sql(
                "CREATE FUNCTION refuse_boom() RETURNS trigger AS $$ BEGIN "
                "IF NEW.service = 'boom' THEN RAISE EXCEPTION 'injected failure'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            await conn.exec_driver_sql(
                "CREATE TRIGGER refuse_boom BEFORE INSERT ON audit "
                "FOR EACH ROW EXECUTE FUNCTION refuse_boom()"
            )

    failed = await api.post("/v1/services", json=document("boom"))
    assert failed.status == 500
    assert failed.headers["Content-Type"].startswith("application/problem+json")
    assert "Traceback" not in failed.body.decode() and "injected" not in failed.body.decode()
    assert problem(failed.body)["type"].endswith("/internal-error")

    assert await api.revision() == 0
    assert await rows(registry, services) == []
    assert await rows(registry, changes) == []
    assert await rows(registry, audit) == []

    # The next change takes revision 1: nothing of the failed one remains, not even a gap.
    assert (await api.post("/v1/services", json=document("bus"))).headers[
        "X-CityPlane-Revision"
    ] == "1"
    async with api.watch("?since=0") as events:
        first = await events.next()
    assert (first.id, first.data["name"]) == ("1", "bus")


async def test_changes_beyond_the_kept_window_are_pruned_in_the_same_transaction(
    start: StartRegistry, session: ClientSession
) -> None:
    registry = await start(changes_kept=5)
    api = Api(session, registry.url, registry.admin_token)
    for i in range(12):
        await api.put("/v1/services/bus", json=document("bus", version=f"v{i}"))
    assert sorted(r.revision for r in await rows(registry, changes)) == [8, 9, 10, 11, 12]
    assert len(await rows(registry, audit)) == 12  # the audit log is never pruned
