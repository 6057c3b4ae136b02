"""`cityplane apply` with a hub token (`--token-file`), end to end: the real command in its own
process against a registry that trusts a test hub."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from registry.app import RegistrySettings, RunningRegistry, start_registry
from tests.registry.hub_tokens import TestHub

SERVICE = """\
apiVersion: cityplane.io/v1alpha1
kind: CityService
metadata: {name: %(name)s}
spec:
  upstream: {targets: [{url: "http://127.0.0.1:9001"}]}
  routes: [{name: read, match: {pathPrefix: /%(name)s/}}]
"""


@pytest.fixture
async def hub() -> AsyncIterator[TestHub]:
    hub = await TestHub().start()
    yield hub
    await hub.stop()


@pytest.fixture
async def registry(tmp_path: Path, hub: TestHub) -> AsyncIterator[RunningRegistry]:
    settings = RegistrySettings(port=0, data_dir=tmp_path / "data", issuer=hub.url)
    registry = await start_registry(settings)
    yield registry
    await registry.stop()


async def cityplane(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "CITYPLANE_CONFIG": str(tmp_path / "no-config"), "NO_COLOR": "1"}
    env.pop("CITYPLANE_REGISTRY_TOKEN", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cityplane.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _token_file(tmp_path: Path, name: str, token: str) -> str:
    path = tmp_path / name
    path.write_text(token + "\n")
    path.chmod(0o600)
    return str(path)


async def test_apply_with_an_org_token_creates_its_own_and_is_refused_another_orgs_service(
    tmp_path: Path, registry: RunningRegistry, hub: TestHub
) -> None:
    water_token = _token_file(
        tmp_path, "water", hub.client_token("water-ci", "org-water", "registry:write")
    )
    transport_token = _token_file(
        tmp_path, "transport", hub.client_token("transport-ci", "org-transport", "registry:write")
    )
    pipes = tmp_path / "pipes.yaml"
    pipes.write_text(SERVICE % {"name": "pipes"})
    bus = tmp_path / "bus.yaml"
    bus.write_text(SERVICE % {"name": "bus"})
    at = ("--registry", registry.url)

    code, out, err = await cityplane(
        tmp_path, "apply", "-f", str(pipes), *at, "--token-file", water_token
    )
    assert (code, out.strip()) == (0, "service/pipes created"), err

    code, out, err = await cityplane(
        tmp_path, "apply", "-f", str(bus), *at, "--token-file", transport_token
    )
    assert (code, out.strip()) == (0, "service/bus created"), err
    code, out, err = await cityplane(
        tmp_path, "apply", "-f", str(bus), *at, "--token-file", transport_token
    )
    assert (code, out.strip()) == (0, "service/bus unchanged"), err  # the owner it was given stays

    pipes.write_text(SERVICE % {"name": "pipes"} + "  version: v2\n")
    code, out, err = await cityplane(
        tmp_path, "apply", "-f", str(pipes), *at, "--token-file", transport_token
    )
    assert code == 1
    assert "service/pipes" in err and "owned by 'org-water'" in err
    stored = await registry.store.get("pipes")
    assert stored is not None and stored["spec"].get("version") is None
