"""An upstream response head read from the bytes llhttp accepted; its fields relayed in runs.

`Http1Connection` installs no `on_status` or `on_header` callback in httptools (each field line
cost ~1,000 instructions there before any code of ours ran, and as much again in ours). Once
llhttp has accepted a head, `scan_response_head` reads what the proxy needs from its bytes in
one pass: where the status line and the header section end, Content-Length, whether the last
Transfer-Encoding ends in chunked, and the Connection options that decide keep-alive.
`relay_fields` then cuts the fields the gateway does not pass on out of that section, as runs
of the bytes received. See docs/adr/0021-upstream-fields-from-the-accepted-head.md.

What strict llhttp accepts (tests/gateway/test_upstream_head.py holds it to that): every line
ends in CRLF and holds no other CR or LF; the head ends at its first empty line; a status line
is ``HTTP/d.d SP ddd`` then SP and the reason, or nothing; a field line is a token, ``:``,
optional SP/HTAB, the value, optional SP/HTAB. Content-Length is digits, at most once.

Compiled, the functions run on C types (``C_TYPES``, ADR 22): one byte read is a C array read.
The sources run the ``*_by_methods`` forms instead, which do the same with bytes methods, since
a Python loop over bytes would cost several times the callbacks it replaces.
"""

from __future__ import annotations

from gateway.ascii import COMPILED, name_is

__all__ = [
    "CONNECTION_CLOSE",
    "CONNECTION_KEEP_ALIVE",
    "drop_table",
    "relay_fields",
    "scan_response_head",
]

# The C types of the compiled form (gateway/speedups.py declares them in the module's .pxd).
C_TYPES = {
    "_scan_by_bytes": {
        "head": "bytes",
        "begin": "Py_ssize_t",
        "i": "Py_ssize_t",
        "line_end": "Py_ssize_t",
        "start": "Py_ssize_t",
        "colon": "Py_ssize_t",
        "value": "Py_ssize_t",
        "stop": "Py_ssize_t",
        "size": "Py_ssize_t",
        "chunked": "bint",
        "options": "Py_ssize_t",
    },
    "_relay_by_bytes": {
        "fields": "bytes",
        "table": "tuple",
        "names": "tuple",
        "name": "bytes",
        "n": "Py_ssize_t",
        "i": "Py_ssize_t",
        "start": "Py_ssize_t",
        "size": "Py_ssize_t",
        "run": "Py_ssize_t",
        "k": "Py_ssize_t",
        "dropped": "bint",
    },
    "_content_length": {
        "head": "bytes",
        "value": "Py_ssize_t",
        "stop": "Py_ssize_t",
        "i": "Py_ssize_t",
        "number": "Py_ssize_t",
        "c": "uchar",
    },
    "_ends_in_chunked": {
        "head": "bytes",
        "value": "Py_ssize_t",
        "stop": "Py_ssize_t",
        "i": "Py_ssize_t",
        "c": "uchar",
    },
    "_connection_options": {
        "head": "bytes",
        "value": "Py_ssize_t",
        "stop": "Py_ssize_t",
        "i": "Py_ssize_t",
        "start": "Py_ssize_t",
        "end": "Py_ssize_t",
        "found": "Py_ssize_t",
        "c": "uchar",
    },
}

CONNECTION_CLOSE = 1  # a Connection field holds the option "close"
CONNECTION_KEEP_ALIVE = 2  # ... "keep-alive"

# Longer names share the last slot of a drop table (and are compared whole).
_TABLE_SLOTS = 64


def drop_table(names: frozenset[bytes] | set[bytes]) -> tuple[tuple[bytes, ...], ...]:
    """The lower-case field names ``names`` by length, as `relay_fields` takes them: a field's
    name is compared with the few names of its own length only."""
    slots: list[list[bytes]] = [[] for _ in range(_TABLE_SLOTS)]
    for name in sorted(names):
        slots[min(len(name), _TABLE_SLOTS - 1)].append(name.lower())
    return tuple(tuple(slot) for slot in slots)


def scan_response_head(head: bytes, begin: int) -> tuple[int, int, int, bool, int]:
    """What the proxy reads from a response head llhttp accepted, starting at ``begin``:

    (end of the status line, end of the header section, Content-Length or -1, chunked,
    Connection options as `CONNECTION_CLOSE` | `CONNECTION_KEEP_ALIVE`). The status line is
    ``head[begin:line_end]``; the header section ``head[line_end:end]`` is the CRLF that ends
    the status line, then each field line with its CRLF; the head ends at ``end + 2``.
    """
    if COMPILED:
        return _scan_by_bytes(head, begin)
    return _scan_by_methods(head, begin)


def relay_fields(fields: bytes, table: tuple[tuple[bytes, ...], ...]) -> bytes:
    """The field lines of a header section (as `scan_response_head` delimits it) whose names
    are not in ``table`` (`drop_table`), each with its CRLF, as the bytes received."""
    if COMPILED:
        return _relay_by_bytes(fields, table)
    return _relay_by_methods(fields, table)


# -- byte by byte, for the compiled form ---------------------------------------------------------
# Numbers as literals, not the module's names: a module global is a Python object to Cython, and
# each comparison with one a call. 13 CR, 10 LF, 32 SP, 9 HTAB, 58 ":", 44 ",", 64 table slots.


