"""Writes held to the end of the event loop's current round of callbacks (ADR 14).

A write to a loopback socket runs the receiver's side of TCP at once, and wakes the receiver
if it sleeps. Requests handled inline write as they go, one between every two reads, which
gives the other side (the upstream, the client) time to fall asleep before each write: the
profile showed ~4 µs more kernel time per request than writes made in a burst. The request
path's whole-message writes are therefore held and made together once the loop has run the
callbacks of this round of socket events (one ``call_soon`` per round, not per write).
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Holder(Protocol):
    def flush_held(self) -> None:
        """Write what was held (or nothing, if the connection has gone since)."""


class Outbox:
    __slots__ = ("_held", "_loop", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._held: list[Holder] = []
        self._scheduled = False

    def hold(self, holder: Holder) -> None:
        """``holder.flush_held()`` runs after the callbacks of the current round."""
        self._held.append(holder)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        held, self._held = self._held, []
        for holder in held:
            holder.flush_held()


_outbox: Outbox | None = None


def outbox(loop: asyncio.AbstractEventLoop) -> Outbox:
    """The outbox of ``loop`` (one per process: one loop runs at a time in a worker)."""
    global _outbox
    box = _outbox
    if box is None or box._loop is not loop:
        box = _outbox = Outbox(loop)
    return box
