"""Sharing breaker state among gateway replicas through Redis, off the request path.

The request path only touches memory (:class:`SharedBreakerState`'s ``register``,
``count_failure``, ``count_success``, ``announce``); background tasks publish openings and
closings with one Lua script and apply other replicas' changes from pub/sub. Why and how:
docs/adr/0004-breaker-adapter.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from typing import TYPE_CHECKING, NamedTuple

from gateway.upstream.breaker import UpstreamBreaker

if TYPE_CHECKING:
    import redis.asyncio
    from redis.asyncio.client import PubSub

log = logging.getLogger("gateway.upstream.breaker")


# One round trip decides and publishes a change. Versions order changes fleet-wide: a receiver
# applies only records newer than the last it applied. Opening joins a fresh opening made by
# another replica since we last heard instead of restarting its timeout; closing happens only
# if the record is still the opening our trial answered (else a newer opening wins).
_TRANSITION = """
local raw = redis.call('GET', KEYS[1])
local cur = raw and cjson.decode(raw)
local target, expected = ARGV[4], tonumber(ARGV[5])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if target == 'open' then
  if cur and cur.state == 'open' and cur.version ~= expected
     and now_ms < cur.opened_at * 1000 + tonumber(ARGV[6]) then
    return raw
  end
elseif not cur or cur.state ~= 'open' or cur.version ~= expected then
  return raw
