"""Request-path normalization: what routing matches is exactly what the upstream receives.

A path is routed and forwarded in its normalized form, so `/bus/../admin`, `//admin` or
`/bus/%2e%2e/admin` can never match `/bus/` and then reach `/admin` behind the upstream's own
normalization (the classic proxy/backend path confusion). Ambiguous encodings that no
normalization makes safe are refused outright.
"""

from __future__ import annotations

import re

from cityplane.problem import Problem

# RFC 3986 §2.3: percent-encoded unreserved characters are equivalent to the characters
# themselves and should be decoded by URI normalizers (§6.2.2.2).
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Encoded '/', '\' and NUL change how a backend splits or terminates the path: refuse them
# (Envoy's path_with_escaped_slashes_action=REJECT_REQUEST).
_FORBIDDEN_ESCAPES = frozenset({"2F", "5C", "00"})
# Controls, space, backslash and '#' never belong in a request-target path (RFC 9112 §3.2).
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f\\#]")
# Tomcat-style path parameters on dot segments ('..;/') are dot segments to some backends.
_DOT_PARAM = re.compile(r"(^|/)\.\.?;")


def _bad(detail: str) -> Problem:
    return Problem(400, "bad-path", detail, title="Bad request path")


def _decode_unreserved(match: re.Match[str]) -> str:
    hexpair = match.group(1).upper()
    if hexpair in _FORBIDDEN_ESCAPES:
        raise _bad(f"encoded character %{hexpair} is not allowed in a path")
    code = int(hexpair, 16)
    return chr(code) if code in _UNRESERVED else "%" + hexpair


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, on an absolute path whose slashes are already merged."""
    out: list[str] = []
    segments = path.split("/")
    for seg in segments[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    result = "/" + "/".join(out)
    # A trailing '.' or '..' denotes a directory: keep the trailing slash (§5.2.4 step 2C/2D).
    if segments[-1] in (".", "..") and not result.endswith("/"):
        result += "/"
    return result


def normalize_path(raw: str) -> str:
    """Normalize the path part of a request-target, or raise a 400 ``Problem``.

    The common case (printable, no '%', no '//', no dot segment) returns the input unchanged
    after a handful of substring checks; the rest pays for the full treatment.
    """
    # A slice and ==, not startswith(): a method with an argument parses it the old way.
    if raw[:1] != "/":
        raise _bad("the request path must start with '/'")
    # isprintable() excludes every control character: three substring checks then cover the
    # rest of _BAD_CHARS, at half a regex search's cost. A path it is unsure of (a control, or
    # a non-printable character outside ASCII that the regex allows) goes to the regex.
    if not (
        raw.isprintable() and " " not in raw and "\\" not in raw and "#" not in raw
    ) and _BAD_CHARS.search(raw):
        raise _bad("the request path contains a forbidden character")
    if "%" not in raw and "//" not in raw and "/." not in raw:
        return raw
    path = raw
    if "%" in path:
        if _BAD_PCT.search(path):
            raise _bad("malformed percent-encoding in the request path")
        path = _PCT.sub(_decode_unreserved, path)
        # Decoding may have produced characters only now visible ('%2e' -> '.').
    if _DOT_PARAM.search(path):
        raise _bad("path parameters on dot segments are not allowed")
    while "//" in path:
        path = path.replace("//", "/")
    if "/." in path:
        path = remove_dot_segments(path)
    return path


def split_target(raw_target: str) -> tuple[str, str]:
    """Split a request-target into (path, query-with-'?'), the query kept byte for byte."""
    qpos = raw_target.find("?")
    if qpos < 0:
        return raw_target, ""
    return raw_target[:qpos], raw_target[qpos:]
