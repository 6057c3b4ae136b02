"""The identity hub's access tokens at the registry: verified locally against its JWKS, every
forgery refused with 401 invalid_token, the bootstrap admin token still working."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from registry.app import RegistrySettings, RunningRegistry, start_registry
from tests.registry.hub_tokens import TestHub
from tests.registry.support import Api, document

AUDIENCE = "cityplane-registry"
StartWithHub = Callable[..., Awaitable[RunningRegistry]]


@pytest.fixture
async def hub() -> AsyncIterator[TestHub]:
    hub = await TestHub().start()
    yield hub
    await hub.stop()


@pytest.fixture
async def start_with_hub(tmp_path: Path, hub: TestHub) -> AsyncIterator[StartWithHub]:
    """Registries on SQLite (token checks do not touch the database) that trust `hub`."""
    running: list[RunningRegistry] = []

    async def make(**settings: Any) -> RunningRegistry:
        settings.setdefault("issuer", hub.url)
        settings.setdefault("audience", AUDIENCE)
        registry = await start_registry(
            RegistrySettings(
                port=0,
                data_dir=tmp_path / f"data{len(running)}",
                database_url=f"sqlite+aiosqlite:///{tmp_path / f'r{len(running)}.db'}",
                **settings,
            )
        )
        running.append(registry)
        return registry

    yield make
    for registry in running:
        await registry.stop()


@pytest.fixture
async def registry(start_with_hub: StartWithHub) -> RunningRegistry:
    return await start_with_hub()


async def _rejected(registry: RunningRegistry, session: ClientSession, token: str) -> str:
    """The error_description of a 401 invalid_token answer (asserting it is one)."""
    reply = await Api(session, registry.url, token).get("/v1/services")
    assert reply.status == 401, reply.body
    assert reply.problem_type == "unauthorized"
    challenge = reply.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge
    return challenge


async def test_a_hub_token_with_registry_read_lists_services(
    registry: RunningRegistry, session: ClientSession, hub: TestHub
) -> None:
    admin = Api(session, registry.url, registry.admin_token)
    assert (await admin.post("/v1/services", json=document("bus"))).status == 201
    reader = Api(session, registry.url, hub.token(scope="registry:read"))
    reply = await reader.get("/v1/services")
    assert reply.status == 200
    assert [s["metadata"]["name"] for s in reply.json["items"]] == ["bus"]


async def test_the_bootstrap_admin_token_keeps_working_next_to_the_hub(
    registry: RunningRegistry, session: ClientSession
) -> None:
    admin = Api(session, registry.url, registry.admin_token)
    assert (await admin.post("/v1/services", json=document("bus"))).status == 201
    assert (await admin.get("/v1/audit")).json["items"][0]["actor"] == "admin"


async def test_alg_none_is_refused(
    registry: RunningRegistry, session: ClientSession, hub: TestHub
) -> None:
    challenge = await _rejected(registry, session, hub.unsigned(scope="registry:admin"))
    assert "algorithm is not accepted" in challenge


async def test_hs256_signed_with_the_hubs_public_key_is_refused(
    registry: RunningRegistry, session: ClientSession, hub: TestHub
) -> None:
    challenge = await _rejected(registry, session, hub.hmac_with_public_key(scope="registry:admin"))
    assert "algorithm is not accepted" in challenge


async def test_a_token_signed_by_a_key_the_hub_never_published_is_refused(
    registry: RunningRegistry, session: ClientSession, hub: TestHub
) -> None:
    challenge = await _rejected(registry, session, hub.signed_by_another_key())
    assert "signature is invalid" in challenge


async def test_a_token_whose_claims_were_edited_after_signing_is_refused(
    registry: RunningRegistry, session: ClientSession, hub: TestHub
) -> None:
    header, _, signature = hub.token(scope="registry:read").split(".")
    raised = hub.claims(scope="registry:admin")
    body = base64.urlsafe_b64encode(json.dumps(raised).encode()).rstrip(b"=").decode()
    challenge = await _rejected(registry, session, f"{header}.{body}.{signature}")
    assert "signature is invalid" in challenge


async def test_an_expired_token_is_refused(
    registry: RunningRegistry, session: ClientSession, hub: TestHub
) -> None:
    long_ago = hub.claims()["iat"] - 3600
    challenge = await _rejected(registry, session, hub.token(iat=long_ago, exp=long_ago + 60))
    assert "expired" in challenge


async def test_a_token_not_valid_yet_is_refused(
    registry: RunningRegistry, session: ClientSession, hub: TestHub
) -> None:
    challenge = await _rejected(registry, session, hub.token(nbf=hub.claims()["iat"] + 3600))
    assert "not valid yet" in challenge


async def test_a_token_from_another_issuer_is_refused(
    registry: RunningRegistry, session: ClientSession, hub: TestHub
) -> None:
    challenge = await _rejected(registry, session, hub.token(iss="https://evil.example"))
    assert "another issuer" in challenge


async def test_a_token_for_another_audience_is_refused(
    registry: RunningRegistry, session: ClientSession, hub: TestHub
) -> None:
    challenge = await _rejected(registry, session, hub.token(aud="cityplane-gateway"))
    assert "another audience" in challenge


async def test_an_id_token_or_plain_jwt_is_not_an_access_token(
    registry: RunningRegistry, session: ClientSession, hub: TestHub
) -> None:
    challenge = await _rejected(registry, session, hub.token(header={"typ": "JWT"}))
    assert "typ" in challenge


async def test_unknown_kids_refetch_the_jwks_at_most_once_per_interval(
    registry: RunningRegistry, session: ClientSession, hub: TestHub
) -> None:
    assert hub.jwks_fetches == 1  # at start
    for n in range(5):
        challenge = await _rejected(registry, session, hub.token(header={"kid": f"rotated-{n}"}))
        assert "signing key is unknown" in challenge
    assert hub.jwks_fetches == 2  # one refetch for the whole burst


async def test_a_hub_token_without_registry_scopes_is_403_insufficient_scope(
    registry: RunningRegistry, session: ClientSession, hub: TestHub
) -> None:
    api = Api(session, registry.url, hub.token(scope="openid profile bus:read"))
    reply = await api.get("/v1/services")
    assert reply.status == 403
    assert reply.problem_type == "insufficient-scope"
    assert 'error="insufficient_scope"' in reply.headers["WWW-Authenticate"]


async def test_with_the_hub_down_at_start_hub_tokens_get_503_and_the_admin_token_works(
    start_with_hub: StartWithHub, session: ClientSession, hub: TestHub
) -> None:
    token = hub.token()
    registry = await start_with_hub(issuer="http://127.0.0.1:9", jwks_url="http://127.0.0.1:9/j")
    reply = await Api(session, registry.url, token).get("/v1/services")
    assert reply.status == 503
    assert reply.problem_type == "keys-unavailable"
    assert int(reply.headers["Retry-After"]) >= 1
    assert (
        await Api(session, registry.url, registry.admin_token).get("/v1/services")
    ).status == 200
