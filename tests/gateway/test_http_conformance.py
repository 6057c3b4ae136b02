"""HTTP/1.1 conformance and safety of the gateway's client side, judged over raw sockets.

Issue #6: smuggling, pipelining, chunked bodies, `Expect: 100-continue`, upgrades, limits and
clients that go away all get the same black-box suite, whichever server implementation sits
behind the port. Each test writes exact bytes to a real gateway and looks at three things: the
answer (status, problem+json `type` and `status` when the gateway answers itself), whether the
connection is closed afterwards, and the exact bytes the upstream received (a raw recording
upstream, tests/gateway/raw_http.py, so a smuggled request shows up as an extra request).
Slow clients are in test_slow_clients.py.

Where the RFCs allow more than one behaviour, the test accepts each of them and checks the
property that matters (the connection never loses its framing; nothing is forwarded that
should not be). The exceptions are repairs a recipient MAY make instead of refusing (obs-fold,
bare LF, CR or NUL in a field value): a proxy in front of parsers it does not know refuses,
and the tests ask for the 400.
"""

from __future__ import annotations

import asyncio
import gzip
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.connections import GatewayLimits
from tests.conftest import service
from tests.gateway.raw_http import (
    WS_BINARY,
    WS_CLOSE,
    WS_TEXT,
    Canned,
    RawClient,
    RawResponse,
    RecordedRequest,
    RecordingUpstream,
    read_ws_frame,
    request,
    request_closing,
    ws_frame,
    ws_key,
)

# Every test here runs on both request drivers (ADR 14): inline and on the connection's task.
GATEWAY_DRIVERS = ("inline", "task")

# Small limits so that every limit is reached with a few KB.
SMALL = GatewayLimits(max_body=1024, max_line_size=1024, max_field_size=1024, max_headers=20)
NEXT = b"GET /svc/next HTTP/1.1\r\nHost: city.example\r\n\r\n"


@dataclass
class Front:
    """A gateway routing /svc/ (prefix stripped) to one recording upstream."""

    port: int
    up: RecordingUpstream


@pytest.fixture
async def recording() -> AsyncIterator[Callable[[], Awaitable[RecordingUpstream]]]:
    started: list[RecordingUpstream] = []

    async def make() -> RecordingUpstream:
        up = RecordingUpstream()
        await up.start()
        started.append(up)
        return up

    yield make
    for up in started:
        await up.stop()


def svc(up: RecordingUpstream) -> dict[str, Any]:
    route = {"name": "svc", "match": {"pathPrefix": "/svc/"}, "stripPrefix": True}
    # No retries: every request the upstream records was sent exactly once.
    return service("svc", [up.url], [route], upstream={"retries": {"attempts": 0}})


async def start_front(recording: Any, gateway_factory: Any, limits: GatewayLimits) -> Front:
    up = await recording()
    # A short drain: a connection a broken server leaves hanging must not stall the teardown.
    gw = await gateway_factory([svc(up)], limits=limits, drain_timeout=0.5)
    return Front(gw.gateway.port, up)


@pytest.fixture
async def front(recording: Any, gateway_factory: Any) -> Front:
    return await start_front(recording, gateway_factory, SMALL)


def says_close(resp: RawResponse) -> bool:
    tokens = (resp.header("Connection") or "").lower().split(",")
    return "close" in (t.strip() for t in tokens)


def assert_refused(resp: RawResponse, closed: bool, status: int, slug: str) -> None:
    """The gateway answered by itself with problem+json and closed the connection."""
    assert resp.status == status, resp.raw[:300]
    assert resp.problem_type() == slug, resp.body
    assert closed, "the connection must be closed after this answer"
    if resp.version == "HTTP/1.1":
        # RFC 9112 §9.6: a server that closes after this response says so in it.
        assert says_close(resp), resp.raw[:300]


async def follow_up(client: RawClient) -> RawResponse | None:
    """A GET on the same connection: its answer, or None when the gateway closed it."""
    client.send(NEXT)
    try:
        return await client.response()
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


async def assert_in_step_or_closed(client: RawClient) -> None:
    """Either the connection is closed or it still knows where the next request begins."""
    answer = await follow_up(client)
    if answer is not None:
        assert (answer.status, answer.body) == (200, b"/next"), answer.raw[:300]


