"""Two hub replicas on one real PostgreSQL: one set of keys, tokens usable across replicas,
refresh-token reuse caught whichever replica sees it, one intact audit chain, key rotation."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jwt
import pytest

from identity.app import RunningIdentity, start_identity
from identity.hub import IdentitySettings
from tests.identity.conftest import CALLBACK, FormBrowser, basic, demo_secret, pkce
from tests.registry.support import postgres_available, postgres_database

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[tuple[RunningIdentity, RunningIdentity]]:
    if not await postgres_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not running (CI promises one)")
        pytest.skip("PostgreSQL is not running")
    async with postgres_database() as url:
        # Both start at once: migrations, keys and demo seeding must not trip over each other.
        # The second replica seeds nothing (one `up` seeds a city); it shares the admin token.
        token_file = tmp_path / "admin-token"
        a, b = await asyncio.gather(
            start_identity(
                IdentitySettings(
                    port=0,
                    data_dir=tmp_path / "a",
                    database_url=url,
                    demo=True,
                    admin_token_file=token_file,
                )
            ),
            start_identity(
                IdentitySettings(
                    port=0, data_dir=tmp_path / "b", database_url=url, admin_token_file=token_file
                )
            ),
        )
        try:
            yield a, b
        finally:
            await a.stop()
            await b.stop()


async def _jwks(http: aiohttp.ClientSession, hub: RunningIdentity) -> list[str]:
    async with http.get(f"{hub.issuer}/jwks.json") as r:
        return sorted(k["kid"] for k in (await r.json())["keys"])


async def test_replicas_share_one_signing_key(
    replicas: tuple[RunningIdentity, RunningIdentity],
) -> None:
    a, b = replicas
    async with aiohttp.ClientSession() as http:
        kids = await _jwks(http, a)
        assert kids == await _jwks(http, b)
        # one per algorithm: ES256 (the hub's) and RS256 (OIDC Core §15.1)
        assert [kid.split("-")[0] for kid in kids] == ["es256", "rs256"]


async def test_refresh_token_from_one_replica_works_and_its_reuse_is_caught_on_the_other(
    replicas: tuple[RunningIdentity, RunningIdentity],
) -> None:
    a, b = replicas
    browser = FormBrowser(a.issuer)
    try:
        verifier, challenge = pkce()
        walk = await browser.authorize(
            {"password": ("citizen1", "demo-citizen-1")},
            response_type="code",
            client_id="demo-web",
            redirect_uri=CALLBACK,
            scope="openid offline_access",
            code_challenge=challenge,
            code_challenge_method="S256",
        )
    finally:
        await browser.close()
    auth = basic("demo-web", demo_secret(a))
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{a.issuer}/token",
            headers=auth,
            data={
                "grant_type": "authorization_code",
                "code": walk.query["code"],
                "redirect_uri": CALLBACK,
                "code_verifier": verifier,
            },
        ) as r:
            first = await r.json()
        async with http.post(
            f"{b.issuer}/token",
            headers=auth,
            data={
                "grant_type": "refresh_token",
                "refresh_token": first["refresh_token"],
            },
        ) as r:
            assert r.status == 200
            second = await r.json()
        async with http.post(
            f"{a.issuer}/token",
            headers=auth,
            data={
                "grant_type": "refresh_token",
                "refresh_token": first["refresh_token"],
            },
        ) as r:
            assert r.status == 400  # reuse, seen by the other replica
        async with http.post(
            f"{b.issuer}/token",
            headers=auth,
            data={
                "grant_type": "refresh_token",
                "refresh_token": second["refresh_token"],
            },
        ) as r:
            assert r.status == 400  # the whole family went with it


async def test_concurrent_grants_on_both_replicas_keep_one_intact_audit_chain(
    replicas: tuple[RunningIdentity, RunningIdentity],
) -> None:
    a, b = replicas
    auth = basic("demo-web", demo_secret(a))

    async def grant(http: aiohttp.ClientSession, hub: RunningIdentity) -> int:
        async with http.post(
            f"{hub.issuer}/token", headers=auth, data={"grant_type": "client_credentials"}
        ) as r:
            return r.status

    async with aiohttp.ClientSession() as http:
        statuses = await asyncio.gather(*(grant(http, h) for h in [a, b] * 40))
        assert statuses == [200] * 80
        async with http.get(
            f"{b.issuer}/admin/audit/verify", headers={"Authorization": f"Bearer {a.admin_token}"}
        ) as r:
            assert await r.json() == {"intact": True, "first_bad_entry": None}
    issued = await a.hub.audit.entries(actions=("token.issued",), limit=1000)
    assert len(issued) == 80


async def test_rotation_publishes_the_new_key_before_it_signs_and_keeps_the_old_one(
    replicas: tuple[RunningIdentity, RunningIdentity],
) -> None:
    a, b = replicas
    admin = {"Authorization": f"Bearer {a.admin_token}"}
    auth = basic("demo-web", demo_secret(a))
    async with aiohttp.ClientSession() as http:
        old = await _jwks(http, a)
        async with http.post(f"{a.issuer}/admin/keys/rotate", headers=admin) as r:
            new = [k["kid"] for k in (await r.json())["keys"]]
        assert sorted(old + new) == await _jwks(http, a)
        async with http.post(
            f"{a.issuer}/token", headers=auth, data={"grant_type": "client_credentials"}
        ) as r:
            token = (await r.json())["access_token"]
        # published ahead (10 min by default): the old key still signs
        assert jwt.get_unverified_header(token)["kid"] == old[0]
        await b.hub.keys.load()  # what the replica's minute-by-minute maintenance does
        assert sorted(old + new) == await _jwks(http, b)
