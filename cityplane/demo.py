"""`cityplane up`: the platform on one machine, with a small demo city to try it on.

Starts demo city services in-process (two bus-times instances, a permits service, and an
archive service that is down on purpose), the registry (SQLite under the data directory) with
their CityService documents, and the gateway following the registry with embedded defaults
(in-process limits and breaker state). Prints what to try, writes the same to
``<data-dir>/demo.json`` and a `cityplane` CLI context named ``demo``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from cityplane.cli import CliError

GATEWAY_AUDIENCE = "urn:cityplane:gateway"
REGISTRY_AUDIENCE = "urn:cityplane:registry"


def _bus_app(instance: str) -> web.Application:
    async def arrivals(request: web.Request) -> web.Response:
        stop = request.match_info["stop"]
        return web.json_response(
            {
                "stop": stop,
                "arrivals": [{"line": "42", "in_minutes": 3}, {"line": "7", "in_minutes": 11}],
                "served_by": instance,
            }
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "instance": instance})

    app = web.Application()
    app.router.add_get("/stops/{stop}/arrivals", arrivals)
    app.router.add_get("/healthz", healthz)
    return app


def _permits_app() -> web.Application:
    permits: dict[str, dict[str, Any]] = {}

    async def create(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "send JSON"}, status=400)
        pid = f"P{len(permits) + 1:05d}"
        permits[pid] = {"id": pid, "status": "received", "request": body}
        return web.json_response(permits[pid], status=201)

    async def show(request: web.Request) -> web.Response:
        permit = permits.get(request.match_info["pid"])
        if permit is None:
            return web.json_response({"error": "no such permit"}, status=404)
        return web.json_response(permit)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/permits", create)
    app.router.add_get("/permits/{pid}", show)
    app.router.add_get("/healthz", healthz)
    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_services(bus: list[str], permits: str, archive: str) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "cityplane.io/v1alpha1",
            "kind": "CityService",
            "metadata": {"name": "bus-times", "labels": {"department": "transport"}},
            "spec": {
                "version": "v1",
                "lifecycle": "published",
                "upstream": {
                    "targets": [{"url": u, "weight": 1} for u in bus],
                    "loadBalancing": "round-robin",
                    "healthCheck": {"path": "/healthz", "interval": "2s"},
                    "timeouts": {"connect": "1s", "request": "5s"},
                    "retries": {"attempts": 2},
                    "circuitBreaker": {"failureThreshold": 5, "resetTimeout": "10s"},
                },
                "routes": [
                    {
                        "name": "arrivals",
                        "match": {"pathPrefix": "/bus/", "methods": ["GET"]},
                        "stripPrefix": True,
                        "rateLimit": {"requests": 5, "window": "10s", "key": "ip"},
                    }
                ],
            },
        },
        {
            "apiVersion": "cityplane.io/v1alpha1",
            "kind": "CityService",
            "metadata": {"name": "permits", "labels": {"department": "construction"}},
            "spec": {
                "version": "v1",
                "lifecycle": "deprecated",
                "sunset": "2027-06-30T00:00:00Z",
                "upstream": {"targets": [{"url": permits}]},
                "routes": [
                    {"name": "permits", "match": {"pathPrefix": "/permits"}},
                ],
            },
        },
        {
            "apiVersion": "cityplane.io/v1alpha1",
            "kind": "CityService",
            "metadata": {"name": "archive", "labels": {"department": "records"}},
            "spec": {
                "version": "v1",
                "upstream": {
                    # Nothing listens here: the demo's broken legacy system.
                    "targets": [{"url": archive}],
                    "retries": {"attempts": 0},
                    "circuitBreaker": {"failureThreshold": 3, "resetTimeout": "30s"},
                },
                "routes": [{"name": "records", "match": {"pathPrefix": "/archive/"}}],
            },
        },
    ]


async def _serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def _seed(registry: Any, services: list[dict[str, Any]]) -> None:
    """Put the demo services into the registry (their upstream ports change every start).

    A service that already exists keeps its lifecycle (and sunset): someone may have moved it
    with `cityplane lifecycle` since, and a lifecycle cannot go back.
    """
    from cityplane.client import RegistryClient
    from cityplane.schema import CityService

    async with RegistryClient(registry.url, registry.admin_token) as client:
        for doc in services:
            current = await client.get_service(doc["metadata"]["name"])
            if current is not None:
                keep = current.spec
                doc["spec"]["lifecycle"] = keep.lifecycle
                for key in ("sunset", "deprecatedSince"):
                    value = getattr(keep, key)
                    if value is None:
                        doc["spec"].pop(key, None)
                    else:
                        doc["spec"][key] = value.isoformat()
            await client.replace_service(CityService.model_validate(doc))


async def _demo(args: argparse.Namespace) -> None:
    from cityplane.context import write_context
    from gateway.runtime import Gateway, GatewaySettings
    from identity.app import IdentityStartError, start_identity
    from identity.hub import IdentitySettings
    from registry.app import RegistrySettings, RegistryStartError, start_registry

    data_dir: Path = args.data_dir.resolve()
    (data_dir / "demo-city").mkdir(parents=True, exist_ok=True)
    # The console is for what to try; the gateway's access log goes to a file, and the
    # registry's per-request lines would drown the rest.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    runners = []
    bus_urls = []
    for name in ("bus-a", "bus-b"):
        runner, url = await _serve_app(_bus_app(name))
        runners.append(runner)
        bus_urls.append(url)
    runner, permits_url = await _serve_app(_permits_app())
    runners.append(runner)
    archive_url = f"http://127.0.0.1:{_free_port()}"
    services = demo_services(bus_urls, permits_url, archive_url)
    config = data_dir / "demo-city" / "services.yaml"
    config.write_text(
        "# The demo city's services. Edit, then: cityplane apply -f "
        + str(config)
        + "\n"
        + yaml.safe_dump_all(services, sort_keys=False)
    )
    registry = None
    gateway = None
    hub = None

    async def cleanup() -> None:
        if gateway is not None:
            await gateway.stop()
        if registry is not None:
            await registry.stop()
        if hub is not None:
            await hub.stop()
        for r in runners:
            await r.cleanup()

    try:
        # Access tokens name the resource servers they are for (RFC 9068 §3), and each checks it.
        hub = await start_identity(
            IdentitySettings(
                host=args.host,
                port=args.identity_port,
                data_dir=data_dir,
                demo=True,
                audiences=[GATEWAY_AUDIENCE, REGISTRY_AUDIENCE],
            )
        )
        registry = await start_registry(
            RegistrySettings(
                host=args.host,
                port=args.registry_port,
                data_dir=data_dir,
                issuer=hub.issuer,
                audience=REGISTRY_AUDIENCE,
            )
        )
        await _seed(registry, services)
        gateway = Gateway(
            GatewaySettings(
                host=args.host,
                port=args.port,
                status_port=args.status_port,
                access_log=str(data_dir / "access.log"),
                registry_url=registry.url,
                registry_token=registry.admin_token,
                state_dir=data_dir / "gateway",
                issuer=hub.issuer,
                audience=GATEWAY_AUDIENCE,
            )
        )
        await gateway.start()
    except OSError as exc:
        await cleanup()
        raise CliError(
            f"cannot listen on {args.host} ports {args.port}/{args.status_port}/"
            f"{args.registry_port}/{args.identity_port}: {exc.strerror or exc} (use --port, "
            "--status-port, --registry-port, --identity-port)"
        ) from None
    except RegistryStartError as exc:
        await cleanup()
        raise CliError(f"registry: {exc}") from None
    except IdentityStartError as exc:
        await cleanup()
        raise CliError(f"identity hub: {exc}") from None
    token_file = registry.admin_token_file
    write_context("demo", registry.url, token_file)
    base = f"http://{args.host}:{gateway.port}"
    status = f"http://{args.host}:{gateway.status_port}"
    tries = [
        {
            "what": "a routed call, balanced over two bus-times instances",
            "curl": f"curl -i {base}/bus/stops/1024/arrivals",
        },
        {
            "what": "a rate-limited call: 5 per 10 s per client IP, the 6th gets 429",
            "curl": f"for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}}\\n' "
            f"{base}/bus/stops/1024/arrivals; done",
        },
        {
            "what": "a breaker trip: the archive is down; after 3 failures (502) the breaker "
            "answers 503 at once",
            "curl": f"for i in 1 2 3 4 5; do curl -s -o /dev/null -w '%{{http_code}}\\n' "
            f"{base}/archive/records/1; done",
        },
        {
            "what": "a deprecated API: served with Deprecation and Sunset headers",
            "curl": "curl -i -X POST -H 'Content-Type: application/json' "
            f'-d \'{{"site": "Lot 9"}}\' {base}/permits',
        },
        {
            "what": "the registry: list services, change one, watch the gateway follow",
            "curl": f"cityplane get services; cityplane apply -f {config}",
        },
        {"what": "metrics", "curl": f"curl -s {status}/metrics | grep cityplane_gateway"},
        {
            "what": "the identity hub: sign in to your account page (accounts below)",
            "curl": f"open {hub.issuer}/account",
        },
        {
            "what": "a machine token (client credentials) from the hub",
            "curl": f"curl -s -u demo-web:{_secret(hub)} -d grant_type=client_credentials "
            f"-d scope=bus:read {hub.issuer}/token",
        },
    ]
    demo = {
        "gateway": base,
        "registry": registry.url,
        "registry_token_file": str(token_file),
        "status": status,
        "config": str(config),
        "access_log": str(data_dir / "access.log"),
        "services": {"bus-times": bus_urls, "permits": [permits_url], "archive": [archive_url]},
        "identity": hub.issuer,
        "identity_admin_token_file": str(data_dir / "identity-admin-token"),
        "accounts": hub.hub.demo["accounts"],
        "clients": hub.hub.demo["clients"],
        "try": tries,
    }
    (data_dir / "demo.json").write_text(json.dumps(demo, indent=2) + "\n")
    lines = [
        "CityPlane is up (embedded defaults: SQLite, in-process limits and breaker state).",
        f"  gateway   {base}",
        f"  registry  {registry.url}  (admin token in {token_file}; `cityplane` context 'demo')",
        f"  status    {status}/healthz  /readyz  /metrics",
        f"  identity  {hub.issuer}  (OIDC discovery: /.well-known/openid-configuration)",
        f"  services  {config}",
        f"  access    {data_dir / 'access.log'}",
        "Try:",
    ]
    for t in tries:
        lines += [f"  # {t['what']}", f"  {t['curl']}"]
    lines.append("Demo accounts (one per trust level):")
    for account in hub.hub.demo["accounts"]:
        how = [f"password {account['password']}"]
        if "totp_secret" in account:
            how.append(f"TOTP secret {account['totp_secret']}")
        if "phone" in account:
            how.append(f"SMS codes in {account['sms_outbox']}")
        if "resident_id" in account:
            how.append(f"real-name: {account['real_name']} {account['resident_id']}")
        lines.append(f"  level {account['level']}  {account['username']:<9} " + "; ".join(how))
    lines.append(f"(written to {data_dir / 'demo.json'}; Ctrl-C stops)")
    print("\n".join(lines), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.exit_after is not None:
            await asyncio.wait_for(stop.wait(), args.exit_after)
        else:
            await stop.wait()
    except TimeoutError:
        pass
    finally:
        await cleanup()


def _secret(hub: Any) -> str:
    return next(
        str(c["client_secret"]) for c in hub.hub.demo["clients"] if c["client_id"] == "demo-web"
    )


def run_demo(args: argparse.Namespace) -> int:
    asyncio.run(_demo(args))
    return 0