def head(method: str, target: str, *fields: str, version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {target} {version}", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- 1. request smuggling and malformed messages ----------------------------------------------

POST = b"POST /svc/a HTTP/1.1\r\nHost: city.example\r\n"


@pytest.mark.parametrize(
    "data",
    [
        # RFC 9112 §6.3 item 3: both headers "ought to be handled as an error".
        pytest.param(
            POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="content-length-and-transfer-encoding",
        ),
        # §6.3 item 5: an invalid Content-Length is an unrecoverable error: 400 and close.
        pytest.param(
            POST + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", id="two-content-lengths"
        ),
        pytest.param(POST + b"Content-Length: +3\r\n\r\nabc", id="content-length-plus"),
        pytest.param(POST + b"Content-Length: -1\r\n\r\nabc", id="content-length-negative"),
        pytest.param(POST + b"Content-Length: 3 3\r\n\r\nabc", id="content-length-3-3"),
        pytest.param(POST + b"Content-Length: abc\r\n\r\nabc", id="content-length-non-digits"),
        pytest.param(POST + b"Content-Length: 0x3\r\n\r\nabc", id="content-length-hex"),
        # §6.3 item 4: chunked is not the final coding, so the length cannot be determined.
        pytest.param(
            POST + b"Transfer-Encoding: xchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            id="transfer-encoding-xchunked",
        ),
        pytest.param(
            POST + b"Transfer-Encoding: chunked, identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            id="transfer-encoding-chunked-identity",
        ),
        pytest.param(
            POST + b"Transfer-Encoding: identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            id="transfer-encoding-identity",
        ),
    ],
)
async def test_ambiguous_request_framing_gets_400_and_close_and_nothing_is_forwarded(
    front: Front, data: bytes
) -> None:
    resp, closed = await request_closing(front.port, data)
    assert_refused(resp, closed, 400, "bad-request")
    assert front.up.received == b""


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(b"zz", id="non-hex"),
        pytest.param(b"-1", id="negative"),
        pytest.param(b"ffffffffffffffffffff", id="overflow"),
    ],
)
async def test_invalid_chunk_size_gets_400_and_close(front: Front, size: bytes) -> None:
    data = POST + b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\nabc\r\n0\r\n\r\n"
    resp, closed = await request_closing(front.port, data)
    assert_refused(resp, closed, 400, "bad-request")
    # A streaming proxy may have sent the head on already; never a whole request.
    assert front.up.requests == []


@pytest.mark.parametrize(
    "fields",
    [
        # RFC 9112 §5.2: obs-fold is rejected with 400 (or unfolded; we ask for the rejection).
        pytest.param(b"X-A: one\r\n two\r\n", id="obs-fold"),
        # §5.1: whitespace between a field name and the colon MUST be rejected with 400.
        pytest.param(b"X-A : one\r\n", id="space-before-colon"),
        pytest.param(b"Transfer-Encoding : chunked\r\n", id="space-before-colon-in-te"),
        # RFC 9110 §5.5: CR, LF and NUL in a field value are rejected (or replaced by SP).
        pytest.param(b"X-A: a\x00b\r\n", id="nul-in-value"),
        pytest.param(b"X-A: a\rb\r\n", id="cr-in-value"),
        # RFC 9112 §2.2 lets a recipient accept a bare LF; a proxy in front of unknown
        # parsers refuses it (the classic LF-vs-CRLF desynchronisation).
        pytest.param(b"X-A: a\nX-B: b\r\n", id="bare-lf-in-fields"),
    ],
)
async def test_malformed_field_line_gets_400_and_close(front: Front, fields: bytes) -> None:
    data = b"GET /svc/a HTTP/1.1\r\nHost: city.example\r\n" + fields + b"\r\n"
    resp, closed = await request_closing(front.port, data)
    assert_refused(resp, closed, 400, "bad-request")
    assert front.up.received == b""


async def test_request_with_bare_lf_line_endings_gets_400_and_close(front: Front) -> None:
    resp, closed = await request_closing(front.port, b"GET /svc/a HTTP/1.1\nHost: city.example\n\n")
    assert_refused(resp, closed, 400, "bad-request")
    assert front.up.received == b""


HIDDEN = b"GET /svc/smuggled HTTP/1.1\r\nHost: city.example\r\n\r\n"


@pytest.mark.parametrize(
    "data",
    [
        # CL.TE: a front end that believes Content-Length forwards the hidden request as body;
        # a back end that believes chunked sees it as the next request.
        pytest.param(
            POST
            + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            % (5 + len(HIDDEN))
            + HIDDEN,
            id="cl-te",
        ),
        # TE.CL: the other way round.
        pytest.param(
            POST
            + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(HIDDEN)
            + HIDDEN
            + b"\r\n0\r\n\r\n",
            id="te-cl",
        ),
        # TE.TE: one Transfer-Encoding a parser may ignore next to one it obeys.
        pytest.param(
            POST
            + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: cow\r\n\r\n"
            + b"%x\r\n" % len(HIDDEN)
            + HIDDEN
            + b"\r\n0\r\n\r\n",
            id="te-te",
        ),
        pytest.param(
            POST
            + b"Content-Length: 4\r\nTransfer-Encoding : chunked\r\n\r\n%x\r\n" % len(HIDDEN)
            + HIDDEN
            + b"\r\n0\r\n\r\n",
            id="te-space-before-colon",
        ),
        pytest.param(
            POST + b"Content-Length: 0\r\nContent-Length: %d\r\n\r\n" % len(HIDDEN) + HIDDEN,
            id="cl-cl",
        ),
    ],
)
async def test_hidden_request_in_a_smuggling_payload_never_reaches_the_upstream(
    front: Front, data: bytes
) -> None:
    resp, closed = await request_closing(front.port, data)
    assert_refused(resp, closed, 400, "bad-request")
    assert b"smuggled" not in front.up.received
    assert front.up.requests == []


