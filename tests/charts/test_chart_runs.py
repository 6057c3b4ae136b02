"""The containers the chart renders, run for real on this machine: the registry and the gateway
start from exactly the rendered arguments, settings and token Secret (with paths, hosts and
ports moved to a scratch directory and free local ports), and every probe the chart declares
answers 200. This is what a kubelet would see, minus the cluster."""

from __future__ import annotations

import base64
import http.server
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import helm_python as helm
import pytest
from cryptography.hazmat.primitives import serialization

from tests.charts.chart_support import RELEASE, container, find, render

FULL = f"{RELEASE}-cityplane"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RenderedContainer:
    """One rendered container run as a local process."""

    def __init__(
        self,
        objects: list[dict[str, Any]],
        deployment: str,
        scratch: Path,
        replace: dict[str, str],
        existing_secrets: dict[str, dict[str, bytes]] | None = None,
    ) -> None:
        spec = find(objects, "Deployment", deployment)["spec"]["template"]["spec"]
        self.container = container(objects, deployment)
        self.ports = {p["name"]: _free_port() for p in self.container["ports"]}
        by_number = {
            str(p["containerPort"]): self.ports[p["name"]] for p in self.container["ports"]
        }
        # Mounted paths -> scratch directories; Secret volumes are written out as files.
        volumes = {v["name"]: v for v in spec["volumes"]}
        paths: dict[str, str] = {}
        for mount in self.container["volumeMounts"]:
            local = scratch / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            paths[mount["mountPath"]] = str(local)
            secret = volumes[mount["name"]].get("secret")
            if secret:
                # A Secret the chart renders, or one the user created beforehand (`existing…`).
                data = (existing_secrets or {}).get(secret["secretName"]) or {
                    key: base64.b64decode(value)
                    for key, value in find(objects, "Secret", secret["secretName"])["data"].items()
                }
                for item in secret["items"]:
                    (local / item["path"]).write_bytes(data[item["key"]])
                    (local / item["path"]).chmod(0o600)
            configmap = volumes[mount["name"]].get("configMap")
            if configmap:
                for key, text in find(objects, "ConfigMap", configmap["name"])["data"].items():
                    (local / key).write_text(text, encoding="utf-8")
        args = []
        for arg in self.container["args"]:
            flag, sep, value = arg.partition("=")
            if sep:
                if flag == "--host" or flag == "--status-host":
                    value = "127.0.0.1"
                elif value in by_number:
                    value = str(by_number[value])
                elif value in replace:
                    value = replace[value]
                else:
                    for mount_path, local_path in paths.items():
                        if value.startswith(mount_path):
                            value = local_path + value[len(mount_path) :]
            args.append(f"{flag}{sep}{value}")
        self.args = args
        # The pod's environment: only what the chart gives it (enableServiceLinks is false).
        env = {k: v for k, v in os.environ.items() if not k.startswith("CITYPLANE_")}
        configmap = self.container["envFrom"][0]["configMapRef"]["name"]
        env |= find(objects, "ConfigMap", configmap)["data"]
        for entry in self.container.get("env", []):
            env[entry["name"]] = entry["value"]
        self.log = scratch / "log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cityplane.cli", *args],
                cwd=scratch,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def url(self, port_name: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[port_name]}{path}"

    def probes(self) -> dict[str, str]:
        """probe kind -> local URL, for every httpGet probe of the container."""
        return {
            kind: self.url(
                self.container[kind]["httpGet"]["port"], self.container[kind]["httpGet"]["path"]
            )
            for kind in ("startupProbe", "livenessProbe", "readinessProbe")
            if "httpGet" in self.container.get(kind, {})
        }

    def wait_until_ok(self, url: str, within: float = 20.0) -> int:
        deadline = time.monotonic() + within
        status = 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return int(response.status)
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{url} answered {status}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def objects() -> list[dict[str, Any]]:
    return render()


@pytest.fixture
def registry(objects: list[dict[str, Any]], tmp_path: Path) -> Iterator[RenderedContainer]:
    running = RenderedContainer(objects, f"{FULL}-registry", tmp_path / "registry", {})
    yield running
    running.stop()


