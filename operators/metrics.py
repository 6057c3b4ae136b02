"""The operator's Prometheus metrics and its health server (``/healthz``, ``/metrics``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)


class OperatorMetrics:
    """``cityplane_operator_*``, one registry per operator (tests run several in a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "cityplane_operator_reconciles_total",
            "Reconciles of CityApps and CityServices by handler and result (ok, retry, invalid)",
            ["handler", "result"],
            registry=self.registry,
        )
        self.errors = Counter(
            "cityplane_operator_errors_total",
            "Failed reconciles by what failed (kubernetes, registry, identity, spec)",
            ["dependency"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "cityplane_operator_reconcile_duration_seconds",
            "Time of one reconcile",
            ["handler"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )

    def observe(self, handler: str, result: str, seconds: float, failed: list[str]) -> None:
        self.reconciles.labels(handler, result).inc()
        self.duration.labels(handler).observe(seconds)
        for dependency in sorted(set(failed)):
            self.errors.labels(dependency).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def health_app(metrics: OperatorMetrics) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        # Live as long as the event loop that runs kopf answers; a stuck loop fails the probe.
        return web.json_response({"status": "ok"})

    async def metrics_page(_: web.Request) -> web.Response:
        response = web.Response(body=metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)
    return app


async def start_health_server(
    metrics: OperatorMetrics, host: str, port: int
) -> tuple[web.AppRunner, int]:
    """Start the server; answers the runner (to clean up) and the port it listens on."""
    runner = web.AppRunner(health_app(metrics), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server: Any = site._server  # aiohttp exposes the bound port only on its asyncio server
    sockets = server.sockets if server is not None else []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, int(bound)
