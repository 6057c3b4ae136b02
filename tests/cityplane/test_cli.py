"""The command line as a user meets it: one-line errors, exit codes, `up` and `--workers`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import ClientSession, encode_basic_auth

from cityplane.documents import load_documents
from tests.cli_process import run_cli
from tests.gateway.procs import free_port

ROOT = Path(__file__).resolve().parents[2]


cli = run_cli


def test_malformed_config_is_one_line_and_exit_3(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: CityService\nmetadata: {name: x}\nspec: {upstream: [}\n")
    result = cli("gateway", "--config", str(bad), "--port", "0")
    assert result.returncode == 3
    assert result.stderr.startswith("cityplane: invalid config: ")
    assert "malformed YAML" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_field_names_file_line_and_field(tmp_path: Path) -> None:
    doc = tmp_path / "svc.yaml"
    doc.write_text(
        "kind: CityService\nmetadata: {name: x}\nspec:\n  upstream:\n"
        "    targets: [{url: 'http://127.0.0.1:1'}]\n    colour: red\n"
        "  routes: [{name: r, match: {pathPrefix: /}}]\n"
    )
    result = cli("gateway", "--config", str(doc))
    assert result.returncode == 3
    assert f"{doc}:6: spec.upstream.colour: unknown field" in result.stderr


def test_missing_config_and_bad_flags_fail_cleanly(tmp_path: Path) -> None:
    result = cli("gateway", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 3 and "no such file" in result.stderr
    result = cli("gateway")
    assert result.returncode == 2 and "--config" in result.stderr
    result = cli("gateway", "--port", "abc")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_identity_with_a_malformed_trust_config_says_where_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "trust.yaml"
    bad.write_text("levels: [1\n")
    result = cli("identity", "--trust-config", str(bad), "--data-dir", str(tmp_path))
    assert result.returncode == 3
    line = result.stderr.strip()
    assert line.startswith(f"cityplane: {bad}:2: malformed YAML: ")
    assert "expected ',' or ']'" in line
    assert "\n" not in line


def test_examples_are_valid_documents() -> None:
    services = load_documents([ROOT / "examples"])
    assert {s.metadata.name for s in services} >= {"bus-times", "parking-v1"}


async def test_up_runs_the_demo_city_and_writes_demo_json(tmp_path: Path) -> None:
    port, status, registry_port, identity_port = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "CITYPLANE_CONFIG": str(tmp_path / "cli-config")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cityplane.cli",
            "up",
            "--port",
            str(port),
            "--status-port",
            str(status),
            "--registry-port",
            str(registry_port),
            "--identity-port",
            str(identity_port),
            "--data-dir",
            str(tmp_path / ".cityplane"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    demo_file = tmp_path / ".cityplane" / "demo.json"
    try:
        deadline = time.monotonic() + 20
        while not demo_file.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        demo = json.loads(demo_file.read_text())
        assert demo["gateway"] == f"http://127.0.0.1:{port}"
        assert demo["registry"] == f"http://127.0.0.1:{registry_port}"
        assert demo["identity"] == f"http://127.0.0.1:{identity_port}"
        assert {a["level"] for a in demo["accounts"]} == {1, 2, 3, 4}
        assert {c["client_id"] for c in demo["clients"]} == {"demo-web", "demo-spa"}
        # The CLI finds the registry through the context `up` wrote.
        listing = subprocess.run(
            [sys.executable, "-m", "cityplane.cli", "get", "services"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert listing.returncode == 0, listing.stderr
        assert "bus-times" in listing.stdout and "deprecated" in listing.stdout
        assert len(demo["try"]) >= 3
        async with ClientSession() as http:
            served_by = set()
            codes = []
            for _ in range(6):
                async with http.get(demo["gateway"] + "/bus/stops/1/arrivals") as resp:
                    codes.append(resp.status)
                    if resp.status == 200:
                        served_by.add((await resp.json())["served_by"])
            assert codes == [200] * 5 + [429]
            assert served_by == {"bus-a", "bus-b"}
            archive = []
            for _ in range(5):
                async with http.get(demo["gateway"] + "/archive/records/1") as resp:
                    archive.append(resp.status)
            assert archive == [502, 502, 502, 503, 503]
            async with http.post(demo["gateway"] + "/permits", json={"site": "Lot 9"}) as resp:
                assert resp.status == 201
                assert resp.headers["Sunset"] == "Wed, 30 Jun 2027 00:00:00 GMT"
                assert resp.headers["Deprecation"].startswith("@")
            # the hub is up, and the registry and the gateway trust its tokens
            web = next(c for c in demo["clients"] if c["client_id"] == "demo-web")
            async with http.post(
                demo["identity"] + "/token",
                data={"grant_type": "client_credentials", "scope": "registry:read"},
                headers={"Authorization": encode_basic_auth("demo-web", web["client_secret"])},
            ) as resp:
                assert resp.status == 200
                machine = (await resp.json())["access_token"]
            async with http.get(
                demo["registry"] + "/v1/services", headers={"Authorization": f"Bearer {machine}"}
            ) as resp:
                assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "CityPlane is up" in out
    assert "curl" in out


@pytest.mark.slow
async def test_workers_share_one_port_and_report_metrics_together(upstreams, tmp_path: Path):
    from tests.conftest import service
    from tests.gateway.procs import write_services

    up = await upstreams("w")
    config = write_services(
        tmp_path / "s.yaml",
        [service("svc", [up.url], [{"name": "r", "match": {"pathPrefix": "/"}}])],
    )
    port, status = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cityplane.cli",
            "gateway",
            "--config",
            str(config),
            "--port",
            str(port),
            "--status-port",
            str(status),
            "--workers",
            "2",
            "--access-log",
            "off",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        async with ClientSession() as http:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/x") as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    await asyncio.sleep(0.1)
            for _ in range(40):
                # A new session per request: new connections are spread over the workers.
                async with ClientSession() as fresh, fresh.get(f"http://127.0.0.1:{port}/x") as r:
                    assert r.status == 200
            # Workers copy their request counters to the shared files once a second.
            deadline = time.monotonic() + 10
            while True:
                async with http.get(f"http://127.0.0.1:{status}/metrics") as resp:
                    text = await resp.text()
                if _requests_200(text) >= 41 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            async with http.get(f"http://127.0.0.1:{status}/readyz") as resp:
                assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert _requests_200(text) >= 41
    assert proc.returncode == 0, err


def _requests_200(text: str) -> float:
    return sum(
        float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln.startswith("cityplane_gateway_requests_total") and 'status="200"' in ln
    )
