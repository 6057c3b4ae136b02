"""Shared test fixtures: real upstream servers and real gateways on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientSession, WSMsgType, web


class Upstream:
    """A city service stand-in that reports what it received."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.healthy = True
        self.fail_with: int | None = None
        self.delay = 0.0
        self.url = ""
        self.runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        async def echo(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            seen = {
                "t": time.time(),
                "instance": self.name,
                "method": request.method,
                "path": request.path,
                "raw_path": request.raw_path,
                "query": request.query_string,
                "headers": {k: v for k, v in request.headers.items()},
                "body_len": len(body),
            }
            self.requests.append(seen)
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail_with:
                return web.json_response(seen, status=self.fail_with)
            resp = web.json_response(seen)
            resp.headers["X-Upstream"] = self.name
            resp.set_cookie("upstream", self.name)
            return resp

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(status=200 if self.healthy else 503, text="ok")

        async def stream(request: web.Request) -> web.StreamResponse:
            size = int(request.query.get("size", "1048576"))
            resp = web.StreamResponse()
            await resp.prepare(request)
            chunk = b"x" * 65536
            sent = 0
            while sent < size:
                part = chunk[: min(len(chunk), size - sent)]
                await resp.write(part)
                sent += len(part)
            await resp.write_eof()
            return resp

        async def status(request: web.Request) -> web.Response:
            code = int(request.match_info["code"])
            self.requests.append({"instance": self.name, "path": request.path})
            return web.Response(status=code, text=f"status {code}")

        async def ws(request: web.Request) -> web.WebSocketResponse:
            sock = web.WebSocketResponse()
            await sock.prepare(request)
            async for msg in sock:
                if msg.type == WSMsgType.TEXT:
                    await sock.send_str(f"{self.name}:{msg.data}")
            return sock

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/stream", stream)
        app.router.add_route("*", "/status/{code}", status)
        app.router.add_get("/ws", ws)
        app.router.add_route("*", "/{tail:.*}", echo)
        return app

    async def start(self, port: int = 0) -> None:
        self.runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    started: list[Upstream] = []

    async def make(name: str = "up", port: int = 0) -> Upstream:
        up = Upstream(name)
        await up.start(port)
        started.append(up)
        return up

    yield make
    for up in started:
        await up.stop()


def service(name: str, targets: list[str], routes: list[dict[str, Any]], **spec: Any) -> dict:
    upstream = {"targets": [{"url": t} for t in targets]}
    upstream.update(spec.pop("upstream", {}))
    return {
        "apiVersion": "cityplane.io/v1alpha1",
        "kind": "CityService",
        "metadata": {"name": name},
        "spec": {"upstream": upstream, "routes": routes, **spec},
    }


class RunningGateway:
    def __init__(self, gateway: Any, config: Path) -> None:
        self.gateway = gateway
        self.config = config
        self.url = f"http://127.0.0.1:{gateway.port}"
        self.status_url = f"http://127.0.0.1:{gateway.status_port}"

    def write(self, services: list[dict]) -> None:
        self.config.write_text(yaml.safe_dump_all(services))


@pytest.fixture
def gateway_driver() -> str:
    """How the gateway drives requests: "inline" (the default, ADR 14) or "task" (every
    request on the connection's task). A module sets ``GATEWAY_DRIVERS`` to run both."""
    return "inline"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    drivers = getattr(metafunc.module, "GATEWAY_DRIVERS", None)
    if drivers and "gateway_driver" in metafunc.fixturenames:
        metafunc.parametrize("gateway_driver", drivers)


@pytest.fixture
async def gateway_factory(
    tmp_path: Path, gateway_driver: str
) -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    from gateway.runtime import Gateway, GatewaySettings

    running: list[Any] = []

    async def make(services: list[dict], **settings: Any) -> RunningGateway:
        config = tmp_path / f"services-{len(running)}.yaml"
        config.write_text(yaml.safe_dump_all(services))
        settings.setdefault("access_log", "off")
        settings.setdefault("watch_interval", 0)
        gw = Gateway(GatewaySettings(config=[config], port=0, status_port=0, **settings))
        await gw.start()
        running.append(gw)
        gw.path.inline = gateway_driver == "inline"
        return RunningGateway(gw, config)

    yield make
    for gw in running:
        await gw.stop()


@pytest.fixture
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession() as session:
        yield session


def problem(body: bytes) -> dict[str, Any]:
    return json.loads(body)
