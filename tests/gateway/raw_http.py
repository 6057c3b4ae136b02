"""HTTP/1.1 on raw sockets for conformance tests: a client that writes exact bytes and a
recording upstream that keeps the exact bytes of every request it receives.

Both sides are deliberately dumb. The client sends what a test spells out (a smuggling payload,
a bare LF, three pipelined heads in one segment) and parses answers strictly; the upstream
parses only what a well-behaved proxy sends and keeps everything else as ``unparsed``, so a
request the gateway should never have forwarded shows up as an extra request, or as stray bytes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

READ_TIMEOUT = 2.0
CRLF = b"\r\n"
HEAD_END = b"\r\n\r\n"
# RFC 6455 §1.3: the GUID appended to Sec-WebSocket-Key for Sec-WebSocket-Accept.
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _parse_fields(lines: list[bytes]) -> list[tuple[str, str]]:
    fields = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon:
            raise ValueError(f"not a field line: {line!r}")
        fields.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    return fields


def _first(fields: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    return next((v for n, v in fields if n.lower() == name), None)


def _all(fields: list[tuple[str, str]], name: str) -> list[str]:
    name = name.lower()
    return [v for n, v in fields if n.lower() == name]


class _Reads(Protocol):
    async def readuntil(self, sep: bytes) -> bytes: ...

    async def readexactly(self, n: int) -> bytes: ...


async def _read_chunked(reader: _Reads) -> tuple[bytes, bytes]:
    """A chunked body (RFC 9112 §7.1): (the payload, the exact bytes read)."""
    raw = bytearray()
    payload = bytearray()
    while True:
        line = await reader.readuntil(CRLF)
        raw += line
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            break
        data = await reader.readexactly(size + 2)
        raw += data
        if not data.endswith(CRLF):
            raise ValueError("chunk data not followed by CRLF")
        payload += data[:-2]
    while (trailer := await reader.readuntil(CRLF)) != CRLF:
        raw += trailer
    raw += CRLF
    return bytes(payload), bytes(raw)


# -- the client side -------------------------------------------------------------------------


@dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes  # the exact bytes of the head and the body as framed on the wire

    def header(self, name: str) -> str | None:
        return _first(self.headers, name)

    def header_all(self, name: str) -> list[str]:
        return _all(self.headers, name)

    def problem(self) -> dict[str, Any]:
        """The problem+json body (RFC 9457) of an answer the gateway gave itself."""
        assert (self.header("Content-Type") or "").startswith("application/problem+json"), self
        body: dict[str, Any] = json.loads(self.body)
        assert body["status"] == self.status, body
        return body

    def problem_type(self) -> str:
        """The last segment of the problem's `type` URI (`.../problems/bad-request`)."""
        return str(self.problem()["type"]).rsplit("/", 1)[-1]


class RawClient:
    """One client connection to the gateway; every byte is the test's own."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()

    async def response(self, method: str = "GET", timeout: float = READ_TIMEOUT) -> RawResponse:
        """The next response (a 1xx interim one included), its body framed as RFC 9112 §6.3."""
        return await asyncio.wait_for(self._response(method), timeout)

    async def _response(self, method: str) -> RawResponse:
        head = await self.reader.readuntil(HEAD_END)
        lines = head[:-4].split(CRLF)
        version, _, rest = lines[0].decode("latin-1").partition(" ")
        status, _, reason = rest.partition(" ")
        headers = _parse_fields(lines[1:])
        code = int(status)
        if method == "HEAD" or code < 200 or code in (204, 304):
            return RawResponse(version, code, reason, headers, b"", head)
        te = _first(headers, "Transfer-Encoding")
        length = _first(headers, "Content-Length")
        if te is not None:
            assert te.lower() == "chunked", te
            body, raw = await _read_chunked(self.reader)
            return RawResponse(version, code, reason, headers, body, head + raw)
        if length is not None:
            body = await self.reader.readexactly(int(length))
        else:
            body = await self.reader.read()  # close-delimited (RFC 9112 §6.3 item 8)
        return RawResponse(version, code, reason, headers, body, head + body)

    async def exchange(
        self, data: bytes, method: str = "GET", timeout: float = READ_TIMEOUT
    ) -> RawResponse:
        self.send(data)
        return await self.response(method, timeout)

    async def closed(self, timeout: float = READ_TIMEOUT) -> bool:
        """True once the gateway closes the connection, False if it is still open after
        ``timeout`` seconds. Bytes arriving instead are a failure: nothing was asked for."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        assert data == b"", f"unexpected bytes after the response: {data[:200]!r}"
        return True

    async def rest(self, timeout: float = READ_TIMEOUT) -> bytes:
        """Everything the gateway sends until it closes (fails if it does not close)."""
        try:
            return await asyncio.wait_for(self.reader.read(), timeout)
        except ConnectionResetError:
            return b""


