"""Registry → gateways propagation: commit of a change to the first request served with it.

`python -m bench.propagation [--gateways 3] [--changes 200]`: starts a registry (SQLite in a
temp dir, or `--database-url`), N gateway processes following it and a tiny upstream, then for
each change PUTs a service with a new route and polls every gateway (every 1 ms) until all of
them serve it. Reports p50/p99/max of "all N serve it" and of "the first one serves it"; the
issue's goal is p99 ≤ 100 ms across 3 replicas. Results go to bench/results/propagation-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import ClientSession, web

from registry.app import RegistrySettings, start_registry

RESULTS = Path(__file__).resolve().parent / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def _until_served(http: ClientSession, url: str) -> float:
    while True:
        try:
            async with http.get(url) as resp:
                if resp.status == 200:
                    return time.monotonic()
        except OSError:
            pass
        await asyncio.sleep(0.001)


async def run(gateways: int, changes: int, database_url: str | None) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="cityplane-propagation-"))

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    upstream = web.Application()
    upstream.router.add_route("*", "/{tail:.*}", ok)
    runner = web.AppRunner(upstream, access_log=None)
    await runner.setup()
    up_port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", up_port).start()
    registry = await start_registry(
        RegistrySettings(port=0, data_dir=work, database_url=database_url)
    )
    token = work / "token"
    token.write_text(registry.admin_token)
    procs = []
    ports = []
    for i in range(gateways):
        port, status = _free_port(), _free_port()
        ports.append(port)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cityplane.cli",
                    "gateway",
                    "--registry",
                    registry.url,
                    "--registry-token-file",
                    str(token),
                    "--state-dir",
                    str(work / f"gw{i}"),
                    "--port",
                    str(port),
                    "--status-port",
                    str(status),
                    "--access-log",
                    "off",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
    all_served: list[float] = []
    first_served: list[float] = []
    try:
        async with ClientSession() as http:
            for port in ports:  # ready: the empty snapshot answers 404
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/") as resp:
                            if resp.status == 404:
                                break
                    except OSError:
                        await asyncio.sleep(0.05)
            auth = {"Authorization": f"Bearer {registry.admin_token}"}
            for i in range(changes):
                doc = {
                    "apiVersion": "cityplane.io/v1alpha1",
                    "kind": "CityService",
                    "metadata": {"name": f"svc{i}"},
                    "spec": {
                        "upstream": {"targets": [{"url": f"http://127.0.0.1:{up_port}"}]},
                        "routes": [{"name": "r", "match": {"pathPrefix": f"/v{i}"}}],
                    },
                }
                async with http.put(
                    f"{registry.url}/v1/services/svc{i}", json=doc, headers=auth
                ) as resp:
                    assert resp.status in (200, 201), await resp.text()
                committed = time.monotonic()  # the PUT answered: the change is committed
                served = await asyncio.gather(
                    *(_until_served(http, f"http://127.0.0.1:{p}/v{i}/x") for p in ports)
                )
                all_served.append(max(served) - committed)
                first_served.append(min(served) - committed)
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(10)
        await registry.stop()
        await runner.cleanup()
    ms = 1000.0
    return {
        "gateways": gateways,
        "changes": changes,
        "database": "postgresql" if database_url else "sqlite",
        "all_ms": {
            "p50": _percentile(all_served, 0.5) * ms,
            "p99": _percentile(all_served, 0.99) * ms,
            "max": max(all_served) * ms,
        },
        "first_ms": {
            "p50": _percentile(first_served, 0.5) * ms,
            "p99": _percentile(first_served, 0.99) * ms,
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.propagation", description=__doc__)
    p.add_argument("--gateways", type=int, default=3)
    p.add_argument("--changes", type=int, default=200)
    p.add_argument("--database-url", default=None, help="postgresql+asyncpg://… (default SQLite)")
    args = p.parse_args()
    result = asyncio.run(run(args.gateways, args.changes, args.database_url))
    a, f = result["all_ms"], result["first_ms"]
    assert isinstance(a, dict) and isinstance(f, dict)
    print(
        f"registry commit -> served by all {args.gateways} gateways over {args.changes} changes "
        f"({result['database']}): p50 {a['p50']:.1f} ms, p99 {a['p99']:.1f} ms, "
        f"max {a['max']:.1f} ms; first gateway p50 {f['p50']:.1f} ms, p99 {f['p99']:.1f} ms "
        "(goal: p99 <= 100 ms)"
    )
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (RESULTS / f"propagation-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
