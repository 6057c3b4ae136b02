"""The token path's database work: refresh tokens looked up together (identity/group_read.py),
and the grants' writes committed in the audit writer's batch (identity/audit.py) with the
single-use rules intact — on the hub's real schema in SQLite."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import event, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from cityplane.storage import make_engine, migrate, sqlite_url, writer
from identity.app import RunningIdentity
from identity.audit import AuditLog
from identity.group_read import GroupedLookup
from identity.models import audit_log, refresh_tokens
from identity.oidc.server import _INSERT_REFRESH_TOKEN, _MARK_REFRESH_TOKEN_USED
from identity.store import Write
from tests.identity.conftest import FormBrowser, basic, demo_secret, sign_in

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(sqlite_url(tmp_path / "identity.db"))
    await migrate(engine, "identity:migrations", 1)
    try:
        yield engine
    finally:
        await engine.dispose()


def _token_row(digest: str, family: str = "family-1") -> dict[str, Any]:
    now = time.time()
    return {
        "digest": digest,
        "family": family,
        "client_id": "demo-web",
        "account_id": "person-1",
        "session_id": None,
        "scope": "openid offline_access",
        "auth": {"acr": "urn:cityplane:loa:1", "amr": ["pwd"]},
        "created_at": now,
        "expires_at": now + 3600,
        "used_at": None,
        "revoked": False,
    }


async def _store(engine: AsyncEngine, *digests: str) -> None:
    async with writer(engine).begin() as conn:
        await conn.execute(insert(refresh_tokens), [_token_row(d) for d in digests])


def _count_selects_of(engine: AsyncEngine, table: str) -> list[str]:
    seen: list[str] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and f"FROM {table}" in statement:
            seen.append(statement)

    return seen


async def _used_at(engine: AsyncEngine, digest: str) -> float | None:
    async with engine.connect() as conn:
        query = select(refresh_tokens.c.used_at).where(refresh_tokens.c.digest == digest)
        return (await conn.execute(query)).scalar_one()


# --- lookups in groups -------------------------------------------------------------------------


async def test_concurrent_lookups_share_one_select_and_each_gets_its_own_row(
    engine: AsyncEngine,
) -> None:
    await _store(engine, "a" * 64, "b" * 64)
    lookup = GroupedLookup(engine, refresh_tokens.c.digest)
    selects = _count_selects_of(engine, "refresh_tokens")
    keys = ["a" * 64, "b" * 64, "a" * 64, "c" * 64]
    first, second, again, missing = await asyncio.gather(*(lookup.get(k) for k in keys))
    assert len(selects) == 1 and " IN " in selects[0]
    assert first is not None and first["digest"] == "a" * 64 and first["used_at"] is None
    assert second is not None and second["digest"] == "b" * 64
    assert again == first and again is not first  # one copy per caller: theirs to change
    assert first["auth"] == {"acr": "urn:cityplane:loa:1", "amr": ["pwd"]}
    assert missing is None


async def test_a_lookup_alone_is_answered_at_once_and_sees_the_latest_commit(
    engine: AsyncEngine,
) -> None:
    lookup = GroupedLookup(engine, refresh_tokens.c.digest)
    assert await lookup.get("d" * 64) is None
    await _store(engine, "d" * 64)
    found = await lookup.get("d" * 64)
    assert found is not None and found["family"] == "family-1"


async def test_a_failed_select_reaches_every_caller_of_its_round_and_the_next_round_works(
    engine: AsyncEngine,
) -> None:
    await _store(engine, "e" * 64)
    lookup = GroupedLookup(engine, refresh_tokens.c.digest)
    failures = 0

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _fail_once(*_: Any) -> None:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise RuntimeError("database went away")

    outcomes = await asyncio.gather(
        lookup.get("e" * 64), lookup.get("f" * 64), return_exceptions=True
    )
    assert [type(o) for o in outcomes] == [RuntimeError, RuntimeError]
    found = await lookup.get("e" * 64)
    assert found is not None and found["digest"] == "e" * 64


# --- the grants' writes in the audit writer's batch ----------------------------------------------


def _rotation(presented: str, new: str) -> tuple[Write, ...]:
    return (
        Write(_INSERT_REFRESH_TOKEN, _token_row(new)),
        Write(_MARK_REFRESH_TOKEN_USED, {"presented": presented, "now": time.time()}, True),
    )


async def test_one_batch_rotates_once_per_token_and_a_lost_race_writes_nothing(
    engine: AsyncEngine,
) -> None:
    await _store(engine, "1" * 64, "2" * 64)
    audit = AuditLog(engine)
    audit.start()
    try:
        # Queued together, so they share one transaction: the second use of "1" loses.
        held = await asyncio.gather(
            audit.record("token.issued", writes=_rotation("1" * 64, "new-1a")),
            audit.record("token.issued", writes=_rotation("1" * 64, "new-1b")),
            audit.record("token.issued", writes=_rotation("2" * 64, "new-2")),
        )
        assert held == [True, False, True]
        lookup = GroupedLookup(engine, refresh_tokens.c.digest)
        assert await lookup.get("new-1a") is not None and await lookup.get("new-2") is not None
        assert await lookup.get("new-1b") is None
        assert await _used_at(engine, "1" * 64) is not None
        assert len(await audit.entries(actions=("token.issued",))) == 2
        assert await audit.verify() is None
    finally:
        await audit.stop()


async def test_when_one_of_several_conditional_writes_misses_the_others_are_undone(
    engine: AsyncEngine,
) -> None:
    await _store(engine, "3" * 64)
    audit = AuditLog(engine)
    audit.start()
    try:
        now = time.time()
        writes = (
            Write(_MARK_REFRESH_TOKEN_USED, {"presented": "3" * 64, "now": now}, True),
            Write(_MARK_REFRESH_TOKEN_USED, {"presented": "unknown", "now": now}, True),
            Write(_INSERT_REFRESH_TOKEN, _token_row("new-3")),
        )
        assert await audit.record("token.issued", writes=writes) is False
        assert await _used_at(engine, "3" * 64) is None
        assert await GroupedLookup(engine, refresh_tokens.c.digest).get("new-3") is None
        async with engine.connect() as conn:
            assert (await conn.execute(select(audit_log.c.seq))).first() is None
    finally:
        await audit.stop()


# --- over HTTP -----------------------------------------------------------------------------------


async def test_one_refresh_token_presented_eight_times_at_once_is_honoured_once(
    hub: RunningIdentity, browser: FormBrowser
) -> None:
    _, first = await sign_in(
        hub, browser, {"password": ("citizen1", "demo-citizen-1")}, scope="openid offline_access"
    )
    headers = basic("demo-web", demo_secret(hub))
    form = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}

    async def present(http: aiohttp.ClientSession) -> tuple[int, dict[str, Any]]:
        async with http.post(f"{hub.issuer}/token", data=form, headers=headers) as r:
            return r.status, await r.json()

    async with aiohttp.ClientSession() as http:
        answers = await asyncio.gather(*(present(http) for _ in range(8)))
    # The losers read the token in the winner's round (their rotation then matches nothing) or
    # after its commit (a reuse: the family goes); either way a refusal.
    assert sorted(status for status, _ in answers) == [200] + [400] * 7
    assert all(body["error"] == "invalid_grant" for status, body in answers if status == 400)
    assert await hub.hub.audit.verify() is None