async def request(port: int, data: bytes, method: str = "GET") -> RawResponse:
    """One request on a fresh connection, and its response."""
    async with await RawClient.open(port) as client:
        return await client.exchange(data, method)


async def request_closing(port: int, data: bytes) -> tuple[RawResponse, bool]:
    """One request on a fresh connection: the response, and whether the gateway then closed
    the connection (waits ``READ_TIMEOUT`` when it does not: for answers that should close)."""
    async with await RawClient.open(port) as client:
        resp = await client.exchange(data)
        return resp, await client.closed()


# -- WebSocket frames (RFC 6455 §5.2), for a client that speaks them by hand -----------------

WS_TEXT = 0x1
WS_BINARY = 0x2
WS_CLOSE = 0x8


def ws_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def ws_frame(opcode: int, payload: bytes, *, masked: bool = True) -> bytes:
    """One final frame; a client masks (§5.3), a server does not."""
    head = bytes([0x80 | opcode])
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def read_ws_frame(
    reader: asyncio.StreamReader, timeout: float = READ_TIMEOUT
) -> tuple[int, bytes]:
    """(opcode, payload) of the next unfragmented frame from the gateway."""

    async def read() -> tuple[int, bytes]:
        b0, b1 = await reader.readexactly(2)
        assert b0 & 0x80, "fragmented frames are not expected here"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await reader.readexactly(8))
        assert not b1 & 0x80, "a server must not mask its frames (RFC 6455 §5.1)"
        return b0 & 0x0F, await reader.readexactly(n)

    return await asyncio.wait_for(read(), timeout)


# -- the upstream side -----------------------------------------------------------------------


@dataclass
class RecordedRequest:
    """One request as the upstream received it."""

    raw: bytes  # the exact bytes: head and body as framed
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes  # the payload, de-chunked (other transfer codings left applied)
    chunked: bool
    connection: int  # which upstream connection carried it (0, 1, …)

    def header(self, name: str) -> str | None:
        return _first(self.headers, name)

    def header_all(self, name: str) -> list[str]:
        return _all(self.headers, name)


@dataclass
class Canned:
    """A fixed answer. ``close``: close the connection after it (a close-delimited body)."""

    data: bytes
    close: bool = False


