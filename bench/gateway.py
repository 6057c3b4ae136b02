"""The CityPlane gateway as a user runs it: ``cityplane gateway`` with one CityService file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.issuer import BenchIssuer
from bench.processes import Supervised, Supervisor, free_port, wait_until_answers

CITYPLANE = Path(sys.executable).parent / "cityplane"
SERVICE_NAME = "bench-upstream"

# Never refuses at the rates one core reaches (the schema's maximum), so the benchmark pays for
# the counting only. `closed`: if Redis ever failed, the run shows 503s instead of quietly
# skipping the store (`open`) and looking faster than it is.
RATE_LIMIT: dict[str, Any] = {
    "requests": 10_000_000,
    "window": "1s",
    "key": "ip",
    "onStoreError": "closed",
}


# The `auth` block of gateway-full's route: a token with the issuer's scope from a person at
# trust level 2 or more (the token wrk sends has exactly that, so every request is a 200).
MIN_TRUST_LEVEL = 2


def service_document(
    upstream_port: int, *, rate_limit: bool, auth_scope: str | None = None
) -> dict[str, Any]:
    route: dict[str, Any] = {"name": "all", "match": {"pathPrefix": "/"}}
    if auth_scope is not None:
        route["auth"] = {
            "required": True,
            "scopes": [auth_scope],
            "minTrustLevel": MIN_TRUST_LEVEL,
        }
    if rate_limit:
        route["rateLimit"] = RATE_LIMIT
    return {
        "apiVersion": "cityplane.io/v1alpha1",
        "kind": "CityService",
        "metadata": {"name": SERVICE_NAME},
        "spec": {
            "upstream": {"targets": [{"url": f"http://127.0.0.1:{upstream_port}"}]},
            "routes": [route],
        },
    }


def start_gateway(
    supervisor: Supervisor,
    name: str,
    port: int,
    upstream_port: int,
    *,
    rate_limit: bool = False,
    redis_url: str | None = None,
    access_log: str = "off",
    issuer: BenchIssuer | None = None,
    core: int,
) -> Supervised:
    """``issuer``: the route requires its tokens (``auth``), and the gateway checks them."""
    config = supervisor.workdir / f"{name}-{port}.json"
    document = service_document(
        upstream_port,
        rate_limit=rate_limit,
        auth_scope=issuer.scope if issuer is not None else None,
    )
    # JSON is YAML: the documents loader reads it as it is.
    config.write_text(json.dumps(document))
    argv = [
        str(CITYPLANE),
        "--log-level",
        "warning",
        "gateway",
        "--config",
        str(config),
        "--port",
        str(port),
        "--status-port",
        str(free_port()),
        "--access-log",
        access_log,
        "--workers",
        "1",
    ]
    if redis_url:
        argv += ["--redis", redis_url]
    headers: dict[str, str] = {}
    if issuer is not None:
        argv += ["--issuer", issuer.url, "--audience", issuer.audience]
        headers = {"Authorization": issuer.authorization}
    started = supervisor.start(name, argv, core=core)
    # With auth, the first 200 also says the keys were fetched and the token passes.
    wait_until_answers(started, port, headers=headers)
    return started
