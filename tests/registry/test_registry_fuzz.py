"""The admin API fuzzed from its own OpenAPI document (schemathesis): never a 5xx, every answer
as the document says, and a wrong token is a 401 on every protected operation.

Bounded for CI: a fixed seed, derandomized generation, `MAX_EXAMPLES` per operation in the
fuzzing phase (the examples and coverage phases are bounded by the document), no example
database on disk. A failure prints the check that failed, the answer and a curl command that
reproduces the request (the token shows as `[Filtered]`).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from registry.app import RegistrySettings, RunningRegistry, start_registry
from registry.engine import sqlite_url
from registry.openapi import EXAMPLE_SERVICE, EXAMPLE_TRANSITION, openapi_document
from tests.registry.support import document, postgres_available, postgres_database

T = TypeVar("T")

SEED = 20240611
MAX_EXAMPLES = 30
# Services in every lifecycle state, put back before each operation is fuzzed; "bus" is the
# OpenAPI document's example name, which the fuzzer sends often.
SEEDED = {"bus": "published", "trams": "draft", "ferry": "deprecated", "metro": "retired"}
_CHECKS = {
    "not_a_server_error": {},
    "status_code_conformance": {},
    "content_type_conformance": {},
    "response_headers_conformance": {},
    "response_schema_conformance": {},
    "negative_data_rejection": {},  # a request that breaks the document gets a 4xx
    "missing_required_header": {},
    "ignored_auth": {},
    "unsupported_method": {},
    "allow_header_conformance": {},
    # Off: the JSON Schema of a CityService cannot say everything the registry checks (a target
    # URL has a host, a route has exactly one of path and pathPrefix, a sunset is in the future,
    # a transition is allowed, the service exists), so documents that fit the schema are
    # rightly refused with 422, 404 or 409.
    "positive_data_acceptance": {"enabled": False},
    # These follow earlier calls, which only the stateful phase records (it does not run here).
    "use_after_free": {"enabled": False},
    "ensure_resource_availability": {"enabled": False},
    "object_level_authorization": {"enabled": False},
}


def _config(max_examples: int, *, coverage: bool) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "request-timeout": 10,
            "generation": {
                "mode": "all",  # requests that fit the document and requests that break it
                "max-examples": max_examples,
                "deterministic": True,
                "database": "none",
                # The tests send the token; no made-up one per example.
                "with-security-parameters": False,
            },
            "phases": {"examples": {}, "coverage": {"enabled": coverage}, "fuzzing": {}},
            "checks": _CHECKS,
            "operations": [
                {
                    # The document schema parses in pydantic's lax mode, as it does for files:
                    # `false` or "3" for a number, a number of seconds for a duration. Requests
                    # that break the JSON Schema this way are accepted by design, so here
                    # "broken" requests only have to get a 4xx or a 2xx, never a 5xx.
                    "include-name": ["POST /v1/services", "PUT /v1/services/{name}"],
                    "checks": {"negative_data_rejection": {"enabled": False}},
                },
                {
                    # An event stream never ends: read its first event, or 2 s of a stream
                    # that only sends heartbeats (`since` at the current revision). The time
                    # also bounds the wait for the response head: 0.3 s failed a CI run on a
                    # loaded VM (ReadTimeout before the head), at 2 s this test takes ~2.6 s.
                    "include-path": "/v1/watch",
                    "max-stream-events": 1,
                    "request-timeout": 2.0,
                },
            ],
        }
    )


# The document the registry serves (see test_the_registry_serves_the_fuzzed_document), loaded
# at collection so that every operation is a test of its own.
admin_api = schemathesis.openapi.from_dict(
    openapi_document(), config=_config(MAX_EXAMPLES, coverage=True)
)
# Every request is refused before its input is read: a few examples per operation show it.
# `exclude`: schemathesis ORs an `include` with the filter its `operations` entries add, which
# selects every operation.
protected_api = schemathesis.openapi.from_dict(
    openapi_document(), config=_config(5, coverage=False)
).exclude(path_regex="^/(?!v1/)")


class RegistryThread:
    """An event loop in a thread for the registry: schemathesis calls it with blocking
    `requests`, which would stall a registry on the test's own loop."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="registry", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@asynccontextmanager
async def _registry_on(database_url: str | None, data_dir: Path) -> AsyncIterator[RunningRegistry]:
    async with AsyncExitStack() as stack:
        if database_url is None:
            database_url = await stack.enter_async_context(postgres_database())
        registry = await start_registry(
            RegistrySettings(
                port=0,
                data_dir=data_dir,
                database_url=database_url,
                heartbeat=0.05,  # an idle watch stream still sends bytes within the read timeout
            )
        )
        stack.push_async_callback(registry.stop)
        yield registry


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def running_registry(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningRegistry]:
    """One registry per backend for every operation (a start per operation would double the
    file's time)."""
    data_dir = tmp_path_factory.mktemp("fuzz")
    thread = RegistryThread()
    try:
        database_url = None
        if request.param == "sqlite":
            database_url = sqlite_url(data_dir / "registry.db")
        elif not thread.run(postgres_available()):
            if os.environ.get("CI"):
                pytest.fail("PostgreSQL is not running at CITYPLANE_TEST_POSTGRES (CI)")
            pytest.skip("PostgreSQL is not running at CITYPLANE_TEST_POSTGRES")
        running = _registry_on(database_url, data_dir)
        registry = thread.run(running.__aenter__())
        try:
            yield registry
        finally:
            thread.run(running.__aexit__(None, None, None))
    finally:
        thread.close()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def registry(running_registry: RunningRegistry) -> RunningRegistry:
    """The registry with `SEEDED` as first written, whatever fuzzing did to them before."""
    url, auth = f"{running_registry.url}/v1/services", _auth(running_registry.admin_token)
    for name, lifecycle in SEEDED.items():
        assert requests.delete(f"{url}/{name}", headers=auth, timeout=10).status_code in (200, 404)
        doc = document(name, lifecycle=lifecycle, owner="transport")
        reply = requests.post(url, json=doc, headers=auth, timeout=10)
        assert reply.status_code == 201, reply.text
    return running_registry


def test_the_registry_serves_the_fuzzed_document(registry: RunningRegistry) -> None:
    served = requests.get(f"{registry.url}/openapi.json", timeout=10)
    assert served.json() == admin_api.raw_schema


def test_the_documents_examples_are_accepted(registry: RunningRegistry) -> None:
    auth = _auth(registry.admin_token)
    put = requests.put(
        f"{registry.url}/v1/services/bus", json=EXAMPLE_SERVICE, headers=auth, timeout=10
    )
    assert put.status_code == 200, put.text
    moved = requests.post(
        f"{registry.url}/v1/services/bus/lifecycle",
        json=EXAMPLE_TRANSITION,
        headers=auth,
        timeout=10,
    )
    assert moved.status_code == 200, moved.text


@admin_api.parametrize()
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # reset per operation
def test_every_operation_answers_as_the_openapi_document_says(
    case: schemathesis.Case, registry: RunningRegistry
) -> None:
    case.call_and_validate(base_url=registry.url, headers=_auth(registry.admin_token))


@protected_api.parametrize()
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_protected_operation_answers_401_to_a_wrong_token(
    case: schemathesis.Case, registry: RunningRegistry
) -> None:
    response = case.call_and_validate(
        base_url=registry.url, headers=_auth("not-" + registry.admin_token)
    )
    assert response.status_code == 401, case.as_curl_command(base_url=registry.url)
    assert response.headers["www-authenticate"][0].startswith("Bearer realm="), response.headers
