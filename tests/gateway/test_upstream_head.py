"""The upstream response head read from the bytes llhttp accepted (ADR 21), against llhttp itself.

`Http1Connection` installs no `on_status` and no `on_header`: it takes the reason phrase, the
field lines and the framing fields (Content-Length, Transfer-Encoding, Connection) from the head's
bytes once llhttp has accepted them. These tests feed the same bytes to an `HttpResponseParser`
with those callbacks and require the same answer: the same fields, reason, framing and keep-alive
decision when llhttp accepts the head, and a failed exchange when it refuses it. Heads are split
at every byte, preceded by 1xx interim heads, and answer HEAD requests. The relay side
(`relay_fields`) is checked against the per-field filter it replaced.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import httptools
import pytest

from gateway.forwarding import UPSTREAM_RESPONSE_DROP
from gateway.upstream import heads
from gateway.upstream.heads import drop_table
from gateway.upstream.http1 import Http1Connection, UpstreamResponse

REQUEST = b"GET / HTTP/1.1\r\nHost: up\r\n\r\n"


class _Reference:
    """llhttp's own view of the last message of a response stream."""

    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.complete_heads = 0

    def on_message_begin(self) -> None:
        self.fields = []
        self.reason = b""

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete_heads += 1


def reference(data: bytes) -> tuple[int, str, list[tuple[bytes, bytes]], str] | None:
    """(status, reason, fields, version) of the final head, or None when llhttp refuses it."""
    ref = _Reference()
    parser = httptools.HttpResponseParser(ref)
    head_end = _final_head_end(data)
    try:
        parser.feed_data(data[:head_end])
    except httptools.HttpParserError:
        return None
    if not ref.complete_heads:
        return None
    return (
        parser.get_status_code(),
        ref.reason.decode("latin-1"),
        ref.fields,
        parser.get_http_version(),
    )


def _final_head(data: bytes) -> tuple[int, int]:
    """Where the first non-1xx head starts and where its CRLFCRLF is (each head ends at its
    first CRLFCRLF); -1 for the end when it has none."""
    at = 0
    while True:
        end = data.find(b"\r\n\r\n", at)
        if end < 0 or data[at + 9 : at + 10] != b"1":
            return at, end
        at = end + 4


def _final_head_end(data: bytes) -> int:
    end = _final_head(data)[1]
    return len(data) if end < 0 else end + 4


def framing(fields: list[tuple[bytes, bytes]], version: str, is_head: bool, status: int) -> tuple:
    """What the per-field callbacks decided before ADR 21 (the oracle)."""
    content_length = None
    chunked = False
    tokens = b""
    for name, value in fields:
        lname = name.lower()
        if lname == b"content-length":
            content_length = int(value)
        elif lname == b"transfer-encoding":
            chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        elif lname == b"connection":
            tokens += value.lower() + b","
    options = {t.strip() for t in tokens.split(b",")} if tokens else set()
    if version == "1.1":
        keep_alive = b"close" not in options
    else:
        keep_alive = version == "1.0" and b"keep-alive" in options and b"close" not in options
    no_body = is_head or status in (204, 304)
    if not no_body and not chunked and content_length is None:
        keep_alive = False
    return content_length, chunked, keep_alive


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Owner:
    def _connection_released(self, conn: Http1Connection, reusable: bool) -> None:
        pass

    def _idle_connection_lost(self, conn: Http1Connection) -> None:
        pass


def gateway_reads(
    loop: asyncio.AbstractEventLoop, parts: list[bytes], *, is_head: bool = False
) -> UpstreamResponse | None:
    """The response an Http1Connection makes of ``parts`` (its reads), or None if it failed."""
    conn = Http1Connection(_Owner(), loop)
    conn.connection_made(_Transport())
    conn.start(
        REQUEST,
        None,
        is_head=is_head,
        deadline=loop.time() + 60,
        idle_timeout=60,
        on_ready=lambda: None,
    )
    conn.flush_held()
    for part in parts:
        conn.data_received(part)
    return conn.response


