"""One service's upstream: targets, balancer, health, breaker, timeouts and retries together.

`UpstreamCluster.send` is the only way the proxy talks to a city service. It picks a target,
asks the breaker, sends through the target's keep-alive pool and retries idempotent requests
on another target within a retry budget (Envoy's retry budget: retries may add at most
`budgetPercent` of the requests in flight, but always `minRetryConcurrency`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, Callable
from urllib.parse import urlsplit

from cityplane.problem import Problem
from cityplane.schema import Upstream
from gateway import metrics
from gateway.upstream.balancer import HeaderSource, hash_key_extractor, make_balancer
from gateway.upstream.breaker import BreakerOpen, SharedBreakerState, UpstreamBreaker
from gateway.upstream.client import (
    HostPool,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
)
from gateway.upstream.health import ActiveHealthChecker, PassiveHealth
from gateway.upstream.target import TargetState

log = logging.getLogger("cityplane.gateway.upstream")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
RETRYABLE_STATUS = frozenset({502, 503, 504})


class UpstreamCluster:
    def __init__(
        self,
        service: str,
        spec: Upstream,
        *,
        shared_breakers: SharedBreakerState | None = None,
    ) -> None:
        self.service = service
        self.spec = spec
        self.targets: list[TargetState] = []
        # Per target: the URL's base path (prepended to every request) and the Host header.
        self._meta: dict[int, tuple[str, str]] = {}
        self._pools: dict[int, HostPool] = {}
        for t in spec.targets:
            target = TargetState(service, t.url, t.weight)
            pool = HostPool(
                target.scheme, target.host, target.port, connect_timeout=spec.timeouts.connect
            )
            target.pool = pool
            self._pools[id(target)] = pool
            parts = urlsplit(t.url)
            self._meta[id(target)] = (parts.path.rstrip("/"), parts.netloc)
            self.targets.append(target)
        self.balancer = make_balancer(spec.loadBalancing, self.targets)
        self._hash_key: Callable[[HeaderSource, str], str] | None = (
            hash_key_extractor(spec.hashOn) if spec.loadBalancing == "consistent-hash" else None
        )
        self.breaker = (
            UpstreamBreaker(service, spec.circuitBreaker, shared_breakers)
            if spec.circuitBreaker
            else None
        )
        self.passive = PassiveHealth(service, spec.healthCheck, targets=self.targets)
        hc = spec.healthCheck
        self.active = (
            ActiveHealthChecker(service, self.targets, hc, self._probe)
            if hc is not None and hc.active
            else None
        )
        self.request_timeout = spec.timeouts.request
        self.retry_attempts = spec.retries.attempts
        self._budget_ratio = spec.retries.budgetPercent / 100.0
        self._min_retry = spec.retries.minRetryConcurrency
        self.active_requests = 0
        self.active_retries = 0
        self._errors = {
            kind: metrics.UPSTREAM_ERRORS.labels(service, kind)
            for kind in ("connect", "timeout", "protocol", "status_5xx")
        }
        self._retries = metrics.RETRIES.labels(service)
        for target in self.targets:
            metrics.TARGET_HEALTHY.labels(service, target.url).set(1)

    async def start(self) -> None:
        if self.active is not None:
            await self.active.start()

    async def close(self) -> None:
        if self.active is not None:
            await self.active.close()
        for pool in self._pools.values():
            await pool.close()

    async def _probe(self, target: TargetState, path: str, timeout: float) -> bool:  # noqa: ASYNC109
        pool = self._pools[id(target)]
        base, host = self._meta[id(target)]
        headers = [("Host", host), ("User-Agent", "cityplane-health/1")]
        resp = await pool.request("GET", base + path, headers, None, timeout=timeout)
        try:
            await resp.read()
        finally:
            resp.release()
        return 200 <= resp.status < 400

    def _retry_allowed(self) -> bool:
        budget = max(self._min_retry, int(self.active_requests * self._budget_ratio))
        return self.active_retries < budget

    def _count_retry(self, retrying: bool) -> bool:
        """Book one more attempt; a request counts once in the budget however often it retries."""
        self._retries.inc()
        if not retrying:
            self.active_retries += 1
        return True

    def address(self, target: TargetState) -> tuple[str, str]:
        """A target's base path (prepended to every request path) and its Host field."""
        return self._meta[id(target)]

    async def send(
        self,
        method: str,
        target_path: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None,
        *,
        request_headers: HeaderSource,
        client_ip: str,
        content_length: int | None = None,
        raw_fields: bytes = b"",
    ) -> tuple[UpstreamResponse, TargetState]:
        """Send one request; returns the response (caller releases it) and the target used.

        Raises ``Problem`` 503 (breaker open / no healthy target), 504 (timeout) or 502.
        """
        replayable = body is None or isinstance(body, bytes)
        attempts = 1 + self.retry_attempts if method in IDEMPOTENT and replayable else 1
        hash_key = self._hash_key(request_headers, client_ip) if self._hash_key else None
        exclude: TargetState | None = None
        self.active_requests += 1
        retrying = False
        try:
            for attempt in range(attempts):
                last = attempt + 1 == attempts
                target = self.balancer.pick(hash_key, exclude)
                if target is None:
                    raise Problem(
                        503,
                        "no-healthy-upstream",
                        f"no healthy instance of {self.service!r} is available",
                        headers={"Retry-After": "1"},
                    )
                permit = None
                if self.breaker is not None:
                    try:
                        permit = self.breaker.acquire()
                    except BreakerOpen as exc:
                        raise Problem(
                            503,
                            "circuit-open",
                            f"{self.service!r} is failing; requests are paused",
                            headers={"Retry-After": str(max(1, round(exc.retry_after + 0.49)))},
                        ) from None
                base, host = self._meta[id(target)]
                # Least-request reads the pool's own in-flight count (held until release()).
                try:
                    resp = await self._pools[id(target)].request(
                        method,
                        base + target_path,
                        [("Host", host), *headers],
                        body,
                        timeout=self.request_timeout,
                        content_length=content_length,
                        raw_fields=raw_fields,
                    )
                except UpstreamError as exc:
                    if permit is not None:
                        permit.failure()
                    self.passive.record(target, False)
                    timed_out = isinstance(exc, UpstreamTimeout)
                    kind = (
                        "timeout"
                        if timed_out
                        else ("connect" if not exc.request_sent else "protocol")
                    )
                    self._errors[kind].inc()
                    can_retry = not exc.request_sent or method in IDEMPOTENT
                    if not last and can_retry and replayable and self._retry_allowed():
                        exclude = target
                        retrying = self._count_retry(retrying)
                        continue
                    if timed_out:
                        raise Problem(
                            504,
                            "upstream-timeout",
                            f"{self.service!r} did not answer within {self.request_timeout:g}s",
                        ) from None
                    raise Problem(
                        502, "upstream-unavailable", f"{self.service!r} could not be reached"
                    ) from None
                except BaseException:
                    # Not the upstream's fault (a body too large or too slow, a cancelled
                    # request): no outcome, but the permit (maybe the half-open trial) is freed.
                    if permit is not None:
                        permit.abandon()
                    raise
                if resp.status >= 500:
                    if permit is not None:
                        permit.failure()
                    self.passive.record(target, False)
                    self._errors["status_5xx"].inc()
                    if not last and resp.status in RETRYABLE_STATUS and self._retry_allowed():
                        resp.release()
                        exclude = target
                        retrying = self._count_retry(retrying)
                        continue
                else:
                    if permit is not None:
                        permit.success()
                    self.passive.record(target, True)
                return resp, target
            raise AssertionError("unreachable: the last attempt returns or raises")
        finally:
            self.active_requests -= 1
            if retrying:
                self.active_retries -= 1
