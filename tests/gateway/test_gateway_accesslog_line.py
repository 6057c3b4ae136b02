"""An access-log line is exactly the compact JSON of its fields, whatever the client sent."""

from __future__ import annotations

import json

import pytest

from gateway.accesslog import request_line

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


@pytest.mark.parametrize(
    "values",
    [
        (1795240737.118, "req-1", "127.0.0.1", "GET", "/x?q=1", 200, 1.234, "svc", "r", "http://u"),
        (1795240737.1, "a" * 32, "2001:db8::1", "HEAD", "/", 404, 0.0, "-", "-", None),
        (
            1.0,
            "id",
            'evil"client\\',  # quotes and backslashes from a trusted X-Forwarded-For hop
            "PURGE",
            "/caf\u00e9/\u65e5\u672c?\x01\x1f\x7f\u2028",  # non-ASCII and control characters
            499,
            12345.678,
            "svc",
            "route-\u00fc",
            "https://up:8443/base",
        ),
    ],
)
def test_a_request_line_is_the_compact_json_of_its_fields(values: tuple[object, ...]) -> None:
    line = request_line(*values)  # type: ignore[arg-type]
    expected = json.dumps(
        dict(zip(FIELDS, values, strict=True)), separators=(",", ":"), ensure_ascii=False
    )
    assert line == expected
    assert list(json.loads(line)) == list(FIELDS)  # field order is part of the format
