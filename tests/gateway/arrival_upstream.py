"""A tiny upstream in its own process that records when each request arrived.

Used by tests that count requests per wall-clock second: in its own process its clock
readings are not delayed by the test's load generator sharing an event loop.
Run: python -m tests.gateway.arrival_upstream PORT
"""

from __future__ import annotations

import sys
import time

from aiohttp import web

arrivals: list[float] = []


async def record(_: web.Request) -> web.Response:
    arrivals.append(time.time())
    return web.Response(text="ok")


async def report(_: web.Request) -> web.Response:
    return web.json_response(arrivals)


def main() -> None:
    app = web.Application()
    app.router.add_get("/__arrivals", report)
    app.router.add_route("*", "/{tail:.*}", record)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