async def test_transfer_encoding_in_http_1_0_is_never_forwarded_with_another_framing(
    front: Front,
) -> None:
    # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing; the server closes
    # the connection after processing the message (or refuses it).
    data = b"POST /svc/a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" + NEXT
    async with await RawClient.open(front.port) as client:
        resp = await client.exchange(data)
        closed = await client.closed()
    assert closed
    if resp.status == 400:
        assert resp.problem_type() == "bad-request"
        assert front.up.requests == []
    else:
        assert resp.status == 200
        assert [(r.target, r.body) for r in front.up.requests] == [("/a", b"abc")]


async def test_transfer_coding_the_gateway_does_not_apply_is_not_silently_dropped(
    front: Front,
) -> None:
    # RFC 9112 §6.1: a server that receives a transfer coding it does not understand SHOULD
    # answer 501. It may also decode it, or forward it still applied; what it must not do is
    # drop the coding from the framing and hand the upstream gzip bytes as the content.
    payload = gzip.compress(b"hello")
    data = (
        POST
        + b"Transfer-Encoding: gzip, chunked\r\n\r\n%x\r\n" % len(payload)
        + payload
        + b"\r\n0\r\n\r\n"
    )
    resp = await request(front.port, data)
    if resp.status in (400, 501):
        assert front.up.requests == []
        return
    assert resp.status == 200
    (seen,) = front.up.requests
    gzip_kept = "gzip" in (seen.header("Transfer-Encoding") or "").lower()
    assert seen.body == b"hello" or gzip_kept, seen.raw


# -- 2. pipelining ----------------------------------------------------------------------------


async def test_three_pipelined_requests_are_answered_in_order_on_one_connection(
    front: Front,
) -> None:
    async with await RawClient.open(front.port) as client:
        client.send(b"".join(head("GET", f"/svc/{n}", "Host: city.example") for n in (1, 2, 3)))
        bodies = [(await client.response()).body for _ in range(3)]
        assert bodies == [b"/1", b"/2", b"/3"]
        assert (await client.exchange(NEXT)).body == b"/next"  # still open, still in step
    assert front.up.targets == ["/1", "/2", "/3", "/next"]


async def test_request_pipelined_after_connection_close_is_not_processed(front: Front) -> None:
    async with await RawClient.open(front.port) as client:
        client.send(
            head("GET", "/svc/1", "Host: city.example", "Connection: close")
            + head("GET", "/svc/2", "Host: city.example")
        )
        resp = await client.response()
        assert (resp.status, resp.body) == (200, b"/1")
        assert says_close(resp)
        assert await client.closed()
    await asyncio.sleep(0.1)  # a request wrongly processed would reach the upstream now
    assert front.up.targets == ["/1"]


async def test_pipelined_requests_with_bodies_keep_their_boundaries(front: Front) -> None:
    async with await RawClient.open(front.port) as client:
        client.send(
            POST
            + b"Content-Length: 5\r\n\r\nhello"
            + b"POST /svc/2 HTTP/1.1\r\nHost: city.example\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"3\r\nabc\r\n0\r\n\r\n"
            + head("GET", "/svc/3", "Host: city.example")
        )
        answers = [await client.response() for _ in range(3)]
    assert [(a.status, a.body) for a in answers] == [(200, b"/a"), (200, b"/2"), (200, b"/3")]
    assert [(r.target, r.body) for r in front.up.requests] == [
        ("/a", b"hello"),
        ("/2", b"abc"),
        ("/3", b""),
    ]


# -- 3. chunked request bodies and the body limit ------------------------------------------------


async def test_chunked_body_with_extensions_and_trailers_reaches_the_upstream_intact(
    front: Front,
) -> None:
    data = (
        POST
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"5;name=value\r\nhello\r\n"
        + b'1;quoted="a b"\r\n \r\n'
        + b"5\r\nworld\r\n"
        + b"0\r\nX-Checksum: 42\r\n\r\n"
    )
    async with await RawClient.open(front.port) as client:
        resp = await client.exchange(data)
        assert resp.status == 200
        assert (await client.exchange(NEXT)).body == b"/next"
    (seen, _) = front.up.requests
    assert seen.body == b"hello world"  # any valid framing, the same content


