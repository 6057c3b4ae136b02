"""The registry client and `cityplane apply/delete/get/lifecycle/login`, end to end.

Against `RegistryDouble`, a small in-memory server that speaks docs/registry-api.md as far as
the CLI uses it; the registry's own tests cover the real server, and the integration tests run
the CLI against it.
"""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from cityplane.cli import main
from cityplane.client import RegistryClient, RegistryError, RegistryUnavailable
from cityplane.context import (
    Connection,
    ContextError,
    load_config,
    resolve_connection,
    write_context,
)
from cityplane.problem import PROBLEM_CONTENT_TYPE, Problem
from cityplane.schema import CityService
from tests.cli_process import environment, run_cli
from tests.gateway.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-admin-token"
TRANSITIONS = {
    ("draft", "published"),
    ("published", "deprecated"),
    ("deprecated", "published"),
    ("deprecated", "retired"),
    ("published", "retired"),
}


class RegistryDouble:
    """The registry API in memory: problems, resourceVersions, revisions, lifecycle rules."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, Any]] = {}
        self.revision = 0
        self.writes: list[str] = []  # "PUT bus-times", … : what changed something
        self.bodies: list[Any] = []  # every write's body, as sent
        self.interfere: set[str] = set()  # names another client changes right after our GET
        self.delay = 0.0
        self.url = ""
        self._runner: web.AppRunner | None = None

    def _bump(self, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        self.revision += 1
        doc["metadata"]["resourceVersion"] = str(self.revision)
        self.services[name] = doc
        return doc

    def _stored(self, body: Any) -> dict[str, Any]:
        try:
            # Kept as the client wrote it, defaults left out, as the real registry does.
            service = CityService.model_validate(body)
            doc = service.model_dump(mode="json", exclude_unset=True)
            return {"apiVersion": service.apiVersion, "kind": service.kind, **doc}
        except ValidationError as exc:
            errors = [
                {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                for e in exc.errors(include_url=False)
            ]
            raise Problem(
                422, "invalid-document", "the document is not valid", errors=errors
            ) from None

    @staticmethod
    def _check_version(request: web.Request, body: dict[str, Any], current: dict[str, Any]) -> None:
        wanted = body.get("metadata", {}).get("resourceVersion") or request.headers.get(
            "If-Match", ""
        ).strip('"')
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise Problem(409, "conflict", f"resourceVersion {wanted} is not the current one")

    @staticmethod
    async def _json(request: web.Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise Problem(400, "malformed-json", "the body is not JSON") from None

    def _answer(self, doc: Any, status: int = 200) -> web.Response:
        headers = {"X-CityPlane-Revision": str(self.revision)}
        if isinstance(doc, dict) and "metadata" in doc:
            headers["ETag"] = f'"{doc["metadata"]["resourceVersion"]}"'
        return web.json_response(doc, status=status, headers=headers)

    def app(self) -> web.Application:
        @web.middleware
        async def problems(request: web.Request, handler: Any) -> web.StreamResponse:
            await asyncio.sleep(self.delay)
            try:
                if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                    raise Problem(
                        401,
                        "unauthorized",
                        "missing or wrong token",
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                response: web.StreamResponse = await handler(request)
                return response
            except Problem as p:
                return web.Response(
                    body=p.body(request.path),
                    status=p.status,
                    headers=p.headers,
                    content_type=PROBLEM_CONTENT_TYPE,
                )

        def existing(request: web.Request) -> dict[str, Any]:
            name = request.match_info["name"]
            if name not in self.services:
                raise Problem(404, "not-found", f"no service {name!r}")
            return self.services[name]

        async def list_services(request: web.Request) -> web.Response:
            items = sorted(self.services.values(), key=lambda d: d["metadata"]["name"])
            if lifecycle := request.query.get("lifecycle"):
                items = [d for d in items if d["spec"].get("lifecycle", "published") == lifecycle]
            for selector in request.query.getall("label", []):
                key, _, value = selector.partition("=")
                items = [d for d in items if d["metadata"].get("labels", {}).get(key) == value]
            return self._answer({"revision": self.revision, "items": items})

        async def get_service(request: web.Request) -> web.Response:
            doc = existing(request)
            answer = self._answer(doc)
            name = request.match_info["name"]
            if name in self.interfere:  # someone else writes between our read and our write
                self.interfere.discard(name)
                self._bump(name, json.loads(json.dumps(doc)))
            return answer

        async def create(request: web.Request) -> web.Response:
            body = await self._json(request)
            self.bodies.append(body)
            doc = self._stored(body)
            name = doc["metadata"]["name"]
            if name in self.services:
                raise Problem(409, "conflict", f"service {name!r} exists")
            self.writes.append(f"POST {name}")
            return self._answer(self._bump(name, doc), 201)

        async def replace(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            body = await self._json(request)
            self.bodies.append(body)
            doc = self._stored(body)
            if doc["metadata"]["name"] != name:
                raise Problem(422, "invalid-document", "metadata.name differs from the URL")
            current = self.services.get(name)
            if current is None:
                self.writes.append(f"PUT {name}")
                return self._answer(self._bump(name, doc), 201)
            self._check_version(request, body, current)
            doc["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            if doc == current:
                return self._answer(current)  # identical: no new revision
            self.writes.append(f"PUT {name}")
            return self._answer(self._bump(name, doc))

        async def delete(request: web.Request) -> web.Response:
            doc = existing(request)
            self._check_version(request, {}, doc)
            del self.services[doc["metadata"]["name"]]
            self.revision += 1
            self.writes.append(f"DELETE {doc['metadata']['name']}")
            return self._answer(doc)

        async def lifecycle(request: web.Request) -> web.Response:
            doc = json.loads(json.dumps(existing(request)))
            body = await self._json(request)
            to, sunset = body.get("to"), body.get("sunset")
            was = doc["spec"].get("lifecycle", "published")
            if (was, to) not in TRANSITIONS:
                raise Problem(422, "invalid-transition", f"{was} -> {to} is not allowed")
            if sunset is not None:
                when = datetime.fromisoformat(sunset)
                if to != "deprecated" or when <= datetime.now(UTC):
                    raise Problem(
                        422, "invalid-transition", "sunset: a future date, when deprecating"
                    )
            doc["spec"].update(lifecycle=to, sunset=sunset)
            if to == "deprecated":
                doc["spec"]["deprecatedSince"] = datetime.now(UTC).isoformat()
            self.writes.append(f"LIFECYCLE {to}")
            return self._answer(self._bump(doc["metadata"]["name"], self._stored(doc)))

        app = web.Application(middlewares=[problems])
        app.router.add_get("/v1/services", list_services)
        app.router.add_post("/v1/services", create)
        app.router.add_get("/v1/services/{name}", get_service)
        app.router.add_put("/v1/services/{name}", replace)
        app.router.add_delete("/v1/services/{name}", delete)
        app.router.add_post("/v1/services/{name}/lifecycle", lifecycle)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
def registry() -> Iterator[RegistryDouble]:
    """The double on its own loop in a thread: `main()` runs `asyncio.run` in the test thread."""
    double = RegistryDouble()
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        loop.run_until_complete(double.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(5)
    yield double
    asyncio.run_coroutine_threadsafe(double.stop(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.fixture(autouse=True)
def isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads or writes the real ~/.cityplane/config."""
    path = tmp_path / "home" / "config"
    monkeypatch.setenv("CITYPLANE_CONFIG", str(path))
    monkeypatch.delenv("CITYPLANE_REGISTRY_URL", raising=False)
    monkeypatch.delenv("CITYPLANE_REGISTRY_TOKEN", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    return path


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def env(registry: RegistryDouble, monkeypatch: pytest.MonkeyPatch) -> RegistryDouble:
    """The registry reached through CITYPLANE_REGISTRY_URL/TOKEN, the last resort."""
    monkeypatch.setenv("CITYPLANE_REGISTRY_URL", registry.url)
    monkeypatch.setenv("CITYPLANE_REGISTRY_TOKEN", TOKEN)
    return registry


def service_yaml(name: str = "bus-times", weight: int = 1, labels: str = "{}") -> str:
    return f"""apiVersion: cityplane.io/v1alpha1
kind: CityService
metadata: {{name: {name}, labels: {labels}}}
spec:
  upstream:
    targets: [{{url: "http://127.0.0.1:9001", weight: {weight}}}]
    timeouts: {{connect: 500ms}}
  routes:
    - name: read
      match: {{pathPrefix: /{name}/, methods: [GET]}}
"""


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=environment(env))


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    assert len(stderr.splitlines()) == 1, stderr
    return stderr


