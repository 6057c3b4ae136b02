"""RequestMetrics exposes what prometheus_client's own Counter and Histogram would, to a scraper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway import metrics
from gateway.metrics import (
    DURATION_BUCKETS,
    REJECTED_SPEC,
    REQUEST_DURATION_SPEC,
    REQUESTS_SPEC,
    RequestMetrics,
    install,
)

REPO = Path(__file__).resolve().parents[2]
FAMILIES = tuple(spec.name.removesuffix("_total") for spec in (REQUESTS_SPEC, REJECTED_SPEC))
FAMILIES += (REQUEST_DURATION_SPEC.name,)

# (service, route, status, seconds): every bucket bound hit exactly, values between bounds,
# zero, past the last bound, statuses a route has and has not seen, the no-route key; the last
# two routes and services appear only in the second half.
OBSERVATIONS = [
    ("bus", "read", 200, 0.0007),
    ("bus", "read", 200, 0.001),
    ("bus", "write", 201, 0.0031),
    ("-", "-", 404, 0.0),
    ("bus", "read", 503, 42.0),
    ("parks", "list", 200, 0.25),
    ("bus", "read", 200, 30.0),
    *(("parks", "list", 200, float(b)) for b in DURATION_BUCKETS),
    *(("parks", "list", 429, b * 1.5) for b in DURATION_BUCKETS),
    ("bus", "write", 201, 1e-9),
    ("parks", "map", 200, 0.02),
    ("zoo", "tickets", 302, 0.4),
]
REJECTIONS = [
    ("-", "no-route"),
    ("parks/list", "rate-limited"),
    ("parks/list", "rate-limited"),
    ("bus/read", "circuit-open"),
]


def reference(registry: CollectorRegistry | None) -> tuple[Counter, Histogram, Counter]:
    """Today's prometheus_client objects, as gateway/server.py feeds them."""
    return (
        Counter(*REQUESTS_SPEC, registry=registry),
        Histogram(*REQUEST_DURATION_SPEC, buckets=DURATION_BUCKETS, registry=registry),
        Counter(*REJECTED_SPEC, registry=registry),
    )


def feed_reference(requests: Counter, durations: Histogram, rejected: Counter) -> None:
    for service, route, status, seconds in OBSERVATIONS:
        requests.labels(service, route, str(status)).inc()
        durations.labels(service, route).observe(seconds)
    for route_id, reason in REJECTIONS:
        rejected.labels(route_id, reason).inc()


def feed(request_metrics: RequestMetrics) -> None:
    for service, route, status, seconds in OBSERVATIONS:
        request_metrics.observe(service, route, status, seconds)
    for route_id, reason in REJECTIONS:
        request_metrics.reject(route_id, reason)


def exposition(registry: CollectorRegistry) -> list[str]:
    return generate_latest(registry).decode().splitlines()


def without_created(lines: list[str]) -> list[str]:
    return [line for line in lines if "_created" not in line]


def created_series(lines: list[str]) -> list[str]:
    """The ``_created`` lines without their values (the creation times differ)."""
    return [line.rsplit(" ", 1)[0] for line in lines if "_created" in line]


def test_exposition_is_line_for_line_what_prometheus_client_writes() -> None:
    expected_registry, registry = CollectorRegistry(), CollectorRegistry()
    feed_reference(*reference(expected_registry))
    request_metrics = RequestMetrics()
    install(registry, request_metrics)
    feed(request_metrics)

    expected, got = exposition(expected_registry), exposition(registry)

    assert without_created(got) == without_created(expected)
    assert created_series(got) == created_series(expected)
    assert 'cityplane_gateway_requests_total{route="read",service="bus",status="200"} 3.0' in got
    assert 'cityplane_gateway_request_duration_seconds_bucket{le="+Inf",route="read",' in "\n".join(
        got
    )
    assert 'cityplane_gateway_rejected_total{reason="rate-limited",route="parks/list"} 2.0' in got


def test_nothing_observed_yet_shows_the_same_help_and_type_lines() -> None:
    expected_registry, registry = CollectorRegistry(), CollectorRegistry()
    reference(expected_registry)
    install(registry, RequestMetrics())

    assert exposition(registry) == exposition(expected_registry)
    assert "# TYPE cityplane_gateway_request_duration_seconds histogram" in exposition(registry)


