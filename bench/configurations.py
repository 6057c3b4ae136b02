"""The configurations measured, in table order; each starts its server and says where to aim."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.gateway import start_gateway
from bench.issuer import BenchIssuer
from bench.nginx import start_proxy
from bench.processes import CORE_UNDER_TEST, Supervised, Supervisor


@dataclass(frozen=True)
class Environment:
    """What every configuration shares within one benchmark."""

    supervisor: Supervisor
    upstream: Supervised
    upstream_port: int
    redis_url: str | None  # gateway-redis's Redis: the benchmark's own, or --redis
    issuer: BenchIssuer  # its documents are served by the upstream


# Starts the server under test on `port` (or returns None when the upstream itself is measured)
# and returns it once it answers.
Starter = Callable[[Environment, int], Supervised | None]
# After the server stopped: facts worth keeping about the run (and clean-up of its files).
Inspector = Callable[[Environment, int], dict[str, Any]]
# Headers wrk sends with every request to this configuration.
RequestHeaders = Callable[[Environment], dict[str, str]]


def _nothing(env: Environment, port: int) -> dict[str, Any]:
    return {}


def _no_headers(env: Environment) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Configuration:
    name: str
    description: str
    start: Starter
    needs_redis: bool = False
    inspect: Inspector = _nothing
    request_headers: RequestHeaders = _no_headers


def _direct(env: Environment, port: int) -> Supervised | None:
    return None


def _nginx(env: Environment, port: int) -> Supervised | None:
    return start_proxy(
        env.supervisor, port, env.upstream_port, limit_req=False, core=CORE_UNDER_TEST
    )


def _nginx_limit_req(env: Environment, port: int) -> Supervised | None:
    return start_proxy(
        env.supervisor, port, env.upstream_port, limit_req=True, core=CORE_UNDER_TEST
    )


def _gateway(env: Environment, port: int) -> Supervised | None:
    return start_gateway(env.supervisor, "gateway", port, env.upstream_port, core=CORE_UNDER_TEST)


def _gateway_ratelimit(env: Environment, port: int) -> Supervised | None:
    return start_gateway(
        env.supervisor,
        "gateway-ratelimit",
        port,
        env.upstream_port,
        rate_limit=True,
        core=CORE_UNDER_TEST,
    )


def _gateway_redis(env: Environment, port: int) -> Supervised | None:
    return start_gateway(
        env.supervisor,
        "gateway-redis",
        port,
        env.upstream_port,
        rate_limit=True,
        redis_url=env.redis_url,
        core=CORE_UNDER_TEST,
    )


def _access_log_file(env: Environment, port: int) -> Path:
    return env.supervisor.workdir / f"access-{port}.log"


def _gateway_accesslog(env: Environment, port: int) -> Supervised | None:
    return start_gateway(
        env.supervisor,
        "gateway-accesslog",
        port,
        env.upstream_port,
        access_log=str(_access_log_file(env, port)),
        core=CORE_UNDER_TEST,
    )


def _gateway_full(env: Environment, port: int) -> Supervised | None:
    """Issue #6's chain: routing, the token (signature once, then the verified-token cache),
    scope and minTrustLevel, rate limit, breaker, metrics, access log."""
    return start_gateway(
        env.supervisor,
        "gateway-full",
        port,
        env.upstream_port,
        rate_limit=True,
        access_log=str(_access_log_file(env, port)),
        issuer=env.issuer,
        core=CORE_UNDER_TEST,
    )


def _bearer_token(env: Environment) -> dict[str, str]:
    return {"Authorization": env.issuer.authorization}


def _count_access_log_lines(env: Environment, port: int) -> dict[str, Any]:
    """Lines written (one per request, warm-up included), then the file goes: it is large."""
    path = _access_log_file(env, port)
    try:
        with path.open("rb") as f:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        path.unlink()
    except OSError as exc:
        return {"access_log_error": str(exc)}
    return {"access_log_lines": lines}


DIRECT = "direct"
NGINX = "nginx"
NGINX_LIMIT_REQ = "nginx-limit-req"
GATEWAY = "gateway"
GATEWAY_RATELIMIT = "gateway-ratelimit"
GATEWAY_REDIS = "gateway-redis"
GATEWAY_ACCESSLOG = "gateway-accesslog"
GATEWAY_FULL = "gateway-full"

CONFIGURATIONS: tuple[Configuration, ...] = (
    Configuration(DIRECT, "wrk straight to the upstream (ceiling)", _direct),
    Configuration(NGINX, "nginx, 1 worker, upstream keep-alive (reference)", _nginx),
    Configuration(NGINX_LIMIT_REQ, "nginx + limit_req on the route", _nginx_limit_req),
    Configuration(GATEWAY, "cityplane gateway, no policies", _gateway),
    Configuration(GATEWAY_RATELIMIT, "gateway + rateLimit (in-process)", _gateway_ratelimit),
    Configuration(GATEWAY_REDIS, "gateway + rateLimit in Redis", _gateway_redis, needs_redis=True),
    Configuration(
        GATEWAY_ACCESSLOG,
        "gateway, access log to a file",
        _gateway_accesslog,
        inspect=_count_access_log_lines,
    ),
    Configuration(
        GATEWAY_FULL,
        "gateway + auth (JWT, scope, minTrustLevel 2) + rateLimit + access log",
        _gateway_full,
        inspect=_count_access_log_lines,
        request_headers=_bearer_token,
    ),
)

BY_NAME = {c.name: c for c in CONFIGURATIONS}
