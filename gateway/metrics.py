"""The gateway's Prometheus metrics; names are a contract (ARCHITECTURE.md, Observability).

Every metric lives here so that names stay in one place. Hot-path callers bind label values
once (``REQUESTS.labels(...)`` at route compile time) and only call ``inc``/``observe`` per
request.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "cityplane_gateway_requests_total",
    "Requests answered by the gateway.",
    ["service", "route", "status"],
)
REQUEST_DURATION = Histogram(
    "cityplane_gateway_request_duration_seconds",
    "Time from request received to response headers sent.",
    ["service", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
UPSTREAM_ERRORS = Counter(
    "cityplane_gateway_upstream_errors_total",
    "Failed upstream attempts by kind (connect, timeout, protocol, status_5xx).",
    ["service", "kind"],
)
RETRIES = Counter("cityplane_gateway_retries_total", "Upstream attempts retried.", ["service"])
REJECTED = Counter(
    "cityplane_gateway_rejected_total",
    "Requests the gateway answered itself with an error, by route and problem type "
    "(token-required, invalid-token, insufficient-scope, insufficient-user-authentication, "
    "rate-limited, circuit-open, upstream-timeout, ...).",
    ["route", "reason"],
)
RATELIMIT_REJECTED = Counter(
    "cityplane_gateway_ratelimit_rejected_total",
    "Requests rejected with 429 by a rate limit.",
    ["route"],
)
RATELIMIT_STORE_ERRORS = Counter(
    "cityplane_gateway_ratelimit_store_errors_total",
    "Rate-limit decisions taken without the shared store, by the route's onStoreError mode.",
    ["route", "mode"],
)
RATELIMIT_DEGRADED = Gauge(
    "cityplane_gateway_ratelimit_degraded",
    "1 while the shared rate-limit store is unreachable.",
)
BREAKER_STATE = Gauge(
    "cityplane_gateway_breaker_state",
    "Circuit breaker state per service upstream: 0 closed, 1 open, 2 half-open.",
    ["service"],
)
TARGET_HEALTHY = Gauge(
    "cityplane_gateway_upstream_target_healthy",
    "1 when an upstream target takes traffic, 0 when ejected or failing its health check.",
    ["service", "target"],
)
CONFIG_RELOADS = Counter(
    "cityplane_gateway_config_reloads_total", "Config loads by result.", ["result"]
)
CONFIG_REVISION = Gauge(
    "cityplane_gateway_config_revision",
    "Revision of the configuration being served (the registry's, or a local reload count).",
)
CONFIG_ROUTES = Gauge("cityplane_gateway_routes", "Routes in the active routing table.")
