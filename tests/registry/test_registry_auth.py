"""Bearer tokens on /v1/*: the bootstrap admin token, its file, and what is open to all."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
from aiohttp import ClientSession

from registry.app import RegistrySettings, RegistryStartError, RunningRegistry, start_registry
from tests.registry.conftest import StartRegistry
from tests.registry.support import Api, document

PROTECTED = [
    ("GET", "/v1/services"),
    ("POST", "/v1/services"),
    ("GET", "/v1/services/bus"),
    ("PUT", "/v1/services/bus"),
    ("DELETE", "/v1/services/bus"),
    ("POST", "/v1/services/bus/lifecycle"),
    ("GET", "/v1/snapshot"),
    ("GET", "/v1/audit"),
    ("GET", "/v1/watch"),
]


async def test_no_token_is_401_with_a_bearer_challenge_on_every_v1_endpoint(
    registry: RunningRegistry, session: ClientSession
) -> None:
    anonymous = Api(session, registry.url, None)
    for method, path in PROTECTED:
        reply = await anonymous.request(method, path, json=document("bus"))
        assert reply.status == 401, (method, path)
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        assert "error=" not in reply.headers["WWW-Authenticate"]
        assert reply.problem_type == "unauthorized"
    assert await Api(session, registry.url, registry.admin_token).revision() == 0


async def test_a_wrong_token_is_401_invalid_token_and_writes_nothing(
    registry: RunningRegistry, session: ClientSession
) -> None:
    for token in ("wrong", registry.admin_token[:-1], registry.admin_token + "x", "é"):
        reply = await Api(session, registry.url, token).post("/v1/services", json=document())
        assert reply.status == 401
        assert 'error="invalid_token"' in reply.headers["WWW-Authenticate"]
    basic = await Api(session, registry.url, None).get(
        "/v1/services", headers={"Authorization": f"Basic {registry.admin_token}"}
    )
    assert basic.status == 401
    assert await Api(session, registry.url, registry.admin_token).revision() == 0


async def test_status_endpoints_and_the_openapi_document_need_no_token(
    registry: RunningRegistry, session: ClientSession
) -> None:
    anonymous = Api(session, registry.url, None)
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert (await anonymous.get(path)).status == 200, path


async def test_the_token_file_is_created_0600_and_reused_across_restarts(
    start: StartRegistry, tmp_path: Path
) -> None:
    first = await start()
    token_file = tmp_path / "data" / "registry" / "admin-token"
    assert first.admin_token_file == token_file
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token_file.read_text().strip() == first.admin_token
    assert len(first.admin_token) >= 43  # 32 random bytes, URL-safe base64
    await first.stop()
    second = await start()
    assert second.admin_token == first.admin_token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600


async def test_the_admin_token_file_can_live_elsewhere_and_is_used_as_written(
    start: StartRegistry, tmp_path: Path, session: ClientSession
) -> None:
    elsewhere = tmp_path / "secrets" / "registry-token"
    elsewhere.parent.mkdir()
    elsewhere.write_text("a-token-chosen-by-the-operator\n")
    elsewhere.chmod(0o600)
    registry = await start(admin_token_file=elsewhere)
    assert registry.admin_token == "a-token-chosen-by-the-operator"
    api = Api(session, registry.url, "a-token-chosen-by-the-operator")
    assert (await api.post("/v1/services", json=document())).status == 201


async def test_the_token_never_reaches_the_log(
    start: StartRegistry, caplog: pytest.LogCaptureFixture, session: ClientSession
) -> None:
    caplog.set_level(logging.DEBUG)
    registry = await start()
    api = Api(session, registry.url, registry.admin_token)
    await api.post("/v1/services", json=document())
    await Api(session, registry.url, "wrong").get("/v1/services")
    assert registry.admin_token not in caplog.text
    assert any("admin token" in r.getMessage() for r in caplog.records)


async def test_an_empty_token_file_stops_the_start_with_one_clear_line(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("")
    settings = RegistrySettings(port=0, data_dir=tmp_path, admin_token_file=empty)
    with pytest.raises(RegistryStartError, match="is empty"):
        await start_registry(settings)
