"""Pick one of a service's upstream targets: round-robin, least-request or consistent-hash.

A balancer is built once per service when config loads (``make_balancer``) and asked once per
upstream attempt (``pick``). Everything that can be computed from the target list — the
round-robin schedule, the cumulative weights, the hash ring — is computed at construction;
``pick`` reads the clock once, looks things up and allocates nothing.

Health is not the balancer's business: it only asks ``TargetState.available(now)``, which the
active and passive health checks (``gateway.upstream.health``) drive.
"""

from __future__ import annotations

import random
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from hashlib import blake2b
from itertools import accumulate
from math import gcd
from typing import Protocol

from gateway.upstream.target import TargetState

__all__ = [
    "Balancer",
    "ConsistentHash",
    "LeastRequest",
    "RoundRobin",
    "hash_key_extractor",
    "make_balancer",
]


class Balancer(Protocol):
    def pick(
        self, hash_key: str | None = None, exclude: TargetState | None = None
    ) -> TargetState | None:
        """An available target, or None when there is none.

        ``exclude`` is the target whose attempt just failed: a retry goes elsewhere when any
        other target is available, and back to it only when it is the only one left.
        """
        ...


def make_balancer(kind: str, targets: Sequence[TargetState]) -> Balancer:
    """The balancer for ``Upstream.loadBalancing`` over ``targets``."""
    if kind == "round-robin":
        return RoundRobin(targets)
    if kind == "least-request":
        return LeastRequest(targets)
    if kind == "consistent-hash":
        return ConsistentHash(targets)
    raise ValueError(f"unknown load balancing {kind!r}")