# --- apply -----------------------------------------------------------------------------------


def test_apply_creates_then_a_second_apply_is_unchanged_and_writes_nothing(
    env: RegistryDouble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "svc").mkdir()
    (tmp_path / "svc" / "bus.yaml").write_text(service_yaml())
    (tmp_path / "svc" / "trams.yaml").write_text(service_yaml("trams"))
    assert run(capsys, "apply", "-f", str(tmp_path / "svc")) == (
        0,
        "service/bus-times created\nservice/trams created\n",
        "",
    )
    assert env.writes == ["POST bus-times", "POST trams"]
    revision = env.revision
    assert run(capsys, "apply", "-f", str(tmp_path / "svc")) == (
        0,
        "service/bus-times unchanged\nservice/trams unchanged\n",
        "",
    )
    assert env.writes == ["POST bus-times", "POST trams"] and env.revision == revision


def test_apply_of_a_changed_file_prints_configured_and_the_diff(
    env: RegistryDouble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "bus.yaml"
    doc.write_text(service_yaml())
    run(capsys, "apply", "-f", str(doc))
    doc.write_text(service_yaml(weight=3, labels="{tier: gold}"))
    code, out, err = run(capsys, "apply", "-f", str(doc))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[:3] == [
        "service/bus-times configured",
        "--- service/bus-times (registry)",
        "+++ service/bus-times (apply)",
    ]
    assert [line for line in lines[3:] if line[:1] in "+-"] == [
        "-  labels: {}",
        "+  labels:",
        "+    tier: gold",
        "-      weight: 1",
        "+      weight: 3",
    ]
    assert "\033[" not in out  # not a terminal: no colour
    assert env.services["bus-times"]["spec"]["upstream"]["targets"][0]["weight"] == 3


def test_dry_run_shows_the_plan_and_writes_nothing(
    env: RegistryDouble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "bus.yaml"
    doc.write_text(service_yaml())
    assert (
        run(capsys, "apply", "-f", str(doc), "--dry-run")[1]
        == "service/bus-times created (dry run)\n"
    )
    assert env.writes == []
    run(capsys, "apply", "-f", str(doc))
    doc.write_text(service_yaml(weight=9))
    code, out, _ = run(capsys, "apply", "-f", str(doc), "--dry-run")
    assert code == 0 and out.startswith("service/bus-times configured (dry run)\n---")
    assert "+      weight: 9" in out
    assert env.writes == ["POST bus-times"]


def test_reapplying_a_file_does_not_undo_a_deprecation(
    env: RegistryDouble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "bus.yaml"
    doc.write_text(service_yaml())
    run(capsys, "apply", "-f", str(doc))
    assert (
        run(capsys, "lifecycle", "bus-times", "--to", "deprecated", "--sunset", "2999-06-30")[0]
        == 0
    )
    assert run(capsys, "apply", "-f", str(doc))[1] == "service/bus-times unchanged\n"
    assert env.services["bus-times"]["spec"]["lifecycle"] == "deprecated"


def test_writes_carry_what_the_file_says_plus_the_lifecycle_the_registry_keeps(
    env: RegistryDouble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "bus.yaml"
    doc.write_text(service_yaml())
    run(capsys, "apply", "-f", str(doc))
    created = env.bodies[-1]
    assert created["spec"]["upstream"] == {
        "targets": [{"url": "http://127.0.0.1:9001", "weight": 1}],
        "timeouts": {"connect": "500ms"},
    }  # no defaults the file did not write: the registry keeps documents as written
    assert "resourceVersion" not in created["metadata"] and "lifecycle" not in created["spec"]
    run(capsys, "lifecycle", "bus-times", "--to", "deprecated", "--sunset", "2999-01-01")
    rv = env.services["bus-times"]["metadata"]["resourceVersion"]
    doc.write_text(service_yaml(weight=2))
    assert run(capsys, "apply", "-f", str(doc))[1].startswith("service/bus-times configured\n")
    updated = env.bodies[-1]
    assert updated["metadata"]["resourceVersion"] == rv
    assert updated["spec"]["lifecycle"] == "deprecated"
    assert updated["spec"]["sunset"] == "2999-01-01T00:00:00Z"
    assert "loadBalancing" not in updated["spec"]["upstream"]
    assert env.services["bus-times"]["spec"]["lifecycle"] == "deprecated"


def test_a_change_between_read_and_write_is_a_conflict_and_exit_1(
    env: RegistryDouble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "bus.yaml"
    doc.write_text(service_yaml() + "---\n" + service_yaml("trams"))
    run(capsys, "apply", "-f", str(doc))
    doc.write_text(service_yaml(weight=2) + "---\n" + service_yaml("trams", weight=2))
    env.interfere.add("bus-times")
    code, out, err = run(capsys, "apply", "-f", str(doc))
    assert code == 1
    assert one_line(err).startswith("cityplane: service/bus-times: conflict: 409 Conflict: ")
    assert "apply again" in err
    assert out.startswith("service/trams configured\n")  # the others still go through


# --- get -------------------------------------------------------------------------------------


def test_get_services_as_table_yaml_json_and_filtered(
    env: RegistryDouble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "get", "services") == (0, "", "No services found.\n")
    doc = tmp_path / "all.yaml"
    doc.write_text(service_yaml(labels="{dept: transport}") + "---\n" + service_yaml("trams"))
    run(capsys, "apply", "-f", str(doc))
    run(capsys, "lifecycle", "trams", "--to", "deprecated")
    assert run(capsys, "get", "services")[1].splitlines() == [
        "NAME        VERSION   LIFECYCLE    ROUTES   TARGETS",
        "bus-times   v1        published    1        127.0.0.1:9001",
        "trams       v1        deprecated   1        127.0.0.1:9001",
    ]
    assert run(capsys, "get", "services", "--lifecycle", "deprecated")[1].count("\n") == 2
    assert (
        run(capsys, "get", "services", "-l", "dept=transport")[1]
        .splitlines()[1]
        .startswith("bus-times ")
    )
    listed = json.loads(run(capsys, "get", "services", "-o", "json")[1])
    assert listed["revision"] == env.revision
    assert [i["metadata"]["name"] for i in listed["items"]] == ["bus-times", "trams"]
    stream = run(capsys, "get", "services", "-o", "yaml")[1]
    assert stream.count("kind: CityService") == 2 and "\n---\n" in stream


def test_get_service_yaml_applies_back_unchanged(
    env: RegistryDouble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "bus.yaml"
    doc.write_text(service_yaml())
    run(capsys, "apply", "-f", str(doc))
    code, out, _ = run(capsys, "get", "service", "bus-times")
    assert code == 0 and out.startswith("apiVersion: cityplane.io/v1alpha1\n")
    assert f"resourceVersion: '{env.revision}'" in out
    exported = tmp_path / "exported.yaml"
    exported.write_text(out)
    assert run(capsys, "apply", "-f", str(exported))[1] == "service/bus-times unchanged\n"
    one = json.loads(run(capsys, "get", "service", "bus-times", "-o", "json")[1])
    assert one["spec"]["upstream"]["timeouts"] == {"connect": "500ms"}  # as stored: no defaults


def test_get_of_an_absent_or_invalid_name_is_one_line(
    env: RegistryDouble, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "get", "service", "nope")
    assert (code, out, err) == (1, "", "cityplane: service/nope not found\n")
    code, _, err = run(capsys, "get", "service", "../admin")
    assert code == 2 and "not a service name" in one_line(err)
    code, _, err = run(capsys, "get", "service")
    assert code == 2 and "give a NAME" in one_line(err)


# --- lifecycle and delete --------------------------------------------------------------------


def test_lifecycle_prints_the_result_and_refuses_what_the_registry_refuses(
    env: RegistryDouble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "bus.yaml"
    doc.write_text(service_yaml())
    run(capsys, "apply", "-f", str(doc))
    assert run(
        capsys,
        "lifecycle",
        "bus-times",
        "--to",
        "deprecated",
        "--sunset",
        "2999-06-30T12:00:00+02:00",
    ) == (0, "service/bus-times deprecated (sunset 2999-06-30T10:00:00Z)\n", "")
    assert env.services["bus-times"]["spec"]["sunset"] == "2999-06-30T10:00:00Z"
    code, _, err = run(capsys, "lifecycle", "bus-times", "--to", "draft")
    assert code == 1
    assert one_line(err).startswith("cityplane: service/bus-times: 422 ")
    assert err.endswith(": deprecated -> draft is not allowed\n")
    code, _, err = run(
        capsys, "lifecycle", "bus-times", "--to", "retired", "--sunset", "2999-01-01"
    )
    assert code == 2 and "--sunset goes with --to deprecated" in one_line(err)
    assert (
        run(capsys, "lifecycle", "ghost", "--to", "published")[2]
        == "cityplane: service/ghost not found\n"
    )


def test_delete_by_file_and_by_name_with_absent_ones(
    env: RegistryDouble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "all.yaml"
    doc.write_text(service_yaml() + "---\n" + service_yaml("trams"))
    run(capsys, "apply", "-f", str(doc))
    assert run(capsys, "delete", "service", "trams") == (0, "service/trams deleted\n", "")
    assert run(capsys, "delete", "-f", str(doc)) == (
        1,
        "service/bus-times deleted\n",
        "cityplane: service/trams not found\n",
    )
    assert run(capsys, "delete", "-f", str(doc), "--ignore-not-found") == (
        0,
        "service/bus-times not found (ignored)\nservice/trams not found (ignored)\n",
        "",
    )
    assert env.services == {}
    code, _, err = run(capsys, "delete", "bus-times")
    assert code == 2 and "service NAME" in one_line(err)


# --- where the registry is: flags, context, environment ---------------------------------------


def test_login_writes_a_0600_context_that_later_commands_use(
    registry: RegistryDouble,
    token_file: Path,
    isolated_config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(
        capsys, "login", "--registry", registry.url + "/", "--token-file", str(token_file)
    )
    assert code == 0
    assert out == (
        f"context/default created: {registry.url} (token file {token_file}), "
        f"current, in {isolated_config}\n"
    )
    assert stat.S_IMODE(isolated_config.stat().st_mode) == 0o600
    assert stat.S_IMODE(isolated_config.parent.stat().st_mode) == 0o700
    config = load_config(isolated_config)
    assert config.current == "default"
    assert config.contexts["default"].tokenFile == str(token_file)
    assert TOKEN not in isolated_config.read_text()  # only the path to it
    doc = tmp_path / "bus.yaml"
    doc.write_text(service_yaml())
    assert run(capsys, "apply", "-f", str(doc))[1] == "service/bus-times created\n"
    assert run(capsys, "login", "--registry", registry.url, "--token-file", str(token_file))[
        1
    ].startswith("context/default updated: ")


def test_write_context_for_up_keeps_other_contexts_and_tightens_permissions(
    isolated_config: Path, token_file: Path
) -> None:
    isolated_config.parent.mkdir(parents=True)
    isolated_config.write_text("contexts:\n  prod: {registry: 'https://registry.city.example'}\n")
    isolated_config.chmod(0o644)
    assert write_context("local", "http://127.0.0.1:8090", token_file) == isolated_config
    assert stat.S_IMODE(isolated_config.stat().st_mode) == 0o600
    config = load_config(isolated_config)
    assert config.current == "local" and set(config.contexts) == {"prod", "local"}
    assert [p.name for p in isolated_config.parent.iterdir()] == ["config"]  # no temp file left


def test_flags_beat_the_context_which_beats_the_environment(
    isolated_config: Path, token_file: Path, tmp_path: Path
) -> None:
    env = {"CITYPLANE_CONFIG": str(isolated_config)}
    env |= {"CITYPLANE_REGISTRY_URL": "http://env:1", "CITYPLANE_REGISTRY_TOKEN": "env-token"}
    assert resolve_connection(env=env) == Connection("http://env:1", "env-token")
    write_context("local", "http://ctx:2", token_file)
    write_context("other", "http://other:3", None, token="other-token", make_current=False)
    assert resolve_connection(env=env) == Connection("http://ctx:2", TOKEN)
    assert resolve_connection(env=env, context="other") == Connection(
        "http://other:3", "other-token"
    )
    assert resolve_connection(env=env, registry="http://flag:4", token="t") == Connection(
        "http://flag:4", "t"
    )
    # A context's token is never sent to another registry.
    assert resolve_connection(env=env, registry="http://flag:4") == Connection(
        "http://flag:4", "env-token"
    )
    with pytest.raises(ContextError, match="no context named 'prod'"):
        resolve_connection(env=env, context="prod")
    with pytest.raises(ContextError, match="not an http"):
        resolve_connection(env=env, registry="registry:8090")
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    with pytest.raises(ContextError, match="expected one token"):
        resolve_connection(env=env, token_file=empty)
    broken = tmp_path / "broken"
    broken.write_text("contexts: {x: {registry: http://x, colour: red}}\n")
    with pytest.raises(ContextError, match=r"contexts\.x\.colour"):
        resolve_connection(env={"CITYPLANE_CONFIG": str(broken)})


def test_nothing_configured_says_how_to_configure(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "get", "services")
    assert code == 3 and "run 'cityplane login'" in one_line(err)


# --- the client alone ------------------------------------------------------------------------


async def test_client_turns_problem_json_into_registry_errors(registry: RegistryDouble) -> None:
    async with RegistryClient(registry.url, TOKEN) as client:
        ok = CityService.model_validate(
            {
                "metadata": {"name": "bus"},
                "spec": {
                    "upstream": {"targets": [{"url": "http://127.0.0.1:1"}]},
                    "routes": [{"name": "r", "match": {"pathPrefix": "/bus"}}],
                },
            }
        )
        created = await client.create_service(ok)
        assert created.metadata.resourceVersion == "1" and client.last_revision == 1
        # Invalid on the server side: the field errors come back with the problem.
        broken = ok.model_copy(update={"spec": ok.spec.model_copy(update={"routes": []})})
        with pytest.raises(RegistryError) as invalid:
            await client.replace_service(broken)
        assert (invalid.value.status, invalid.value.slug) == (422, "invalid-document")
        assert invalid.value.errors[0]["field"] == "spec.routes"
        assert "(spec.routes: List should have at least 1 item" in str(invalid.value)
        with pytest.raises(RegistryError) as conflict:
            await client.replace_service(ok, resource_version="999")
        assert (conflict.value.status, conflict.value.slug) == (409, "conflict")
        assert await client.get_service("ghost") is None
        assert await client.delete_service("ghost") is None
        gone = await client.delete_service("bus", resource_version="1")
        assert gone is not None and gone.metadata.name == "bus"
    async with RegistryClient(registry.url, "wrong") as client:
        with pytest.raises(RegistryError) as denied:
            await client.list_services()
        assert str(denied.value) == "401 Unauthorized: missing or wrong token"


async def test_client_reports_unreachable_and_slow_registries(registry: RegistryDouble) -> None:
    async with RegistryClient(f"http://127.0.0.1:{free_port()}", TOKEN) as client:
        with pytest.raises(RegistryUnavailable, match=r"cannot reach the registry at .*: "):
            await client.list_services()
    registry.delay = 0.5
    async with RegistryClient(registry.url, TOKEN, timeout=0.1) as client:
        with pytest.raises(RegistryUnavailable, match=r"did not answer within 0\.1s"):
            await client.list_services()


# --- exit codes and one-line errors, from a real process -------------------------------------


def test_process_errors_are_one_line_with_their_exit_codes(
    registry: RegistryDouble, token_file: Path, tmp_path: Path, isolated_config: Path
) -> None:
    good = tmp_path / "bus.yaml"
    good.write_text(service_yaml())
    flags = ["--registry", registry.url, "--token-file", str(token_file)]
    env = {"CITYPLANE_CONFIG": str(isolated_config)}

    result = cli("apply", "-f", str(good), "--registry", f"http://127.0.0.1:{free_port()}", env=env)
    assert result.returncode == 3 and "no token for" in one_line(result.stderr)
    result = cli(
        "apply",
        "-f",
        str(good),
        "--registry",
        f"http://127.0.0.1:{free_port()}",
        "--token",
        "x",
        env=env,
    )
    assert result.returncode == 1
    assert one_line(result.stderr).startswith(
        "cityplane: cannot reach the registry at http://127.0.0.1:"
    )

    result = cli("apply", "-f", str(good), "--registry", registry.url, "--token", "wrong", env=env)
    assert result.returncode == 1
    assert one_line(result.stderr) == (
        f"cityplane: the registry at {registry.url} refused the token (401 Unauthorized: missing "
        "or wrong token); check --token/--token-file or run 'cityplane login'\n"
    )

    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("kind: CityService\nmetadata: {name: x}\nspec: {upstream: [}\n")
    result = cli("apply", "-f", str(malformed), *flags, env=env)
    assert result.returncode == 3
    assert one_line(result.stderr).startswith(f"cityplane: {malformed}:3: malformed YAML: ")

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(service_yaml().replace("    timeouts:", "    colour: red\n    timeouts:"))
    result = cli("apply", "-f", str(unknown), *flags, env=env)
    assert result.returncode == 3
    assert (
        one_line(result.stderr) == f"cityplane: {unknown}:7: spec.upstream.colour: unknown field\n"
    )

    assert cli("apply", "-f", str(good), *flags, env=env).returncode == 0
    good.write_text(service_yaml(weight=4))
    registry.interfere.add("bus-times")
    result = cli("apply", "-f", str(good), *flags, env=env)
    assert result.returncode == 1 and result.stdout == ""
    assert "service/bus-times: conflict: 409 Conflict" in one_line(result.stderr)
    assert registry.writes == ["POST bus-times"]