def assert_same(
    loop: asyncio.AbstractEventLoop, data: bytes, parts: list[bytes], *, is_head: bool = False
) -> None:
    expected = reference(data)
    got = gateway_reads(loop, parts, is_head=is_head)
    if expected is None:
        assert got is None, (data, parts)
        return
    status, reason, fields, version = expected
    assert got is not None, (data, parts)
    assert (got.status, got.reason) == (status, reason), (data, parts)
    assert got.raw_headers == fields, (data, parts)
    assert (got.content_length, got.chunked, got.keep_alive) == framing(
        fields, version, is_head, status
    ), (data, parts)
    # The relayed form is the field lines as received: CRLF, then each line with its CRLF.
    start, end = _final_head(data)
    assert got.fields == data[data.find(b"\r\n", start) : end + 2], (data, parts)


NAMES = [
    b"Content-Type",
    b"Content-Length",
    b"content-length",
    b"Transfer-Encoding",
    b"Connection",
    b"CONNECTION",
    b"Keep-Alive",
    b"Date",
    b"Dates",
    b"X-Date",
    b"Server",
    b"TE",
    b"Te-X",
    b"Trailer",
    b"Upgrade",
    b"X-Request-Id",
    b"Set-Cookie",
    b"ETag",
    b"Cache-Control",
    b"X!#$%&'*+.^_`|~",
    b"X-" + b"a" * 66,  # longer names share a drop table's last slot
    b"X-" + b"a" * 62,
]
VALUES = [
    b"",
    b"x",
    b"a b",
    b"a:b",
    b"caf\xe9",
    b"\xff",
    b"gzip, chunked",
    b"chunked",
    b"chunked, gzip",
    b"xchunked",  # not the chunked coding
    b"gzip ,\tchunked",
    b"close",
    b"keep-alive",
    b"Keep-Alive, Upgrade",
    b"upgrade, close",
    b'"v1"',
    b"\x7f",  # refused
    b"a\x00b",  # refused
    b"a\rb",  # refused
]
OWS = [b"", b" ", b"\t", b"  ", b" \t"]


