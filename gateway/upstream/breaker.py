"""Circuit breaking per service upstream (Nygard, *Release It!*), shared among replicas.

The state machine is pybreaker's (closed -> open -> half-open -> closed), driven from async
code through ``CircuitBreaker.calling()``: the context manager is entered in ``acquire()`` and
exited when the permit learns the upstream's outcome, so one attempt may span any ``await``.
pybreaker's own async path needs tornado and its Redis storage blocks the event loop; neither is
used. :class:`SharedBreakerState` spreads state changes among gateway replicas through Redis in
background tasks: the request path only touches memory. Why and how: docs/adr/0004-breaker-adapter.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import pybreaker
from redis.exceptions import RedisError

from gateway import metrics

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import redis.asyncio
    from redis.asyncio.client import PubSub

    from cityplane.schema import CircuitBreaker

__all__ = ["BreakerOpen", "BreakerPermit", "SharedBreakerState", "UpstreamBreaker"]

log = logging.getLogger(__name__)

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN
_GAUGE_VALUE = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}  # metrics.BREAKER_STATE's documented values


class BreakerOpen(Exception):
    """The upstream's breaker rejects the attempt: answer 503 with ``Retry-After`` at once."""

    def __init__(self, service: str, retry_after: float) -> None:
        super().__init__(f"circuit breaker of {service!r} is open")
        self.service = service
        self.retry_after = retry_after


class _UpstreamFailed(Exception):
    """What a failed attempt looks like to pybreaker, which counts exceptions."""


class _LocalStorage(pybreaker.CircuitBreakerStorage):
    """pybreaker's in-memory storage plus what the adapter needs.

    ``opened_at`` is kept as a POSIX timestamp, cheap to read for ``Retry-After`` and settable to
    another replica's opening time. ``muted`` lets a permit without a usable outcome end
    pybreaker's call without touching the counters (see :meth:`UpstreamBreaker._finish`).
    """

    def __init__(self) -> None:
        super().__init__("cityplane-memory")
        self._state = CLOSED
        self.failures = 0
        self.successes = 0
        self.opened_at_ts = 0.0
        self.muted = False

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._state = state

    def increment_counter(self) -> None:
        if not self.muted:
            self.failures += 1

    def reset_counter(self) -> None:
        if not self.muted:
            self.failures = 0

    def increment_success_counter(self) -> None:
        if not self.muted:
            self.successes += 1

    def reset_success_counter(self) -> None:
        self.successes = 0

    @property
    def counter(self) -> int:
        return self.failures

    @property
    def success_counter(self) -> int:
        return self.successes

    @property
    def opened_at(self) -> datetime | None:
        return datetime.fromtimestamp(self.opened_at_ts, UTC) if self.opened_at_ts else None

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self.opened_at_ts = value.timestamp()


class _StateListener(pybreaker.CircuitBreakerListener):
    def __init__(self, breaker: UpstreamBreaker) -> None:
        self._breaker = breaker

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self._breaker._state_changed(new_state.name)


class BreakerPermit:
    """Leave to make one upstream attempt; report its outcome exactly once.

    A permit dropped without an outcome (a cancelled request) is released as neutral: it
    neither counts nor holds the half-open trial slot.
    """

    __slots__ = ("_breaker", "_calling", "_done", "_generation", "_trial")

    def __init__(
        self,
        breaker: UpstreamBreaker,
        calling: AbstractContextManager[Any],
        generation: int,
        trial: bool,
    ) -> None:
        self._breaker = breaker
        self._calling = calling
        self._generation = generation
        self._trial = trial
        self._done = False

    def success(self) -> None:
        """The upstream answered (any status < 500, 4xx/401/429 included)."""
        if not self._done:
            self._done = True
            self._breaker._finish(self, failed=False)

    def failure(self) -> None:
        """Connection error, timeout, protocol error or 5xx."""
        if not self._done:
            self._done = True
            self._breaker._finish(self, failed=True)

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            self._breaker._finish(self, failed=None)


