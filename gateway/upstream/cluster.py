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
from gateway.upstream.breaker import (
    BreakerOpen,
    BreakerPermit,
    SharedBreakerState,
    UpstreamBreaker,
)
from gateway.upstream.client import (
    HostPool,
    UpstreamError,
    UpstreamTimeout,
    encode_request_head,
)
from gateway.upstream.health import ActiveHealthChecker, PassiveHealth
from gateway.upstream.http1 import Http1Connection, UpstreamResponse
from gateway.upstream.target import TargetState

log = logging.getLogger("cityplane.gateway.upstream")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
RETRYABLE_STATUS = frozenset({502, 503, 504})


class UpstreamCluster:
    __slots__ = (
        "_budget_ratio",
        "_errors",
        "_hash_key",
        "_meta",
        "_min_retry",
        "_pools",
        "_retries",
        "active",
        "active_requests",
        "active_retries",
        "balancer",
        "breaker",
        "passive",
        "request_timeout",
        "retry_attempts",
        "service",
        "spec",
        "targets",
    )

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
        self.passive: PassiveHealth = PassiveHealth(service, spec.healthCheck, targets=self.targets)
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
        resume: Resume | None = None,
    ) -> tuple[UpstreamResponse, TargetState]:
        """Send one request; returns the response (caller releases it) and the target used.

        Raises ``Problem`` 503 (breaker open / no healthy target), 504 (timeout) or 502.
        ``resume``: the first attempt was made inline (`start_inline`); go on from there.
        """
        replayable = body is None or isinstance(body, bytes)
        attempts = 1 + self.retry_attempts if method in IDEMPOTENT and replayable else 1
        hash_key = self._hash_key(request_headers, client_ip) if self._hash_key else None
        exclude: TargetState | None = None
        first = 0
        redo: tuple[TargetState, BreakerPermit | None] | None = None
        if resume is not None:
            first, exclude, redo = resume.attempt, resume.exclude, resume.redo
        self.active_requests += 1
        retrying = False
        try:
            if first:
                retrying = self._count_retry(retrying)  # the retry the inline attempt decided
            for attempt in range(first, attempts):
                last = attempt + 1 == attempts
                if redo is not None:
                    (target, permit), redo, fresh = redo, None, True
                else:
                    target, permit = self._choose(hash_key, exclude)
                    fresh = False
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
                        fresh=fresh,
                    )
                except UpstreamError as exc:
                    if self._settle_error(target, permit, exc, method, replayable, last):
                        exclude = target
                        retrying = self._count_retry(retrying)
                        continue
                    raise AssertionError("unreachable: _settle_error raises") from None
                except BaseException:
                    # Not the upstream's fault (a body too large or too slow, a cancelled
                    # request): no outcome, but the permit (maybe the half-open trial) is freed.
                    if permit is not None:
                        permit.abandon()
                    raise
                if self._settle_response(target, permit, resp, last):
                    resp.release()
                    exclude = target
                    retrying = self._count_retry(retrying)
                    continue
                return resp, target
            raise AssertionError("unreachable: the last attempt returns or raises")
        finally:
            self.active_requests -= 1
            if retrying:
                self.active_retries -= 1

    def start_inline(
        self,
        method: str,
        target_path: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        *,
        request_headers: HeaderSource,
        client_ip: str,
        raw_fields: bytes,
        on_ready: Callable[[], None],
    ) -> InlineAttempt | Resume:
        """`send`'s first attempt without waiting (docs/adr/0014-inline-exchanges.md).

        When the picked target has an idle keep-alive connection, the request is written on
        it and an `InlineAttempt` returned; ``on_ready`` is called (from the upstream
        connection's callbacks) once it has an outcome, which `InlineAttempt.settle` tells.
        Otherwise the `Resume` for `send` to make this attempt on a new connection (same
        target, same breaker permit: the balancer's choice stands).
        Raises ``Problem`` 503 as `send` does, ``ValueError`` for fields that cannot be sent.
        """
        hash_key = self._hash_key(request_headers, client_ip) if self._hash_key else None
        target = self.balancer.pick(hash_key, None)
        if target is None:
            raise self._no_target()
        # Typed: take_idle_now() and start_inline() are C calls (ADR 17/18).
        pool: HostPool = self._pools[id(target)]
        base, host = self._meta[id(target)]
        head, _chunked = encode_request_head(
            method, base + target_path, [("Host", host), *headers], body, None, raw_fields
        )
        permit = self._permit()
        conn: Http1Connection | None = pool.take_idle_now()
        if conn is None:  # none idle (or they had expired or closed): send() connects
            return Resume(0, redo=(target, permit))
        attempt = InlineAttempt(self, target, permit, pool, conn, method, body)
        self.active_requests += 1
        pool.start_inline(
            conn,
            head,
            body,
            is_head=method == "HEAD",
            timeout=self.request_timeout,
            on_ready=on_ready,
        )
        return attempt

    # -- the steps of an attempt, shared by send() and inline attempts ---------------------------

    def _no_target(self) -> Problem:
        return Problem(
            503,
            "no-healthy-upstream",
            f"no healthy instance of {self.service!r} is available",
            headers={"Retry-After": "1"},
        )

    def _permit(self) -> BreakerPermit | None:
        if self.breaker is None:
            return None
        try:
            return self.breaker.acquire()
        except BreakerOpen as exc:
            raise Problem(
                503,
                "circuit-open",
                f"{self.service!r} is failing; requests are paused",
                headers={"Retry-After": str(max(1, round(exc.retry_after + 0.49)))},
            ) from None

    def _choose(
        self, hash_key: str | None, exclude: TargetState | None
    ) -> tuple[TargetState, BreakerPermit | None]:
        target = self.balancer.pick(hash_key, exclude)
        if target is None:
            raise self._no_target()
        return target, self._permit()

    def _settle_error(
        self,
        target: TargetState,
        permit: BreakerPermit | None,
        exc: UpstreamError,
        method: str,
        replayable: bool,
        last: bool,
    ) -> bool:
        """Book a failed attempt; True to retry on another target, else raises the Problem."""
        if permit is not None:
            permit.failure()
        self.passive.record(target, False)
        timed_out = isinstance(exc, UpstreamTimeout)
        kind = "timeout" if timed_out else ("connect" if not exc.request_sent else "protocol")
        self._errors[kind].inc()
        can_retry = not exc.request_sent or method in IDEMPOTENT
        if not last and can_retry and replayable and self._retry_allowed():
            return True
        if timed_out:
            raise Problem(
                504,
                "upstream-timeout",
                f"{self.service!r} did not answer within {self.request_timeout:g}s",
            ) from None
        raise Problem(
            502, "upstream-unavailable", f"{self.service!r} could not be reached"
        ) from None

    def body_failed(self, target: TargetState, exc: UpstreamError) -> Problem:
        """A response's body failed after its head was accepted: a failure of ``target``
        (passive health, errors), and the Problem that answers if nothing was sent yet."""
        self.passive.record(target, False)
        timed_out = isinstance(exc, UpstreamTimeout)
        self._errors["timeout" if timed_out else "protocol"].inc()
        if timed_out:
            return Problem(
                504,
                "upstream-timeout",
                f"{self.service!r} did not finish its answer within {self.request_timeout:g}s",
            )
        return Problem(502, "upstream-unavailable", f"{self.service!r} broke off its answer: {exc}")

    def _settle_response(
        self,
        target: TargetState,
        permit: BreakerPermit | None,
        resp: UpstreamResponse,
        last: bool,
    ) -> bool:
        """Book an answered attempt; True to retry it on another target (a retryable 5xx)."""
        if resp.status >= 500:
            if permit is not None:
                permit.failure()
            self.passive.record(target, False)
            self._errors["status_5xx"].inc()
            return not last and resp.status in RETRYABLE_STATUS and self._retry_allowed()
        if permit is not None:
            permit.success()
        self.passive.record(target, True)
        return False


