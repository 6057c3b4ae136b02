"""Per-route rate limiting: who is counted, what the client is told, what happens without Redis.

The counting itself (sliding window counter) lives in :mod:`gateway.policies.ratelimit_store`;
why that algorithm: docs/adr/0002-rate-limit-algorithm.md.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from cityplane.problem import Problem
from gateway import metrics
from gateway.policies.ratelimit_store import (
    Decision,
    LocalStore,
    RateLimitStore,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from cityplane.schema import RateLimit
    from gateway.exchange import Exchange

__all__ = ["RateLimitPolicy", "rate_limit_key"]

log = logging.getLogger(__name__)

# Header fields of draft-ietf-httpapi-ratelimit-headers-11 (23 May 2026), structured fields
# (RFC 9651) lists of one item each:
#   §3   RateLimit-Policy: "default";q=100;w=1    q = quota, w = window in whole seconds
#   §4   RateLimit: "default";r=42;t=1            r = available quota, t = effective window (s)
# §3.1.3: "w" is a non-zero Integer with no sub-second precision, so a 250ms window is
# advertised as w=1: a stricter policy than the real one, which §7.2 allows.
POLICY_NAME = "default"

# Values a client controls (header values, consumer ids) longer than this are hashed, so a
# key in Redis or in the local dict never grows with the request.
MAX_KEY_PART = 128
_SHORT_IP = MAX_KEY_PART - len("ip:")  # client addresses up to this long are used as they are
_KEY_KINDS = frozenset({"consumer", "ip", "route", "header"})  # who a rateLimit.key counts


def rate_limit_key(route_id: str, part: str) -> str:
    """The store key of one bucket: the route, then who is counted (hashed when long)."""
    if len(part) > MAX_KEY_PART:
        part = "#" + hashlib.blake2b(part.encode(), digest_size=16).hexdigest()
    return f"{route_id}|{part}"


class _ThrottledWarning:
    """One log line per ``interval`` at most, however many requests hit the same failure."""

    __slots__ = ("_interval", "_next", "_suppressed")

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0

    def __call__(self, route_id: str, mode: str, error: StoreUnavailable) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        self._next = now + self._interval
        log.warning(
            "rate-limit store unavailable (%s); route %s decided %s; "
            "%d more store errors in the last %gs not logged",
            error,
            route_id,
            {"open": "without a limit", "closed": "with 503", "local": "with local counters"}[mode],
            self._suppressed,
            self._interval,
        )
        self._suppressed = 0


_store_warning = _ThrottledWarning(10.0)
_ceil = math.ceil  # a module global: no attribute lookup on `math` per request
_DIGITS = tuple(str(n).encode() for n in range(1000))


def _digits(n: int) -> bytes:
    """``n`` in decimal ASCII, from a table below 1,000."""
    return _DIGITS[n] if 0 <= n < 1000 else str(n).encode()


class RateLimitPolicy:
    """The ``rateLimit`` block of one route, compiled once when the routing table is built."""

    name: ClassVar[str] = "rate-limit"
    response_fields: ClassVar[tuple[str, ...]] = ("RateLimit-Policy", "RateLimit")

    __slots__ = (
        "_header",
        "_hit_soon",
        "_inline_store",
        "_ip_prefix",
        "_kind",
        "_limit",
        "_lines",
        "_local",
        "_mode",
        "_policy_header",
        "_policy_line",
        "_rejected",
        "_route_id",
        "_store",
        "_store_errors",
        "_window",
    )

    def __init__(
        self, route_id: str, spec: RateLimit, store: RateLimitStore, *, local: LocalStore
    ) -> None:
        self._route_id = route_id
        self._limit = spec.requests
        self._window = spec.window
        self._mode = spec.onStoreError
        self._store = store
        self._local = local
        # An in-process store decides inline (ADR 14), through LocalStore's C method.
        self._inline_store: LocalStore | None = store if isinstance(store, LocalStore) else None
        self._hit_soon: Callable[..., None] | None = getattr(store, "hit_soon", None)
        self._policy_header = (
            "RateLimit-Policy",
            f'"{POLICY_NAME}";q={spec.requests};w={max(1, math.ceil(spec.window))}',
        )
        # The fields on the wire: the policy alone (store down, "open"), and an allowed
        # request's two, up to the value of r (then r, t and the line end, see _answer).
        self._policy_line = f"{self._policy_header[0]}: {self._policy_header[1]}\r\n".encode()
        self._lines = self._policy_line + f'RateLimit: "{POLICY_NAME}";r='.encode()
        self._rejected = metrics.RATELIMIT_REJECTED.labels(route=route_id)
        self._store_errors = metrics.RATELIMIT_STORE_ERRORS.labels(
            route=route_id, mode=spec.onStoreError
        )
        kind, _, header = spec.key.partition(":")
        if kind not in _KEY_KINDS:  # the schema allows no other; _key_of() relies on it
            raise ValueError(f"rateLimit.key: unknown kind {kind!r}")
        self._kind = kind
        self._header = header
        self._ip_prefix = f"{route_id}|ip:"

    # --- who is counted ------------------------------------------------------------------

    def _consumer_key(self, exchange: Exchange) -> str:
        consumer = exchange.consumer
        if consumer is None:
            return rate_limit_key(self._route_id, "ip:" + exchange.client_ip)
        return rate_limit_key(self._route_id, "consumer:" + consumer)

    def _ip_key(self, exchange: Exchange) -> str:
        ip = exchange.client_ip
        if len(ip) <= _SHORT_IP:  # what rate_limit_key would build, without its call
            return self._ip_prefix + ip
        return rate_limit_key(self._route_id, "ip:" + ip)

    def _route_key(self, exchange: Exchange) -> str:
        return rate_limit_key(self._route_id, "route")

    def _header_key(self, exchange: Exchange) -> str:
        value = exchange.request.headers.get(self._header)
        if not value:
            return rate_limit_key(self._route_id, "ip:" + exchange.client_ip)
        return rate_limit_key(self._route_id, "header:" + value)

    # --- the decision --------------------------------------------------------------------

    def check_now(self, exchange: Exchange) -> bool:
        """Decide without waiting when the store is in-process; ``False`` for Redis."""
        store: LocalStore | None = self._inline_store
        if store is None:
            return False
        self._answer(exchange, store.hit_now(self._key_of(exchange), self._limit, self._window))
        return True

    def _key_of(self, exchange: Exchange) -> str:
        # The key's method by kind, not through the bound method in _key: each of these is a
        # C call in the compiled form (ADR 18), a bound method a Python call.
        kind = self._kind
        if kind == "ip":
            return self._ip_key(exchange)
        if kind == "consumer":
            return self._consumer_key(exchange)
        if kind == "route":
            return self._route_key(exchange)
        return self._header_key(exchange)

    def check_soon(self, exchange: Exchange, then: Callable[[Problem | None], None]) -> bool:
        """For a request handled without a task (ADR 14), when the store answers through a
        callback (Redis): ``then(None)`` once the request may go on, ``then(problem)`` to
        refuse it. Returns False when the store has no callback form (``check`` follows)."""
        hit_soon = self._hit_soon
        if hit_soon is None:
            return False
        key = self._key_of(exchange)
        decided = _Decided(self, exchange, key, then)
        try:
            hit_soon(key, self._limit, self._window, decided)
        except StoreUnavailable as error:  # known to be down: decided at once
            decided(error)
        return True

    async def check(self, exchange: Exchange) -> None:
        key = self._key_of(exchange)
        try:
            decision: Decision | None = await self._store.hit(key, self._limit, self._window)
        except StoreUnavailable as error:
            decision = self._unavailable(exchange, key, error)
        if decision is not None:
            self._answer(exchange, decision)

    def _unavailable(
        self, exchange: Exchange, key: str, error: StoreUnavailable
    ) -> Decision | None:
        """The store failed: what ``onStoreError`` says (None: let the request through)."""
        self._store_errors.inc()
        metrics.RATELIMIT_DEGRADED.set(1)
        _store_warning(self._route_id, self._mode, error)
        if self._mode == "open":
            exchange.response_block += self._policy_line
            return None
        if self._mode == "closed":
            raise Problem(
                503,
                "rate-limit-store-unavailable",
                "The rate-limit store is unavailable and this route fails closed.",
                headers={"Retry-After": "1"},
            ) from None
        # Each live replica enforces its share, so together they stay near the limit.
        replicas = max(1, getattr(self._store, "replicas", 1))
        return self._local.hit_now(key, -(-self._limit // replicas), self._window)

    def _answer(self, exchange: Exchange, decision: Decision) -> None:
        # Retry-After and t agree: draft-ietf-httpapi-ratelimit-headers-11 §6 says Retry-After
        # SHOULD NOT point earlier than the end of the effective window.
        # Unpacked, not read by name: a named tuple's field is a descriptor call (~190
        # instructions) where unpacking is a C loop over the tuple.
        allowed, limit, remaining, reset_after = decision
        seconds = max(1, _ceil(reset_after))
        if allowed:
            # A join of bytes, numbers from a table: a bytes % format was ~1,500 instructions.
            exchange.response_block += b"".join(
                [self._lines, _digits(remaining), b";t=", _digits(seconds), b"\r\n"]
            )
            return
        state = ("RateLimit", f'"{POLICY_NAME}";r={remaining};t={seconds}')
        self._rejected.inc()
        raise Problem(
            429,
            "rate-limited",
            f"More than {limit} requests in {self._window:g}s on this route; "
            f"retry after {seconds}s.",
            headers={
                "Retry-After": str(seconds),
                self._policy_header[0]: self._policy_header[1],
                state[0]: state[1],
            },
        )


class _Decided:
    """`RateLimitPolicy.check_soon`'s callback for one request. An object rather than a
    closure: a closure would keep ``check_soon`` a Python method (ADR 18) and allocate a scope
    and a function object per request."""

    __slots__ = ("exchange", "key", "policy", "then")

    def __init__(
        self,
        policy: RateLimitPolicy,
        exchange: Exchange,
        key: str,
        then: Callable[[Problem | None], None],
    ) -> None:
        self.policy = policy
        self.exchange = exchange
        self.key = key
        self.then = then

    def __call__(self, reply: Decision | Exception) -> None:
        policy = self.policy
        try:
            if isinstance(reply, StoreUnavailable):
                decision = policy._unavailable(self.exchange, self.key, reply)
            elif isinstance(reply, Exception):
                raise reply
            else:
                decision = reply
            if decision is not None:
                policy._answer(self.exchange, decision)
        except Problem as problem:
            self.then(problem)
            return
        self.then(None)