# A handler answers by itself; it may go on reading (through a reader that keeps recording) and
# the connection is closed when it returns.
Handler = Callable[[RecordedRequest, "_TeeReader", asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RecordingUpstream:
    """An upstream on a raw asyncio server: records every request, answers from ``answers``.

    ``answers`` maps a request path (the target without its query) to a `Canned` answer or to
    an async handler that writes its own; any other path is echoed: 200, the target as the
    body (so pipelined answers can be told apart), ``X-Body-Length`` the payload's length.
    """

    answers: dict[str, Canned | Handler] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)  # every byte, all connections
    unparsed: list[bytes] = field(default_factory=list)  # bytes that made no request
    messages: list[tuple[int, bytes]] = field(default_factory=list)  # WebSocket (opcode, data)
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def targets(self) -> list[str]:
        return [r.target for r in self.requests]

    async def start(self) -> None:
        # A 1 MiB line limit: an oversized head the gateway forwards must be recorded, not
        # refused here.
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def echo_websocket(
        self, req: RecordedRequest, reader: _TeeReader, writer: asyncio.StreamWriter
    ) -> None:
        """A WebSocket server by hand (RFC 6455 §4.2.2, §5): echoes text and binary messages as
        they came and answers a close with a close; every message received is kept in ``messages``.
        Register it as an answer: ``up.answers["/ws"] = up.echo_websocket``."""
        key = (req.header("Sec-WebSocket-Key") or "").encode()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
        )
        await writer.drain()
        while True:
            b0, b1 = await reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await reader.readexactly(8))
            key4 = await reader.readexactly(4) if b1 & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ key4[i % 4] for i, b in enumerate(await reader.readexactly(n)))
            opcode = b0 & 0x0F
            self.messages.append((opcode, data))
            writer.write(ws_frame(opcode, data, masked=False))
            await writer.drain()
            if opcode == WS_CLOSE:
                return

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        number = self.connections
        self.connections += 1
        tee = _TeeReader(reader, self.received)
        try:
            while True:
                try:
                    req = await self._read_request(tee, number)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                    self.unparsed.append(bytes(tee.pending))
                    return
                if req is None:
                    return
                self.requests.append(req)
                if not await self._answer(req, tee, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return  # the gateway closed its connection (mid-answer, or a tunnel ended)
        except asyncio.CancelledError:
            # stop(): ending normally keeps asyncio's stream callback from logging the
            # cancellation as an error.
            return
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _read_request(self, r: _TeeReader, number: int) -> RecordedRequest | None:
        r.pending.clear()
        try:
            head = await r.readuntil(HEAD_END)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            return None  # closed between requests
        lines = head[:-4].split(CRLF)
        method, target, version = lines[0].decode("latin-1").split(" ")
        headers = _parse_fields(lines[1:])
        te = _first(headers, "Transfer-Encoding")
        length = _first(headers, "Content-Length")
        if te is not None:
            # Codings before the final chunked (RFC 9112 §6.1) stay in the recorded body.
            if te.rsplit(",", 1)[-1].strip().lower() != "chunked" or length is not None:
                raise ValueError(f"framing a proxy must not send: {te!r}, {length!r}")
            body, _ = await _read_chunked(r)
        else:
            body = await r.readexactly(int(length)) if length is not None else b""
        return RecordedRequest(
            bytes(r.pending), method, target, version, headers, body, te is not None, number
        )

    async def _answer(
        self, req: RecordedRequest, reader: _TeeReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer ``req``; False when the connection is to be closed afterwards."""
        answer = self.answers.get(req.target.split("?", 1)[0])
        if answer is None:
            body = req.target.encode("latin-1")
            head = (
                f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                f"X-Body-Length: {len(req.body)}\r\n\r\n"
            ).encode()
            writer.write(head if req.method == "HEAD" else head + body)
            await writer.drain()
            return True
        if isinstance(answer, Canned):
            writer.write(answer.data)
            await writer.drain()
            return not answer.close
        await answer(req, reader, writer)
        return False


class _TeeReader:
    """A StreamReader whose reads also go to a shared log and to the current request's bytes."""

    def __init__(self, reader: asyncio.StreamReader, log: bytearray) -> None:
        self._reader = reader
        self._log = log
        self.pending = bytearray()

    def _keep(self, data: bytes) -> bytes:
        self._log += data
        self.pending += data
        return data

    async def readuntil(self, sep: bytes) -> bytes:
        try:
            return self._keep(await self._reader.readuntil(sep))
        except asyncio.IncompleteReadError as exc:
            self._keep(exc.partial)
            raise

    async def readexactly(self, n: int) -> bytes:
        try:
            return self._keep(await self._reader.readexactly(n))
        except asyncio.IncompleteReadError as exc:
            self._keep(exc.partial)
            raise
