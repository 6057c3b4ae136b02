"""The gateway's upstream HTTP/1.1 client: a keep-alive connection pool per upstream target.

Why not ``aiohttp.ClientSession``, the stale-connection retry rule and measurements:
docs/adr/0003-upstream-client.md. The wire protocol lives in :mod:`gateway.upstream.http1`.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterable, Callable
from typing import cast

from gateway.forwarding import breaks_field
from gateway.upstream.http1 import (
    Http1Connection,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeout,
)

__all__ = [
    "HostPool",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "encode_request_head",
]

# RFC 9110 §9.2.2. A request with one of these methods may be repeated after a stale
# keep-alive connection failed (if its body can be replayed).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Methods whose requests carry content, so an absent body is framed as "Content-Length: 0"
# (RFC 9110 §8.6: a user agent sends Content-Length when the method defines a meaning for it).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

# RFC 9110 §5.1: field-name = token; §9.1: method = token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Framing and hop-by-hop fields (RFC 9110 §7.6.1) are the pool's business, never the caller's:
# a second Content-Length or Transfer-Encoding would be a request-smuggling vector.
_POOL_OWNED = frozenset(
    {"connection", "content-length", "keep-alive", "te", "transfer-encoding", "upgrade"}
)
_PLAIN, _HOST = 0, 1
# Field names seen so far, validated once: a request then costs one dict lookup per field.
_NAME_KINDS: dict[str, int] = {}
_NAME_CACHE_MAX = 4096
_METHODS_OK: set[str] = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"}

_default_tls: ssl.SSLContext | None = None


def _default_tls_context() -> ssl.SSLContext:
    # Built once per process: loading the CA bundle reads files, so it is not done per pool.
    global _default_tls
    if _default_tls is None:
        _default_tls = ssl.create_default_context()
    return _default_tls


def _name_kind(name: str) -> int:
    if name in _NAME_KINDS:  # `in` and [] are C calls compiled; .get() a call by name
        return _NAME_KINDS[name]
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"invalid header name {name!r}")
    lower = name.lower()
    if lower in _POOL_OWNED or lower.startswith("proxy-"):
        raise ValueError(f"hop-by-hop or framing header {name!r}: the upstream pool owns it")
    kind = _HOST if lower == "host" else _PLAIN
    if len(_NAME_KINDS) < _NAME_CACHE_MAX:
        _NAME_KINDS[name] = kind
    return kind


def encode_request_head(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes | AsyncIterable[bytes] | None,
    content_length: int | None,
    raw_fields: bytes = b"",
) -> tuple[bytes, bool]:
    """The request head on the wire, plus whether the body is sent chunked.

    Raises ValueError for anything that would let a value escape its field (CR, LF, NUL),
    invalid tokens, a missing or repeated Host, and fields the pool owns. ``raw_fields`` are
    fields already in the wire's form (``name: value\\r\\n`` each) whose values were checked
    where they were made, and are not scanned again here:

    - the client's, as the front server accepted them: it refuses CR, LF and NUL in a value
      and bare LF line ends (tests/gateway/test_http_conformance.py), and
      `gateway.forwarding.forwarded_fields` passes them on as they came;
    - this hop's forwarding fields (`gateway.forwarding`'s ``_hop_block``) and a verified
      token's identity fields (`gateway.jwks.VerifiedToken`), whose values are checked with
      `gateway.forwarding.breaks_field` once when built (both are cached).
    """
    if method not in _METHODS_OK:
        if method == "CONNECT" or not _TOKEN.fullmatch(method):
            raise ValueError(f"unsupported request method {method!r}")
        if len(_METHODS_OK) < 64:  # clients choose methods: keep the cache bounded
            _METHODS_OK.add(method)
    if not target or " " in target or "\t" in target or breaks_field(target):
        raise ValueError(f"invalid request-target {target!r}")
    parts = [method, " ", target, " HTTP/1.1\r\n"]
    hosts = 0
    for name, value in headers:
        if _name_kind(name) == _HOST:  # the name is a token (ValueError if not)
            hosts += 1
        if breaks_field(value):
            raise ValueError(f"CR, LF or NUL in the value of header {name!r}")
        parts.append(f"{name}: {value}\r\n")
    if hosts != 1:
        raise ValueError(f"exactly one Host header is required, got {hosts}")
    chunked = False
    # The framing fields and the blank line, as bytes: they go after the raw fields.
    if body is None or isinstance(body, bytes):
        if body:
            framing = f"Content-Length: {len(body)}\r\n\r\n".encode("ascii")
        elif method in _BODY_METHODS:
            framing = b"Content-Length: 0\r\n\r\n"
        else:
            framing = b"\r\n"
    elif not hasattr(body, "__aiter__"):
        raise TypeError(f"body must be bytes, an async iterable of bytes or None, not {body!r}")
    elif content_length is not None:
        if content_length < 0:
            raise ValueError(f"negative content_length {content_length}")
        framing = f"Content-Length: {content_length}\r\n\r\n".encode("ascii")
    else:
        framing = b"Transfer-Encoding: chunked\r\n\r\n"
        chunked = True
    # Their values were checked where they were made (see the docstring): scanning ~1 KB
    # again here was ~5 % of a request's instructions (docs/perf.md).
    if raw_fields and raw_fields[-2:] != b"\r\n":  # not endswith(): ~600 to parse its argument
        raise ValueError("raw fields must be whole lines")
    # Latin-1 mirrors how fields are decoded on both sides (the proxy reads the client's raw
    # headers as latin-1, responses come back latin-1 decoded): a client's bytes go out
    # unchanged. Text only the gateway wrote (a citizen's name in an identity header) may hold
    # characters above U+00FF; those fields go out as UTF-8 instead of failing the request.
    try:
        head = "".join(parts).encode("latin-1")
    except UnicodeEncodeError:
        head = b"".join([_encode_part(part) for part in parts])  # a list: no closure (ADR 19)
    # One join: the raw fields used to go in by slicing the head and adding three pieces,
    # two copies of it (~2,400 instructions with a token in the raw fields).
    return b"".join([head, raw_fields, framing]), chunked


def _encode_part(part: str) -> bytes:
    try:
        return part.encode("latin-1")
    except UnicodeEncodeError:
        return part.encode("utf-8")


class HostPool:
    """Keep-alive connections to one upstream target (scheme, host, port).

    Idle connections are reused last-in first-out (the most recently used is the least likely
    to have been closed by the upstream), expire after ``idle_ttl`` and are dropped when the
    upstream closes them. There is no cap on concurrent connections: the caller limits
    concurrency (circuit breaker, least-request balancing on ``in_flight``).
    """

    __slots__ = (
        "_closed",
        "_connect_timeout",
        "_idle",
        "_idle_ttl",
        "_loop",
        "_max_idle",
        "_server_hostname",
        "_ssl",
        "_sweep",
        "host",
        "in_flight",
        "port",
        "scheme",
    )

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        *,
        connect_timeout: float = 1.0,
        max_idle: int = 128,
        idle_ttl: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported upstream scheme {scheme!r}")
        self.scheme = scheme
        self.host = host
        self.port = port
        self.in_flight = 0  # requests holding a connection of this pool, body included
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle
        self._idle_ttl = idle_ttl
        self._ssl: ssl.SSLContext | None = None
        self._server_hostname: str | None = None
        if scheme == "https":
            self._ssl = ssl_context or _default_tls_context()
            self._server_hostname = host
        self._idle: list[Http1Connection] = []  # a stack: oldest at index 0
        self._sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<HostPool {self.scheme}://{self.host}:{self.port} "
            f"in_flight={self.in_flight} idle={len(self._idle)}>"
        )

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None = None,
        *,
        timeout: float,  # noqa: ASYNC109 (one loop.call_at handle per request, see send())
        content_length: int | None = None,
        raw_fields: bytes = b"",
        fresh: bool = False,
    ) -> UpstreamResponse:
        """Send a request; return when the response head is complete.

        The caller must call ``release()`` on the response (in ``finally``). ``timeout`` bounds
        the time from the first byte sent until the response head is complete, and each wait
        for more body. A request on a reused connection that fails before any response byte is
        retried once on a new connection when that is safe (see the ADR). ``fresh``: on a new
        connection straight away (an inline exchange's stale-connection redo, ADR 14).
        """
        head, chunked = encode_request_head(
            method, target, headers, body, content_length, raw_fields
        )
        if self._closed:
            raise UpstreamConnectError(f"{self!r} is closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        is_head = method == "HEAD"
        self.in_flight += 1
        try:
            deadline = 0.0
            conn = None if fresh else self._take_idle(loop)
            if conn is not None:
                deadline = loop.time() + timeout
                try:
                    return await conn.send(
                        head,
                        body,
                        is_head=is_head,
                        chunked=chunked,
                        content_length=content_length,
                        deadline=deadline,
                        idle_timeout=timeout,
                    )
                except UpstreamError as exc:
                    if not _stale_retry_is_safe(conn, method, body, exc):
                        raise
            conn = await self._connect(loop)
            if not deadline:
                deadline = loop.time() + timeout
            return await conn.send(
                head,
                body,
                is_head=is_head,
                chunked=chunked,
                content_length=content_length,
                deadline=deadline,
                idle_timeout=timeout,
            )
        except BaseException:
            self.in_flight -= 1
            raise

    # -- inline exchanges (ADR 14): the same steps as request(), driven by callbacks ----------

    def take_idle_now(self) -> Http1Connection | None:
        """An idle keep-alive connection ready for `start_inline`, or None (none, or closed)."""
        if self._closed or not self._idle or self._loop is None:
            return None
        return self._take_idle(self._loop)

    def start_inline(
        self,
        conn: Http1Connection,
        head: bytes,
        body: bytes | None,
        *,
        is_head: bool,
        timeout: float,
        on_ready: Callable[[], None],
    ) -> None:
        """Send a request encoded by `encode_request_head` on ``conn`` (from `take_idle_now`);
        ``on_ready`` follows as `Http1Connection.start` says. The exchange ends with the
        response's ``release()``, or `inline_failed` / `inline_abandoned`."""
        assert self._loop is not None
        self.in_flight += 1
        conn.start(
            head,
            body,
            is_head=is_head,
            deadline=self._loop.time() + timeout,
            idle_timeout=timeout,
            on_ready=on_ready,
        )

    def inline_failed(
        self, conn: Http1Connection, method: str, body: bytes | None, exc: UpstreamError
    ) -> bool:
        """An inline exchange failed: the connection is dropped. Returns whether the request
        may be sent again on a new connection (the stale-connection rule of `request`)."""
        redo = _stale_retry_is_safe(conn, method, body, exc)
        self.inline_abandoned(conn)
        return redo

    def inline_abandoned(self, conn: Http1Connection) -> None:
        """The client left during an inline exchange: its connection is closed."""
        conn.abandon()
        self.in_flight -= 1

    async def close(self) -> None:
        """Close idle connections now; connections in use close when released."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.in_pool = False
            conn.close()

    # -- connections --------------------------------------------------------------------------

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> Http1Connection:
        conn = Http1Connection(self, loop)
        target = f"{self.scheme}://{self.host}:{self.port}"
        try:
            # Once per new connection, not per request: asyncio.timeout is fine here.
            async with asyncio.timeout(self._connect_timeout):
                await loop.create_connection(
                    lambda: cast(asyncio.Protocol, conn),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self._server_hostname,
                )
        except TimeoutError:
            raise UpstreamConnectError(
                f"connect to {target} timed out after {self._connect_timeout:g}s"
            ) from None
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
            raise UpstreamConnectError(f"connect to {target} failed: {exc}") from exc
        return conn

    def _take_idle(self, loop: asyncio.AbstractEventLoop) -> Http1Connection | None:
        idle = self._idle
        while idle:
            conn: Http1Connection = idle.pop()  # typed: struct reads, C calls (ADR 17)
            conn.in_pool = False
            if loop.time() - conn.idle_since >= self._idle_ttl:
                # The newest idle connection has expired, so have all the older ones.
                conn.close()
                for old in idle:
                    old.in_pool = False
                    old.close()
                idle.clear()
                return None
            if conn.usable():
                conn.reused = True
                return conn
            conn.close()
        return None

    def _connection_released(self, conn: Http1Connection, reusable: bool) -> None:
        self.in_flight -= 1
        if not reusable:
            return  # the connection has closed itself
        if self._closed or len(self._idle) >= self._max_idle or self._loop is None:
            conn.close()
            return
        conn.idle_since = self._loop.time()
        conn.in_pool = True
        self._idle.append(conn)
        if self._sweep is None:
            self._sweep = self._loop.call_at(conn.idle_since + self._idle_ttl, self._expire_idle)

    def _idle_connection_lost(self, conn: Http1Connection) -> None:
        conn.in_pool = False
        if conn in self._idle:
            self._idle.remove(conn)

    def _expire_idle(self) -> None:
        # One timer per pool (not per connection), re-armed for the oldest idle connection.
        self._sweep = None
        if self._loop is None:
            return
        idle = self._idle
        cutoff = self._loop.time() - self._idle_ttl + 0.001
        expired = 0
        while expired < len(idle) and idle[expired].idle_since <= cutoff:
            expired += 1
        for conn in idle[:expired]:
            conn.in_pool = False
            conn.close()
        del idle[:expired]
        if idle:
            self._sweep = self._loop.call_at(idle[0].idle_since + self._idle_ttl, self._expire_idle)


def _stale_retry_is_safe(
    conn: Http1Connection,
    method: str,
    body: bytes | AsyncIterable[bytes] | None,
    exc: UpstreamError,
) -> bool:
    """The rule for retrying after a reused keep-alive connection failed (ADR 0003).

    The upstream may close an idle connection just as we send on it; then the request fails
    before any response byte. Retrying is safe when the request can be repeated (idempotent
    method, RFC 9110 §9.2.2) or when it provably was not processed (it failed while being
    written), and its body can be sent again (bytes, or an iterable not yet touched).
    """
    if not conn.reused or conn.response_started or isinstance(exc, UpstreamTimeout):
        return False
    if conn.body_started:
        return False  # a partly consumed iterable cannot be replayed
    return method in IDEMPOTENT_METHODS or conn.retry_is_safe_for_any_method