def test_the_rendered_registry_starts_and_answers_every_probe(registry: RenderedContainer) -> None:
    probes = registry.probes()
    assert set(probes) == {"startupProbe", "livenessProbe", "readinessProbe"}
    for url in probes.values():
        assert registry.wait_until_ok(url) == 200
    # The bootstrap token it was given through the Secret is the one it accepts.
    token_file = next(
        a.partition("=")[2] for a in registry.args if a.startswith("--admin-token-file=")
    )
    request = urllib.request.Request(
        registry.url("http", "/v1/services"),
        headers={"Authorization": f"Bearer {Path(token_file).read_text().strip()}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


def test_the_rendered_gateway_follows_the_rendered_registry_and_answers_every_probe(
    objects: list[dict[str, Any]], registry: RenderedContainer, tmp_path: Path
) -> None:
    registry.wait_until_ok(registry.probes()["readinessProbe"])
    in_cluster = next(
        a.partition("=")[2]
        for a in container(objects, f"{FULL}-gateway")["args"]
        if a.startswith("--registry=")
    )
    gateway = RenderedContainer(
        objects, f"{FULL}-gateway", tmp_path / "gateway", {in_cluster: registry.url("http")}
    )
    try:
        probes = gateway.probes()
        assert set(probes) == {"startupProbe", "livenessProbe", "readinessProbe"}
        for url in probes.values():
            assert gateway.wait_until_ok(url) == 200
        with urllib.request.urlopen(gateway.url("status", "/metrics"), timeout=5) as response:
            assert b"cityplane_" in response.read()
        # The last good snapshot lands on the state-dir emptyDir.
        state = tmp_path / "gateway" / "state"
        deadline = time.monotonic() + 5
        while not any(state.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any(state.iterdir())
    finally:
        gateway.stop()


class _City(http.server.BaseHTTPRequestHandler):
    """Stands in for the gateway status port and the hub; `broken` paths answer 503."""

    broken: ClassVar[set[str]] = set()

    def do_GET(self) -> None:
        if self.path in self.broken:
            self.send_response(503)
            self.end_headers()
            return
        body = b'{"status": "ready"}'
        if self.path == "/.well-known/openid-configuration":
            body = json.dumps({"issuer": "http://hub"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def _run_helm_test_pod(
    objects: list[dict[str, Any]], port: int
) -> subprocess.CompletedProcess[str]:
    """Run the helm test Pod's command with every in-cluster host pointed at 127.0.0.1:port
    and without the 2 s pauses between attempts."""
    (smoke,) = find(objects, "Pod", f"{FULL}-test")["spec"]["containers"]
    assert smoke["command"] == ["python", "-c"]
    prelude = (
        "import re, time, urllib.request\n"
        "time.sleep = lambda _: None\n"
        "_open = urllib.request.urlopen\n"
        "urllib.request.urlopen = lambda url, timeout: _open(\n"
        f"    re.sub(r'^http://[^/]+', 'http://127.0.0.1:{port}', url), timeout=timeout)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + smoke["args"][0]],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_helm_test_pod_passes_when_the_gateway_and_hub_answer_and_names_what_fails(
    objects: list[dict[str, Any]],
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _City)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        passed = _run_helm_test_pod(objects, server.server_port)
        assert passed.returncode == 0, passed.stdout + passed.stderr
        assert "ok   gateway /readyz" in passed.stdout
        assert "ok   hub discovery" in passed.stdout

        _City.broken = {"/readyz"}
        failed = _run_helm_test_pod(objects, server.server_port)
        assert failed.returncode == 1
        assert "FAIL gateway /readyz" in failed.stdout
        assert "ok   hub discovery" in failed.stdout
    finally:
        _City.broken = set()
        server.shutdown()


def test_the_rendered_identity_hub_starts_with_its_trust_config_and_serves_discovery(
    tmp_path: Path,
) -> None:
    trust = {"amr": {"cert": "sc"}}
    objects = render({"identity": {"trustConfig": trust}})
    hub = RenderedContainer(objects, f"{FULL}-identity", tmp_path / "identity", {})
    try:
        assert any(a.startswith("--trust-config=") for a in hub.args)
        for url in hub.probes().values():
            assert hub.wait_until_ok(url, within=40) == 200
        with urllib.request.urlopen(
            hub.url("http", "/.well-known/openid-configuration"), timeout=5
        ) as response:
            discovery = json.loads(response.read())
        # Tokens name the issuer the gateway is told to accept.
        gateway_args = container(objects, f"{FULL}-gateway")["args"]
        assert f"--issuer={discovery['issuer']}" in gateway_args
        assert discovery["jwks_uri"] == f"{discovery['issuer']}/jwks.json"
        assert f"--jwks-url={discovery['jwks_uri']}" in gateway_args
    finally:
        hub.stop()


def test_a_trust_config_pasted_with_its_top_level_key_is_refused() -> None:
    with pytest.raises(helm.HelmValuesError, match="trust"):
        render({"identity": {"trustConfig": {"trust": {"levels": {}}}}})


def test_the_rendered_hub_seals_its_keys_with_the_key_secret_from_an_existing_secret(
    tmp_path: Path,
) -> None:
    new, old = (
        b"new-key-secret-0123456789abcdefghijklmnopq\n",
        b"old-key-secret-0123456789abcdefghijklmnopq\n",
    )
    key_secret = {"existingSecret": "hub-keys", "key": "new", "previousKey": "old"}
    objects = render({"identity": {"keySecret": key_secret}})
    scratch = tmp_path / "identity"
    hub = RenderedContainer(
        objects, f"{FULL}-identity", scratch, {}, {"hub-keys": {"new": new, "old": old}}
    )
    try:
        for url in hub.probes().values():
            assert hub.wait_until_ok(url, within=40) == 200
    finally:
        hub.stop()
    database = scratch / "data" / "identity" / "identity.db"
    with sqlite3.connect(database) as conn:
        pems = [row[0] for row in conn.execute("SELECT private_pem FROM signing_keys")]
    assert len(pems) == 2
    for pem in pems:
        assert pem.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        serialization.load_pem_private_key(pem.encode(), new.strip())
    assert not (scratch / "data" / "identity" / "key-secret").exists()  # none of its own
