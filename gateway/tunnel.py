"""WebSocket through the gateway as a byte tunnel, the way nginx and Envoy carry upgrades.

After the route's policies have passed, the gateway opens a fresh connection to one upstream
target, sends the upgrade request (its cleaned, forwarded head), and reads the answer. A
``101`` is relayed to the client and from then on bytes flow both ways unchanged, with flow
control in both directions; any other answer is relayed as an ordinary response and the
client connection closes. The gateway does not parse WebSocket frames: extensions,
subprotocols and close handshakes are the two ends' business.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

import httptools

from cityplane.problem import Problem
from gateway.forwarding import UPSTREAM_RESPONSE_DROP
from gateway.h1server import encode_fields
from gateway.upstream.client import encode_request_head

if TYPE_CHECKING:
    from gateway.h1server import ClientConnection, IncomingRequest
    from gateway.upstream.target import TargetState

log = logging.getLogger("cityplane.gateway")

# An upstream's refusal of an upgrade is relayed if its body is at most this large.
MAX_REFUSAL_BODY = 64 * 1024


class _UpstreamSide(asyncio.Protocol):
    """The upstream half: parses the answer's head, then relays bytes to the client."""

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        loop = client.loop
        self.head: asyncio.Future[None] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.body_size = 0
        self.rest = b""  # bytes after a 101's head: the first frames from the upstream
        self.relaying = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectionError("the upstream closed before answering"))
        if not self.finished.done():
            self.finished.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.relaying:
            self.client.write_raw(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.rest = data[upgrade.args[0] :]
            self._head_done()
        except httptools.HttpParserError as exc:
            if not self.head.done():
                self.head.set_exception(ConnectionError(f"bad upgrade answer: {exc}"))
            self.close()

    # The client's transport applies back-pressure to this socket, and the other way round.
    def pause_writing(self) -> None:
        self.client.pause_tunnel()

    def resume_writing(self) -> None:
        self.client.resume_tunnel()

    def on_status(self, reason: bytes) -> None:
        self.reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > MAX_REFUSAL_BODY:
            if not self.head.done():
                self.head.set_exception(ConnectionError("upgrade refusal body too large"))
            self.close()
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.status != 101:
            self._head_done()

    def _head_done(self) -> None:
        if not self.head.done():
            self.head.set_result(None)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


async def tunnel(
    request: IncomingRequest,
    *,
    target: TargetState,
    base: str,
    host: str,
    path: str,
    headers: list[tuple[str, str]],
    raw_fields: bytes,
    response_headers: list[tuple[str, str]],
    response_block: bytes = b"",
    timeout: float,  # noqa: ASYNC109 - the upstream's request timeout, for connect + answer
) -> int:
    """Carry an upgrade request to ``target`` and, on 101, relay bytes until either side closes.

    Returns the status relayed to the client. Raises ``Problem`` 502/504 when the upstream
    cannot be reached or answers something that is not HTTP.
    """
    client = request.conn
    loop = client.loop
    upstream_head, _chunked = encode_request_head(
        request.method, base + path, [("Host", host), *headers], None, None, raw_fields
    )
    # The pool never sends Connection or Upgrade; an upgrade request must (RFC 9110 §7.8).
    upgrade = (request.upgrade or "websocket").encode("latin-1")
    upstream_head = upstream_head[:-2] + b"Connection: Upgrade\r\nUpgrade: " + upgrade + b"\r\n\r\n"
    side: _UpstreamSide | None = None
    try:
        async with asyncio.timeout(timeout):
            _transport, side = await loop.create_connection(
                lambda: _UpstreamSide(client),
                target.host,
                target.port,
                ssl=True if target.scheme == "https" else None,
            )
            side.transport.write(upstream_head)  # type: ignore[union-attr]
            await side.head
    except TimeoutError:
        if side is not None:
            side.close()
        raise Problem(504, "upstream-timeout", "the upgrade was not answered in time") from None
    except (OSError, ConnectionError) as exc:
        if side is not None:
            side.close()
        log.info("upgrade to %s failed: %s", target.url, exc)
        raise Problem(502, "upstream-unavailable", "the upstream refused the upgrade") from None
    extra = encode_fields(response_headers) + response_block
    if side.status != 101:
        # Refused by the upstream (403, 426, ...): relayed as it is, then the connection closes.
        fields = [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in side.headers
            if n.lower() not in UPSTREAM_RESPONSE_DROP
        ]
        side.close()
        client.respond(
            request,
            side.status,
            encode_fields(fields) + extra,
            b"".join(side.body),
            reason=side.reason or None,
            close=True,
        )
        return side.status
    fields = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in side.headers]
    head = b"HTTP/1.1 101 Switching Protocols\r\n" + encode_fields(fields) + extra + b"\r\n"
    client.write_raw(head + side.rest)
    side.relaying = True
    upstream = side.transport
    assert upstream is not None
    pending = client.take_tunnel(upstream.write)
    if pending:
        upstream.write(pending)
    client.tunnel_peer = upstream
    client.on_lost = side.close
    try:
        await side.finished
    finally:
        side.close()
        client.close_after_write()
    return 101
