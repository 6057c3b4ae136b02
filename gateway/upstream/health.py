"""Whether an upstream target takes traffic: active probes and passive ejection.

Two independent signals, as in Envoy, both written onto the shared :class:`TargetState`:

* **Active** (:class:`ActiveHealthChecker`): one background task per service probes every
  target's ``healthCheck.path`` each ``interval``. ``unhealthyThreshold`` consecutive failures
  set ``healthy = False``; ``healthyThreshold`` consecutive successes set it back and also end a
  passive ejection early.
* **Passive** (:class:`PassiveHealth`, Envoy's outlier detection): the core reports every real
  attempt; ``passiveFailures`` consecutive failures eject the target for ``ejectionTime``.

``cityplane_gateway_upstream_target_healthy{service,target}`` follows both: 1 while the target
is healthy and not ejected, 0 otherwise; set when active checks start (or when a
``PassiveHealth`` is given the targets) and on every change after. A healthy weight-0 target
shows 1: it is drained by configuration, not failing, and alerts on the gauge should not fire.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from cityplane.schema import HealthCheck
from gateway.metrics import TARGET_HEALTHY
from gateway.upstream.target import TargetState

__all__ = ["ActiveHealthChecker", "PassiveHealth", "Probe", "close_probe_session", "http_probe"]

log = logging.getLogger(__name__)

Probe = Callable[[TargetState, str, float], Awaitable[bool]]

# Slack after an ejection deadline before the timer re-publishes the gauge, so that the timer
# never fires a hair before the deadline (asyncio may run a timer one clock tick early).
_EXPIRY_SLACK = 0.01


def _publish(target: TargetState, now: float) -> None:
    up = target.healthy and target.ejected_until <= now
    TARGET_HEALTHY.labels(service=target.service, target=target.url).set(1 if up else 0)


def _end_expired_ejection(target: TargetState, now: float) -> None:
    if target.ejected_until and target.ejected_until <= now:
        target.ejected_until = 0.0
        log.info("upstream %s of %s: ejection ended", target.url, target.service)
        _publish(target, now)


def _on_ejection_timer(target: TargetState) -> None:
    # A target ejected again meanwhile is still ejected here; its newer timer handles it.
    _end_expired_ejection(target, time.monotonic())


# --- passive ----------------------------------------------------------------------------------


def _other_available(peers: Iterable[TargetState], target: TargetState, now: float) -> bool:
    """Whether a peer other than ``target`` can take requests (outside ``record``, which a
    generator expression would keep from being a C method, ADR 18)."""
    return any(p is not target and p.available(now) for p in peers)


class PassiveHealth:
    """Eject a target after ``passiveFailures`` consecutive failed attempts (0 disables).

    An ejected target gets no traffic for ``ejectionTime``, then returns (or earlier, once
    active checks see ``healthyThreshold`` consecutive successes). Any success resets the
    count; failures reported while a target is already ejected (late answers of attempts made
    before) do not count.

    Ejection never takes out the last available target. This is Envoy's
    ``max_ejection_percent`` counted in targets: with one target left, failing requests get the
    upstream's own answer (and the circuit breaker's judgement) instead of a gateway-made 503
    for every request during ``ejectionTime``, and passive ejection alone can never empty a
    service. The target is ejected on its next failure once another target is available again.

    Which targets are "the others" comes from ``targets`` (pass the balancer's list) and from
    every target ever reported to :meth:`record`.
    """

    __slots__ = (
        "_ejection_time",
        "_peers",
        "_threshold",
        "service",
    )

    def __init__(
        self,
        service: str,
        spec: HealthCheck | None,
        *,
        targets: Sequence[TargetState] = (),
    ) -> None:
        spec = spec if spec is not None else HealthCheck()
        self.service = service
        self._threshold = spec.passiveFailures
        self._ejection_time = spec.ejectionTime
        self._peers: dict[TargetState, None] = dict.fromkeys(targets)  # an ordered set
        now = time.monotonic()
        for target in targets:
            _publish(target, now)

    def record(self, target: TargetState, ok: bool) -> None:
        """Report one real attempt's outcome (called by the core after every attempt)."""
        if self._threshold <= 0:
            return
        if target not in self._peers:
            self._peers[target] = None
        if ok:
            target.passive_failures = 0
            if target.ejected_until:
                _end_expired_ejection(target, time.monotonic())
            return
        now = time.monotonic()
        if target.ejected_until > now:
            return
        target.passive_failures += 1
        if target.passive_failures < self._threshold:
            return
        if not _other_available(self._peers, target, now):
            log.debug("upstream %s of %s: not ejected, no other target", target.url, self.service)
            return
        self._eject(target, now)

    def _eject(self, target: TargetState, now: float) -> None:
        target.ejected_until = now + self._ejection_time
        target.passive_failures = 0
        # Active checks end an ejection only after healthyThreshold successes counted from now.
        target.probe_successes = 0
        _publish(target, now)
        log.warning(
            "upstream %s of %s: ejected for %gs after %d consecutive failures",
            target.url,
            self.service,
            self._ejection_time,
            self._threshold,
        )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop to time it: the gauge is refreshed by the next record or probe
        loop.call_later(self._ejection_time + _EXPIRY_SLACK, _on_ejection_timer, target)


# --- active -----------------------------------------------------------------------------------


class ActiveHealthChecker:
    """Probe every target of one service each ``interval``, in one background task.

    All targets are probed concurrently, each bounded by ``timeout``; a round starts every
    ``interval`` (at once if the previous round took longer). A probe that returns False,
    raises or times out is a failure; nothing a probe does stops the task. With
    ``spec.active`` false :meth:`start` does nothing.
    """

    def __init__(
        self,
        service: str,
        targets: Sequence[TargetState],
        spec: HealthCheck,
        probe: Probe,
    ) -> None:
        self.service = service
        self.targets = list(targets)
        self._spec = spec
        self._probe = probe
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None and self._spec.active and self.targets:
            now = time.monotonic()
            for target in self.targets:
                _publish(target, now)
            self._task = asyncio.create_task(self._run(), name=f"health-check {self.service}")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    async def check_once(self) -> None:
        """Probe every target once and apply the results (one round of the task)."""
        await asyncio.gather(*(self._check(target) for target in self.targets))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.check_once()
            except Exception:
                # Only a bug of ours gets here (probe errors are caught per target); keep
                # checking rather than freeze every target's health where it stands.
                log.exception("health check round for %s failed", self.service)
            await asyncio.sleep(max(0.0, self._spec.interval - (loop.time() - started)))

    async def _check(self, target: TargetState) -> None:
        spec = self._spec
        reason = ""
        try:
            async with asyncio.timeout(spec.timeout):
                ok = bool(await self._probe(target, spec.path, spec.timeout))
            if not ok:
                reason = "unhealthy answer"
        except TimeoutError:
            ok, reason = False, f"no answer within {spec.timeout:g}s"
        except Exception as exc:
            log.debug("probe of %s failed", target.url, exc_info=True)
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        self._apply(target, ok, reason)

    def _apply(self, target: TargetState, ok: bool, reason: str) -> None:
        now = time.monotonic()
        _end_expired_ejection(target, now)
        spec = self._spec
        if not ok:
            target.probe_successes = 0
            target.probe_failures += 1
            if target.healthy and target.probe_failures >= spec.unhealthyThreshold:
                target.healthy = False
                _publish(target, now)
                log.warning(
                    "upstream %s of %s: unhealthy after %d failed probes (last: %s)",
                    target.url,
                    self.service,
                    target.probe_failures,
                    reason,
                )
            return
        target.probe_failures = 0
        target.probe_successes += 1
        if target.probe_successes < spec.healthyThreshold:
            return
        if not target.healthy or target.ejected_until:
            target.healthy = True
            target.ejected_until = 0.0
            target.passive_failures = 0
            _publish(target, now)
            log.info(
                "upstream %s of %s: healthy after %d good probes",
                target.url,
                self.service,
                target.probe_successes,
            )


# --- the default probe ------------------------------------------------------------------------

# Health checks are off the request path, so aiohttp's client, with its per-request overhead,
# is fine here; one session serves every checker in the process. force_close: each probe opens
# a fresh connection, so it also proves the target still accepts connections, and limit=0 keeps
# a service with many targets from queueing its own probes into timeouts.
_session: aiohttp.ClientSession | None = None
_session_loop: asyncio.AbstractEventLoop | None = None


def _probe_session() -> aiohttp.ClientSession:
    global _session, _session_loop
    loop = asyncio.get_running_loop()
    if _session is None or _session.closed or _session_loop is not loop:
        _session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            headers={"User-Agent": "cityplane-health-check"},
        )
        _session_loop = loop
    return _session


# The timeout argument is the Probe signature's: a custom probe may need it to size its own
# I/O; the checker also bounds every probe with asyncio.timeout.
async def http_probe(target: TargetState, path: str, timeout: float) -> bool:  # noqa: ASYNC109
    """GET ``path`` on the target's origin; True for a 2xx or 3xx answer (redirects not followed).

    The path is taken from the origin (scheme, host, port), not below a base path in the
    target's URL. Transport errors (refused, reset, TLS, timeout) raise; the checker counts
    them as failures and logs the last one when the target turns unhealthy.
    """
    url = urlunsplit((target.scheme, urlsplit(target.url).netloc, path, "", ""))
    request_timeout = aiohttp.ClientTimeout(total=timeout)
    async with _probe_session().get(url, timeout=request_timeout, allow_redirects=False) as resp:
        return 200 <= resp.status < 400


async def close_probe_session() -> None:
    """Close the shared probe session; call once at shutdown, after closing every checker."""
    global _session, _session_loop
    session, _session, _session_loop = _session, None, None
    if session is not None and not session.closed:
        await session.close()
