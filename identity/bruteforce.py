"""Login throttling per account and per IP address, shared by every hub replica through Redis.

NIST SP 800-63B §5.2.2 asks verifiers to limit consecutive failed attempts per account; the
OWASP Authentication Cheat Sheet ("Account Lockout") adds an exponential lockout and a
per-source limit so one address cannot try many accounts. The default policy:

- **per account**: the 5th consecutive failure locks the account for 30 s, and each further
  failure (once the lock has passed) for twice as long as the last (60 s, 120 s, ...) up to
  15 minutes. A success resets the count; it is forgotten after 24 h without failures. The
  lockout is short on purpose: anyone can lock a known username, so it must slow guessing
  without locking the owner out for long.
- **per IP address**: 100 failures in a 15-minute window that starts at the first failure;
  IPv6 addresses count per /64, the block one subscriber usually holds. A success does *not*
  reset it (one valid account would otherwise launder a guessing campaign).

Where Redis is configured, one Lua script records a failure, so concurrent failures on any
number of replicas are counted exactly. If Redis fails, :class:`LoginThrottle` keeps counting
in the process (:class:`LocalThrottleStore`) rather than refusing every login or letting
guesses through unchecked, and logs that once per outage.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

_E = TypeVar("_E")
_R = TypeVar("_R")


@dataclass(frozen=True)
class ThrottlePolicy:
    account_lockout_threshold: int = 5
    account_base_lockout: float = 30.0
    account_max_lockout: float = 900.0
    account_forget_after: float = 24 * 3600.0
    ip_max_failures: int = 100
    ip_window: float = 900.0

    def lockout_after(self, failures: int) -> float:
        """Seconds an account is locked after its ``failures``-th consecutive failure."""
        if failures < self.account_lockout_threshold:
            return 0.0
        exponent = min(failures - self.account_lockout_threshold, 32)
        return min(self.account_base_lockout * 2**exponent, self.account_max_lockout)


@dataclass(frozen=True)
class ThrottleDecision:
    allowed: bool
    retry_after: float  # seconds; 0 when allowed


class ThrottleStoreUnavailable(Exception):
    """The shared store did not answer; the throttle falls back to counting locally."""


class ThrottleStore(Protocol):
    async def blocked_until(
        self, account: str | None, ip: str, now: float, policy: ThrottlePolicy
    ) -> tuple[float, float]:
        """(account locked until, IP blocked until), epoch seconds; 0 when not blocked."""
        ...

    async def record_failure(
        self, account: str | None, ip: str, now: float, policy: ThrottlePolicy
    ) -> None: ...

    async def reset_account(self, account: str) -> None: ...


def account_key(account: str) -> str:
    """Usernames are compared case-insensitively and kept out of store keys."""
    return hashlib.sha256(account.strip().casefold().encode()).hexdigest()[:32]


def ip_key(ip: str) -> str:
    """The address, or its /64 for IPv6 (one subscriber usually holds a whole /64)."""
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return ip.strip()
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass
class _Account:
    failures: int
    locked_until: float
    expires_at: float


@dataclass
class _Address:
    failures: int
    window_ends: float


class LocalThrottleStore:
    """Counts in this process; at most ``max_entries`` accounts and addresses each (LRU)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._accounts: OrderedDict[str, _Account] = OrderedDict()
        self._addresses: OrderedDict[str, _Address] = OrderedDict()

    def __len__(self) -> int:
        return len(self._accounts) + len(self._addresses)

    async def blocked_until(
        self, account: str | None, ip: str, now: float, policy: ThrottlePolicy
    ) -> tuple[float, float]:
        acct = self._accounts.get(account) if account is not None else None
        locked = acct.locked_until if acct is not None and acct.expires_at > now else 0.0
        addr = self._addresses.get(ip)
        blocked = 0.0
        if addr is not None and addr.window_ends > now and addr.failures >= policy.ip_max_failures:
            blocked = addr.window_ends
        return locked, blocked

    async def record_failure(
        self, account: str | None, ip: str, now: float, policy: ThrottlePolicy
    ) -> None:
        addr = self._addresses.pop(ip, None)
        if addr is None or addr.window_ends <= now:
            addr = _Address(0, now + policy.ip_window)
        addr.failures += 1
        self._addresses[ip] = addr
        _trim(self._addresses, self.max_entries, now, lambda a: a.window_ends)
        if account is None:
            return
        acct = self._accounts.pop(account, None)
        if acct is None or acct.expires_at <= now:
            acct = _Account(0, 0.0, 0.0)
        acct.failures += 1
        lockout = policy.lockout_after(acct.failures)
        if lockout:
            acct.locked_until = now + lockout
        acct.expires_at = max(now + policy.account_forget_after, acct.locked_until)
        self._accounts[account] = acct
        _trim(self._accounts, self.max_entries, now, lambda a: a.expires_at)

    async def reset_account(self, account: str) -> None:
        self._accounts.pop(account, None)


def _trim(
    entries: OrderedDict[str, _E], limit: int, now: float, expiry: Callable[[_E], float]
) -> None:
    # Oldest first: drop expired entries at the front, then the least recently updated.
    while entries:
        key, oldest = next(iter(entries.items()))
        if expiry(oldest) > now and len(entries) <= limit:
            break
        del entries[key]


