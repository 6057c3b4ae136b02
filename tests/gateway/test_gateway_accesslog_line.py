"""An access-log line is the compact JSON of its fields, whatever the client sent."""

from __future__ import annotations

import io
import json

import pytest

from gateway.accesslog import AccessLog, request_line
from gateway.server import _REQUEST_ID

FIELDS = (
    "ts",
    "request_id",
    "client",
    "method",
    "path",
    "status",
    "duration_ms",
    "service",
    "route",
    "upstream",
)
STRINGS = ("request_id", "client", "method", "path", "service", "route", "upstream")

CASES = [
    (1795240737118, "req-1", "127.0.0.1", "GET", "/x?q=1", 200, 1234, "svc", "r", "http://u"),
    (1795240737100, "a" * 32, "2001:db8::1", "HEAD", "/", 404, 0, "-", "-", None),
    (
        1000,
        "id",
        'evil"client\\',  # quotes and backslashes from a trusted X-Forwarded-For hop
        "PURGE",
        "/caf\u00e9/\u65e5\u672c?\x01\x1f\x7f\u2028",  # non-ASCII and control characters
        499,
        12345678,
        "svc",
        "route-\u00fc",
        "https://up:8443/base",
    ),
    (999, "id", "::1", 'M"\\', "/", 200, 7, 'svc"\\', "r\n", 'http://"u"'),
]


def expected_line(values: tuple[object, ...]) -> str:
    fields = dict(zip(FIELDS, values, strict=True))
    ts, duration = fields["ts"], fields["duration_ms"]
    assert isinstance(ts, int) and isinstance(duration, int)
    encoded = {
        name: json.dumps(value, ensure_ascii=False) if name in STRINGS else str(value)
        for name, value in fields.items()
    }
    encoded["ts"] = f"{ts // 1000}.{ts % 1000:03d}"
    encoded["duration_ms"] = f"{duration // 1000}.{duration % 1000:03d}"
    return "{" + ",".join(f'"{name}":{encoded[name]}' for name in FIELDS) + "}"


@pytest.mark.parametrize("values", CASES)
def test_a_request_line_is_the_compact_json_of_its_fields(values: tuple[object, ...]) -> None:
    line = request_line(*values)  # type: ignore[arg-type]
    assert line == expected_line(values)
    parsed = json.loads(line)
    assert list(parsed) == list(FIELDS)  # field order is part of the format
    assert parsed["ts"] == pytest.approx(values[0] / 1000, abs=1e-9)  # type: ignore[operator]
    assert parsed["duration_ms"] == pytest.approx(values[6] / 1000, abs=1e-9)  # type: ignore[operator]
    assert {k: parsed[k] for k in STRINGS} == {
        k: v for k, v in zip(FIELDS, values, strict=True) if k in STRINGS
    }


def test_every_request_id_the_gateway_accepts_is_its_own_json_text() -> None:
    # The line writes the request id between quotes without json's encoder: that holds only
    # while the request path's pattern admits no character JSON would escape.
    admitted = [chr(c) for c in range(0x110000) if _REQUEST_ID.fullmatch(chr(c))]
    assert len(admitted) == 66  # A-Z a-z 0-9 . _ : -
    assert all(json.dumps(c, ensure_ascii=False) == f'"{c}"' for c in admitted)
    assert not _REQUEST_ID.fullmatch('a"b') and not _REQUEST_ID.fullmatch("a\\b")


def test_timestamps_and_durations_keep_three_decimals() -> None:
    line = json.loads(request_line(1795240737005, "i", "c", "GET", "/", 200, 40, "s", "r", None))
    assert line["ts"] == 1795240737.005
    assert line["duration_ms"] == 0.04
    text = request_line(1795240737000, "i", "c", "GET", "/", 200, 0, "s", "r", None)
    assert '"ts":1795240737.000,' in text
    assert '"duration_ms":0.000,' in text


async def test_the_log_writes_the_same_lines_when_the_route_tail_is_reused() -> None:
    sink = io.StringIO()
    log = AccessLog(sink)
    for values in CASES + CASES:
        log.record_request(*values)  # type: ignore[arg-type]
    log.flush()
    assert sink.getvalue().split("\n") == [*(expected_line(v) for v in CASES + CASES), ""]
