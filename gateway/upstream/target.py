"""One upstream instance of a service, as the balancer and the health checks see it."""

from __future__ import annotations

from typing import Protocol, cast
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


class _CountsInFlight(Protocol):
    in_flight: int


class TargetState:
    """One upstream instance: its address, its weight and what health checks think of it.

    Balancers read it on every pick, so it is a slotted object with plain attributes and one
    cheap predicate, :meth:`available`. The core sets :attr:`pool` and moves :attr:`in_flight`;
    ``gateway.upstream.health`` owns :attr:`healthy`, :attr:`ejected_until` and the counters
    below them.
    """

    __slots__ = (
        "_pool",
        "ejected_until",
        "healthy",
        "host",
        "in_flight",
        "load_source",
        "passive_failures",
        "port",
        "probe_failures",
        "probe_successes",
        "scheme",
        "service",
        "url",
        "weight",
    )

    def __init__(self, service: str, url: str, weight: int, pool: object | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL with a host")
        self.service = service
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or _DEFAULT_PORTS[parts.scheme]
        self.weight = weight
        self.in_flight = 0
        self.healthy = True
        self.ejected_until = 0.0  # time.monotonic() deadline of a passive ejection, 0 if none
        # Health bookkeeping (consecutive counts), owned by gateway.upstream.health.
        self.passive_failures = 0
        self.probe_successes = 0
        self.probe_failures = 0
        # What counts this target's requests in flight: the pool when it keeps a count, else
        # the target itself. Least-request reads ``load_source.in_flight`` on every pick.
        self.load_source: _CountsInFlight = self
        self.pool = pool

    @property
    def pool(self) -> object | None:
        """The core's connection pool for this host; opaque here except ``in_flight``."""
        return self._pool

    @pool.setter
    def pool(self, pool: object | None) -> None:
        self._pool = pool
        # Decided once here, not per pick: read the pool's count when it keeps one.
        counts = pool is not None and hasattr(pool, "in_flight")
        self.load_source = cast(_CountsInFlight, pool) if counts else self

    @property
    def load(self) -> int:
        """Requests in flight to this target (the pool's count when it has one)."""
        return self.load_source.in_flight

    def available(self, now: float) -> bool:
        """Whether the balancer may send a request here at ``now`` (``time.monotonic()``)."""
        return self.healthy and self.ejected_until <= now and self.weight > 0

    def __repr__(self) -> str:
        return f"TargetState({self.service!r}, {self.url!r}, weight={self.weight})"