def random_heads(count: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(count):
        lines = []
        for _ in range(rng.randrange(0, 7)):
            name = rng.choice(NAMES)
            if name.lower() == b"content-length":
                value = rng.choice([b"0", b"3", b"12", b" 7", b"", b"+1", b"1 "])
            else:
                value = rng.choice(VALUES)
            lines.append(name + b":" + rng.choice(OWS) + value + rng.choice(OWS))
        if rng.random() < 0.05:
            lines.append(b" folded")  # obs-fold: refused
        status = rng.choice([b"200 OK", b"200", b"200 ", b"204 No Content", b"404 Not  Found"])
        version = rng.choice([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"])
        interim = rng.choice([b"", b"", b"HTTP/1.1 100 Continue\r\n\r\n"])
        yield (
            interim
            + version
            + b" "
            + status
            + b"\r\n"
            + b"".join(line + b"\r\n" for line in lines)
            + b"\r\n"
        )


FIXED = [
    b"HTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 200\r\n\r\n",
    b"HTTP/1.1 200  OK\r\nA: x \r\n\r\n",
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 22 Nov 2026 08:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n",
    b"HTTP/1.1 200 OK\r\nContent-Length:  3 \r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    b"HTTP/1.1 201 Created\r\nLocation: /x\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",  # refused
    b"HTTP/1.1 200 OK\r\nA : x\r\n\r\n",  # refused
    b"HTTP/1.1 200 OK\nA: x\r\n\r\n",  # refused
]


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_fixed_heads_in_one_read(loop: asyncio.AbstractEventLoop) -> None:
    for data in FIXED:
        assert_same(loop, data, [data])


def test_random_heads_in_one_read_and_as_head_responses(loop: asyncio.AbstractEventLoop) -> None:
    accepted = refused = 0
    for data in random_heads(1500, seed=21):
        body = b"0\r\n\r\n" if b"chunked\r\n" in data else b""
        assert_same(loop, data + body, [data + body])
        assert_same(loop, data, [data], is_head=True)
        if reference(data) is None:
            refused += 1
        else:
            accepted += 1
    assert accepted > 500 and refused > 100, (accepted, refused)  # both sides were exercised


def test_heads_split_at_every_byte(loop: asyncio.AbstractEventLoop) -> None:
    heads = FIXED + list(random_heads(40, seed=7))
    for data in heads:
        for cut in range(1, len(data)):
            assert_same(loop, data, [data[:cut], data[cut:]])
        assert_same(loop, data, [data[i : i + 1] for i in range(len(data))])


def test_a_head_over_the_limit_fails_the_exchange(loop: asyncio.AbstractEventLoop) -> None:
    big = b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n"
    assert reference(big) is not None  # llhttp itself has no limit
    assert gateway_reads(loop, [big]) is None
    assert gateway_reads(loop, [big[i : i + 4096] for i in range(0, len(big), 4096)]) is None


def test_raw_headers_keep_the_trailing_whitespace_as_llhttp_does(
    loop: asyncio.AbstractEventLoop,
) -> None:
    data = b"HTTP/1.1 200 OK\r\nA:\t x \r\nB:\r\nC: d: e\r\nContent-Length: 0\r\n\r\n"
    got = gateway_reads(loop, [data])
    assert got is not None
    assert got.raw_headers == [
        (b"A", b"x "),
        (b"B", b""),
        (b"C", b"d: e"),
        (b"Content-Length", b"0"),
    ]
    assert got.headers[0] == ("A", "x ")


def _old_relay(
    fields: list[tuple[bytes, bytes]], drop: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in fields if n.lower() not in drop]


def test_relayed_fields_are_exactly_the_lines_the_per_field_filter_kept(
    loop: asyncio.AbstractEventLoop,
) -> None:
    drops = [
        UPSTREAM_RESPONSE_DROP,
        UPSTREAM_RESPONSE_DROP | {b"ratelimit", b"ratelimit-policy", b"retry-after"},
        frozenset({b"te", b"x!#$%&'*+.^_`|~"}),
        frozenset({b"x-" + b"a" * 66, b"x-" + b"a" * 70, b"x-" + b"a" * 61}),
    ]
    checked = 0
    for data in [*FIXED, *random_heads(600, seed=3)]:
        got = gateway_reads(loop, [data + (b"0\r\n\r\n" if b"chunked\r\n" in data else b"")])
        if got is None:
            continue
        for drop in drops:
            table = drop_table(drop)
            relayed = heads._relay_by_bytes(got.fields, table)
            assert relayed == heads._relay_by_methods(got.fields, table)
            assert relayed == heads.relay_fields(got.fields, table)
            lines = [line for line in relayed.split(b"\r\n") if line]
            assert relayed == b"".join(line + b"\r\n" for line in lines)
            # Each kept line is one of the head's lines, byte for byte, in the same order.
            assert all(b"\r\n" + line + b"\r\n" in got.fields for line in lines)
            pairs = [(n, v.lstrip(b" \t")) for n, _, v in (line.partition(b":") for line in lines)]
            assert pairs == _old_relay(got.raw_headers, drop), data
            checked += 1
    assert checked > 900


def test_both_forms_of_the_scan_agree_with_llhttp() -> None:
    """The compiled form runs `_scan_by_bytes`, the sources `_scan_by_methods`: both are held
    to llhttp here, whichever form the tests run on."""
    checked = 0
    for data in [*FIXED, *random_heads(1500, seed=22)]:
        expected = reference(data)
        if expected is None:
            continue
        status, _reason, fields, version = expected
        begin = _final_head(data)[0]
        by_bytes = heads._scan_by_bytes(data, begin)
        assert by_bytes == heads._scan_by_methods(data, begin), data
        line_end, end, length, chunked, options = by_bytes
        assert data[begin + 13 : line_end].decode("latin-1") == _reason
        assert data[line_end:end] == data[data.find(b"\r\n", begin) : _final_head(data)[1] + 2]
        old_length, old_chunked, _keep = framing(fields, version, False, status)
        assert (length if length >= 0 else None, chunked) == (old_length, old_chunked), data
        tokens = {
            t.strip(b" \t").lower()
            for n, v in fields
            if n.lower() == b"connection"
            for t in v.split(b",")
        }
        assert options == (heads.CONNECTION_CLOSE if b"close" in tokens else 0) | (
            heads.CONNECTION_KEEP_ALIVE if b"keep-alive" in tokens else 0
        ), data
        checked += 1
    assert checked > 500


def test_a_long_content_length_is_read_whole() -> None:
    for digits in (b"1" * 18, b"9" * 19, b"18446744073709551615"):
        data = b"HTTP/1.1 200 OK\r\nContent-Length: " + digits + b" \r\n\r\n"
        assert heads._scan_by_bytes(data, 0)[2] == int(digits)
        assert heads._scan_by_methods(data, 0)[2] == int(digits)


def test_the_compiled_form_runs_the_byte_loops() -> None:
    compiled = heads.__spec__ is not None and not str(heads.__spec__.origin).endswith(".py")
    assert heads.COMPILED is compiled
