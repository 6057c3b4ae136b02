"""Errors aiohttp's HTTP parser finds before any handler runs (a request line or header too
long, a malformed message), answered as problem+json like every other error, and without the
traceback aiohttp would log for each of them.

The gateway's connection layer (gateway/connections.py) and the aiohttp applications (identity
hub, registry, through `ProblemAppRunner`) share the classification.
"""

from __future__ import annotations

import logging
import re

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from cityplane.problem import PROBLEM_CONTENT_TYPE, Problem

log = logging.getLogger(__name__)

# aiohttp reports the offending URL (request line) or header value; URLs start with "/".
_REQUEST_LINE = re.compile(rb"^([A-Z]+ |/|[a-z]+://)")


def parse_error_problem(
    exc: BaseException | None, status: int, message: str | None, who: str = "the server"
) -> Problem:
    """The problem for an error aiohttp's request handler reports (RFC 9110 §15.5)."""
    if isinstance(exc, LineTooLong):
        line = exc.args[0] if exc.args else b""
        line = bytes(line) if isinstance(line, bytes | bytearray) else str(line).encode()
        if _REQUEST_LINE.match(line):
            return Problem(414, "uri-too-long", "the request line is too long")
        return Problem(431, "headers-too-large", "a request header is too large")
    if isinstance(exc, BadHttpMessage):
        text = str(getattr(exc, "message", exc))
        if "too many headers" in text.lower():
            return Problem(431, "headers-too-large", "too many request headers")
        return Problem(400, "bad-request", "malformed HTTP request")
    if status >= 500:
        log.error("unhandled error in request handling", exc_info=exc)
        return Problem(status, "internal-error", f"{who} failed to handle this request")
    return Problem(status, "bad-request", message or None)


def problem_response(problem: Problem, request_id: str | None = None) -> web.Response:
    headers = dict(problem.headers)
    headers.setdefault("Server", "cityplane")
    if request_id:
        headers["X-Request-Id"] = request_id
    return web.Response(
        status=problem.status,
        body=problem.body(),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


class ProblemRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own parse errors as problem+json."""

    who = "the server"

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        resp = problem_response(parse_error_problem(exc, status, message, self.who))
        resp.force_close()
        return resp


class _ProblemServer(Server):
    def __call__(self) -> RequestHandler:
        return ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class ProblemAppRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer parse errors as problem+json."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        # aiohttp builds the Server itself (Application._make_handler); only the class of the
        # connection handler it hands out differs, so the instance takes our subclass.
        server.__class__ = _ProblemServer
        return server