def test_a_scrape_sees_requests_observed_after_the_previous_scrape() -> None:
    registry = CollectorRegistry()
    request_metrics = RequestMetrics()
    install(registry, request_metrics)
    request_metrics.observe("bus", "read", 200, 0.002)
    line = 'cityplane_gateway_requests_total{route="read",service="bus",status="200"}'
    assert f"{line} 1.0" in exposition(registry)
    request_metrics.observe("bus", "read", 200, 0.002)
    assert f"{line} 2.0" in exposition(registry)


def test_installing_twice_in_one_registry_is_harmless() -> None:
    registry = CollectorRegistry()
    request_metrics = RequestMetrics()
    install(registry, request_metrics)
    install(registry, request_metrics)
    request_metrics.reject("-", "no-route")
    lines = exposition(registry)
    assert lines.count('cityplane_gateway_rejected_total{reason="no-route",route="-"} 1.0') == 1


def test_connection_cap_refusals_have_their_counter() -> None:
    metrics.CONNECTIONS_REFUSED.inc()
    lines = exposition(REGISTRY)
    assert "# TYPE cityplane_gateway_connections_refused_total counter" in lines
    assert any(line.startswith("cityplane_gateway_connections_refused_total ") for line in lines)


# -- --workers: prometheus_client's multi-process files --------------------------------------

WORKER = textwrap.dedent(
    """
    import asyncio, json, sys
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
    from gateway.metrics import (
        DURATION_BUCKETS, REJECTED_SPEC, REQUEST_DURATION_SPEC, REQUESTS_SPEC, RequestMetrics,
        install,
    )

    observations, rejections, use_reference = json.loads(sys.stdin.read())
    half = len(observations) // 2
    if use_reference:
        requests = Counter(*REQUESTS_SPEC, registry=None)
        durations = Histogram(*REQUEST_DURATION_SPEC, buckets=DURATION_BUCKETS, registry=None)
        rejected = Counter(*REJECTED_SPEC, registry=None)
        for service, route, status, seconds in observations:
            requests.labels(service, route, str(status)).inc()
            durations.labels(service, route).observe(seconds)
        for route_id, reason in rejections:
            rejected.labels(route_id, reason).inc()
    else:
        async def main():
            request_metrics = RequestMetrics()
            install(request_metrics=request_metrics)
            await request_metrics.start(interval=0.01)
            for service, route, status, seconds in observations[:half]:
                request_metrics.observe(service, route, status, seconds)
            # The publisher task writes the files without being asked.
            line = 'cityplane_gateway_requests_total{route="read",service="bus",status="200"}'
            for _ in range(3000):
                await asyncio.sleep(0.01)
                registry = CollectorRegistry()
                MultiProcessCollector(registry)
                if line in generate_latest(registry).decode():
                    break
            else:
                sys.exit("never published")
            for service, route, status, seconds in observations[half:-2]:
                request_metrics.observe(service, route, status, seconds)
            # A flush paused between two slices (here: after one series) loses nothing
            # answered meanwhile, new routes and services included.
            slices = request_metrics._flush_slices(size=1)
            next(slices)
            for service, route, status, seconds in observations[-2:]:
                request_metrics.observe(service, route, status, seconds)
            for _ in slices:
                pass
            for route_id, reason in rejections:
                request_metrics.reject(route_id, reason)
            await request_metrics.close()  # the last flush

        asyncio.run(main())
    """
)


def worker_files(directory: Path, use_reference: bool) -> list[str]:
    """What the supervisor's /metrics shows of one worker that saw OBSERVATIONS."""
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    subprocess.run(
        [sys.executable, "-c", WORKER],
        input=json.dumps([OBSERVATIONS, REJECTIONS, use_reference]),
        text=True,
        cwd=REPO,
        env=env,
        check=True,
        timeout=60,
    )
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return [line for line in exposition(registry) if any(name in line for name in FAMILIES)]


def test_under_workers_the_supervisor_reads_the_same_series_from_the_files(
    tmp_path: Path,
) -> None:
    expected = worker_files(tmp_path / "reference", use_reference=True)
    got = worker_files(tmp_path / "request-metrics", use_reference=False)

    assert sorted(got) == sorted(expected)
    assert 'cityplane_gateway_requests_total{route="read",service="bus",status="200"} 3.0' in got
