"""One upstream HTTP/1.1 connection: an asyncio Protocol driving ``httptools.HttpResponseParser``.

A connection carries one exchange at a time (no pipelining). The request path allocates one
future for the response head, one ``loop.call_at`` handle for the timeout and the
:class:`UpstreamResponse`; small bodies usually arrive in the same ``data_received`` as the head
and are read without another wake-up. See docs/adr/0003-upstream-client.md.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Protocol, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from gateway.outbox import Outbox, outbox
from gateway.upstream.heads import CONNECTION_CLOSE, CONNECTION_KEEP_ALIVE, scan_response_head

__all__ = [
    "Http1Connection",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamTimeout",
]

# Read backpressure: stop reading the socket once this much body is buffered and not yet taken
# by the consumer; resume when the consumer has drained it.
READ_HIGH_WATER = 256 * 1024
# A response head (status line + fields, 1xx interim heads included) larger than this is
# refused: llhttp itself has no limit and the fields are kept in memory.
MAX_RESPONSE_HEAD = 64 * 1024
# Bytes bodies up to this size are sent in the same write() as the head (one copy, one syscall).
_COALESCE_BODY = 16 * 1024

# Exchange phases.
_IDLE = 0  # no request on the connection
_AWAIT_HEAD = 1  # request being sent / response head not complete yet
_BODY = 2  # response head complete, body still arriving
_DONE = 3  # response complete, waiting for release()

_V11 = b"HTTP/1.1 "
# The usual reason phrases as text: a bytes decode() is ~630 instructions compiled.
_REASONS = {phrase.encode(): phrase for phrase in ("OK", "Created", "No Content", "Not Found")}
_CRLF2 = b"\r\n\r\n"


class UpstreamError(Exception):
    """The upstream exchange failed. ``request_sent`` is False only when no byte of the request
    can have reached the upstream, which makes a retry always safe."""

    def __init__(self, message: str, *, request_sent: bool) -> None:
        super().__init__(message)
        self.request_sent = request_sent


class UpstreamConnectError(UpstreamError):
    """Refused, unreachable, DNS failure, TLS handshake failure or connect timeout."""

    def __init__(self, message: str, *, request_sent: bool = False) -> None:
        super().__init__(message, request_sent=request_sent)


class UpstreamTimeout(UpstreamError):
    """No complete response head within ``timeout``, or a body read idle for longer."""


class UpstreamProtocolError(UpstreamError):
    """Malformed response, or the connection closed before the response was complete."""


class ConnectionOwner(Protocol):
    """What a connection tells its pool (implemented by ``HostPool``)."""

    def _connection_released(self, conn: Http1Connection, reusable: bool) -> None: ...

    def _idle_connection_lost(self, conn: Http1Connection) -> None: ...


class UpstreamResponse:
    """A response head plus a handle on its body. Call :meth:`release` in ``finally``."""

    __slots__ = (
        "_conn",
        "chunked",
        "content_length",
        "fields",
        "keep_alive",
        "reason",
        "status",
    )

    def __init__(
        self,
        status: int,
        reason: str,
        fields: bytes,
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
        conn: Http1Connection,
    ) -> None:
        self.status = status
        self.reason = reason
        # The header section as received (llhttp checked it), hop-by-hop fields included: the
        # CRLF that ended the status line, then each field line with its CRLF. The proxy relays
        # it with the lines it does not pass cut out (gateway.upstream.heads.relay_fields).
        self.fields = fields
        # The Content-Length field's value; HEAD, 204 and 304 responses have no body regardless.
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self._conn: Http1Connection | None = conn

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {self.reason!r}>"

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The fields as (name, value) pairs, as llhttp reports them: the value without the
        whitespace before it (the whitespace after it is kept)."""
        return [
            (name, value.lstrip(b" \t"))
            for name, _, value in (line.partition(b":") for line in self.fields.split(b"\r\n"))
            if name
        ]

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The fields as text (latin-1, byte for byte); the proxy itself relays ``fields``."""
        return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.raw_headers]

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Yield the body as it arrives; the socket is paused while the consumer lags behind."""
        while True:
            conn = self._conn
            if conn is None:
                raise RuntimeError("response body read after release()")
            data = conn._take_body()
            if data is not None:
                yield data
            elif conn._phase == _DONE:
                return
            elif conn._exc is not None:
                raise conn._exc
            else:
                await conn._wait_body()

    async def read(self) -> bytes:
        """The whole body, for small bodies: it is held in memory."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("response body read after release()")
        if conn._phase == _DONE:  # the usual case: the body came with the head
            return conn._take_body() or b""
        return b"".join([chunk async for chunk in self.iter_chunks()])

    def complete(self) -> bool:
        """The whole body has arrived: ``read_now`` can take it."""
        conn = self._conn
        return conn is not None and conn._phase == _DONE

    def read_now(self) -> bytes:
        """The whole body of a ``complete`` response, without waiting (ADR 14)."""
        conn = self._conn
        if conn is None or conn._phase != _DONE:
            raise RuntimeError("read_now() on a response that is not complete")
        return conn._take_body() or b""

    def release(self) -> None:
        """Give the connection back: to the pool if the body is complete and the upstream keeps
        the connection alive, else it is closed. Idempotent."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn._release()