class UpstreamBreaker:
    """One service upstream's breaker, built when the routing table is compiled."""

    def __init__(
        self, service: str, spec: CircuitBreaker, shared: SharedBreakerState | None = None
    ) -> None:
        self.service = service
        self.spec = spec
        self.reset_timeout = float(spec.resetTimeout)
        self._storage = _LocalStorage()
        self._gauge = metrics.BREAKER_STATE.labels(service)
        self._gauge.set(_GAUGE_VALUE[CLOSED])
        # Bumped on every state change: outcomes of permits from an earlier state are stale.
        self._generation = 0
        self._trial = False  # the one half-open trial attempt is in flight
        self._shared = shared
        self._applying_shared = False  # a change that came from another replica: don't echo it
        self._shared_version = 0  # version of the last shared record applied here
        self._shared_dirty = False  # added to the shared failure count since it was last reset
        self._cb = pybreaker.CircuitBreaker(
            fail_max=spec.failureThreshold,
            reset_timeout=self.reset_timeout,
            state_storage=self._storage,
            listeners=[_StateListener(self)],
            name=service,
            throw_new_error_on_trip=False,
        )
        if shared is not None:
            shared.register(self)

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open``; as in pybreaker, open turns half-open only when
        an attempt is asked for after ``resetTimeout``."""
        return self._storage.state

    @property
    def opened_at(self) -> float:
        """POSIX time of the last opening (0.0 if never opened)."""
        return self._storage.opened_at_ts

    def retry_after(self) -> float:
        """Seconds until a trial attempt will be allowed.

        While a trial is in flight nobody knows: it is ``resetTimeout``, the wait if it fails.
        """
        state = self._storage.state
        if state == OPEN:
            return max(0.0, self._storage.opened_at_ts + self.reset_timeout - time.time())
        if state == HALF_OPEN and self._trial:
            return self.reset_timeout
        return 0.0

    def acquire(self) -> BreakerPermit:
        # pybreaker's half-open lets every call through; only one trial may be in flight.
        if self._trial:
            raise BreakerOpen(self.service, self.reset_timeout)
        calling = self._cb.calling()
        try:
            calling.__enter__()
        except pybreaker.CircuitBreakerError:
            raise BreakerOpen(self.service, self.retry_after()) from None
        trial = self._storage.state == HALF_OPEN
        if trial:
            self._trial = True
        return BreakerPermit(self, calling, self._generation, trial)

    def _finish(self, permit: BreakerPermit, failed: bool | None) -> None:
        current = permit._generation == self._generation
        if permit._trial and current:
            self._trial = False
        calling = permit._calling
        if failed is None or not current:
            # An outcome from before the last state change (a request that was in flight when
            # the breaker opened), or no outcome at all, must not move the present state. End
            # pybreaker's call as a success that touches no counter: with the success counter
            # at 0 (it is reset on every state change) even a half-open state will not close.
            self._storage.muted = True
            try:
                calling.__exit__(None, None, None)
            finally:
                self._storage.muted = False
        elif failed:
            if self._shared is not None and not permit._trial:
                self._shared.count_failure(self)
            calling.__exit__(_UpstreamFailed, _UpstreamFailed(), None)
        else:
            if self._shared_dirty and self._shared is not None:
                self._shared.count_success(self)
            calling.__exit__(None, None, None)

    def _state_changed(self, state: str) -> None:
        # Called by pybreaker before its storage holds the new state: use ``state``.
        self._generation += 1
        self._trial = False
        self._gauge.set(_GAUGE_VALUE[state])
        if self._shared is not None and not self._applying_shared and state != HALF_OPEN:
            # Half-open is not shared: every replica reaches it from the same opened_at.
            self._shared.announce(self, state)

    def _is_current(self, state: str, generation: int) -> bool:
        """Whether a change announced at ``generation`` still describes this breaker."""
        if generation != self._generation:
            return False
        return state != OPEN or time.time() < self._storage.opened_at_ts + self.reset_timeout

    def _trip(self) -> None:
        """Open because the failures counted across replicas reached ``failureThreshold``."""
        if self._storage.state == CLOSED:
            self._cb.open()

    def _apply_shared(self, state: str, opened_at: float) -> None:
        """Take another replica's change; ``opened_at`` is POSIX time on this host's clock."""
        self._applying_shared = True
        try:
            if state == OPEN:
                if self._storage.state != OPEN:
                    self._cb.open()
                # Same opening time everywhere, so every replica turns half-open together.
                self._storage.opened_at_ts = opened_at
            elif state == CLOSED and self._storage.state != CLOSED:
                self._cb.close()
        finally:
            self._applying_shared = False


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

_REDIS_ERRORS = (RedisError, OSError, TimeoutError)
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
        except _REDIS_ERRORS as exc:
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
                except _REDIS_ERRORS as exc:
                    self._warn(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RECONNECT_MAX)
                    continue
            delay = 0.05
            try:
                await self._relay(pubsub)
            except _REDIS_ERRORS as exc:
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
            except _REDIS_ERRORS as exc:
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
    with contextlib.suppress(*_REDIS_ERRORS):
        await pubsub.aclose()


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "%s stopped; breakers work per replica", task.get_name(), exc_info=task.exception()
        )
