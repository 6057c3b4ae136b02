"""Where rate-limit counters live: in this process (`LocalStore`), or in Redis shared by every
replica (`gateway.policies.ratelimit_redis.RedisStore`).

Both stores implement the same *sliding window counter* (docs/adr/0002-rate-limit-algorithm.md):
two fixed windows aligned to the epoch, the previous one weighted by the part of it that still
overlaps a sliding window ending now::

    estimate = previous * (1 - elapsed / window) + current
    allow iff estimate + 1 <= limit, then current += 1

Time is counted in whole microseconds in both stores so that they agree to the last request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

_US = 1_000_000
_SWEEP_BATCH = 64  # keys a hit looks at during a sweep pass
_MAX_WINDOWS = 1024  # window lengths whose microseconds are kept (one per route at most)


class Decision(NamedTuple):
    """One rate-limit answer.

    ``reset_after`` is, when allowed, the seconds until the current window ends; when refused,
    the seconds until a request would be allowed again if nothing else arrives.

    A named tuple rather than a frozen dataclass: one is built per rate-limited request, and a
    frozen dataclass's ``__init__`` (``object.__setattr__`` per field) costs 0.41 µs against
    0.18 µs.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float


_new_tuple = tuple.__new__


class StoreUnavailable(Exception):
    """The shared store cannot answer now; the policy's ``onStoreError`` decides what happens."""


class RateLimitStore(Protocol):
    async def hit(self, key: str, limit: int, window: float) -> Decision:
        """Count one request against ``key``; raises :class:`StoreUnavailable`."""

        # A store that can decide without waiting also has ``hit_now(key, limit, window) ->
        # Decision`` (the in-process store): the policy then decides inline (ADR 14).
        ...


def window_micros(known: dict[float, int], window: float) -> int:
    """A window's length in whole microseconds (at least 1), remembered in ``known``: one
    ``round()`` per window length, not one per hit. ``known`` holds at most ``_MAX_WINDOWS``."""
    if window in known:  # `in` and [] are C calls compiled; .get() is a call by name
        return known[window]
    micros = max(1, round(window * _US))
    if len(known) < _MAX_WINDOWS:
        known[window] = micros
    return micros


def _decide(
    limit: int, window_us: int, elapsed_us: int, previous: int, current: int
) -> tuple[bool, int, int]:
    """The sliding-window-counter rule: (allowed, remaining, microseconds until reset).

    The function ``hit`` in the Lua script ``_HIT_SCRIPT`` of `gateway.policies.ratelimit_redis`
    is this one, line for line.
    """
    left_us = window_us - elapsed_us
    estimate = previous * left_us / window_us + current
    if estimate + 1 <= limit:
        return True, max(0, math.floor(limit - estimate - 1)), left_us
    if current + 1 <= limit:
        # The previous window's weight must decay until the estimate drops to limit - 1.
        wait = left_us - (limit - 1 - current) * window_us / previous
    else:
        # Wait for the next window, then until this window's count has decayed enough.
        wait = left_us + max(0.0, 1 - (limit - 1) / current) * window_us
    return False, 0, max(1, math.ceil(wait))


# --- in process ------------------------------------------------------------------------------


class _Counter:
    __slots__ = ("current", "index", "previous", "window_us")

    def __init__(self, window_us: int, index: int) -> None:
        self.window_us = window_us
        self.index = index
        self.current = 0
        self.previous = 0


