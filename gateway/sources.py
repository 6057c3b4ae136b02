"""Where the gateway's services come from. Files today; the registry's watch stream next.

A source answers two questions: what is the configuration now (`load`), and has it changed
(`changed`, awaited in a loop by the gateway). Anything that raises `DocumentError` from
`load` is rejected whole; the gateway keeps serving what it had.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

from cityplane.documents import DocumentError, document_files, load_documents
from cityplane.schema import CityService

Fingerprint = tuple[tuple[str, int, int], ...]


class ConfigSource(Protocol):
    ready: bool  # holds a configuration the gateway may serve
    revision: int | None  # the source's own revision, when it has one

    async def load(self) -> list[CityService]: ...

    async def changed(self) -> None:
        """Return when the configuration may have changed since the last `load`."""
        ...

    async def close(self) -> None: ...


class FileSource:
    """CityService documents in files and directories, polled for changes (mtime, size)."""

    def __init__(self, paths: list[Path], *, interval: float = 1.0) -> None:
        self.paths = paths
        self.interval = interval
        self._seen: Fingerprint = ()
        self.ready = True
        self.revision: int | None = None

    def describe(self) -> str:
        return ", ".join(str(p) for p in self.paths)

    async def load(self) -> list[CityService]:
        loop = asyncio.get_running_loop()
        # Reading and parsing files blocks: done in a thread, never on the event loop.
        self._seen = await loop.run_in_executor(None, self._fingerprint)
        return await loop.run_in_executor(None, load_documents, self.paths)

    async def changed(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            if await loop.run_in_executor(None, self._fingerprint) != self._seen:
                return

    async def close(self) -> None:
        return None

    def _fingerprint(self) -> Fingerprint:
        stats = []
        for root in self.paths:
            try:
                files = document_files(root)
            except DocumentError:
                continue
            for f in files:
                try:
                    st = f.stat()
                except OSError:
                    continue
                stats.append((str(f), st.st_mtime_ns, st.st_size))
        return tuple(sorted(stats))
