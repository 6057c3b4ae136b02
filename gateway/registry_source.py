"""The registry as the gateway's config source: a snapshot, then a stream of changes.

The gateway never reads the registry's database: it follows `GET /v1/watch` (Server-Sent
Events, docs/registry-api.md), keeps the services in memory, and saves every applied revision
to disk (`<state-dir>/snapshot.json`, written atomically) so that a restart without a
registry serves the last good configuration. A dropped stream is resumed from the last
revision seen (`since=`); the registry answers with a snapshot when that is too old.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout
from pydantic import ValidationError

from cityplane.documents import DocumentError
from cityplane.schema import CityService

log = logging.getLogger("cityplane.gateway.registry")

SNAPSHOT_FILE = "snapshot.json"


class SseEvent:
    __slots__ = ("data", "event", "id")

    def __init__(self, event: str, data: str, id: str | None) -> None:
        self.event = event
        self.data = data
        self.id = id


async def read_events(lines: AsyncIterable[bytes]) -> AsyncIterator[SseEvent]:
    """Parse a text/event-stream (HTML Living Standard §9.2.6, the parts a registry uses)."""
    event, ident = "message", None
    data: list[str] = []
    async for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield SseEvent(event, "\n".join(data), ident)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue  # a comment: the registry's heartbeat
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            ident = value


class RegistrySource:
    """Follows a registry; implements gateway.sources.ConfigSource."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        state_dir: Path,
        first_snapshot_wait: float = 10.0,
        heartbeat: float = 15.0,
    ) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self.state_dir = state_dir
        self._first_wait = first_snapshot_wait
        self._heartbeat = heartbeat
        self.services: dict[str, dict[str, Any]] = {}
        self.revision: int | None = None
        self.ready = False  # true once a snapshot (from the registry or disk) is held
        self.connected = False
        self._changed = asyncio.Event()
        self._first = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._save_task: asyncio.Task[None] | None = None

    def describe(self) -> str:
        return self.url

    # -- ConfigSource ----------------------------------------------------------------------------

    async def load(self) -> list[CityService]:
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="registry-watch")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first.wait(), self._first_wait)
            if not self._first.is_set():
                await self._load_saved()
        self._changed.clear()
        try:
            return [CityService.model_validate(doc) for doc in self.services.values()]
        except ValidationError as exc:
            raise DocumentError(f"registry sent an invalid service: {exc}") from None

    async def changed(self) -> None:
        await self._changed.wait()

    async def close(self) -> None:
        for task in (self._task, self._save_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    # -- following the registry ------------------------------------------------------------------

    async def _follow(self) -> None:
        delay = 0.2
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        # No total timeout: the stream is long-lived; a silent one (no heartbeat) is dead.
        timeout = ClientTimeout(total=None, connect=5, sock_read=self._heartbeat * 3)
        async with ClientSession(timeout=timeout, headers=headers) as http:
            while True:
                try:
                    await self._stream(http)
                    delay = 0.2
                except asyncio.CancelledError:
                    raise
                except (ClientError, TimeoutError, OSError, ValueError) as exc:
                    if self.connected:
                        log.warning("registry watch lost (%s); retrying", exc)
                    self.connected = False
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    async def _stream(self, http: ClientSession) -> None:
        params = {"since": str(self.revision)} if self.revision is not None else {}
        async with http.get(self.url + "/v1/watch", params=params) as resp:
            if resp.status == 409:
                # A revision from the future: the registry was reset; start over.
                log.warning("registry has no revision %s; resyncing", self.revision)
                self.revision = None
                return
            if resp.status != 200:
                detail = (await resp.text())[:200]
                raise ValueError(f"watch answered {resp.status}: {detail}")
            self.connected = True
            log.info("following registry %s from revision %s", self.url, self.revision)
            async for event in read_events(resp.content):
                self._apply(event)

    def _apply(self, event: SseEvent) -> None:
        if event.event not in ("snapshot", "change"):
            return
        body = json.loads(event.data)
        if event.event == "snapshot":
            self.services = {doc["metadata"]["name"]: doc for doc in body["services"]}
        elif body["type"] == "DELETED":
            self.services.pop(body["name"], None)
        else:
            self.services[body["name"]] = body["service"]
        self.revision = int(body["revision"])
        self.ready = True
        self._first.set()
        self._changed.set()
        self._schedule_save()

    # -- last known good on disk -----------------------------------------------------------------

    def _schedule_save(self) -> None:
        if self._save_task is None or self._save_task.done():
            self._save_task = asyncio.create_task(self._save())

    async def _save(self) -> None:
        await asyncio.sleep(0.05)  # coalesce bursts of changes into one write
        payload = json.dumps({"revision": self.revision, "services": list(self.services.values())})
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._write, payload)
        except OSError as exc:
            log.warning("cannot save the registry snapshot: %s", exc)

    def _write(self, payload: str) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / (SNAPSHOT_FILE + ".tmp")
        tmp.write_text(payload, encoding="utf-8")
        os.replace(tmp, self.state_dir / SNAPSHOT_FILE)

    async def _load_saved(self) -> None:
        path = self.state_dir / SNAPSHOT_FILE
        try:
            text = await asyncio.get_running_loop().run_in_executor(None, path.read_text)
            saved = json.loads(text)
        except FileNotFoundError:
            log.warning("registry %s unreachable and no saved snapshot yet", self.url)
            return
        except (OSError, ValueError) as exc:
            log.error("saved registry snapshot %s unreadable: %s", path, exc)
            return
        self.services = {doc["metadata"]["name"]: doc for doc in saved["services"]}
        self.revision = int(saved["revision"])
        self.ready = True
        log.warning(
            "registry %s unreachable: serving the saved snapshot of revision %d",
            self.url,
            self.revision,
        )