async def test_chunked_body_over_max_body_gets_413_and_is_never_forwarded_whole(
    front: Front,
) -> None:
    body = b"a" * 2048  # max_body is 1024
    data = POST + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    async with await RawClient.open(front.port) as client:
        resp = await client.exchange(data)
        assert resp.status == 413
        assert resp.problem_type() == "body-too-large"
        await assert_in_step_or_closed(client)
    assert "/a" not in front.up.targets


async def test_content_length_over_max_body_gets_413_before_the_body_is_sent(
    front: Front,
) -> None:
    async with await RawClient.open(front.port) as client:
        resp = await client.exchange(POST + b"Content-Length: 5000\r\n\r\n")
        assert resp.status == 413
        assert resp.problem_type() == "body-too-large"
        # Whether the gateway closes or reads the announced body and throws it away, the body
        # is never taken for requests.
        body = HIDDEN + b"x" * (5000 - len(HIDDEN))
        client.send(body)
        await assert_in_step_or_closed(client)
    assert b"smuggled" not in front.up.received
    assert front.up.targets in ([], ["/next"])


# -- 4. streamed and bodiless responses ----------------------------------------------------------


async def test_chunked_upstream_response_reaches_the_client_whole_and_framed(
    front: Front,
) -> None:
    front.up.answers["/chunked"] = Canned(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    async with await RawClient.open(front.port) as client:
        resp = await client.exchange(head("GET", "/svc/chunked", "Host: city.example"))
        assert (resp.status, resp.body) == (200, b"hello world")
        assert (await client.exchange(NEXT)).body == b"/next"


async def test_close_delimited_upstream_response_reaches_the_client_whole(front: Front) -> None:
    front.up.answers["/eof"] = Canned(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the upstream closes", close=True
    )
    async with await RawClient.open(front.port) as client:
        resp = await client.exchange(head("GET", "/svc/eof", "Host: city.example"))
        assert (resp.status, resp.body) == (200, b"until the upstream closes")
        if resp.header("Content-Length") or resp.header("Transfer-Encoding"):
            assert (await client.exchange(NEXT)).body == b"/next"  # re-framed: reusable
        else:
            assert await client.closed()  # close-delimited to the client as well


async def test_head_gets_the_upstreams_content_length_and_no_body(front: Front) -> None:
    async with await RawClient.open(front.port) as client:
        resp = await client.exchange(head("HEAD", "/svc/abc", "Host: city.example"), "HEAD")
        assert resp.status == 200
        assert resp.header("Content-Length") == "4"  # len(b"/abc"), as the upstream said
        # A body byte after the HEAD answer would corrupt the next response.
        assert (await client.exchange(NEXT)).body == b"/next"
    assert [r.method for r in front.up.requests] == ["HEAD", "GET"]


@pytest.mark.parametrize(
    ("path", "answer"),
    [
        ("/204", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("/304", b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 10\r\n\r\n'),
    ],
)
async def test_204_and_304_carry_no_body(front: Front, path: str, answer: bytes) -> None:
    front.up.answers[path] = Canned(answer)
    async with await RawClient.open(front.port) as client:
        resp = await client.exchange(head("GET", "/svc" + path, "Host: city.example"))
        assert resp.status == int(path[1:])
        # RFC 9112 §6.1 / RFC 9110 §8.6: no Transfer-Encoding in either; no Content-Length in
        # a 204; a 304's Content-Length, if any, is the one the upstream gave.
        assert resp.header("Transfer-Encoding") is None
        assert resp.header("Content-Length") in ((None,) if path == "/204" else (None, "10"))
        assert (await client.exchange(NEXT)).body == b"/next"


# -- 5. Expect: 100-continue (RFC 9110 §10.1.1) -------------------------------------------------


async def test_expect_100_continue_gets_100_then_the_final_answer_after_the_body(
    front: Front,
) -> None:
    async with await RawClient.open(front.port) as client:
        interim = await client.exchange(POST + b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert (interim.version, interim.status) == ("HTTP/1.1", 100)
        resp = await client.exchange(b"hello")
        assert (resp.status, resp.body) == (200, b"/a")
    assert [(r.target, r.body) for r in front.up.requests] == [("/a", b"hello")]


@pytest.mark.parametrize(
    ("target", "length", "status", "slug"),
    [
        ("/nowhere", 5, 404, "no-route"),
        ("/svc/a", 5000, 413, "body-too-large"),
    ],
)
async def test_expect_100_continue_refused_by_its_head_gets_the_final_answer_without_100(
    front: Front, target: str, length: int, status: int, slug: str
) -> None:
    data = head(
        "POST", target, "Host: city.example", f"Content-Length: {length}", "Expect: 100-continue"
    )
    async with await RawClient.open(front.port) as client:
        resp = await client.exchange(data)
        assert resp.status == status  # the first answer is final: no 100 before it
        assert resp.problem_type() == slug
        # ... and none after it either: the connection closes or stays silent.
        try:
            late = await asyncio.wait_for(client.reader.read(1), 0.5)
        except (TimeoutError, ConnectionError):
            late = b""
        assert late == b"", late
    assert front.up.received == b""


async def test_unknown_expectation_gets_417_or_is_served_without_100(front: Front) -> None:
    # RFC 9110 §10.1.1: a server MAY answer 417 to an expectation other than 100-continue.
    async with await RawClient.open(front.port) as client:
        resp = await client.exchange(POST + b"Content-Length: 3\r\nExpect: foo\r\n\r\nabc")
    if resp.status == 417:
        assert resp.problem()["status"] == 417
        assert front.up.requests == []
    else:
        assert (resp.status, resp.body) == (200, b"/a")
        assert [r.body for r in front.up.requests] == [b"abc"]


async def test_expect_100_continue_in_http_1_0_is_ignored(front: Front) -> None:
    # RFC 9110 §10.1.1: a server MUST ignore a 100-continue expectation in an HTTP/1.0
    # request; §15.2: a server MUST NOT send a 1xx response to an HTTP/1.0 client.
    async with await RawClient.open(front.port) as client:
        client.send(b"POST /svc/a HTTP/1.0\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        await asyncio.sleep(0.2)  # room for a wrong 100 to arrive before the body is sent
        client.send(b"hello")
        resp = await client.response()
    assert resp.status == 200, resp.raw[:100]
    assert [r.body for r in front.up.requests] == [b"hello"]


# -- 6. persistence (RFC 9112 §9.3) and protocol versions ---------------------------------------


async def test_http_1_1_connection_is_persistent_by_default(front: Front) -> None:
    async with await RawClient.open(front.port) as client:
        first = await client.exchange(head("GET", "/svc/1", "Host: city.example"))
        second = await client.exchange(head("GET", "/svc/2", "Host: city.example"))
    assert [(first.status, first.body), (second.status, second.body)] == [
        (200, b"/1"),
        (200, b"/2"),
    ]
    assert not says_close(first)
    assert front.up.targets == ["/1", "/2"]


async def test_connection_close_is_announced_and_the_socket_closed(front: Front) -> None:
    data = head("GET", "/svc/a", "Host: city.example", "Connection: close")
    resp, closed = await request_closing(front.port, data)
    assert resp.status == 200
    assert says_close(resp)
    assert closed


async def test_http_1_0_without_keep_alive_is_closed_after_the_response(front: Front) -> None:
    resp, closed = await request_closing(front.port, head("GET", "/svc/a", version="HTTP/1.0"))
    assert (resp.status, resp.body) == (200, b"/a")
    assert "keep-alive" not in (resp.header("Connection") or "").lower()
    assert closed


async def test_http_1_0_with_keep_alive_stays_open_and_says_so(front: Front) -> None:
    async with await RawClient.open(front.port) as client:
        for n in (1, 2):
            data = head("GET", f"/svc/{n}", "Connection: keep-alive", version="HTTP/1.0")
            resp = await client.exchange(data)
            assert (resp.status, resp.body) == (200, f"/{n}".encode())
            # RFC 9112 §9.3 / Appendix C.2.2: persistence with an HTTP/1.0 client is explicit.
            assert "keep-alive" in (resp.header("Connection") or "").lower()


@pytest.mark.parametrize("split", [False, True], ids=["one-packet", "split-request-line"])
async def test_each_pipelined_request_is_read_with_its_own_version(
    front: Front, split: bool
) -> None:
    # The front server reads " HTTP/1.1" off the request line that begins a packet instead of
    # asking llhttp (h1server's data_received): the requests after it in the same packet, or a
    # request line split over packets, must still get their own version. Served as HTTP/1.1,
    # the HTTP/1.0 request below would be a 400 (no Host) and the connection would stay open.
    first, second = head("GET", "/svc/1", "Host: x"), head("GET", "/svc/2", version="HTTP/1.0")
    async with await RawClient.open(front.port) as client:
        if split:
            client.send(first + second[:20])  # "GET /svc/2 HTTP/1.0" without its CRLF
            await asyncio.sleep(0.05)
            client.send(second[20:])
        else:
            client.send(first + second)
        one, two = await client.response(), await client.response()
        assert (one.status, one.body, two.status, two.body) == (200, b"/1", 200, b"/2")
        assert await client.closed()  # HTTP/1.0 without keep-alive


async def test_each_request_on_a_connection_is_forwarded_with_its_own_host(front: Front) -> None:
    # The front server keeps the text of a connection's last Host field (h1server's on_header):
    # a request naming another host, or an empty one, must not get the one before it.
    for hosts in (["a.example", "b.example", "a.example", "", "a.example"], ["", "a.example"]):
        async with await RawClient.open(front.port) as client:
            for n, host in enumerate(hosts):
                resp = await client.exchange(head("GET", f"/svc/{n}", f"Host: {host}"))
                assert resp.status == 200
    assert [r.header("X-Forwarded-Host") for r in front.up.requests] == [
        *("a.example", "b.example", "a.example", "-", "a.example"),
        *("-", "a.example"),
    ]


async def test_http_2_0_request_line_gets_505_or_400_and_is_not_forwarded(front: Front) -> None:
    # RFC 9110 §6.2: 505 refuses a major version, and a response never claims a version the
    # server does not conform to ("HTTP/2.0 200" in HTTP/1 framing is neither protocol).
    resp, closed = await request_closing(
        front.port, head("GET", "/svc/a", "Host: x", version="HTTP/2.0")
    )
    assert resp.version in ("HTTP/1.1", "HTTP/1.0")
    assert resp.status in (400, 505)
    assert resp.problem()["status"] == resp.status
    assert closed
    assert front.up.received == b""


async def test_http_1_2_request_line_is_served_as_http_1_1_or_refused(front: Front) -> None:
    # RFC 9110 §6.2: a higher minor version SHOULD be processed as the highest one the server
    # implements (HTTP/1.1); refusing it (400/505) is a deviation, but never answered as 1.2.
    async with await RawClient.open(front.port) as client:
        resp = await client.exchange(head("GET", "/svc/a", "Host: x", version="HTTP/1.2"))
        assert resp.version in ("HTTP/1.1", "HTTP/1.0")
        if resp.status == 200:
            assert front.up.targets == ["/a"]
            return
        assert resp.status in (400, 505)
        assert resp.problem()["status"] == resp.status
        assert await client.closed()
    assert front.up.received == b""


# -- 7. request line and header section -----------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        # RFC 9112 §3.2: 400 for an HTTP/1.1 request without Host, or with two.
        pytest.param((), id="no-host"),
        pytest.param(("Host: city.example", "Host: other.example"), id="two-hosts"),
        pytest.param(("Host: city.example", "hOST: other.example"), id="two-hosts-other-case"),
    ],
)
async def test_missing_or_repeated_host_gets_400_and_close(
    front: Front, fields: tuple[str, ...]
) -> None:
    resp, closed = await request_closing(front.port, head("GET", "/svc/a", *fields))
    assert_refused(resp, closed, 400, "bad-request")
    assert front.up.received == b""


async def test_request_fields_are_read_whatever_the_case_of_their_names(front: Front) -> None:
    # RFC 9110 §5.1: field names are case-insensitive. The usual spellings (Host,
    # Content-Length) are found without lower-casing; any other spelling must mean the same.
    async with await RawClient.open(front.port) as client:
        client.send(
            b"POST /svc/a HTTP/1.1\r\nhOsT: city.example\r\ncontent-LENGTH: 5\r\n"
            + b"x-REQUEST-id: case-1\r\n\r\nhello"
            + b"POST /svc/2 HTTP/1.1\r\nHOST: city.example\r\ntransfer-ENCODING: chunked\r\n"
            + b"\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        answers = [await client.response() for _ in range(2)]
    assert [(a.status, a.body) for a in answers] == [(200, b"/a"), (200, b"/2")]
    assert answers[0].header("X-Request-Id") == "case-1"
    assert [(r.target, r.body) for r in front.up.requests] == [("/a", b"hello"), ("/2", b"abc")]


async def test_upstream_framing_fields_are_read_whatever_the_case_of_their_names(
    front: Front,
) -> None:
    front.up.answers["/length"] = Canned(
        b"HTTP/1.1 200 OK\r\ncontent-LENGTH: 5\r\nCONNECTION: close\r\n\r\nhello"
    )  # the upstream keeps the socket open: only the field says not to reuse it
    front.up.answers["/chunks"] = Canned(
        b"HTTP/1.1 200 OK\r\ntransfer-ENCODING: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    async with await RawClient.open(front.port) as client:
        for path in ("/svc/length", "/svc/chunks", "/svc/length"):
            resp = await client.exchange(head("GET", path, "Host: city.example"))
            assert (resp.status, resp.body) == (200, b"hello"), path
    # "CONNECTION: close" was honoured: /chunks came on a new connection, which the second
    # /length then reused (it was kept).
    assert front.up.connections == 2


async def test_http_1_0_request_without_host_is_served(front: Front) -> None:
    resp = await request(front.port, head("GET", "/svc/a", version="HTTP/1.0"))
    assert (resp.status, resp.body) == (200, b"/a")


async def test_absolute_form_target_is_routed_by_its_path(front: Front) -> None:
    # RFC 9112 §3.2.2: a server MUST accept the absolute form; the upstream gets origin form.
    data = head("GET", "http://city.example/svc/a?q=1", "Host: city.example")
    async with await RawClient.open(front.port) as client:
        resp = await client.exchange(data)
    assert (resp.status, resp.body) == (200, b"/a?q=1")
    assert front.up.targets == ["/a?q=1"]


@pytest.mark.parametrize(
    ("data", "status", "slug"),
    [
        # SMALL limits: 1024 per line and per field, 20 fields.
        pytest.param(
            head("GET", "/svc/" + "a" * 2000, "Host: x"), 414, "uri-too-long", id="long-target"
        ),
        pytest.param(
            head("GET", "/svc/a", "Host: x", "X-Big: " + "a" * 2000),
            431,
            "headers-too-large",
            id="long-field-value",
        ),
        pytest.param(
            head("GET", "/svc/a", "Host: x", "X-" + "a" * 2000 + ": 1"),
            431,
            "headers-too-large",
            id="long-field-name",
        ),
        pytest.param(
            head("GET", "/svc/a", "Host: x", *(f"X-{n}: {n}" for n in range(30))),
            431,
            "headers-too-large",
            id="too-many-fields",
        ),
    ],
)
async def test_request_head_over_a_limit_is_refused_and_closed(
    front: Front, data: bytes, status: int, slug: str
) -> None:
    resp, closed = await request_closing(front.port, data)
    assert_refused(resp, closed, status, slug)
    assert front.up.received == b""


async def test_70_kb_head_in_many_small_fields_gets_431(
    recording: Any, gateway_factory: Any
) -> None:
    # Default limits: 80 fields (under 100) of 900 bytes (under 8190) each, 72 KB in all.
    # Each field passes its own limit; the head as a whole must not (nginx: 4 x 8 KB).
    front = await start_front(recording, gateway_factory, GatewayLimits())
    fields = (f"X-Filler-{n}: {'v' * 900}" for n in range(80))
    resp, closed = await request_closing(front.port, head("GET", "/svc/a", "Host: x", *fields))
    assert_refused(resp, closed, 431, "headers-too-large")
    assert front.up.received == b""


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"HELLO THERE\r\n\r\n", id="words"),
        pytest.param(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", id="tls-hello"),
        pytest.param(b"GET /svc/a HTTP/1.1 extra\r\nHost: x\r\n\r\n", id="four-parts"),
        pytest.param(b"GET /svc/a HTTX/1.1\r\nHost: x\r\n\r\n", id="bad-protocol-name"),
    ],
)
async def test_garbage_request_line_gets_400_and_close(front: Front, data: bytes) -> None:
    resp, closed = await request_closing(front.port, data)
    assert_refused(resp, closed, 400, "bad-request")
    assert front.up.received == b""


# -- 8. upgrades ----------------------------------------------------------------------------------


def websocket_head(*extra: str) -> bytes:
    return head(
        "GET",
        "/svc/ws",
        "Host: city.example",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Key: {ws_key()}",
        *extra,
    )


@pytest.fixture
def ws_front(front: Front) -> Front:
    front.up.answers["/ws"] = front.up.echo_websocket
    return front


async def test_websocket_relays_text_and_binary_and_closes_cleanly(ws_front: Front) -> None:
    blob = bytes(range(256)) * 300  # 76,800 bytes: a 64-bit length on the wire
    async with await RawClient.open(ws_front.port) as client:
        resp = await client.exchange(websocket_head())
        assert resp.status == 101
        assert (resp.header("Upgrade") or "").lower() == "websocket"
        client.send(ws_frame(WS_TEXT, "grüß dich".encode()))
        assert await read_ws_frame(client.reader) == (WS_TEXT, "grüß dich".encode())
        client.send(ws_frame(WS_BINARY, blob))
        assert await read_ws_frame(client.reader) == (WS_BINARY, blob)
        client.send(ws_frame(WS_CLOSE, struct.pack("!H", 1000)))
        opcode, payload = await read_ws_frame(client.reader)
        assert opcode == WS_CLOSE
        assert payload[:2] == struct.pack("!H", 1000)
        assert await client.closed()
    assert [op for op, _ in ws_front.up.messages] == [WS_TEXT, WS_BINARY, WS_CLOSE]
    assert ws_front.up.messages[1][1] == blob


async def test_bytes_sent_with_the_upgrade_head_reach_the_upstream(ws_front: Front) -> None:
    async with await RawClient.open(ws_front.port) as client:
        resp = await client.exchange(websocket_head() + ws_frame(WS_TEXT, b"early"))
        assert resp.status == 101
        assert await read_ws_frame(client.reader) == (WS_TEXT, b"early")
    assert ws_front.up.messages[:1] == [(WS_TEXT, b"early")]


async def test_h2c_upgrade_is_answered_as_plain_http_1_1(front: Front) -> None:
    data = head(
        "GET",
        "/svc/a",
        "Host: city.example",
        "Connection: Upgrade, HTTP2-Settings",
        "Upgrade: h2c",
        "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
    )
    async with await RawClient.open(front.port) as client:
        resp = await client.exchange(data)
    assert (resp.version, resp.status, resp.body) == ("HTTP/1.1", 200, b"/a")
    assert resp.header("Upgrade") is None
    (seen,) = front.up.requests
    # RFC 9110 §7.6.1: Upgrade and the fields Connection names are hop-by-hop.
    assert seen.header("Upgrade") is None
    assert seen.header("HTTP2-Settings") is None


async def test_connect_gets_4xx_and_is_never_tunnelled(front: Front) -> None:
    # Aimed at the upstream's own port: a tunnel would carry these bytes straight to it.
    authority = f"127.0.0.1:{front.up.port}"
    data = head("CONNECT", authority, f"Host: {authority}") + b"\x16\x03\x01tunnelled bytes"
    async with await RawClient.open(front.port) as client:
        resp = await client.exchange(data)
        assert 400 <= resp.status < 500
        assert resp.problem()["status"] == resp.status
        await asyncio.sleep(0.2)  # room for a tunnel, were there one, to carry the bytes
    assert front.up.received == b""
    assert front.up.connections == 0


# -- 9. path tricks on the wire (gateway/paths.py has the unit tests) -----------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/svc/../admin",
        "/svc/%2e%2e/admin",
        "/svc/.%2E/admin",
        "/svc/..%2Fadmin",
        "/svc/%2e%2e%2fadmin",
        "/svc/..%5Cadmin",
        "/svc/..;/admin",
        "//admin",
    ],
)
async def test_path_escaping_its_prefix_never_reaches_the_upstream(
    front: Front, target: str
) -> None:
    resp = await request(front.port, head("GET", target, "Host: city.example"))
    assert resp.status in (400, 404), resp.raw[:200]
    assert resp.problem()["status"] == resp.status
    assert front.up.received == b""


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("/svc/a/./b/../c", "/a/c"),
        ("/svc//a", "/a"),
        ("/svc/%61", "/a"),
        ("//svc/a", "/a"),
    ],
)
async def test_routed_path_is_normalized_before_it_reaches_the_upstream(
    front: Front, target: str, forwarded: str
) -> None:
    resp = await request(front.port, head("GET", target, "Host: city.example"))
    assert resp.status == 200
    assert front.up.targets == [forwarded]


