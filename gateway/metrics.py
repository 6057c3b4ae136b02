"""The gateway's Prometheus metrics; names are a contract (ARCHITECTURE.md, Observability).

Every metric lives here so that names stay in one place. Hot-path callers bind label values
once (``UPSTREAM_ERRORS.labels(...)`` when a cluster is built) and only call ``inc``/``set``
afterwards. The three per-request families (requests, durations, refusals) are counted by
``RequestMetrics`` in plain ints and floats instead, and published at scrape time (one process)
or every second (``--workers``); see ``install``.
"""

from __future__ import annotations

import asyncio
import os
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from itertools import accumulate
from typing import Any, NamedTuple

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import INF, floatToGoString


class MetricSpec(NamedTuple):
    """Name, help text and label names: what a scraper sees of a metric family."""

    name: str
    documentation: str
    labelnames: tuple[str, ...]


REQUESTS_SPEC = MetricSpec(
    "cityplane_gateway_requests_total",
    "Requests answered by the gateway.",
    ("service", "route", "status"),
)
REQUEST_DURATION_SPEC = MetricSpec(
    "cityplane_gateway_request_duration_seconds",
    "Time from request received to response headers sent.",
    ("service", "route"),
)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
REJECTED_SPEC = MetricSpec(
    "cityplane_gateway_rejected_total",
    "Requests the gateway answered itself with an error, by route and problem type "
    "(token-required, invalid-token, insufficient-scope, insufficient-user-authentication, "
    "rate-limited, circuit-open, upstream-timeout, ...).",
    ("route", "reason"),
)


UPSTREAM_ERRORS = Counter(
    "cityplane_gateway_upstream_errors_total",
    "Failed upstream attempts by kind (connect, timeout, protocol, status_5xx).",
    ["service", "kind"],
)
RETRIES = Counter("cityplane_gateway_retries_total", "Upstream attempts retried.", ["service"])
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
CONNECTIONS_REFUSED = Counter(
    "cityplane_gateway_connections_refused_total",
    "Connections refused with 503 before reading anything because the worker was at its "
    "connection cap (ADR 0011).",
)