def _reason_text(reason: bytes) -> str:
    return _REASONS[reason] if reason in _REASONS else reason.decode("latin-1")


def _wake(waiter: asyncio.Future[None] | None) -> None:
    """Resolve a waiter if there is one (the task driver's; inline exchanges have none)."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class Http1Connection:
    """One keep-alive connection to an upstream; used by one request at a time.

    An `asyncio.Protocol` by its methods, not by inheritance: with no base class, the compiled
    module makes it an extension type whose own attributes are struct fields (ADR 16).
    """

    __slots__ = (
        "_body_started",
        "_body_waiter",
        "_buffered",
        "_cancel_pending",
        "_chunks",
        "_crlf_tail",
        "_deadline",
        "_drain_waiter",
        "_exc",
        "_head_bytes",
        "_head_data",
        "_head_from",
        "_head_more",
        "_head_waiter",
        "_held",
        "_is_head",
        "_loop",
        "_lost",
        "_on_ready",
        "_outbox",
        "_owner",
        "_parser",
        "_phase",
        "_read_paused",
        "_request_sent",
        "_response",
        "_response_started",
        "_reusable",
        "_sending_task",
        "_timeout",
        "_timer",
        "_timer_at",
        "_transport",
        "_until_eof",
        "_upload",
        "_v11",
        "_wait_since",
        "_write_failed",
        "_write_paused",
        "_writing",
        "idle_since",
        "in_pool",
        "reused",
    )

    def __init__(self, owner: ConnectionOwner, loop: asyncio.AbstractEventLoop) -> None:
        self._owner = owner
        self._loop = loop
        self._outbox: Outbox = outbox(loop)  # typed: hold() is a C call (ADR 17/18)
        self._transport: asyncio.Transport | None = None
        self._parser = HttpResponseParser(self)
        self._lost = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._read_paused = False
        self._phase = _IDLE
        # One timer per connection, kept across requests: it is armed at the first request's
        # deadline and, when it fires, compares against the current request's deadline and
        # re-arms itself (no timer handle created and cancelled per request).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._timeout = 0.0
        self._exc: UpstreamError | None = None
        self._response: UpstreamResponse | None = None
        self._head_waiter: asyncio.Future[None] | None = None
        # An inline exchange's callback (start(), ADR 14), in place of the head waiter.
        self._on_ready: Callable[[], None] | None = None
        self._held: tuple[bytes, bytes | None] | None = None  # start()'s request, not yet written
        self._body_waiter: asyncio.Future[None] | None = None
        self._wait_since = 0.0
        self._sending_task: asyncio.Task[object] | None = None
        self._upload: asyncio.Task[None] | None = None  # a request body detached from send()
        self._cancel_pending = False
        self._is_head = False
        self._crlf_tail = b""
        self._head_bytes = 0  # bytes received while the head is incomplete
        # Those bytes themselves (the first chunk, then any others), and where the status line
        # of the head being read starts in them (after any 1xx interim heads).
        self._head_data = b""
        self._head_more: list[bytes] | None = None
        self._head_from = 0
        self._until_eof = False
        self._v11 = False  # the response's first bytes were "HTTP/1.1 " (see data_received)
        self._reusable = True
        self._request_sent = False
        self._response_started = False
        self._write_failed = False
        self._writing = False
        self._body_started = False
        # Pool bookkeeping (read and written by HostPool).
        self.idle_since = 0.0
        self.in_pool = False
        self.reused = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Request heads are small writes answered by the peer: Nagle would add latency.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._phase in (_IDLE, _DONE) and self._timer is not None:
            self._timer.cancel()  # nothing left to time (a live exchange fails below instead)
            self._timer = None
        if self.in_pool:
            self._owner._idle_connection_lost(self)
            return
        if self._writing:
            self._write_failed = True
        phase = self._phase
        if phase == _AWAIT_HEAD and self._exc is None:
            what = "response head" if self._response_started else "any response byte"
            self._fail(
                UpstreamProtocolError(
                    f"upstream closed the connection before {what}",
                    request_sent=self._request_sent,
                )
            )
        elif phase == _BODY and self._exc is None:
            if self._until_eof:  # RFC 9112 §6.3 item 8: the body ends when the connection closes
                self._complete()
            else:
                self._fail(
                    UpstreamProtocolError(
                        "upstream closed the connection before the body was complete",
                        request_sent=True,
                    )
                )
        _wake(self._drain_waiter)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        _wake(self._drain_waiter)

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase in (_DONE, _IDLE):
            # Bytes nobody asked for (or after a complete response): the framing can no longer
            # be trusted, so the connection is not reused.
            self._reusable = False
            if self._transport is not None:
                self._transport.abort()
            return
        if not self._response_started:
            self._response_started = True
            # The response's first bytes, which llhttp reads as the first status line (it
            # starts at byte 0, else llhttp fails): "HTTP/1.1 " makes that message's version
            # known without get_http_version(), which formats a str (~2,300 instructions).
            self._v11 = data[:9] == _V11  # not startswith(): its arguments cost ~600 to parse
        if phase == _AWAIT_HEAD:
            # Kept until the head is complete: on_headers_complete reads the fields from them.
            if self._head_bytes:
                self._keep_head_part(data)
            else:
                self._head_data = data
            self._head_bytes += len(data)
            if self._is_head:
                self._feed_head_only(data)
                return
        if self._feed(data) and self._phase == _AWAIT_HEAD:
            self._check_head_size()
        if self._on_ready is not None and self._phase != _AWAIT_HEAD:
            self._ready()  # after the parser returned: the callback may release this connection

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost() decides what the EOF means

    # -- httptools callbacks ------------------------------------------------------------------

    # No on_status and no on_header: without them httptools installs no per-field callbacks
    # (~1,000 instructions per field line before any code of ours ran), and llhttp still checks
    # every line. The status line's reason and the fields are read from the bytes llhttp
    # accepted, in on_headers_complete (ADR 21).

    def on_message_begin(self) -> None:
        if self._phase != _AWAIT_HEAD:
            # A second message after a complete response: abort parsing (see _parse_error).
            raise UpstreamProtocolError("unsolicited response", request_sent=True)

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        more = self._head_more
        head = self._head_data if more is None else b"".join([self._head_data, *more])
        begin = self._head_from
        line_end, end, length, chunked, options = scan_response_head(head, begin)
        if status < 200:
            self._v11 = False  # the final response's status line is another one: ask llhttp
            if status == 101:
                raise UpstreamProtocolError("unexpected 101 Switching Protocols", request_sent=True)
            self._head_from = end + 2
            return  # interim response (100 Continue, 103 Early Hints): skipped
        if end + 2 > MAX_RESPONSE_HEAD:
            raise UpstreamProtocolError(
                f"response head larger than {MAX_RESPONSE_HEAD} bytes", request_sent=True
            )
        self._head_data = b""  # not kept while the body is read
        self._head_more = None
        # "HTTP/d.d ddd" then SP and the reason, or nothing: llhttp takes exactly that shape.
        reason = head[begin + 13 : line_end]
        fields = head[line_end:end]
        content_length = length if length >= 0 else None
        # RFC 9112 §9.3: HTTP/1.1 persists unless "close"; HTTP/1.0 only with "keep-alive".
        if self._v11 or parser.get_http_version() == "1.1":
            keep_alive = not options & CONNECTION_CLOSE
        else:
            keep_alive = (
                parser.get_http_version() == "1.0"
                and options == CONNECTION_KEEP_ALIVE  # keep-alive without close
            )
        no_body = self._is_head or status == 204 or status == 304
        if not no_body and not chunked and content_length is None:
            self._until_eof = True  # RFC 9112 §6.3 item 8: read until the connection closes
            keep_alive = False
        if not keep_alive:
            self._reusable = False
        if self._writing:
            # An early response while the request body is still being written: the upstream may
            # not read the rest, so the connection's state is unknown afterwards. A write
            # blocked on flow control stops waiting (see _pump_body).
            self._reusable = False
            _wake(self._drain_waiter)
        self._response = UpstreamResponse(
            status,
            "OK" if reason == b"OK" else _reason_text(reason),
            fields,
            content_length,
            chunked,
            keep_alive,
            self,
        )
        self._phase = _BODY
        if no_body:
            self._complete()
        _wake(self._head_waiter)

    def on_body(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > READ_HIGH_WATER and not self._read_paused:
            self._read_paused = True
            if self._transport is not None:
                self._transport.pause_reading()
        _wake(self._body_waiter)

    def on_message_complete(self) -> None:
        if self._phase == _BODY:
            self._complete()
        # _AWAIT_HEAD: an interim 1xx message ended; _DONE: HEAD/204/304 already completed.

    # -- parsing helpers ----------------------------------------------------------------------

    def _feed(self, data: bytes) -> bool:
        try:
            self._parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:
            self._parse_error(exc)
            return False
        return True

    def _parse_error(self, exc: Exception) -> None:
        if self._phase == _DONE:
            # Garbage after a complete response: keep the response, drop the connection.
            self._reusable = False
            if self._transport is not None:
                self._transport.abort()
            return
        cause = exc.__context__
        if isinstance(cause, UpstreamError):
            self._fail(cause)
        else:
            self._fail(UpstreamProtocolError(f"malformed response: {exc}", request_sent=True))

    def _feed_head_only(self, data: bytes) -> None:
        # httptools cannot be told that a response answers HEAD (llhttp's "skip body" return
        # from on_headers_complete is not exposed), so it would read the Content-Length the
        # response announces as body. Feed it exactly up to the end of each head instead: with
        # strict llhttp a head ends at its first CRLFCRLF. The parser is then replaced, and any
        # byte after the final head makes the connection unusable.
        tail = self._crlf_tail
        idx = (tail + data).find(_CRLF2) if tail else data.find(_CRLF2)
        while idx >= 0:
            cut = idx + 4 - len(tail)
            piece, data = data[:cut], data[cut:]
            if not self._feed(piece):
                return
            if self._phase != _AWAIT_HEAD:  # the final head is complete
                self._parser = HttpResponseParser(self)
                self._crlf_tail = b""
                if data:
                    self._reusable = False
                if self._on_ready is not None:
                    self._ready()
                return
            tail = b""
            idx = data.find(_CRLF2)
        if data and not self._feed(data):
            return
        self._crlf_tail = (tail + data)[-3:]
        self._check_head_size()

    def _keep_head_part(self, data: bytes) -> None:
        """A head in more than one read (rare): its parts are joined once it is complete."""
        more = self._head_more
        if more is None:
            self._head_more = [data]
        else:
            more.append(data)

    def _check_head_size(self) -> None:
        if self._head_bytes > MAX_RESPONSE_HEAD:
            self._fail(
                UpstreamProtocolError(
                    f"response head larger than {MAX_RESPONSE_HEAD} bytes", request_sent=True
                )
            )

    # -- exchange state -----------------------------------------------------------------------

    def _complete(self) -> None:
        self._phase = _DONE  # the timer, if armed, finds nothing to do when it fires
        _wake(self._body_waiter)

    def _fail(self, exc: UpstreamError) -> None:
        if self._exc is None:
            self._exc = exc
        self._reusable = False
        if self._writing:
            self._write_failed = True
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        if self._transport is not None and not self._lost:
            self._transport.abort()
        _wake(self._head_waiter)
        _wake(self._body_waiter)
        _wake(self._drain_waiter)
        task = self._sending_task
        if task is not None:
            # The request body iterable is waiting on the downstream client; the exchange is
            # already lost, so interrupt that wait (asyncio.timeout does the same).
            self._sending_task = None
            self._cancel_pending = True
            task.cancel()
        if self._on_ready is not None:
            self._ready()

    def _ready(self) -> None:
        on_ready = self._on_ready
        if on_ready is not None:
            self._on_ready = None
            on_ready()

    def _on_timer(self) -> None:
        self._timer = None
        phase = self._phase
        if phase == _AWAIT_HEAD:
            if self._loop.time() + 0.001 < self._deadline:  # armed for an earlier request
                self._arm(self._deadline)
                return
            self._fail(
                UpstreamTimeout(
                    f"no response head within {self._timeout:g}s",
                    request_sent=self._request_sent,
                )
            )
        elif phase == _BODY:
            # One handle per request: rather than re-arming on every chunk, the timer checks
            # how long the consumer has been waiting when it fires and re-arms itself.
            now = self._loop.time()
            if self._body_waiter is not None or self._drain_waiter is not None:
                expires = self._wait_since + self._timeout
                if now + 0.001 >= expires:
                    self._fail(
                        UpstreamTimeout(
                            f"body stream idle for {self._timeout:g}s", request_sent=True
                        )
                    )
                    return
            else:  # the consumer is busy elsewhere: that is not the upstream's idleness
                expires = now + self._timeout
            self._arm(expires)

    def _arm(self, when: float) -> None:
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _take_body(self) -> bytes | None:
        chunks = self._chunks
        if not chunks:
            return None
        if len(chunks) == 1:
            data = chunks.popleft()
        else:
            data = b"".join(chunks)
            chunks.clear()
        self._buffered = 0
        if self._read_paused:
            self._read_paused = False
            if self._transport is not None and not self._lost:
                self._transport.resume_reading()
        return data

    async def _wait_body(self) -> None:
        waiter = self._body_waiter = self._loop.create_future()
        self._wait_since = self._loop.time()
        try:
            await waiter
        finally:
            self._body_waiter = None

    async def _drain(self) -> None:
        waiter = self._drain_waiter = self._loop.create_future()
        self._wait_since = self._loop.time()
        try:
            await waiter
        finally:
            self._drain_waiter = None

    # -- used by HostPool ---------------------------------------------------------------------

    def usable(self) -> bool:
        # A method, not a property: compiled, a property is read by name (ADR 18).
        return not self._lost and self._transport is not None and not self._transport.is_closing()

    @property
    def retry_is_safe_for_any_method(self) -> bool:
        """The request died while being written: the upstream cannot have processed it."""
        return self._write_failed

    @property
    def response_started(self) -> bool:
        return self._response_started

    @property
    def body_started(self) -> bool:
        return self._body_started

    def close(self) -> None:
        transport = self._transport
        if transport is not None and not self._lost:
            transport.close()

    async def send(
        self,
        head: bytes,
        body: bytes | AsyncIterable[bytes] | None,
        *,
        is_head: bool,
        chunked: bool,
        content_length: int | None,
        deadline: float,
        idle_timeout: float,
    ) -> UpstreamResponse:
        """Send one request and return once its response head is complete."""
        self._begin(is_head, deadline, idle_timeout)
        transport = self._transport
        assert transport is not None
        try:
            if body is None or isinstance(body, bytes):
                self._write_request(transport, head, body)
            else:
                await self._send_streamed(transport, head, body, chunked, content_length)
            if self._phase == _AWAIT_HEAD and self._exc is None:
                waiter = self._head_waiter = self._loop.create_future()
                try:
                    await waiter
                finally:
                    self._head_waiter = None
            response = self._response
            if response is not None:
                return response  # even if the connection broke later: the body read will say so
            if self._exc is not None:
                raise self._exc
            raise UpstreamProtocolError(
                "connection lost before the response", request_sent=self._request_sent
            )
        except BaseException:
            self._abandon()
            raise

    def start(
        self,
        head: bytes,
        body: bytes | None,
        *,
        is_head: bool,
        deadline: float,
        idle_timeout: float,
        on_ready: Callable[[], None],
    ) -> None:
        """``send`` without a coroutine, for a body of bytes or none (ADR 14): the request is
        written now, and ``on_ready`` is called once, from this connection's own callbacks
        (never from inside the parser), when the response head is complete (``response``)
        or the exchange failed (``error``)."""
        self._begin(is_head, deadline, idle_timeout)
        self._on_ready = on_ready
        # Written with the other writes of this round of callbacks (gateway/outbox.py).
        self._held = (head, body)
        self._outbox.hold(self)

    def flush_held(self) -> None:
        held, self._held = self._held, None
        transport = self._transport
        if held is None or transport is None or self._lost or self._exc is not None:
            return  # abandoned, failed or closed meanwhile: nothing of it was sent
        if self._phase != _AWAIT_HEAD:
            return  # abandoned, failed or closed meanwhile: nothing of it was sent
        self._write_request(transport, *held)

    @property
    def response(self) -> UpstreamResponse | None:
        """The response of the exchange in progress, once its head is complete."""
        return self._response

    @property
    def error(self) -> UpstreamError:
        """Why the exchange in progress failed (once it has no response)."""
        if self._exc is not None:
            return self._exc
        return UpstreamProtocolError(
            "connection lost before the response", request_sent=self._request_sent
        )

    @property
    def complete(self) -> bool:
        """The whole response has been read (it may be taken without waiting)."""
        return self._phase == _DONE

    def abandon(self) -> None:
        """Give up the exchange in progress (the client left): the connection is closed."""
        self._on_ready = None
        self._abandon()

    def _write_request(self, transport: asyncio.Transport, head: bytes, body: bytes | None) -> None:
        if not body:
            transport.write(head)
        elif len(body) <= _COALESCE_BODY:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)
        # A write that fails at once (EPIPE, ECONNRESET) closes the transport before
        # returning: then no byte of the request was accepted.
        if transport.is_closing():
            self._write_failed = True
        else:
            self._request_sent = True

    async def _send_streamed(
        self,
        transport: asyncio.Transport,
        head: bytes,
        body: AsyncIterable[bytes],
        chunked: bool,
        content_length: int | None,
    ) -> None:
        transport.write(head)
        if transport.is_closing():
            self._write_failed = True
            return
        self._request_sent = True
        self._body_started = True
        await self._pump_body(transport, body.__aiter__(), chunked, content_length, 0, inline=True)

    async def _pump_body(
        self,
        transport: asyncio.Transport,
        iterator: AsyncIterator[bytes],
        chunked: bool,
        content_length: int | None,
        total: int,
        *,
        inline: bool,
    ) -> None:
        """Write the request body chunk by chunk, honouring write flow control.

        Inline (in the caller's task) it hands the rest of the body to a task of its own when
        the response head arrives first, and the caller gets the response: the upstream may
        answer before reading everything (413, 401) or stream both ways at once, and waiting
        for the upload to finish would then deadlock against our own read backpressure.
        """
        task = cast("asyncio.Task[object] | None", asyncio.current_task())
        assert task is not None
        cancelling = task.cancelling()
        self._writing = True
        handed_off = False
        try:
            while True:
                if inline and self._phase != _AWAIT_HEAD:
                    handed_off = True
                    self._upload = self._loop.create_task(
                        self._pump_body(
                            transport, iterator, chunked, content_length, total, inline=False
                        )
                    )
                    return
                self._sending_task = task
                try:
                    chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    self._sending_task = None
                if self._exc is not None or self._lost:
                    return
                n = len(chunk)
                if not n:
                    continue  # an empty chunk would end a chunked body early
                total += n
                if chunked:
                    transport.writelines((b"%x\r\n" % n, chunk, b"\r\n"))
                else:
                    if content_length is not None and total > content_length:
                        raise ValueError(
                            f"request body longer than content_length={content_length}"
                        )
                    transport.write(chunk)
                while self._write_paused:
                    await self._drain()
                    if self._exc is not None or self._lost:
                        return
                    if inline and self._phase != _AWAIT_HEAD:
                        break
            if chunked:
                transport.write(b"0\r\n\r\n")
            elif content_length is not None and total != content_length:
                raise ValueError(
                    f"request body ended after {total} of content_length={content_length} bytes"
                )
        except asyncio.CancelledError:
            if not inline:
                return  # the response was released or the exchange failed: stop uploading
            # Our own cancellation from _fail(): send() raises the recorded error instead.
            if self._cancel_pending and task.uncancel() <= cancelling and self._exc is not None:
                self._cancel_pending = False
                return
            raise
        except Exception as exc:  # a detached upload has nobody to raise to but the response
            if inline:
                raise
            self._fail(UpstreamProtocolError(f"request body failed: {exc!r}", request_sent=True))
        finally:
            if not handed_off:
                self._writing = False

    def _begin(self, is_head: bool, deadline: float, timeout: float) -> None:
        self._phase = _AWAIT_HEAD
        self._is_head = is_head
        self._timeout = timeout
        self._deadline = deadline
        timer = self._timer
        if timer is None:
            self._arm(deadline)
        elif self._timer_at > deadline:  # a shorter timeout than the armed one's
            timer.cancel()
            self._arm(deadline)
        self._exc = None
        self._response = None
        self._reusable = True
        self._until_eof = False
        self._request_sent = False
        self._response_started = False
        self._write_failed = False
        self._body_started = False
        self._cancel_pending = False
        self._upload = None
        self._head_bytes = 0
        self._head_data = b""
        self._head_more = None
        self._head_from = 0
        self._crlf_tail = b""

    def _stop_upload(self) -> None:
        upload = self._upload
        if upload is not None:
            self._upload = None
            upload.cancel()

    def _abandon(self) -> None:
        """The request failed or was cancelled before returning a response: drop the conn."""
        self._reusable = False
        self._phase = _IDLE
        self._response = None
        self._stop_upload()
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        if self._transport is not None and not self._lost:
            self._transport.abort()

    def _release(self) -> None:
        self._on_ready = None
        reusable = self._reusable and self._phase == _DONE and self._exc is None and self.usable()
        self._stop_upload()
        complete = self._phase == _DONE
        self._phase = _IDLE
        self._response = None
        if self._chunks:
            self._chunks.clear()
        self._buffered = 0
        if self._read_paused:
            self._read_paused = False
            if reusable and self._transport is not None:
                self._transport.resume_reading()
        transport = self._transport
        if not reusable and transport is not None and not self._lost:
            if complete and not transport.get_write_buffer_size():
                transport.close()
            else:
                transport.abort()  # unread body or unsent upload: do not wait for either
        self._owner._connection_released(self, reusable)