class LocalStore:
    """Counters in a dict, for one replica (embedded mode, and ``onStoreError: local``).

    Memory stays bounded by the keys seen in the last two windows: every ``sweep_interval``
    seconds, or once the dict has doubled, a sweep pass drops expired counters. A pass is
    spread over the following hits, ``_SWEEP_BATCH`` keys each, so no request pays for an
    O(keys) scan (a 100k-key pass done at once would stall the loop ~15 ms). Each hit adds at
    most one key and sweeps many, so a pass always finishes.
    ``max_keys`` is a last resort against key floods within one long window: past it the
    oldest-created counters are evicted (those clients get a fresh count, never a 500).
    Windows are aligned to the clock's zero (``time.monotonic`` by default, so that wall-clock
    steps cannot reopen a window).
    """

    __slots__ = (
        "_clock",
        "_counters",
        "_max_keys",
        "_min_sweep_size",
        "_next_sweep_us",
        "_pending",
        "_sweep_interval_us",
        "_sweep_size",
        "_windows_us",
    )

    replicas = 1

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sweep_interval: float = 10.0,
        min_sweep_size: int = 10_000,
        max_keys: int = 1_000_000,
    ) -> None:
        self._clock = clock
        self._counters: dict[str, _Counter] = {}
        self._sweep_interval_us = round(sweep_interval * _US)
        self._min_sweep_size = min_sweep_size
        self._max_keys = max_keys
        self._next_sweep_us = round(clock() * _US) + self._sweep_interval_us
        self._sweep_size = min(max_keys, min_sweep_size)
        self._pending: Iterator[str] | None = None  # the rest of the current sweep pass
        # window (seconds) -> microseconds: one per route's window, not a round() per hit.
        self._windows_us: dict[float, int] = {}

    def __len__(self) -> int:
        return len(self._counters)

    async def hit(self, key: str, limit: int, window: float) -> Decision:
        return self.hit_now(key, limit, window)

    def hit_now(self, key: str, limit: int, window: float) -> Decision:
        """``hit`` without a coroutine: the in-process store never waits (ADR 14)."""
        now_us = int(self._clock() * _US + 0.5)  # round() is a call by name (~670 instructions)
        window_us = window_micros(self._windows_us, window)
        index = now_us // window_us
        counters = self._counters
        # `in` and [] are C calls in the compiled form; .get() is a method call by name.
        counter: _Counter | None = counters[key] if key in counters else None  # noqa: SIM401
        if counter is None or counter.window_us != window_us:
            counter = counters[key] = _Counter(window_us, index)
        elif counter.index != index:
            if counter.index == index - 1:
                counter.previous = counter.current
                counter.current = 0
                counter.index = index
            elif counter.index < index:
                counter.previous = counter.current = 0
                counter.index = index
            else:  # the clock went back: keep counting in the newer window
                index = counter.index
        if (
            self._pending is not None
            or now_us >= self._next_sweep_us
            or len(self._counters) > self._sweep_size
        ):
            self._sweep_some(now_us)
        allowed, remaining, reset_us = _decide(
            limit, window_us, max(0, now_us - index * window_us), counter.previous, counter.current
        )
        if allowed:
            counter.current += 1
        # tuple.__new__ skips the named tuple's __new__, a Python function (~2.5k instructions
        # per request compiled, docs/perf.md); the result is the same Decision.
        return _new_tuple(Decision, (allowed, limit, remaining, reset_us / _US))

    def sweep(self) -> None:
        """Run a whole sweep pass now."""
        now_us = round(self._clock() * _US)
        self._pending = None
        self._sweep_some(now_us)
        while self._pending is not None:
            self._sweep_some(now_us)

    def _sweep_some(self, now_us: int) -> None:
        counters = self._counters
        if self._pending is None:
            keys = list(counters)  # a C-speed snapshot: ~12 ms for a million keys
            overflow = len(keys) - self._max_keys
            if overflow > 0:
                # dicts keep insertion order: the first keys are the oldest counters.
                for key in keys[:overflow]:
                    del counters[key]
                keys = keys[overflow:]
            self._pending = iter(keys)
            self._next_sweep_us = now_us + self._sweep_interval_us
        for seen, key in enumerate(self._pending, 1):
            counter = counters.get(key)
            if counter is not None and (counter.index + 2) * counter.window_us <= now_us:
                del counters[key]
            if seen == _SWEEP_BATCH:
                return
        self._pending = None
        # The next pass on size waits for the dict to double: a flood of live keys must not
        # start a pass on every hit.
        self._sweep_size = min(self._max_keys, max(self._min_sweep_size, 2 * len(counters)))