async def test_encoded_slash_is_refused_or_forwarded_still_encoded(front: Front) -> None:
    resp = await request(front.port, head("GET", "/svc/a%2Fb", "Host: city.example"))
    if resp.status == 400:
        assert front.up.received == b""
    else:
        assert resp.status == 200
        assert front.up.targets == ["/a%2Fb"]


# -- 10. clients that go away ---------------------------------------------------------------------


async def test_client_leaving_mid_response_does_not_disturb_other_connections(
    front: Front,
) -> None:
    async def endless(_req: RecordedRequest, _reader: Any, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        for _ in range(1000):
            writer.write(b"x" * 65536)
            await writer.drain()
            await asyncio.sleep(0.01)

    front.up.answers["/endless"] = endless
    async with await RawClient.open(front.port) as client:
        client.send(head("GET", "/svc/endless", "Host: city.example"))
        await asyncio.wait_for(client.reader.readexactly(100_000), 2)
        client.writer.transport.abort()  # RST mid-body
    resp = await request(front.port, NEXT)
    assert (resp.status, resp.body) == (200, b"/next")


@pytest.mark.parametrize(
    "length",
    [
        pytest.param(1000, id="body-read-whole"),
        pytest.param(200_000, id="body-streamed"),
    ],
)
async def test_client_leaving_mid_request_body_does_not_disturb_other_connections(
    recording: Any, gateway_factory: Any, length: int
) -> None:
    front = await start_front(recording, gateway_factory, GatewayLimits())
    async with await RawClient.open(front.port) as client:
        client.send(
            head("POST", "/svc/upload", "Host: city.example", f"Content-Length: {length}")
            + b"x" * (length // 2)
        )
        await asyncio.sleep(0.1)
        client.writer.transport.abort()
    resp = await request(front.port, NEXT)
    assert (resp.status, resp.body) == (200, b"/next")
    assert "/upload" not in front.up.targets  # never forwarded as a complete request
