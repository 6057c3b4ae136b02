"""The gateway's client side: HTTP/1.1 on asyncio protocols and httptools (llhttp).

This replaces aiohttp's server on the request path (docs/adr/0013-own-http1-server.md). It does
what a proxy's front needs and nothing else: parse a request with llhttp in its strict mode
(which refuses Content-Length with Transfer-Encoding, duplicate lengths, bad chunk sizes,
obs-fold, bare LF and the like), enforce the size limits and the slow-client clocks, run one
request at a time per connection (pipelined heads wait their turn), write each response with
as few system calls as possible, and hand a WebSocket connection over to a byte tunnel.

`ClientConnection` is one client connection; `IncomingRequest` one request on it. The handler
(`gateway.server.RequestPath`) is called with each request and writes the answer through
`ClientConnection.respond` / `start_response` + `write` + `end_response`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol, cast

import httptools

from cityplane.problem import PROBLEM_CONTENT_TYPE, Problem
from gateway.ascii import COMPILED, name_is
from gateway.outbox import Outbox, outbox

if TYPE_CHECKING:
    from gateway.connections import GatewayLimits

log = logging.getLogger("cityplane.gateway")

# A request head (request line and every field) larger than this is refused with 431 even when
# each field is within its own limit: llhttp keeps a partial field in memory until its line
# ends, so without a bound on the whole head a client could make one field grow for ever.
# Envoy's default for the whole head is 60 KiB; nginx allows 4 x 8 KiB.
MAX_HEAD = 64 * 1024
# Bytes of a request body held for a handler that has not read them yet before the socket is
# paused (flow control toward the client).
BODY_BUFFER = 64 * 1024
# Pipelined requests parsed ahead of the one being handled before the socket is paused.
PIPELINE_DEPTH = 16

_MISSING: Any = object()
_STATUS_LINES: dict[tuple[int, str | None], bytes] = {}
_date_second = -1
_date_header = b""

# Field names the connection reads itself, by their lower-case bytes.
_HOST, _CL, _TE, _EXPECT, _UPGRADE, _XRID, _TRACEPARENT, _XFF, _AUTHZ = range(9)
_WATCHED = {
    b"host": _HOST,
    b"authorization": _AUTHZ,
    b"content-length": _CL,
    b"transfer-encoding": _TE,
    b"expect": _EXPECT,
    b"upgrade": _UPGRADE,
    b"x-request-id": _XRID,
    b"traceparent": _TRACEPARENT,
    b"x-forwarded-for": _XFF,
}
_OTHER = -1  # any other field


# `_WATCHED` by name length, as `_field_kind` reads it: their lengths differ, so each length has
# one name (or none: an empty name whose kind is `_OTHER`).
_WATCHED_BY_SIZE = tuple(
    next(((n, k) for n, k in _WATCHED.items() if len(n) == size), (b"", _OTHER))
    for size in range(max(map(len, _WATCHED)) + 1)
)

# The C types of the compiled form (gateway/speedups.py declares them in the module's .pxd).
C_TYPES = {
    "_field_kind": {"name": "bytes", "table": "tuple", "entry": "tuple", "size": "Py_ssize_t"}
}


def _field_kind(name: bytes, table: tuple[tuple[bytes, int], ...]) -> int:
    """Which of the fields in `_WATCHED` ``name`` is, in any case, else `_OTHER`: ``table`` is
    `_WATCHED_BY_SIZE`, so one comparison in C decides (ADR 22). Compiled only: the sources
    look the lower-cased name up in `_WATCHED` (a loop over bytes in Python costs more)."""
    size = len(name)
    if size >= len(table):
        return -1  # _OTHER
    entry = table[size]
    return entry[1] if name_is(name, 0, entry[0]) else -1  # an empty name matches: _OTHER


_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}


def content_length_field(length: int) -> bytes:
    """The ``Content-Length`` line for ``length``, from a bounded table: responses repeat their
    sizes, and a bytes % format is ~1,500 instructions."""
    if length in _LENGTH_FIELDS:  # `in` and [] are C calls compiled
        return _LENGTH_FIELDS[length]
    field = f"Content-Length: {length}\r\n".encode("ascii")
    if len(_LENGTH_FIELDS) < 4096:
        _LENGTH_FIELDS[length] = field
    return field


_LENGTH_FIELDS: dict[int, bytes] = {}


def status_line(status: int, reason: str | None = None) -> bytes:
    key = (status, reason)
    if key in _STATUS_LINES:  # `in` and [] are C calls compiled; .get() a call by name
        return _STATUS_LINES[key]
    try:
        phrase = reason if reason is not None else HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    # A reason phrase is the upstream's text: keep it to visible ASCII (RFC 9112 §4).
    phrase = "".join([c for c in phrase if " " <= c <= "~"])  # a list: no closure (ADR 19)
    line = f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")
    if len(_STATUS_LINES) < 512:  # upstreams choose reasons: keep the cache bounded
        _STATUS_LINES[key] = line
    return line


def date_header(now: float) -> bytes:
    """``Date: ...\\r\\n``, formatted once per second."""
    global _date_second, _date_header
    second = int(now)
    if second != _date_second:
        _date_second = second
        _date_header = b"Date: " + formatdate(second, usegmt=True).encode() + b"\r\n"
    return _date_header


def encode_fields(fields: list[tuple[str, str]]) -> bytes:
    """Header fields as bytes; CR, LF and NUL in a value are dropped (response splitting)."""
    out = []
    for name, value in fields:
        line = f"{name}: {value}\r\n"
        if line.count("\r") != 1 or line.count("\n") != 1 or "\x00" in line:
            value = value.replace("\r", "").replace("\n", "").replace("\x00", "")
            line = f"{name}: {value}\r\n"
        out.append(line)
    return "".join(out).encode("latin-1", "replace")


_KEYS: dict[str, bytes] = {}


def _key(name: str) -> bytes:
    if name in _KEYS:  # `in` and [] are C calls compiled; .get() is a call by name
        return _KEYS[name]
    key = name.lower().encode("latin-1")
    if len(_KEYS) < 1024:
        _KEYS[name] = key
    return key


def _values(raw: list[tuple[bytes, bytes]], key: bytes) -> list[str]:
    """The values of the raw fields named ``key`` (lower-case), in order."""
    size = len(key)  # lower-cases only the names whose length matches
    return [v.decode("latin-1") for n, v in raw if len(n) == size and n.lower() == key]


class RequestHeaders:
    """A request's fields, looked up case-insensitively in the parser's raw pairs.

    The subset of ``CIMultiDictProxy`` the policies use (``get``, ``getall``, ``in``, ``[]``,
    iteration). Building a multidict costs ~2.5 µs per request; one scan of a handful of
    fields ~0.5 µs, and a request's policies ask for one or two fields at most.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def getall(self, name: str, default: Any = _MISSING) -> Any:
        found = _values(self._raw, _key(name))
        if found:
            return found
        if default is _MISSING:
            raise KeyError(name)
        return default

    def get(self, name: str, default: Any = None) -> Any:
        found = _values(self._raw, _key(name))  # a request repeats a field rarely
        return found[0] if found else default

    def __getitem__(self, name: str) -> str:
        value = self.get(name, _MISSING)
        if value is _MISSING:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name, _MISSING) is not _MISSING

    def __iter__(self) -> Iterator[str]:
        return (n.decode("latin-1") for n, _ in self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def items(self) -> Iterator[tuple[str, str]]:
        return ((n.decode("latin-1"), v.decode("latin-1")) for n, v in self._raw)


class ClientGone(ConnectionError):
    """The client's connection closed while a response was being written."""


class IncomingRequest:
    """One request on a client connection: its head, and its body as it arrives."""

    __slots__ = (
        "_body",
        "_body_size",
        "_body_waiter",
        "_error",
        "_expect",
        "authorization",
        "authorizations",
        "body_complete",
        "chunked",
        "conn",
        "content_length",
        "expect_continue",
        "forwarded_for",
        "host",
        "inline",
        "keep_alive",
        "method",
        "raw_headers",
        "raw_path",
        "request_id",
        "traceparent",
        "upgrade",
        "upgrading",
        "version",
    )

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.method = ""
        self.raw_path = ""
        self.version = "1.1"
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.host = ""
        # The Authorization field's text, and how many there were (the auth policy refuses
        # more than one). A connection's requests share one str (see on_header).
        self.authorization: str | None = None
        self.authorizations = 0
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.upgrade: str | None = None  # the Upgrade field, lower-cased
        self.upgrading = False  # the parser stopped after this head (Upgrade, or CONNECT)
        self.request_id: str | None = None
        self.traceparent: str | None = None
        self.forwarded_for: str | None = None
        self.keep_alive = True
        self.body_complete = False
        self._body: deque[bytes] = deque()
        self._body_size = 0
        self._body_waiter: asyncio.Future[None] | None = None
        self._error: Problem | None = None
        self._expect: bytes | None = None
        # Set by the request path while the request is handled without a task, or handed
        # over to the task mid-way (docs/adr/0014-inline-exchanges.md).
        self.inline: InlineState | None = None

    @property
    def headers(self) -> RequestHeaders:
        """The request's fields, case-insensitive (`RequestHeaders`)."""
        return RequestHeaders(self.raw_headers)

    def get(self, name: str, default: str | None = None) -> str | None:
        """One field's first value (for the balancer's hash keys)."""
        return self.headers.get(name, default)

    def body_exists(self) -> bool:
        # A method, not a property: compiled, a property is read by name (ADR 18).
        return self.chunked or bool(self.content_length)

    # -- the body, fed by the connection and read by the handler -------------------------------

    def _feed(self, data: bytes) -> None:
        self._body.append(data)
        self._body_size += len(data)
        if self._body_size > BODY_BUFFER:
            self.conn._pause_reading()
        self._wake()

    def _finish(self) -> None:
        self.body_complete = True
        self._wake()

    def _fail(self, problem: Problem) -> None:
        """The body's framing broke (a bad chunk): the handler's next read raises."""
        self._error = problem
        self._wake()

    def _wake(self) -> None:
        waiter = self._body_waiter
        if waiter is not None:
            self._body_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def take_body(self) -> bytes:
        """Everything buffered so far (the whole body once ``body_complete``)."""
        body = self._body
        if not body:
            return b""
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._body_size = 0
        self.conn._resume_reading()
        return data

    async def read_chunk(self) -> bytes:
        """The next piece of the body; ``b""`` at its end. Raises `ClientGone` if the client
        closed before the body was complete."""
        while not self._body:
            if self._error is not None:
                raise self._error
            if self.body_complete:
                return b""
            if self.conn.closed:
                raise ClientGone("the client closed during the request body")
            self._body_waiter = self.conn.loop.create_future()
            await self._body_waiter
        data = self._body.popleft()
        self._body_size -= len(data)
        if self._body_size <= BODY_BUFFER:
            self.conn._resume_reading()
        return data


Handler = Callable[[IncomingRequest], Awaitable[None]]
# What a handler's ``dispatch`` did with a request (ADR 14): see gateway.server.
_DONE, _IN_FLIGHT, _TASK = 0, 1, 2


class InlineState(Protocol):
    """A request's state while the request path handles it without a task."""

    def client_lost(self) -> None:
        """The client closed: give up what is under way and account for the request."""


class ClientConnection:
    """One client connection: parser, request queue, response writer, clocks.

    An `asyncio.Protocol` by its methods, not by inheritance: with no base class, the compiled
    module makes it an extension type whose own attributes are struct fields (ADR 16).
    """

    __slots__ = (
        "_authz_raw",
        "_authz_text",
        "_busy",
        "_chunked_out",
        "_clock_offset",
        "_close_held",
        "_drain_waiter",
        "_head_sent",
        "_head_size",
        "_head_started",
        "_held",
        "_host_raw",
        "_host_text",
        "_idle_since",
        "_in_body",
        "_in_head",
        "_keep_after",
        "_next",
        "_outbox",
        "_parser",
        "_queue",
        "_reading_paused",
        "_refusal",
        "_req",
        "_runner_turn",
        "_stop_parsing",
        "_task",
        "_timer",
        "_timer_at",
        "_tunnel",
        "_tunnel_pending",
        "_url",
        "_url_size",
        "_v11",
        "_writing_paused",
        "closed",
        "limits",
        "loop",
        "on_lost",
        "peer",
        "server",
        "transport",
        "tunnel_peer",
    )

    def __init__(self, server: FrontServer) -> None:
        self.server = server
        self.loop = server.loop
        self._clock_offset: float = server.clock_offset  # Date = loop time + this (per server)
        self.limits: GatewayLimits = server.limits  # typed: its fields are struct reads
        self.transport: asyncio.Transport | None = None
        self.peer = "0.0.0.0"
        self.closed = False
        self._parser = httptools.HttpRequestParser(self)
        # The head being parsed.
        self._req: IncomingRequest | None = None
        self._url: list[bytes] = []
        self._url_size = 0
        self._head_size = 0
        self._in_head = False
        self._in_body = False
        self._v11 = False  # the next head to complete is HTTP/1.1 (see data_received)
        self._host_raw = b""  # the last Host field's bytes and its text (see on_header)
        self._host_text = "-"  # what an empty Host field reads as
        self._authz_raw = b""  # the last Authorization field's bytes and its text
        self._authz_text = ""
        # Requests whose head is complete, in order; the first is being handled.
        self._queue: deque[IncomingRequest] = deque()
        # One task per connection runs the handler for each request in turn and, between
        # requests, waits on _next: a future per request is cheaper than a task per request.
        self._task: asyncio.Task[None] | None = None
        self._next: asyncio.Future[None] | None = None
        self._busy = False  # a request is being handled (inline or by the task)
        self._runner_turn = False  # ... by the task
        self._tunnel: Callable[[bytes], None] | None = None
        # Set by a tunnel (gateway/tunnel.py): the upstream socket, paused while the client
        # cannot take more, and what to do when the client goes.
        self.tunnel_peer: asyncio.Transport | None = None
        self.on_lost: Callable[[], None] | None = None
        self._tunnel_pending: list[bytes] | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._stop_parsing = False  # no more requests are read on this connection
        self._refusal: Problem | None = None  # answered once the queued requests are
        # The response in progress (streamed): chunked framing, and whether the connection
        # can be kept once it ends.
        self._chunked_out = False
        self._keep_after = True
        self._head_sent = False
        # Whole responses held for the outbox (gateway/outbox.py), and whether the connection
        # closes once they are written. Any other write or close writes them first.
        self._held: list[bytes] | None = None
        self._close_held = False
        self._outbox: Outbox = outbox(self.loop)  # typed: hold() is a C call (ADR 17/18)
        # Clocks: one timer at most, re-armed lazily (see _on_timer).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._idle_since = 0.0
        self._head_started = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = peer[0]
        self.server._connections.add(self)
        self._idle_since = self.loop.time()
        self._arm(self._idle_since + self.limits.idle_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._held = None
        self.server._connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ClientGone("the client closed the connection"))
        for req in self._queue:
            req._wake()
        inline = self._queue[0].inline if self._queue else None
        if inline is not None:
            inline.client_lost()  # an upstream exchange under way without a task
        if self.on_lost is not None:
            self.on_lost()  # a tunnel ends with its client; its handler returns by itself
        elif self._task is not None and not self._task.done():
            self._task.cancel()  # nginx's proxy_ignore_client_abort off: stop the upstream too

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.tunnel_peer is not None:
            self.tunnel_peer.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.tunnel_peer is not None:
            self.tunnel_peer.resume_reading()
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel(data)
            return
        if self._tunnel_pending is not None:  # an upgrade is being set up
            self._tunnel_pending.append(data)
            self._pause_reading()
            return
        if self._stop_parsing:
            return  # after "Connection: close", an upgrade or an error nothing more is read
        if self._req is None:
            # Between requests, the first CRLF in these bytes ends the next request line:
            # llhttp refuses CR and LF in a method or target, and any other line end. " HTTP/1.1"
            # before it gives that request's version without get_http_version(), which formats
            # a str (~2,300 instructions). on_headers_complete uses it once.
            # (A slice and ==: bytes methods with arguments parse them the old way, ~600.)
            eol = data.find(b"\r\n")
            self._v11 = eol >= 9 and data[eol - 9 : eol] == b" HTTP/1.1"
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded(data[upgrade.args[0] :])
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if not isinstance(cause, _StopParsing):
                self._stop_parsing = True
                self._malformed(
                    cause.problem if isinstance(cause, _HeadRefused) else _parse_problem(exc)
                )
                return
        # Handlers start only once the parser has accepted everything it was given: llhttp
        # checks some framing (an unknown transfer coding, a bad chunk) after the head.
        if self._queue and not self._busy and not self.closed:
            self._dispatch_queued()
        if self._in_head and not self._head_started:
            # Bytes of a head that is not complete yet: the header clock starts (ADR 11).
            self._head_started = now = self.loop.time()
            deadline = now + self.limits.header_timeout
            if deadline < self._timer_at or self._timer is None:
                self._arm(deadline, force=True)

    def eof_received(self) -> bool | None:
        # A client that half-closes after its request still gets the answer (RFC 9112 §9.6).
        self._stop_parsing = True
        return self._busy or bool(self._queue)

    # -- parser callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._stop_parsing:
            raise _StopParsing()  # pipelined after "Connection: close": never read
        self._req = IncomingRequest(self)
        self._url = []
        self._url_size = 0
        self._head_size = 0
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._url_size += len(url)
        if self._url_size > self.limits.max_line_size:
            raise _HeadRefused(Problem(414, "uri-too-long", "the request line is too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._req
        if req is None or not self._in_head:
            return  # a trailer field after a chunked body: not forwarded (RFC 9110 §6.5.2)
        size = len(name) + len(value)
        self._head_size += size + 4
        limits = self.limits
        if len(value) > limits.max_field_size or len(name) > limits.max_field_size:
            raise _HeadRefused(Problem(431, "headers-too-large", "a request header is too large"))
        headers = req.raw_headers
        if len(headers) >= limits.max_headers:
            raise _HeadRefused(Problem(431, "headers-too-large", "too many request headers"))
        if self._head_size > MAX_HEAD:
            raise _HeadRefused(Problem(431, "headers-too-large", "the request head is too large"))
        headers.append((name, value))
        if COMPILED:
            kind = _field_kind(name, _WATCHED_BY_SIZE)
        else:
            kind = _WATCHED.get(name.lower(), _OTHER)
        if kind == _OTHER:
            return
        if kind == _AUTHZ:
            req.authorizations += 1
            # A client sends its token again and again on a connection: one str for them all
            # keeps its hash for the verified-token cache, and the decode (~600 bytes) is saved.
            if value == self._authz_raw:
                req.authorization = self._authz_text
            else:
                req.authorization = value.decode("latin-1")
                self._authz_raw, self._authz_text = value, req.authorization
        elif kind == _HOST:
            if req.host:
                raise _HeadRefused(Problem(400, "bad-request", "more than one Host field"))
            # A connection's requests name the same host: its text is kept (decode() ~630).
            if value == self._host_raw:
                req.host = self._host_text
            else:
                req.host = value.decode("latin-1") or "-"
                self._host_raw, self._host_text = value, req.host
        elif kind == _CL:
            req.content_length = int(value)  # llhttp checked: digits only, never two
        elif kind == _TE:
            # llhttp checks that chunked is the final coding; any other coding is one the
            # gateway does not apply, and dropping it would hand the upstream encoded bytes
            # as content (RFC 9112 §6.1: 501).
            codings = [c.strip() for c in value.lower().split(b",")]
            if codings[-1] != b"chunked":
                raise _HeadRefused(Problem(400, "bad-request", "invalid Transfer-Encoding"))
            if len(codings) > 1:
                raise _HeadRefused(
                    Problem(501, "not-implemented", "only the chunked transfer coding is supported")
                )
            req.chunked = True
        elif kind == _EXPECT:
            req._expect = value
        elif kind == _UPGRADE:
            req.upgrade = value.decode("latin-1").strip().lower()
        elif kind == _XRID:
            req.request_id = value.decode("latin-1")
        elif kind == _TRACEPARENT:
            req.traceparent = value.decode("latin-1")
        else:
            xff = value.decode("latin-1")
            req.forwarded_for = f"{req.forwarded_for}, {xff}" if req.forwarded_for else xff

    def on_headers_complete(self) -> None:
        req = self._req
        assert req is not None
        self._in_head = False
        self._head_started = 0.0
        parser = self._parser
        if self._v11:
            self._v11 = False  # the next request in these bytes has its own request line
            version = "1.1"
        else:
            version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _HeadRefused(
                Problem(505, "http-version-not-supported", f"HTTP/{version} is not supported")
            )
        req.version = version
        expect = req._expect
        if expect is not None and version == "1.1":  # RFC 9110 §10.1.1: ignored in HTTP/1.0
            req.expect_continue = True
            if expect.lower() != b"100-continue":
                raise _HeadRefused(
                    Problem(417, "expectation-failed", "only Expect: 100-continue is supported")
                )
        method = parser.get_method()
        # The usual methods' str from a table: a bytes method's decode() is a call by name.
        req.method = _METHODS[method] if method in _METHODS else method.decode("ascii")
        url = self._url[0] if len(self._url) == 1 else b"".join(self._url)
        if url[:1] != b"/":
            url = _origin_form(url, req.method)
        req.raw_path = url.decode("latin-1")
        if not req.host:
            if version == "1.1":
                raise _HeadRefused(Problem(400, "bad-request", "an HTTP/1.1 request needs Host"))
            req.host = self.server.local_host
        req.keep_alive = parser.should_keep_alive()
        if req.chunked and version == "1.0":
            raise _HeadRefused(
                Problem(400, "bad-request", "Transfer-Encoding is not allowed in HTTP/1.0")
            )
        if not req.body_exists():
            req.body_complete = True
        else:
            self._in_body = True
        self._queue.append(req)
        if len(self._queue) > PIPELINE_DEPTH:
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        req = self._req
        if req is not None:
            req._feed(body)

    def on_message_complete(self) -> None:
        req = self._req
        self._req = None
        self._in_body = False
        if req is not None:
            req._finish()
            if not req.keep_alive:
                self._stop_parsing = True  # nothing after this request is read

    # -- requests --------------------------------------------------------------------------------

    def _dispatch_queued(self) -> None:
        """Start the queued requests in turn: each without a task if the request path can
        (ADR 14), else the connection's task takes it and the ones after it."""
        queue = self._queue
        dispatch = self.server.dispatch
        while queue and not self._busy and not self.closed:
            req = queue[0]
            self._head_sent = False
            self._keep_after = True
            self._busy = True
            if dispatch is None:
                self._wake_runner()
                return
            try:
                outcome = dispatch(req)
            except Exception:  # noqa: BLE001 - a bug: request_crashed logs it, answers 500
                self.request_crashed(req)  # answered 500, and the connection closes
                return
            if outcome == _IN_FLIGHT:
                return  # request_done() or hand_over() follows
            if outcome == _TASK:
                self._wake_runner()
                return
            if not self._finish():
                return

    def request_done(self, req: IncomingRequest) -> None:
        """An inline request has been answered (ADR 14): on to the next one."""
        if self._finish():
            self._dispatch_queued()

    def hand_over(self, req: IncomingRequest) -> None:
        """An inline request has to wait: the connection's task goes on with it."""
        self._wake_runner()

    def request_crashed(self, req: IncomingRequest) -> None:
        """A bug while handling ``req``: the client still gets an answer (then the connection
        closes), the log the trace."""
        log.exception("unhandled error handling %s %s", req.method, req.raw_path)
        self._busy = self._runner_turn = False
        if self._head_sent or self.closed:
            self._close()
            return
        self.respond_problem(req, Problem(500, "internal-error"), close=True)

    def _finish(self) -> bool:
        """The request at the head of the queue is answered; returns whether the connection
        goes on with the next one."""
        self._busy = False
        queue = self._queue
        queue.popleft()
        if self.closed or self._tunnel is not None or not self._keep_after:
            return False
        if self._stop_parsing and not queue:
            if self._refusal is not None:
                self.write_raw(raw_problem(self._refusal))
            self._close_after_write()
            return False
        if self._reading_paused and len(queue) <= PIPELINE_DEPTH:
            self._resume_reading()
        if not queue:
            self._idle_since = self.loop.time()
        return True

    def _wake_runner(self) -> None:
        self._busy = True
        self._runner_turn = True  # the task owns the head of the queue until it lets go
        if self._task is None:
            self._task = self.loop.create_task(self._run())
            return
        waiter = self._next
        if waiter is not None:
            self._next = None
            if not waiter.done():
                waiter.set_result(None)

    async def _run(self) -> None:
        handler = self.server.handler
        queue = self._queue
        try:
            while True:
                if not self._runner_turn:
                    self._next = self.loop.create_future()
                    await self._next
                    continue
                req = queue[0]
                try:
                    await handler(req)
                except (ClientGone, ConnectionError):
                    self._close()
                    return
                except Exception:  # noqa: BLE001 - a bug: request_crashed logs it, answers 500
                    self.request_crashed(req)  # answered 500, and the connection closes
                    return
                if req.inline is not None:
                    # It went on without the task (ADR 14): request_done() or hand_over().
                    self._runner_turn = False
                    continue
                if not self._finish():
                    return
                if queue:
                    self._head_sent = False
                    self._keep_after = True
                    self._busy = True
                else:
                    self._runner_turn = False
        finally:
            self._task = None
            self._next = None

    # -- responses -------------------------------------------------------------------------------

    def _connection_field(self, req: IncomingRequest, close: bool) -> bytes:
        """Whether the connection survives this response, and the Connection field saying so."""
        keep = (
            req.keep_alive
            and not close
            and not self.server.draining
            and not req.upgrading  # an upgrade not taken: nothing after it can be parsed
            and req.body_complete  # an unread body would be parsed as the next request
        )
        self._keep_after = keep
        if not keep:
            return b"Connection: close\r\n"
        return b"Connection: keep-alive\r\n" if req.version == "1.0" else b""

    def respond(
        self,
        req: IncomingRequest,
        status: int,
        fields: bytes,
        body: bytes,
        *,
        reason: str | None = None,
        close: bool = False,
    ) -> None:
        """A whole response in one write. ``fields`` are encoded header lines (see
        `encode_fields`); Content-Length, Date and Connection are added here."""
        if self.closed or self.transport is None:
            raise ClientGone("the client closed the connection")
        head = b"".join(
            (
                status_line(status, reason),
                fields,
                content_length_field(len(body)) if _has_length(status) else b"",
                date_header(self.loop.time() + self._clock_offset),
                self._connection_field(req, close),
                b"\r\n",
            )
        )
        self._head_sent = True
        data = head if req.method == "HEAD" or not _has_body(status) else head + body
        if self._held is None:
            self._held = [data]
            self._outbox.hold(self)
        else:
            self._held.append(data)
        if not self._keep_after:
            self._close_after_write()

    def flush_held(self) -> None:
        """Write the held responses (the outbox calls this), then close if one said so."""
        held, self._held = self._held, None
        if held is None or self.closed or self.transport is None:
            return
        self.transport.write(held[0] if len(held) == 1 else b"".join(held))
        if self._close_held:
            self.transport.close()

    def respond_problem(
        self,
        req: IncomingRequest,
        problem: Problem,
        *,
        request_id: str | None = None,
        extra: list[tuple[str, str]] | None = None,
        raw: bytes = b"",
        close: bool = False,
    ) -> None:
        """``raw``: fields already in wire form ("Name: value\r\n" each), as written by the
        gateway itself."""
        fields = [("Content-Type", PROBLEM_CONTENT_TYPE), *problem.headers.items()]
        if request_id:
            fields.append(("X-Request-Id", request_id))
        if extra:
            fields.extend(extra)
        self.respond(req, problem.status, encode_fields(fields) + raw, problem.body(), close=close)

    def start_response(
        self,
        req: IncomingRequest,
        status: int,
        fields: bytes,
        *,
        content_length: int | None,
        reason: str | None = None,
        first: bytes = b"",
    ) -> bool:
        """Send a response head (with ``first`` body bytes) whose body follows through
        `write`; returns whether the body is to be written at all (not for HEAD, 204, 304)."""
        if self.closed or self.transport is None:
            raise ClientGone("the client closed the connection")
        with_body = req.method != "HEAD" and _has_body(status)
        framing = b""
        close = False
        self._chunked_out = False
        if content_length is not None:
            if status >= 200 and status != 204:  # a 304 may repeat the representation's length
                framing = content_length_field(content_length)
        elif with_body:
            if req.version == "1.1":
                framing = b"Transfer-Encoding: chunked\r\n"
                self._chunked_out = True
            else:
                close = True  # HTTP/1.0: the body ends when the connection does
        head = b"".join(
            (
                status_line(status, reason),
                fields,
                framing,
                date_header(self.loop.time() + self._clock_offset),
                self._connection_field(req, close),
                b"\r\n",
            )
        )
        self._head_sent = True
        if first and with_body:
            head += b"%x\r\n%b\r\n" % (len(first), first) if self._chunked_out else first
        if self._held is not None:
            self.flush_held()
        self.transport.write(head)
        return with_body

    async def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise ClientGone("the client closed the connection")
        if not data:
            return
        if self._held is not None:
            self.flush_held()
        if self._chunked_out:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.transport.write(data)
        if self._writing_paused:
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter

    def end_response(self) -> None:
        if self.closed or self.transport is None:
            return
        if self._held is not None:
            self.flush_held()
        if self._chunked_out:
            self.transport.write(b"0\r\n\r\n")
            self._chunked_out = False
        if not self._keep_after:
            self._close_after_write()

    def cut(self) -> None:
        """A response that cannot be completed: the connection closes after what was written
        (the client sees the body end early)."""
        self._keep_after = False
        self._chunked_out = False  # no last chunk: its absence is what tells the client
        self._close_after_write()

    def write_raw(self, data: bytes) -> None:
        """Bytes outside any response framing (``100 Continue``, a tunnel)."""
        if self.transport is not None and not self.closed:
            if self._held is not None:
                self.flush_held()
            self.transport.write(data)

    # -- upgrades --------------------------------------------------------------------------------

    def _upgraded(self, rest: bytes) -> None:
        """The parser stopped after an upgrade request's head (or a CONNECT)."""
        req = self._queue[-1] if self._queue else None
        if req is None:
            self._close()
            return
        req.upgrading = True
        # Until the handler decides, bytes from the client are held (and reading paused).
        self._tunnel_pending = [rest] if rest else []
        self._stop_parsing = True  # whatever happens, no HTTP/1.1 request follows here

    def take_tunnel(self, sink: Callable[[bytes], None]) -> bytes:
        """Hand the connection's incoming bytes to ``sink`` from now on; returns the bytes
        that arrived before."""
        pending = b"".join(self._tunnel_pending or ())
        self._tunnel_pending = None
        self._tunnel = sink
        self._resume_reading()
        return pending

    # -- flow control and closing ---------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            if self._tunnel is None and self._tunnel_pending is not None:
                return
            self._reading_paused = False
            self.transport.resume_reading()

    def pause_tunnel(self) -> None:
        self._pause_reading()

    def resume_tunnel(self) -> None:
        self._resume_reading()

    def _malformed(self, problem: Problem) -> None:
        """The parser refused what it was given: answer ``problem`` in turn, then close."""
        req = self._req  # the message being parsed (None between two messages)
        self._req = None
        if req is not None and req in self._queue:
            if self._busy and self._queue[0] is req:
                req._fail(problem)  # its handler is reading the body: the answer is its
                return
            self._queue.remove(req)  # its framing is broken: never handed to a handler
        if self._queue:
            # Earlier requests are still to be answered: the refusal follows their answers.
            self._refusal = problem
            if not self._busy:
                self._dispatch_queued()
            return
        self._refuse(problem)

    def _refuse(self, problem: Problem) -> None:
        """Answer a request that could not be parsed, then close."""
        if self.transport is not None:
            if self._held is not None:
                self.flush_held()
            self.transport.write(raw_problem(problem))
        self._close_after_write()

    def close_after_write(self) -> None:
        self._close_after_write()

    def _close_after_write(self) -> None:
        self._stop_parsing = True  # bytes that still arrive are not requests of ours
        if self._held is not None:
            self._close_held = True  # once the held responses are written
            return
        if self.transport is not None and not self.closed:
            self.transport.close()  # the buffer is flushed first

    def _close(self) -> None:
        self._stop_parsing = True
        if self._held is not None:
            self.flush_held()
        if self.transport is not None and not self.closed:
            self.transport.close()

    def close_if_idle(self) -> bool:
        if not self._busy and not self._in_head and not self._queue:
            self._close()
            return True
        return False

    def abort(self) -> None:
        self._held = None
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # -- clocks -----------------------------------------------------------------------------------

    def _arm(self, when: float, *, force: bool = False) -> None:
        if self._timer is not None:
            if not force and self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        """The one timer of a connection: a trickled head runs out (408), or an idle
        connection does (closed without an answer). Activity since the timer was set only
        moves the deadline: the timer is re-armed instead of cancelled on every request."""
        self._timer = None
        if self.closed:
            return
        now = self.loop.time()
        limits = self.limits
        if self._in_head and self._head_started:
            deadline = self._head_started + limits.header_timeout
            if now >= deadline:
                if not self._busy and not self._queue:  # no answer in progress to collide with
                    self.transport.write(  # type: ignore[union-attr]
                        raw_problem(
                            Problem(
                                408,
                                "request-header-timeout",
                                f"the request head was not complete within "
                                f"{limits.header_timeout:g}s",
                            )
                        )
                    )
                self._close()
                return
            self._arm(deadline)
            return
        if self._busy or self._queue or self._in_body:
            # A request is in progress: its own timeouts govern. Look again later.
            self._arm(now + limits.idle_timeout)
            return
        deadline = self._idle_since + limits.idle_timeout
        if now >= deadline:
            self._close()
            return
        self._arm(deadline)


class _StopParsing(Exception):
    pass


class _HeadRefused(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.detail)
        self.problem = problem


def _has_body(status: int) -> bool:
    return status >= 200 and status not in (204, 304)


def _has_length(status: int) -> bool:
    return status >= 200 and status not in (204, 304)


def _origin_form(target: bytes, method: str) -> bytes:
    """RFC 9112 §3.2: absolute-form (``http://host/path``) is accepted and routed by its path;
    ``*`` (OPTIONS) and authority-form (CONNECT) pass through for the handler to refuse."""
    lower = target[:8].lower()
    if lower.startswith((b"http://", b"https://")):
        rest = target.split(b"//", 1)[1]
        slash = rest.find(b"/")
        query = rest.find(b"?")
        if slash < 0 or (0 <= query < slash):
            return b"/" + (rest[query:] if query >= 0 else b"")
        return rest[slash:]
    return target


def _parse_problem(exc: Exception) -> Problem:
    return Problem(400, "bad-request", f"malformed HTTP request: {exc}")


def raw_problem(problem: Problem, extra: str = "") -> bytes:
    """A whole HTTP/1.1 answer where no request exists yet; the connection then closes."""
    body = problem.body()
    head = (
        f"HTTP/1.1 {problem.status} {problem.title}\r\n"
        f"Content-Type: {PROBLEM_CONTENT_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        "Server: cityplane\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _RefusedConnection(asyncio.Protocol):
    """A connection over ``max_connections``: told 503 and closed before anything is read.

    Refused rather than queued: a queued connection still holds a descriptor, which is what
    the cap protects. With ``--workers N`` a client that retries may land on another worker
    (SO_REUSEPORT spreads connections over them).
    """

    def __init__(self, answer: bytes) -> None:
        self._answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        tcp.write(self._answer)
        tcp.close()

    def data_received(self, data: bytes) -> None:
        pass  # the connection is closing; what the client sent is not read


class FrontServer:
    """The protocol factory for the gateway's listening socket."""

    # Compiled, ClientConnection is an extension type that cannot be patched; a test that
    # watches connections sets a subclass here.
    connection_type: type[ClientConnection] = ClientConnection

    def __init__(self, handler: Handler, limits: GatewayLimits, *, on_refused: Any = None) -> None:
        self.handler = handler
        # Requests that need not wait are started from the protocol's callbacks (ADR 14).
        self.dispatch: Callable[[IncomingRequest], int] | None = getattr(handler, "dispatch", None)
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self._connections: set[ClientConnection] = set()
        self.draining = False
        self.refused = 0
        self.local_host = "localhost"  # Host of an HTTP/1.0 request that names none
        self._on_refused = on_refused
        self._refusal = raw_problem(
            Problem(503, "too-many-connections", "this gateway worker is at its connection limit"),
            "Retry-After: 1\r\n",
        )
        self._refusal_logged = 0.0
        # Date fields come from the loop's monotonic clock plus this offset: one call fewer.
        self.clock_offset = time.time() - self.loop.time()

    def __call__(self) -> asyncio.Protocol:
        if len(self._connections) >= self.limits.max_connections:
            return self._refuse()
        return cast(asyncio.Protocol, self.connection_type(self))

    @property
    def connections(self) -> int:
        return len(self._connections)

    def _refuse(self) -> asyncio.Protocol:
        self.refused += 1
        if self._on_refused is not None:
            self._on_refused()
        now = self.loop.time()
        if now - self._refusal_logged > 10.0:  # at most one line per 10 s under a flood
            self._refusal_logged = now
            log.warning(
                "connection limit reached (%d); refusing new connections (%d so far)",
                self.limits.max_connections,
                self.refused,
            )
        return _RefusedConnection(self._refusal)

    async def shutdown(self, timeout: float) -> None:  # noqa: ASYNC109 - a grace period
        """Close idle connections now, the others once their request is answered (their
        responses say ``Connection: close``), and abort what is left after ``timeout``."""
        self.draining = True
        for conn in list(self._connections):
            conn.close_if_idle()
        deadline = self.loop.time() + timeout
        while self._connections and self.loop.time() < deadline:
            for conn in list(self._connections):
                conn.close_if_idle()
            await asyncio.sleep(0.05)
        for conn in list(self._connections):
            conn.abort()


def detached_request(
    method: str = "GET", path: str = "/", headers: dict[str, str] | None = None
) -> IncomingRequest:
    """A request no client sent, on a connection that never opened, for benchmarks and tests
    that call the policies directly (from a running event loop). The compiled gateway takes
    only an `IncomingRequest` where one is annotated (ADR 17)."""
    from gateway.connections import GatewayLimits

    async def unused(request: IncomingRequest) -> None:
        raise AssertionError("a detached request is never served")

    request = IncomingRequest(ClientConnection(FrontServer(unused, GatewayLimits())))
    request.method = method
    request.raw_path = path
    fields = headers or {}
    request.raw_headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in fields.items()]
    request.host = fields.get("Host", "")
    for name, value in fields.items():
        if name.lower() == "authorization":
            request.authorization = value
            request.authorizations += 1
    return request