class RequestMetrics:
    """Requests, their durations and the gateway's own refusals, in plain ints and floats.

    prometheus_client takes a lock per ``inc``/``observe`` and finds a histogram bucket in a
    Python loop: three locks per request (docs/perf.md), measured ~1.0 µs for a counter and a
    histogram child in one process and ~3.4 µs under ``--workers``, where each of them also
    writes a file. A worker answers requests on one thread, its event loop's, and a scrape of
    this process runs on that thread too (the status app shares the loop), so no lock is
    needed here: ~0.2 µs. One instance per process: ``REQUEST_METRICS``.
    """

    __slots__ = (
        "_bounds",
        "_buckets",
        "_durations_created",
        "_files",
        "_le",
        "_registries",
        "_rejected",
        "_rejected_created",
        "_requests_created",
        "_series",
        "_task",
    )

    def __init__(self, buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        self._buckets = tuple(buckets)
        self._bounds = tuple(float(b) for b in buckets)  # +Inf is index len(bounds)
        self._le = tuple(floatToGoString(b) for b in (*self._bounds, INF))
        # service -> route -> [count per bucket (+Inf last), sum of seconds, {status: count}].
        # Two dict levels, not a (service, route, status) key: no tuple is built per request
        # (1,000 series: ~230 ns per observe against ~310 ns with tuple keys).
        self._series: dict[str, dict[str, list[Any]]] = {}
        self._rejected: dict[tuple[str, str], int] = {}
        # When each labelled series first appeared, in that order: prometheus_client exposes
        # its children in creation order, each with a _created sample.
        self._requests_created: dict[tuple[str, str, int], float] = {}
        self._durations_created: dict[tuple[str, str], float] = {}
        self._rejected_created: dict[tuple[str, str], float] = {}
        self._registries: list[CollectorRegistry] = []
        self._files: _ProcessFiles | None = None
        self._task: asyncio.Task[None] | None = None

    # -- request path ---------------------------------------------------------------------------

    def observe(self, service: str, route: str, status: int, seconds: float) -> None:
        """One answered request: counted by status, its duration in the route's histogram."""
        try:
            series = self._series[service][route]
            series[-1][status] += 1
        except KeyError:
            series = self._first(service, route, status)
        # bisect_left: the first bound >= seconds, the bucket Histogram.observe picks.
        series[bisect_left(self._bounds, seconds)] += 1
        series[-2] += seconds

    def reject(self, route_id: str, reason: str) -> None:
        """A request the gateway answered itself with problem type ``reason``."""
        key = (route_id, reason)
        try:
            self._rejected[key] += 1
        except KeyError:
            self._rejected[key] = 1
            self._rejected_created[key] = time.time()

    def _first(self, service: str, route: str, status: int) -> list[Any]:
        """The series of a route seen for the first time, or with a status not seen before."""
        now = time.time()
        routes = self._series.setdefault(service, {})
        series = routes.get(route)
        if series is None:
            series = routes[route] = [0] * len(self._le) + [0.0, {}]
            self._durations_created[service, route] = now
        series[-1][status] = 1
        self._requests_created[service, route, status] = now
        return series

    # -- exposition (one process) ---------------------------------------------------------------

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> list[Metric]:
        requests, durations, rejected = self._families()
        # prometheus_client's switch (PROMETHEUS_DISABLE_CREATED_SERIES, disable_created_metrics)
        created = getattr(prometheus_metrics, "_use_created", True)
        for (service, route, status), at in self._requests_created.items():
            count = self._series[service][route][-1][status]
            requests.add_metric((service, route, str(status)), count, at if created else None)
        n = len(self._le)
        for (service, route), at in self._durations_created.items():
            series = self._series[service][route]
            cumulative = list(zip(self._le, accumulate(series[:n]), strict=True))
            durations.add_metric((service, route), cumulative, series[n])
            if created:
                labels = {"service": service, "route": route}
                durations.add_sample(durations.name + "_created", labels, at)
        for key, count in self._rejected.items():
            rejected.add_metric(key, count, self._rejected_created[key] if created else None)
        return [requests, durations, rejected]

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily(*REQUESTS_SPEC[:2], labels=REQUESTS_SPEC.labelnames),
            HistogramMetricFamily(
                *REQUEST_DURATION_SPEC[:2], labels=REQUEST_DURATION_SPEC.labelnames
            ),
            CounterMetricFamily(*REJECTED_SPEC[:2], labels=REJECTED_SPEC.labelnames),
        )

    # -- publication under --workers ------------------------------------------------------------

    async def start(self, interval: float = 1.0) -> None:
        """Under ``--workers``, copy the values into this worker's files every ``interval``.

        In one process there is nothing to copy: a scrape reads the values. Not every 0.1 s:
        a flush costs ~6 µs per series that changed (prometheus_client's file writes, ~1.2 µs
        each), so with 1,000 routes in use it would cost as much as the per-request locks did;
        scrapes are seconds apart anyway.
        """
        if self._files is not None and self._task is None:
            self._task = asyncio.create_task(self._publish(interval), name="request-metrics")

    async def _publish(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for _ in self._flush_slices():
                await asyncio.sleep(0)  # let requests through between slices

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.flush()

    def flush(self) -> None:
        """Copy what changed since the last flush into this worker's files (``--workers``)."""
        for _ in self._flush_slices():
            pass

    def _flush_slices(self, size: int = 64) -> Iterator[None]:
        """Flush, pausing after every ``size`` changed series (one slice: well under 1 ms)."""
        files = self._files
        if files is None:
            return
        n = len(self._le)
        written = 0
        # Lists, not the live dicts: new routes may appear while the caller pauses.
        for service, routes in list(self._series.items()):
            published = files.published.setdefault(service, {})
            for route, series in list(routes.items()):
                seen = published.get(route)
                if seen is None:
                    child = files.durations.labels(service, route)
                    seen = published[route] = [[0] * n + [0.0, {}], child, {}]
                before, hist, counters = seen
                if series == before:
                    continue
                # Histogram has no public way to add n observations at once; these are the
                # values its observe() increments (the multi-process test compares the files).
                for i in range(n):
                    if series[i] != before[i]:
                        hist._buckets[i].set(series[i])
                hist._sum.set(series[n])
                was = before[-1]
                for status, count in series[-1].items():
                    delta = count - was.get(status, 0)
                    if delta:
                        counter = counters.get(status)
                        if counter is None:
                            counter = counters[status] = files.requests.labels(
                                service, route, str(status)
                            )
                        counter.inc(delta)
                seen[0] = [*series[:-1], dict(series[-1])]
                written += 1
                if written % size == 0:
                    yield
        for key, count in list(self._rejected.items()):
            delta = count - files.rejected_published.get(key, 0)
            if delta:
                counter = files.rejected_children.get(key)
                if counter is None:
                    counter = files.rejected_children[key] = files.rejected.labels(*key)
                counter.inc(delta)
                files.rejected_published[key] = count


class _ProcessFiles:
    """prometheus_client children, unregistered, used only for their multi-process files.

    Under ``--workers`` the supervisor serves /metrics from the files every worker writes
    (``MultiProcessCollector``); a collector in a worker's registry would never be scraped.
    """

    def __init__(self, buckets: Sequence[float]) -> None:
        self.requests = Counter(*REQUESTS_SPEC, registry=None)
        self.durations = Histogram(*REQUEST_DURATION_SPEC, buckets=buckets, registry=None)
        self.rejected = Counter(*REJECTED_SPEC, registry=None)
        # service -> route -> [the series as last flushed, its Histogram child,
        #                      {status: Counter child}]
        self.published: dict[str, dict[str, list[Any]]] = {}
        self.rejected_published: dict[tuple[str, str], int] = {}
        self.rejected_children: dict[tuple[str, str], Counter] = {}


REQUEST_METRICS = RequestMetrics()


def install(
    registry: CollectorRegistry = REGISTRY, request_metrics: RequestMetrics = REQUEST_METRICS
) -> None:
    """Publish ``request_metrics`` at start-up, once per process (again is harmless).

    One process: it joins ``registry`` as a collector and a scrape reads its live values.
    ``--workers`` (prometheus_client's multi-process mode, PROMETHEUS_MULTIPROC_DIR): the
    supervisor's status port reads only the workers' files, so ``registry`` is not used and
    ``request_metrics.start()`` must run to copy the values there (up to a second late).
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        if request_metrics._files is None:
            request_metrics._files = _ProcessFiles(request_metrics._buckets)
    elif not any(r is registry for r in request_metrics._registries):
        registry.register(request_metrics)
        request_metrics._registries.append(registry)
