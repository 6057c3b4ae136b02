"""Circuit breaking per service upstream (Nygard, *Release It!*), shared among replicas.

The state machine is pybreaker's (closed -> open -> half-open -> closed), driven from async
code through ``CircuitBreaker.calling()``: the context manager is entered in ``acquire()`` and
exited when the permit learns the upstream's outcome, so one attempt may span any ``await``.
pybreaker's own async path needs tornado and its Redis storage blocks the event loop; neither is
used. :class:`SharedBreakerState` (in :mod:`gateway.upstream.breaker_sharing`) spreads state
changes among gateway replicas through Redis in background tasks: the request path only
touches memory. Why and how: docs/adr/0004-breaker-adapter.md.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gateway import metrics

# pybreaker imports redis when it can, for its CircuitRedisStorage, which is not used (above).
# redis and what it pulls in cost ~20 MB of RSS per worker (issue #6: 80 MB with 1,000 routes),
# so it is hidden while pybreaker loads (a None entry makes `import redis` fail there) unless
# something loaded it already; the gateway imports redis itself when it has a Redis URL.
_HIDE_REDIS = "redis" not in sys.modules
if _HIDE_REDIS:
    sys.modules["redis"] = None  # type: ignore[assignment]
try:
    import pybreaker
finally:
    if _HIDE_REDIS and sys.modules.get("redis", 0) is None:
        del sys.modules["redis"]

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

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
        calling: AbstractContextManager[Any] | None,
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

    def abandon(self) -> None:
        """No outcome to report (the client's body was refused, the request was cancelled):
        release the permit as neutral, at once, rather than when the garbage collector runs."""
        if not self._done:
            self._done = True
            self._breaker._finish(self, failed=None)

    def __del__(self) -> None:
        self.abandon()


class UpstreamBreaker:
    """One service upstream's breaker, built when the routing table is compiled."""

    __slots__ = (
        "_applying_shared",
        "_cb",
        "_gauge",
        "_generation",
        "_shared",
        "_shared_dirty",
        "_shared_version",
        "_storage",
        "_trial",
        "reset_timeout",
        "service",
        "spec",
    )

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
        if self._storage.state == CLOSED:
            # The request path's usual case. Entering pybreaker's call while closed does
            # nothing (no before_call, no listener acts) and costs ~4 µs per attempt (its
            # generator, context manager and lock); _finish() replays the only outcome that
            # needs pybreaker, a failure, through it then.
            return BreakerPermit(self, None, self._generation, False)
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
        if calling is None:
            # Issued while closed without entering pybreaker (acquire's fast path). A stale or
            # missing outcome would end pybreaker's closed-state call muted: nothing to do.
            if failed is None or not current:
                return
            if not failed:
                # What pybreaker's closed state does on success: reset the consecutive count.
                if self._shared_dirty and self._shared is not None:
                    self._shared.count_success(self)
                self._storage.reset_counter()
                return
            # Still the same closed state (same generation): entering cannot be refused.
            calling = self._cb.calling()
            calling.__enter__()
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


# Re-exported: callers import everything breaker-related from here.
from gateway.upstream.breaker_sharing import SharedBreakerState  # noqa: E402