end
local version = now_ms
if cur and cur.version >= version then version = cur.version + 1 end
local rec = {service = ARGV[2], state = target, version = version, replica = ARGV[3]}
if target == 'open' then rec.opened_at = now_ms / 1000 end
local out = cjson.encode(rec)
redis.call('SET', KEYS[1], out, 'EX', ARGV[7])
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[1], out)
return out
"""


def _redis_errors() -> tuple[type[Exception], ...]:
    """What a Redis round trip may raise. redis is imported here, not at the top: only a
    gateway with a Redis URL loads it (RSS per worker, issue #6), and only such a gateway has a
    SharedBreakerState, so this is a sys.modules lookup."""
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)


_OP_TIMEOUT = 1.0  # bound on a background Redis round trip
_RESYNC_INTERVAL = 5.0  # re-read states even without events: catches missed messages
_RECONNECT_MAX = 1.0
_WARN_INTERVAL = 10.0
_RECORD_TTL = 7 * 24 * 3600  # versions are time-based, so a lapsed record restarts safely


class _Announcement(NamedTuple):
    breaker: UpstreamBreaker
    state: str
    generation: int
    expected_version: int


class SharedBreakerState:
    """Shares breaker state among gateway replicas through Redis, off the hot path."""

    def __init__(
        self,
        redis: redis.asyncio.Redis,
        *,
        prefix: str = "cityplane:cb:",
        replica_id: str | None = None,
        failure_window: float = 30.0,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._channel = prefix + "events"
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        # The shared failure count lapses this long after its last failure, so scattered
        # failures never add up to an opening.
        self._failure_window_ms = int(failure_window * 1000)
        self._transition = redis.register_script(_TRANSITION)
        self._breakers: dict[str, UpstreamBreaker] = {}
        self._failures: dict[str, int] = {}
        self._resets: set[str] = set()
        self._announcements: dict[str, _Announcement] = {}
        self._unloaded: set[str] = set()
        self._wake = asyncio.Event()
        self._clock_offset = 0.0  # Redis clock minus ours
        self._tasks: list[asyncio.Task[None]] = []
        self._degraded = False
        self._last_warning = -math.inf

    # --- called from the request path: memory only -------------------------------------------

    def register(self, breaker: UpstreamBreaker) -> None:
        self._breakers[breaker.service] = breaker
        self._unloaded.add(breaker.service)
        self._wake.set()

    def count_failure(self, breaker: UpstreamBreaker) -> None:
        breaker._shared_dirty = True
        self._failures[breaker.service] = self._failures.get(breaker.service, 0) + 1
        self._wake.set()

    def count_success(self, breaker: UpstreamBreaker) -> None:
        breaker._shared_dirty = False
        self._failures.pop(breaker.service, None)
        self._resets.add(breaker.service)
        self._wake.set()

    def announce(self, breaker: UpstreamBreaker, state: str) -> None:
        self._announcements[breaker.service] = _Announcement(
            breaker, state, breaker._generation, breaker._shared_version
        )
        self._wake.set()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to changes and load current states. Redis being down is not an error here:
        breakers work per replica and the subscriber keeps reconnecting in the background."""
        if self._tasks:
            return
        pubsub: PubSub | None
        try:
            pubsub = await self._connect()
        except _redis_errors() as exc:
            self._warn(exc)
            pubsub = None
        self._tasks = [
            asyncio.create_task(self._listen(pubsub), name="breaker-state-subscriber"),
            asyncio.create_task(self._flush_loop(), name="breaker-state-writer"),
        ]
        for task in self._tasks:
            task.add_done_callback(_report_crash)
        self._wake.set()

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- background --------------------------------------------------------------------------

    def _record_key(self, service: str) -> str:
        return self._prefix + service

    def _counter_key(self, service: str) -> str:
        return f"{self._prefix}{service}:failures"

    async def _connect(self) -> PubSub:
        pubsub = self._redis.pubsub()
        try:
            # Subscribe before loading, so no change falls between the two.
            async with asyncio.timeout(_OP_TIMEOUT):
                await pubsub.subscribe(self._channel)
                await self._sync_clock()
                services = list(self._breakers)
                await self._load(services)
        except BaseException:
            await _close_quietly(pubsub)
            raise
        self._unloaded.difference_update(services)
        self._recovered()
        return pubsub

    async def _listen(self, pubsub: PubSub | None) -> None:
        delay = 0.05
        while True:
            if pubsub is None:
                try:
                    pubsub = await self._connect()
                except _redis_errors() as exc:
                    self._warn(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RECONNECT_MAX)
                    continue
            delay = 0.05
            try:
                await self._relay(pubsub)
            except _redis_errors() as exc:
                self._warn(exc)
            finally:
                await _close_quietly(pubsub)
            pubsub = None

    async def _relay(self, pubsub: PubSub) -> None:
        resync_at = time.monotonic() + _RESYNC_INTERVAL
        while True:
            wait = max(0.0, resync_at - time.monotonic())
            message = await pubsub.get_message(timeout=wait)
            if message is not None and message["type"] == "message":
                self._apply(message["data"])
            elif message is not None and message["type"] == "subscribe":
                # Also seen when redis-py reconnected and subscribed again by itself: changes
                # may have been missed meanwhile, so load the states now, not at the next resync.
                resync_at = 0.0
            if time.monotonic() >= resync_at:
                async with asyncio.timeout(_OP_TIMEOUT):
                    await self._sync_clock()
                    await self._load(list(self._breakers))
                resync_at = time.monotonic() + _RESYNC_INTERVAL

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                async with asyncio.timeout(_OP_TIMEOUT):
                    await self._flush()
            except _redis_errors() as exc:
                self._warn(exc)
                # Failure counts are only worth something fresh: drop them. Announcements stay
                # queued; they are dropped when sent if their breaker has moved on meanwhile.
                self._failures.clear()
                self._resets.clear()
                await asyncio.sleep(_RECONNECT_MAX)
                if self._announcements or self._unloaded:
                    self._wake.set()
            else:
                self._recovered()

    async def _flush(self) -> None:
        if self._failures or self._resets:
            await self._flush_counts()
        while self._announcements:
            service, announcement = self._announcements.popitem()
            try:
                await self._publish(service, announcement)
            except BaseException:
                self._announcements.setdefault(service, announcement)
                raise
        if self._unloaded:
            services = list(self._unloaded)
            self._unloaded.clear()
            try:
                await self._load(services)
            except BaseException:
                self._unloaded.update(services)
                raise

    async def _flush_counts(self) -> None:
        failures, self._failures = self._failures, {}
        resets, self._resets = self._resets, set()
        pipe = self._redis.pipeline(transaction=False)
        for service in resets:
            pipe.delete(self._counter_key(service))
        for service, count in failures.items():
            pipe.incrby(self._counter_key(service), count)
            pipe.pexpire(self._counter_key(service), self._failure_window_ms)
        results = await pipe.execute()
        totals = results[len(resets) :: 2]
        for service, total in zip(failures, totals, strict=True):
            breaker = self._breakers.get(service)
            if breaker is not None and int(total) >= breaker.spec.failureThreshold:
                breaker._trip()

    async def _publish(self, service: str, announcement: _Announcement) -> None:
        breaker = announcement.breaker
        if self._breakers.get(service) is not breaker or not breaker._is_current(
            announcement.state, announcement.generation
        ):
            return  # replaced by a config reload, or moved on since
        record = await self._transition(
            keys=[self._record_key(service), self._counter_key(service)],
            args=[
                self._channel,
                service,
                self.replica_id,
                announcement.state,
                announcement.expected_version,
                int(breaker.reset_timeout * 1000),
                _RECORD_TTL,
            ],
        )
        if record is not None:
            # The record as it now stands: ours (adopt Redis's opening time) or a newer one.
            self._apply(record)

    async def _load(self, services: list[str]) -> None:
        if services:
            records = await self._redis.mget([self._record_key(s) for s in services])
            for record in records:
                if record is not None:
                    self._apply(record)

    async def _sync_clock(self) -> None:
        before = time.time()
        seconds, micros = await self._redis.time()
        after = time.time()
        self._clock_offset = seconds + micros / 1e6 - (before + after) / 2

    def _apply(self, raw: bytes | str) -> None:
        try:
            record = json.loads(raw)
            service, state, version = record["service"], record["state"], int(record["version"])
            opened_at = float(record.get("opened_at") or 0.0) - self._clock_offset
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed shared breaker record %r: %s", raw, exc)
            return
        breaker = self._breakers.get(service)
        if breaker is None or version <= breaker._shared_version:
            return
        breaker._shared_version = version
        breaker._apply_shared(state, opened_at)

    def _warn(self, exc: BaseException) -> None:
        self._degraded = True
        now = time.monotonic()
        if now - self._last_warning >= _WARN_INTERVAL:
            self._last_warning = now
            log.warning(
                "breaker state sharing through Redis is unavailable (%s: %s); "
                "breakers work per replica until it is back",
                type(exc).__name__,
                exc,
            )

    def _recovered(self) -> None:
        if self._degraded:
            self._degraded = False
            log.info("breaker state sharing through Redis is back")


async def _close_quietly(pubsub: PubSub) -> None:
    # Closing a subscription whose connection is already gone may fail the same way.
    with contextlib.suppress(*_redis_errors()):
        await pubsub.aclose()


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "%s stopped; breakers work per replica", task.get_name(), exc_info=task.exception()
        )
