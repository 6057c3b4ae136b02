"""Sessions in Redis when the hub is given one: sign-in, step-up and the account page work the
same; the session lives (and expires) in Redis, not the database; logout removes it; a Redis
outage is a clear 503, not a traceback."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from sqlalchemy import func, select

from identity.app import RunningIdentity, start_identity
from identity.hub import IdentitySettings
from identity.models import sessions
from tests.identity.conftest import CALLBACK, FormBrowser, pkce

pytestmark = pytest.mark.timeout(60)
REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def redis_hub(tmp_path: Path) -> AsyncIterator[RunningIdentity]:
    client = aioredis.from_url(REDIS)
    try:
        await client.ping()
    except OSError:
        pytest.fail("Redis is not running on 127.0.0.1:6379")
    finally:
        await client.aclose()
    running = await start_identity(
        IdentitySettings(port=0, data_dir=tmp_path, demo=True, redis_url=REDIS)
    )
    try:
        yield running
    finally:
        await running.stop()


async def test_sessions_live_in_redis_and_logout_removes_them(redis_hub: RunningIdentity) -> None:
    browser = FormBrowser(redis_hub.issuer)
    try:
        _, challenge = pkce()
        walk = await browser.authorize(
            {"password": ("citizen2", "demo-citizen-2"), "choose": "otp", "otp": "citizen2"},
            response_type="code",
            client_id="demo-web",
            redirect_uri=CALLBACK,
            scope="openid",
            acr_values="urn:cityplane:loa:2",
            code_challenge=challenge,
            code_challenge_method="S256",
        )
        assert "code" in walk.query
        sid = next(c.value for c in browser.http.cookie_jar if c.key == "cityplane_session")
        redis = aioredis.from_url(REDIS)
        try:
            key = f"cityplane:identity:session:{sid}"
            assert await redis.exists(key) == 1
            assert 0 < await redis.pttl(key) <= 12 * 3600 * 1000
            async with redis_hub.hub.engine.connect() as conn:
                assert (
                    await conn.execute(select(func.count()).select_from(sessions))
                ).scalar() == 0
            _, _, page = await browser.get("/account")
            assert "this session" in page
            csrf = re.search(r'name="csrf" value="([^"]+)"', page)
            assert csrf
            await browser.post("/logout", {"csrf": csrf.group(1)})
            assert await redis.exists(key) == 0
        finally:
            await redis.aclose()
    finally:
        await browser.close()


async def test_a_redis_outage_is_a_503_problem_not_a_traceback(tmp_path: Path) -> None:
    hub = await start_identity(
        IdentitySettings(port=0, data_dir=tmp_path, demo=True, redis_url="redis://127.0.0.1:1/0")
    )
    browser = FormBrowser(hub.issuer)
    try:
        status, _, body = await browser.get(
            "/authorize?response_type=code&client_id=demo-web&scope=openid&redirect_uri="
            + CALLBACK
            + "&code_challenge="
            + pkce()[1]
            + "&code_challenge_method=S256"
        )
        assert status == 503 and "sessions-unavailable" in body
    finally:
        await browser.close()
        await hub.stop()
