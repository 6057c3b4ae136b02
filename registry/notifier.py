"""Wakes this process's watch streams when the revision moves.

Only a doorbell: it carries the newest revision number, never the change itself. A woken stream
re-reads the changes table from its own last revision, so a slow stream cannot lose a change and
the notifier needs no per-subscriber queue.
"""

from __future__ import annotations

import asyncio


class Notifier:
    def __init__(self, revision: int = 0) -> None:
        self.revision = revision
        self.closed = False
        self._moved = asyncio.Event()

    def publish(self, revision: int) -> None:
        """Called after a commit here, or on a NOTIFY from another replica (in any order)."""
        if revision <= self.revision:
            return
        self.revision = revision
        self._ring()

    def close(self) -> None:
        self.closed = True
        self._ring()

    def _ring(self) -> None:
        # Waking every waiter and handing out a fresh event is O(1) per publish, however many
        # streams are open (asyncio.Condition.notify_all would be the same, with a lock).
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    async def wait_past(self, revision: int, within: float) -> bool:
        """True once the revision is beyond `revision`; False after `within` seconds or on close."""
        try:
            async with asyncio.timeout(within):
                while self.revision <= revision and not self.closed:
                    await self._moved.wait()
        except TimeoutError:
            return False
        return self.revision > revision
