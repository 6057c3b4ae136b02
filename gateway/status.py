"""The status listener: /healthz, /readyz and /metrics, kept off the public proxy port."""

from __future__ import annotations

import os
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest


def metrics_registry() -> Any:
    """The process registry, or an aggregate of all workers in multi-process mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def status_app(gateway: Any) -> web.Application:
    """`gateway` needs `.ready`, `.draining` and `.revision` attributes."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if gateway.ready and not gateway.draining:
            return web.json_response({"status": "ready", "revision": gateway.revision})
        return web.json_response(
            {"status": "draining" if gateway.draining else "starting"}, status=503
        )

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(metrics_registry())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
