"""`GET /v1/watch`: the change stream as Server-Sent Events (WHATWG HTML §9.2).

Each stream keeps only its last revision. Woken by the notifier (or by its heartbeat timer),
it reads the changes after that revision from the database and writes them out in order. If
the next change it needs was already pruned (it fell off the kept window), it sends a full
snapshot instead and carries on from the snapshot's revision.

A caller without registry:admin does not see other organizations' drafts (registry.ownership):
they are left out of its snapshots, and their changes out of its stream, deletions included
(the deleted document comes from the change's audit row).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from registry.auth import principal
from registry.errors import invalid_query, revision_from_the_future
from registry.ownership import Authority
from registry.query import query_value
from registry.state import STATE, RegistryState
from registry.store import Change

log = logging.getLogger(__name__)

BATCH = 500  # changes read (and written to the socket) at a time
HEARTBEAT = b": heartbeat\n\n"


def _event(kind: str, revision: int, data: dict[str, Any]) -> bytes:
    # Compact JSON has no newlines, so one `data:` line carries the whole event.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {kind}\nid: {revision}\ndata: {payload}\n\n".encode()


def _revision(name: str, raw: str) -> int:
    if raw.startswith("-") and raw[1:].isdigit():
        raise invalid_query(f"{name!r} cannot be negative")
    # ASCII digits only: int() also takes " 7", "+7", "7_0" and the digits of other scripts.
    if raw.isascii() and raw.isdigit():
        try:
            return int(raw)
        except ValueError:  # more digits than int() converts
            pass
    raise invalid_query(f"{name!r} must be a revision number, got {raw!r}")


def requested_since(request: web.Request) -> int | None:
    raw = query_value(request, "since")
    since = None if raw is None else _revision("since", raw)  # checked even when not used
    # A reconnecting EventSource repeats its original URL and adds Last-Event-ID, which is the
    # newer of the two; so Last-Event-ID wins.
    last_event_id = request.headers.get("Last-Event-ID")
    return _revision("Last-Event-ID", last_event_id) if last_event_id else since


class WatchStream:
    def __init__(
        self, state: RegistryState, response: web.StreamResponse, authority: Authority
    ) -> None:
        self.state = state
        self.response = response
        self.events = state.metrics.watch_events
        self.authority = authority
        self.filtered = not authority.admin

    def _shows(self, change: Change) -> bool:
        document = change.document if change.document is not None else change.deleted
        return document is None or self.authority.sees(document)

    async def snapshot(self) -> int:
        revision, services = await self.state.store.snapshot()
        if self.filtered:
            services = [service for service in services if self.authority.sees(service)]
        await self.response.write(
            _event("snapshot", revision, {"revision": revision, "services": services})
        )
        self.events.labels("snapshot").inc()
        return revision

    async def catch_up(self, last: int) -> int:
        """Send every change after `last`; the revision the client has now."""
        while True:
            batch = await self.state.store.changes_after(last, BATCH, with_deleted=self.filtered)
            if not batch:
                return last
            if batch[0].revision != last + 1:
                last = await self.snapshot()  # the change after `last` was pruned
                continue
            shown = [c for c in batch if self._shows(c)] if self.filtered else batch
            if shown:
                await self.response.write(
                    b"".join(_event("change", c.revision, c.event()) for c in shown)
                )
                self.events.labels("change").inc(len(shown))
            last = batch[-1].revision
            if len(batch) < BATCH:
                return last

    async def heartbeat(self) -> None:
        await self.response.write(HEARTBEAT)
        self.events.labels("heartbeat").inc()


async def watch(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    authority = Authority(principal(request))
    authority.require_read()
    since = requested_since(request)
    head = await state.store.revision()
    if since is not None and since > head:
        raise revision_from_the_future(since, head)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass events through, do not buffer them
            "X-CityPlane-Revision": str(head),
        }
    )
    await response.prepare(request)
    stream = WatchStream(state, response, authority)
    notifier = state.notifier
    state.metrics.watchers.inc()
    try:
        last = await stream.snapshot() if since is None else since
        while not notifier.closed:
            last = await stream.catch_up(last)
            if await notifier.wait_past(last, state.heartbeat):
                continue
            if notifier.closed or request.transport is None or request.transport.is_closing():
                break
            # Idle: keep proxies from closing the stream. The loop then reads the changes
            # table again, which also covers a NOTIFY from another replica that never came.
            await stream.heartbeat()
    except ConnectionResetError:
        return response  # the client went away; its next request resumes with Last-Event-ID
    except (OSError, SQLAlchemyError) as exc:
        # The answer has started: no problem+json now. End the stream; the client reconnects
        # with Last-Event-ID and loses nothing.
        log.warning("watch stream ended by a database error: %s", exc)
        return response
    finally:
        state.metrics.watchers.dec()
    return response