def _scan_by_bytes(head: bytes, begin: int) -> tuple[int, int, int, bool, int]:
    i = begin
    while head[i] != 13:
        i += 1
    line_end = i
    length = -1
    chunked = False
    options = 0
    i += 2
    while head[i] != 13:  # a field line; the empty line ends the head
        start = i
        while head[i] != 58:
            i += 1
        colon = i
        i += 1
        while head[i] == 32 or head[i] == 9:
            i += 1
        value = i
        while head[i] != 13:
            i += 1
        stop = i
        i += 2
        size = colon - start
        if size == 14 and name_is(head, start, b"content-length"):
            length = _content_length(head, value, stop)
        elif size == 17 and name_is(head, start, b"transfer-encoding"):
            # RFC 9112 §6.3 item 4: chunked framing only if chunked is the final coding (of
            # the last Transfer-Encoding field, as llhttp reads it).
            chunked = _ends_in_chunked(head, value, stop)
        elif size == 10 and name_is(head, start, b"connection"):
            options |= _connection_options(head, value, stop)
    return line_end, i, length, chunked, options


def _relay_by_bytes(fields: bytes, table: tuple[tuple[bytes, ...], ...]) -> bytes:
    n = len(fields)
    out = []
    run = -1  # where the current run of relayed lines starts
    i = 2
    while i < n:
        start = i
        while fields[i] != 58:
            i += 1
        size = i - start
        names = table[size if size < 64 else 64 - 1]
        dropped = False
        for k in range(len(names)):
            name = names[k]
            if len(name) == size and name_is(fields, start, name):
                dropped = True
                break
        while fields[i] != 13:
            i += 1
        i += 2
        if dropped:
            if run >= 0:
                out.append(fields[run:start])
                run = -1
        elif run < 0:
            run = start
    if run == 2:
        return fields[2:]  # every line relayed
    if run >= 0:
        out.append(fields[run:n])
    return b"".join(out)


def _content_length(head: bytes, value: int, stop: int) -> int:
    number = 0
    i = value
    while i < stop:
        c = head[i]
        if c == 32 or c == 9:
            break  # the whitespace after the digits
        if i - value == 18:  # more digits than a C integer holds for sure
            return int(head[value:stop])
        number = number * 10 + (c - 48)
        i += 1
    return number


def _ends_in_chunked(head: bytes, value: int, stop: int) -> bool:
    i = stop
    while i > value and (head[i - 1] == 32 or head[i - 1] == 9):
        i -= 1
    if i - 7 < value or not name_is(head, i - 7, b"chunked"):
        return False
    i -= 7  # the coding is "chunked" if what comes before it is a list separator or nothing
    while i > value and (head[i - 1] == 32 or head[i - 1] == 9):
        i -= 1
    return i == value or head[i - 1] == 44


def _connection_options(head: bytes, value: int, stop: int) -> int:
    found = 0
    i = value
    while i <= stop:
        start = i
        while i < stop and head[i] != 44:
            i += 1
        end = i
        while start < end and (head[start] == 32 or head[start] == 9):
            start += 1
        while end > start and (head[end - 1] == 32 or head[end - 1] == 9):
            end -= 1
        if end - start == 5 and name_is(head, start, b"close"):
            found |= CONNECTION_CLOSE
        elif end - start == 10 and name_is(head, start, b"keep-alive"):
            found |= CONNECTION_KEEP_ALIVE
        i += 1
    return found


# -- the same with bytes methods, for the sources ------------------------------------------------


def _scan_by_methods(head: bytes, begin: int) -> tuple[int, int, int, bool, int]:
    line_end = head.find(b"\r\n", begin)
    end = head.find(b"\r\n\r\n", line_end) + 2
    fields = head[line_end:end].lower()
    length = -1
    at = fields.find(b"\r\ncontent-length:")
    if at >= 0:
        length = int(fields[at + 17 : fields.find(b"\r", at + 17)])
    chunked = False
    at = fields.rfind(b"\r\ntransfer-encoding:")
    if at >= 0:
        coding = fields[at + 20 : fields.find(b"\r", at + 20)].rsplit(b",", 1)[-1]
        chunked = coding.strip(b" \t") == b"chunked"
    options = 0
    at = fields.find(b"\r\nconnection:")
    while at >= 0:
        stop = fields.find(b"\r", at + 13)
        for token in fields[at + 13 : stop].split(b","):
            token = token.strip(b" \t")
            if token == b"close":
                options |= CONNECTION_CLOSE
            elif token == b"keep-alive":
                options |= CONNECTION_KEEP_ALIVE
        at = fields.find(b"\r\nconnection:", stop)
    return line_end, end, length, chunked, options


def _relay_by_methods(fields: bytes, table: tuple[tuple[bytes, ...], ...]) -> bytes:
    kept = []
    for line in fields[2:-2].split(b"\r\n") if len(fields) > 2 else ():
        name = line[: line.find(b":")].lower()
        if name not in table[min(len(name), _TABLE_SLOTS - 1)]:
            kept.append(line + b"\r\n")
    return b"".join(kept)