# KEYS[1] = IP key, KEYS[2] = account key (optional)
# ARGV = now_ms, ip_window_ms, lockout_threshold, base_lockout_ms, max_lockout_ms, forget_ms
_FAILURE_SCRIPT = """
local now = tonumber(ARGV[1])
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if #KEYS < 2 then return n end
local failures = redis.call('HINCRBY', KEYS[2], 'f', 1)
local free = tonumber(ARGV[3])
local ttl = tonumber(ARGV[6])
if failures >= free then
  local lock = tonumber(ARGV[4]) * 2 ^ math.min(failures - free, 32)
  lock = math.min(lock, tonumber(ARGV[5]))
  redis.call('HSET', KEYS[2], 'u', string.format('%d', now + lock))
  ttl = math.max(ttl, lock)
end
redis.call('PEXPIRE', KEYS[2], string.format('%d', ttl))
return n
"""


class RedisThrottleStore:
    """Counters in Redis, shared by every replica; failures are recorded by one Lua script.

    Keys: ``{prefix}a:{account}`` (hash: ``f`` consecutive failures, ``u`` locked until, ms)
    and ``{prefix}ip:{address}`` (failure count, expiring at the end of its window).
    """

    def __init__(self, redis: Redis, *, prefix: str = "cityplane:identity:throttle:") -> None:
        self._redis = redis
        self.prefix = prefix
        self._failure = redis.register_script(_FAILURE_SCRIPT)

    async def blocked_until(
        self, account: str | None, ip: str, now: float, policy: ThrottlePolicy
    ) -> tuple[float, float]:
        account_field = self.prefix + "a:" + account if account is not None else None
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(self.prefix + "ip:" + ip)
                pipe.pttl(self.prefix + "ip:" + ip)
                if account_field is not None:
                    pipe.hget(account_field, "u")
                replies = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise ThrottleStoreUnavailable(str(exc)) from exc
        count, pttl = replies[0], replies[1]
        blocked = 0.0
        if count is not None and int(count) >= policy.ip_max_failures and pttl > 0:
            blocked = now + pttl / 1000
        locked = int(replies[2]) / 1000 if len(replies) > 2 and replies[2] else 0.0
        return locked, blocked

    async def record_failure(
        self, account: str | None, ip: str, now: float, policy: ThrottlePolicy
    ) -> None:
        keys = [self.prefix + "ip:" + ip]
        if account is not None:
            keys.append(self.prefix + "a:" + account)
        args = [
            int(now * 1000),
            int(policy.ip_window * 1000),
            policy.account_lockout_threshold,
            int(policy.account_base_lockout * 1000),
            int(policy.account_max_lockout * 1000),
            int(policy.account_forget_after * 1000),
        ]
        try:
            await self._failure(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise ThrottleStoreUnavailable(str(exc)) from exc

    async def reset_account(self, account: str) -> None:
        try:
            await self._redis.delete(self.prefix + "a:" + account)
        except (RedisError, OSError, TimeoutError) as exc:
            raise ThrottleStoreUnavailable(str(exc)) from exc


class LoginThrottle:
    """Ask :meth:`check` before verifying a password; report the outcome with
    :meth:`failed` or :meth:`succeeded`. ``account`` may be None when the username is unknown
    (only the IP address is counted then).

    When the shared store fails, the throttle counts in this process and asks the shared store
    again only every ``retry_interval`` seconds, so an outage costs one slow call per interval,
    not one per login. Give the Redis client short timeouts and no retries of its own (as the
    gateway's rate limiter does): a login should not wait seconds for a counter.
    """

    def __init__(
        self,
        store: ThrottleStore | None = None,
        policy: ThrottlePolicy | None = None,
        *,
        fallback: ThrottleStore | None = None,
        clock: Callable[[], float] = time.time,
        retry_interval: float = 5.0,
    ) -> None:
        self.policy = policy or ThrottlePolicy()
        self.retry_interval = retry_interval
        self._retry_at = 0.0
        self._clock = clock
        self._local = fallback or LocalThrottleStore()
        self._store = store or self._local
        self._degraded = False

    async def check(self, account: str | None, ip: str) -> ThrottleDecision:
        acct = account_key(account) if account is not None else None
        now = self._clock()
        locked, blocked = await self._call(
            lambda s: s.blocked_until(acct, ip_key(ip), now, self.policy)
        )
        wait = max(locked, blocked) - now
        if wait > 0:
            return ThrottleDecision(False, wait)
        return ThrottleDecision(True, 0.0)

    async def failed(self, account: str | None, ip: str) -> None:
        acct = account_key(account) if account is not None else None
        now = self._clock()
        await self._call(lambda s: s.record_failure(acct, ip_key(ip), now, self.policy))

    async def succeeded(self, account: str, ip: str) -> None:
        acct = account_key(account)
        await self._call(lambda s: s.reset_account(acct))

    async def _call(self, op: Callable[[ThrottleStore], Awaitable[_R]]) -> _R:
        if self._store is self._local:
            return await op(self._local)
        if self._degraded and self._clock() < self._retry_at:
            return await op(self._local)
        try:
            result = await op(self._store)
        except ThrottleStoreUnavailable as exc:
            self._retry_at = self._clock() + self.retry_interval
            if not self._degraded:
                self._degraded = True
                log.warning(
                    "login throttle store unavailable (%s); counting in this process until it"
                    " is back",
                    exc,
                )
            return await op(self._local)
        if self._degraded:
            self._degraded = False
            log.warning("login throttle store is back; counting there again")
        return result
