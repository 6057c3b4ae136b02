"""Every answer is counted, and every error is problem+json (RFC 9457), never a traceback."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from cityplane.problem import PROBLEM_CONTENT_TYPE, Problem
from registry.state import STATE

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# aiohttp's own error responses carry headers that describe their text body, not ours.
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})
_UNTIMED = frozenset({"/v1/watch"})  # streams stay open for hours: no place in a latency histogram
# Any token is a valid HTTP method; keep label values bounded whatever clients send.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def render(problem: Problem, request: web.Request) -> web.Response:
    return web.Response(
        status=problem.status,
        body=problem.body(request.path),
        headers={"Content-Type": PROBLEM_CONTENT_TYPE, **problem.headers},
    )


def _from_http_exception(exc: web.HTTPException) -> Problem:
    slugs = {404: "not-found", 405: "method-not-allowed", 413: "too-large"}
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
    detail = None
    if exc.status == 404:
        detail = "no such endpoint; see /openapi.json"
    return Problem(exc.status, slugs.get(exc.status, "http-error"), detail, headers=headers)


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as problem:
        return render(problem, request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return render(_from_http_exception(exc), request)
    except ConnectionResetError:
        raise  # the client left: nobody to answer
    except Exception:
        # A bug or a database failure, not bad input: log it here, answer without details.
        log.exception("%s %s failed", request.method, request.path)
        return render(Problem(500, "internal-error", "the registry failed; see its log"), request)


@web.middleware
async def measured(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[STATE].metrics
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        method = request.method if request.method in _METHODS else "other"
        metrics.requests.labels(method, str(status)).inc()
        if request.path not in _UNTIMED:
            metrics.duration.labels(method).observe(time.perf_counter() - started)