class Resume:
    """Where `UpstreamCluster.send` goes on after an inline first attempt (ADR 14): a retry
    (``attempt`` 1, not on ``exclude``), or the same attempt again on a new connection to the
    same target with the same breaker permit (``redo``: the stale keep-alive rule)."""

    __slots__ = ("attempt", "exclude", "redo")

    def __init__(
        self,
        attempt: int,
        exclude: TargetState | None = None,
        redo: tuple[TargetState, BreakerPermit | None] | None = None,
    ) -> None:
        self.attempt = attempt
        self.exclude = exclude
        self.redo = redo

    def abandon(self) -> None:
        """Not to be sent after all (the client left): a held breaker permit is freed."""
        if self.redo is not None and self.redo[1] is not None:
            self.redo[1].abandon()


class InlineAttempt:
    """`UpstreamCluster.send`'s first attempt, made by `start_inline` without a coroutine."""

    __slots__ = ("_body", "_cluster", "_conn", "_method", "_permit", "_pool", "target")

    def __init__(
        self,
        cluster: UpstreamCluster,
        target: TargetState,
        permit: BreakerPermit | None,
        pool: HostPool,
        conn: Http1Connection,
        method: str,
        body: bytes | None,
    ) -> None:
        self._cluster = cluster
        self.target = target
        self._permit = permit
        self._pool = pool
        self._conn = conn
        self._method = method
        self._body = body

    def settle(self) -> UpstreamResponse | Resume:
        """After ``on_ready``: the response (the caller relays and releases it), or where
        `send` goes on. Raises ``Problem`` 502/504 as `send` does."""
        cluster = self._cluster
        last = self._method not in IDEMPOTENT or cluster.retry_attempts == 0
        try:
            resp = self._conn.response
            if resp is None:
                exc = self._conn.error
                if self._pool.inline_failed(self._conn, self._method, self._body, exc):
                    return Resume(0, redo=(self.target, self._permit))
                if cluster._settle_error(self.target, self._permit, exc, self._method, True, last):
                    return Resume(1, exclude=self.target)
                raise AssertionError("unreachable: _settle_error raises")
            if cluster._settle_response(self.target, self._permit, resp, last):
                resp.release()
                return Resume(1, exclude=self.target)
            return resp
        finally:
            cluster.active_requests -= 1

    def abandon(self) -> None:
        """The client left before the outcome: the upstream connection is closed and the
        breaker permit freed without an outcome (as cancelling `send` does)."""
        self._cluster.active_requests -= 1
        self._pool.inline_abandoned(self._conn)
        if self._permit is not None:
            self._permit.abandon()