def _reduced_weights(targets: Sequence[TargetState]) -> list[int]:
    """Weights divided by their common divisor: 10/2/2 balances exactly like 5/1/1."""
    divisor = 0
    for target in targets:
        divisor = gcd(divisor, max(target.weight, 0))
    return [max(t.weight, 0) // divisor if divisor else 0 for t in targets]


# --- round-robin ----------------------------------------------------------------------------

# Above this many steps (schedule length x targets) the precomputed cycle costs more at config
# load (~10 ms at this size) than it saves per pick; such services use the live algorithm only.
_MAX_SCHEDULE_WORK = 100_000


class RoundRobin:
    """nginx's smooth weighted round-robin (``ngx_http_upstream_get_peer``).

    Each pick adds every target's weight to its ``current`` and takes the largest, which then
    gives back the total: weights 5/1/1 yield ``a a b a c a a``, spreading the heavy target out
    instead of sending it five requests in a row. The sequence is deterministic and repeats
    every ``sum(weights)`` picks, so while every target is available it is precomputed once and
    ``pick`` is one index step (O(1)). A slot whose target is unavailable (or excluded) is
    served by the same algorithm run live over the available targets only (O(n)), which keeps
    the shares of the remaining targets proportional to their weights.
    """

    __slots__ = (
        "_current",
        "_next",
        "_schedule",
        "_weights",
        "targets",
    )

    def __init__(self, targets: Sequence[TargetState]) -> None:
        self.targets = list(targets)
        self._weights = _reduced_weights(self.targets)
        self._current = [0] * len(self.targets)
        self._schedule = self._cycle() if self._cycle_work() <= _MAX_SCHEDULE_WORK else []
        self._next = 0

    def _cycle_work(self) -> int:
        return sum(self._weights) * len(self.targets)

    def _cycle(self) -> list[TargetState]:
        current = [0] * len(self.targets)
        total = sum(self._weights)
        cycle = []
        for _ in range(total):
            best = -1
            for i, weight in enumerate(self._weights):
                if weight <= 0:
                    continue
                current[i] += weight
                if best < 0 or current[i] > current[best]:
                    best = i
            current[best] -= total
            cycle.append(self.targets[best])
        return cycle

    def pick(
        self, hash_key: str | None = None, exclude: TargetState | None = None
    ) -> TargetState | None:
        now = time.monotonic()
        schedule = self._schedule
        if schedule:
            slot = self._next
            self._next = slot + 1 if slot + 1 < len(schedule) else 0
            target = schedule[slot]
            if target is not exclude and target.available(now):
                return target
        return self._pick_live(now, exclude)

    def _pick_live(self, now: float, exclude: TargetState | None) -> TargetState | None:
        targets, weights, current = self.targets, self._weights, self._current
        best = -1
        total = 0
        for i, target in enumerate(targets):
            if target is exclude or not target.available(now):
                continue
            current[i] += weights[i]
            total += weights[i]
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return exclude if exclude is not None and exclude.available(now) else None
        current[best] -= total
        return targets[best]


# --- least-request --------------------------------------------------------------------------

# Weighted samples tried before falling back to a scan when most targets are unavailable.
_SAMPLE_ATTEMPTS = 4


class LeastRequest:
    """Power of two random choices (Envoy's ``LEAST_REQUEST``), weighted.

    Two targets are drawn at random with probability proportional to their weight (a bisect
    into precomputed cumulative weights, O(log n)); the one with fewer requests in flight per
    unit of weight wins, ties going to the first draw. So at idle the traffic splits by weight,
    and under load a slow target, whose requests pile up, is drawn but rarely chosen. Two draws
    avoid the herd effect of "always the least loaded" (Mitzenmacher, *The Power of Two
    Choices*, 2001): replicas with slightly stale counts do not all rush the same target.

    With equal weights and at most two targets two random draws add nothing but the chance of
    drawing the same target twice, so those services scan instead, starting the scan one target
    further each time so that ties alternate.
    """

    __slots__ = (
        "_cumulative",
        "_drawable",
        "_rand",
        "_rotation",
        "_scan_only",
        "_total",
        "targets",
    )

    def __init__(
        self, targets: Sequence[TargetState], rand: Callable[[], float] = random.random
    ) -> None:
        self.targets = list(targets)
        weights = _reduced_weights(self.targets)
        self._drawable = [t for t, w in zip(self.targets, weights, strict=True) if w > 0]
        self._cumulative = list(accumulate(w for w in weights if w > 0))
        self._total = self._cumulative[-1] if self._cumulative else 0
        equal_weights = len(set(weights)) <= 1
        self._scan_only = not self._drawable or (len(self.targets) <= 2 and equal_weights)
        self._rand = rand
        self._rotation = 0

    def pick(
        self, hash_key: str | None = None, exclude: TargetState | None = None
    ) -> TargetState | None:
        now = time.monotonic()
        if self._scan_only:
            return self._scan(now, exclude)
        drawable, cumulative, total = self._drawable, self._cumulative, self._total
        rand = self._rand
        first = drawable[bisect_right(cumulative, rand() * total)]
        if first is exclude or not first.available(now):
            redrawn = self._redraw(now, exclude)
            if redrawn is None:
                return self._scan(now, exclude)
            first = redrawn
        second = drawable[bisect_right(cumulative, rand() * total)]
        if second is exclude or not second.available(now):
            redrawn = self._redraw(now, exclude)
            if redrawn is None:
                return first
            second = redrawn
        if second is first:
            return first
        # first.load / first.weight <= second.load / second.weight, without division.
        if (
            first.load_source.in_flight * second.weight
            <= second.load_source.in_flight * first.weight
        ):
            return first
        return second

    def _redraw(self, now: float, exclude: TargetState | None) -> TargetState | None:
        drawable, cumulative, total = self._drawable, self._cumulative, self._total
        for _ in range(_SAMPLE_ATTEMPTS):
            target = drawable[bisect_right(cumulative, self._rand() * total)]
            if target is not exclude and target.available(now):
                return target
        return None

    def _scan(self, now: float, exclude: TargetState | None) -> TargetState | None:
        targets = self.targets
        count = len(targets)
        if not count:
            return None
        start = self._rotation
        self._rotation = start + 1 if start + 1 < count else 0
        best: TargetState | None = None
        for offset in range(count):
            index = start + offset
            target = targets[index if index < count else index - count]
            if target is exclude or not target.available(now):
                continue
            if best is None or (
                target.load_source.in_flight * best.weight
                < best.load_source.in_flight * target.weight
            ):
                best = target
        if best is None and exclude is not None and exclude.available(now):
            return exclude
        return best


# --- consistent-hash ------------------------------------------------------------------------

POINTS_PER_WEIGHT = 160  # ketama's 160 points per server: ~±10 % spread with equal weights
_MAX_RING_POINTS = 32_768  # ~50 ms to build; beyond it weights are scaled down to fit
_WALK_BEFORE_CHECK = 64  # ring points to walk before checking whether anything is up at all


def _hash64(data: str) -> int:
    # blake2b, not hash(): Python salts str hashes per process, and every gateway replica must
    # map a key to the same target. Measured ~0.45 µs per key; zlib.crc32 is faster but only 32
    # bits and linear, which clusters similar keys such as consecutive IPs on the ring.
    digest = blake2b(data.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class ConsistentHash:
    """A hash ring with virtual nodes (Karger et al. 1997; ketama's layout).

    Each target owns ``160 x weight`` points (weights first divided by their common divisor),
    placed by hashing ``"<url>#<n>"``; a key goes to the first point clockwise from its hash
    (bisect, O(log points)). A point's position depends only on its target's URL, so removing
    a target from the config moves only the keys it owned, and an unavailable target is simply
    walked past, which moves only its keys, to the next target clockwise; they come back when
    it does. This holds exactly while the weights' common divisor is unchanged (always with
    equal weights) and the ring fits ``_MAX_RING_POINTS``.

    Without a key (``hash_key=None``) a pick starts from a random point, i.e. random by weight.
    """

    __slots__ = (
        "_owners",
        "_points",
        "_rand",
        "targets",
    )

    def __init__(
        self,
        targets: Sequence[TargetState],
        points_per_weight: int = POINTS_PER_WEIGHT,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.targets = list(targets)
        weights = _reduced_weights(self.targets)
        total = sum(weights) * points_per_weight
        scale = min(1.0, _MAX_RING_POINTS / total) if total else 1.0
        ring: list[tuple[int, str, TargetState]] = []
        for target, weight in zip(self.targets, weights, strict=True):
            if weight <= 0:
                continue
            count = max(1, round(weight * points_per_weight * scale))
            ring.extend((_hash64(f"{target.url}#{n}"), target.url, target) for n in range(count))
        # Sorting by URL second keeps the ring identical whatever order the targets came in.
        ring.sort(key=lambda point: point[:2])
        self._points = [point for point, _, _ in ring]
        self._owners = [target for _, _, target in ring]
        self._rand = rand

    def pick(
        self, hash_key: str | None = None, exclude: TargetState | None = None
    ) -> TargetState | None:
        now = time.monotonic()
        points = self._points
        size = len(points)
        if not size:
            return None
        if hash_key is None:
            index = int(self._rand() * size)
        else:
            index = bisect_left(points, _hash64(hash_key))
            if index == size:
                index = 0
        target = self._owners[index]
        if target is not exclude and target.available(now):
            return target
        return self._walk(now, index, exclude)

    def _walk(self, now: float, index: int, exclude: TargetState | None) -> TargetState | None:
        """Clockwise from ``index`` to the first point of an available target."""
        owners = self._owners
        size = len(owners)
        for step in range(1, size):
            index = index + 1 if index + 1 < size else 0
            target = owners[index]
            if target is not exclude and target.available(now):
                return target
            if step == _WALK_BEFORE_CHECK and not self._any_available(now, exclude):
                break  # everything is down: do not walk the whole ring to find that out
        if exclude is not None and exclude.available(now):
            return exclude
        return None

    def _any_available(self, now: float, exclude: TargetState | None) -> bool:
        return any(t is not exclude and t.available(now) for t in self.targets)


# --- hash keys ------------------------------------------------------------------------------


class HeaderSource(Protocol):
    """Where a hash key's header comes from: any case-insensitive ``get`` (the gateway's
    `IncomingRequest`, a ``CIMultiDict``)."""

    def get(self, name: str, default: None = None, /) -> str | None: ...


HashKeyExtractor = Callable[[HeaderSource, str], str]


def hash_key_extractor(hash_on: str) -> HashKeyExtractor:
    """Compile ``Upstream.hashOn`` into ``(request headers, client ip) -> hash key``.

    ``headers`` must be case-insensitive (aiohttp's ``CIMultiDictProxy``). A missing or empty
    header or cookie falls back to the client IP, so such clients still stick to one target.
    """
    if hash_on == "ip":
        return _client_ip
    kind, _, name = hash_on.partition(":")
    if kind == "header" and name:

        def header_value(headers: HeaderSource, client_ip: str) -> str:
            return headers.get(name) or client_ip

        return header_value
    if kind == "cookie" and name:
        prefix = name + "="

        def cookie_value(headers: HeaderSource, client_ip: str) -> str:
            cookie = headers.get("Cookie")
            if cookie and prefix in cookie:
                # RFC 6265 section 4.2.1: cookie-pair *( ";" SP cookie-pair ); names are
                # case-sensitive; a value may be wrapped in DQUOTEs.
                for pair in cookie.split(";"):
                    pair = pair.strip()
                    if pair.startswith(prefix):
                        value = pair[len(prefix) :].strip('"')
                        return value or client_ip
            return client_ip

        return cookie_value
    raise ValueError(f"hashOn must be 'ip', 'header:<name>' or 'cookie:<name>', not {hash_on!r}")


def _client_ip(headers: HeaderSource, client_ip: str) -> str:
    return client_ip
