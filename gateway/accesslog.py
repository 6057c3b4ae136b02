"""JSON access log, kept off the request's critical path.

Each request appends one pre-serialized line to an in-memory buffer; a background task writes
the buffer every ``flush_interval`` (or when it passes ``max_lines``) in one write. If the sink
blocks or fails, lines are dropped and counted rather than stalling requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from json.encoder import encode_basestring
from typing import IO, Any

log = logging.getLogger("cityplane.gateway")


class AccessLog:
    __slots__ = (
        "_buffer",
        "_interval",
        "_max",
        "_sink",
        "_soft_max",
        "_tails",
        "_task",
        "_wake",
        "dropped",
    )

    def __init__(
        self,
        sink: IO[str] | None = None,
        *,
        flush_interval: float = 0.25,
        max_lines: int = 4096,
    ) -> None:
        self._sink = sink if sink is not None else sys.stdout
        self._buffer: list[str] = []
        self._interval = flush_interval
        self._max = max_lines * 4
        self._soft_max = max_lines
        self._tails: dict[tuple[str, str, str | None], str] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.dropped = 0

    def record(self, entry: dict[str, Any]) -> None:
        buf = self._buffer
        if len(buf) >= self._max:
            self.dropped += 1
            return
        buf.append(json.dumps(entry, separators=(",", ":"), ensure_ascii=False))
        if len(buf) >= self._soft_max:
            self._wake.set()

    def record_request(
        self,
        ts_ms: int,
        request_id: str,
        client: str,
        method: str,
        path: str,
        status: int,
        duration_us: int,
        service: str,
        route: str,
        upstream: str | None,
    ) -> None:
        """One proxied request: ``request_line()`` of these fields. The line's last three
        fields repeat for every request of a route and upstream: they are escaped once."""
        buf = self._buffer
        if len(buf) >= self._max:
            self.dropped += 1
            return
        tails = self._tails
        key = (service, route, upstream)
        tail = tails.get(key)
        if tail is None:
            if len(tails) >= _MAX_TAILS:  # routes of replaced configurations
                tails.clear()
            tail = tails[key] = line_tail(service, route, upstream)
        buf.append(line_head(ts_ms, request_id, client, method, path, status, duration_us) + tail)
        if len(buf) >= self._soft_max:
            self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="access-log")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            if self._buffer:
                lines, self._buffer = self._buffer, []
                # The write may block (a slow disk, a full pipe): a thread takes it.
                await asyncio.get_running_loop().run_in_executor(None, self._write, lines)

    def flush(self) -> None:
        """Write what is buffered now, on the caller's thread (at shutdown)."""
        if self._buffer:
            lines, self._buffer = self._buffer, []
            self._write(lines)

    def _write(self, lines: list[str]) -> None:
        try:
            self._sink.write("\n".join(lines) + "\n")
            self._sink.flush()
        except (OSError, ValueError) as exc:
            self.dropped += len(lines)
            log.warning("access log sink failed (%s); %d lines dropped", exc, len(lines))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.flush()


def request_line(
    ts_ms: int,
    request_id: str,
    client: str,
    method: str,
    path: str,
    status: int,
    duration_us: int,
    service: str,
    route: str,
    upstream: str | None,
) -> str:
    """The compact JSON object of a request's fields (``ensure_ascii=False``), in this order:
    ``ts`` (Unix time in seconds) and ``duration_ms`` with exactly three decimals, the strings
    through json's own encoder. Both numbers come from integers (milliseconds, microseconds):
    ``round()`` and ``repr()`` of floats were 9k of the 25k instructions a line cost.

    ``request_id`` is the gateway's own or a client's that passed the request path's pattern
    (letters, digits and ``._:-``): it is written between quotes as it is, no escaping."""
    return line_head(ts_ms, request_id, client, method, path, status, duration_us) + line_tail(
        service, route, upstream
    )


def line_head(
    ts_ms: int,
    request_id: str,
    client: str,
    method: str,
    path: str,
    status: int,
    duration_us: int,
) -> str:
    esc = encode_basestring
    seconds, ms = divmod(ts_ms, 1000)
    whole, us = divmod(duration_us, 1000)
    # Integers as text from tables where the range allows (each str() of an int was ~500
    # instructions): the second changes once a second, statuses and most durations are small.
    last = _LAST_SECOND
    if last[0] != seconds:
        last[0], last[1] = seconds, str(seconds)
    code = int(status)
    # Clients and methods repeat: their JSON text from a bounded table (`in` and [] are C
    # calls compiled, where encode_basestring is ~650 instructions and .get() a call by name).
    if client in _CLIENTS:
        client_json = _CLIENTS[client]
    else:
        client_json = esc(client)
        if len(_CLIENTS) < _MAX_CLIENTS:
            _CLIENTS[client] = client_json
    method_json = _METHODS[method] if method in _METHODS else esc(method)
    return (
        f'{{"ts":{last[1]}.{_DECIMALS[ms]},"request_id":"{request_id}",'
        f'"client":{client_json},"method":{method_json},'
        f'"path":{esc(path)},"status":{_NUMBERS[code] if 0 <= code < 1000 else code},'
        f'"duration_ms":{_NUMBERS[whole] if 0 <= whole < 1000 else whole}.{_DECIMALS[us]},'
    )


def line_tail(service: str, route: str, upstream: str | None) -> str:
    esc = encode_basestring
    up = "null" if upstream is None else esc(upstream)
    return f'"service":{esc(service)},"route":{esc(route)},"upstream":{up}}}'


_METHODS = {m: encode_basestring(m) for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")}
_MAX_TAILS = 10_000
_CLIENTS: dict[str, str] = {}  # a client address -> its JSON string
_MAX_CLIENTS = 10_000
# "007" for 7: a format spec per number cost 1.3k instructions of a line
_DECIMALS = tuple(f"{n:03d}" for n in range(1000))
_NUMBERS = tuple(str(n) for n in range(1000))
_LAST_SECOND: list[Any] = [None, ""]  # the last `ts` second and its text
