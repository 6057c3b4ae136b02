"""`/healthz`, `/readyz`, `/metrics` and `/openapi.json`: open to all, no token needed."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from registry.engine import ping
from registry.state import STATE


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.migrated:
        return web.json_response({"status": "starting"}, status=503)
    if state.notifier.closed:
        return web.json_response({"status": "stopping"}, status=503)
    if not await ping(state.engine):
        return web.json_response({"status": "database unavailable"}, status=503)
    return web.json_response({"status": "ready", "revision": state.notifier.revision})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[STATE].openapi, headers={"Content-Type": "application/json"}
    )


def add_status_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
