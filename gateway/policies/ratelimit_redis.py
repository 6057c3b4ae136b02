"""Rate-limit counters in Redis, shared by every gateway replica (the in-process store and the
algorithm: `gateway.policies.ratelimit_store`, docs/adr/0002-rate-limit-algorithm.md).

One Lua script decides a batch of hits, each exactly as `ratelimit_store._decide` would, at
one server clock; the store sends one batch at a time on a connection of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from gateway import metrics
from gateway.policies.ratelimit_store import (
    _US,
    Decision,
    StoreUnavailable,
    _new_tuple,
    window_micros,
)

if TYPE_CHECKING:
    # redis (~20 MB of RSS with its dependencies) is imported only by a gateway that has a
    # Redis URL: RSS per worker, issue #6.
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

_MAX_BATCH = 128  # hits per EVALSHA (Redis runs a script alone); a larger batch sends several

# KEYS[i] counter hash {w: window index, c: current, p: previous}, one per hit in the batch
# ARGV[2i-1], ARGV[2i] that hit's limit and window (µs). Returns, per key in order,
# {allowed, remaining, µs until reset}. The keys are decided one after the other, each exactly
# as a script of its own would (a key may repeat: its later hits see the earlier ones), at one
# server TIME, so that replicas' clocks do not matter; Redis >= 5 replicates the effects.
_HIT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function hit(key, limit, window)
  local index = math.floor(now / window)
  local s = redis.call('HMGET', key, 'w', 'c', 'p')
  local w = tonumber(s[1])
  local current = tonumber(s[2]) or 0
  local previous = tonumber(s[3]) or 0
  if w == nil or w < index - 1 then
    previous = 0
    current = 0
  elseif w == index - 1 then
    previous = current
    current = 0
  elseif w > index then
    index = w  -- the clock went back (a failover to a skewed replica): stay in the newer window
  end
  local left = window - math.max(0, now - index * window)
  local estimate = previous * left / window + current
  if estimate + 1 <= limit then
    redis.call('HSET', key, 'w', index, 'c', current + 1, 'p', previous)
    redis.call('PEXPIRE', key, math.max(1, math.ceil(2 * window / 1000)))
    return {1, math.max(0, math.floor(limit - estimate - 1)), left}
  end
  local wait
  if current + 1 <= limit then
    wait = left - (limit - 1 - current) * window / previous
  else
    wait = left + math.max(0, 1 - (limit - 1) / current) * window
  end
  return {0, 0, math.max(1, math.ceil(wait))}
end
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = hit(key, tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i]))
end
return out
"""

# KEYS[1] members sorted set; ARGV replica id, member ttl (µs). Returns live replicas.
_HEARTBEAT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], math.ceil(2 * ttl / 1000))
return redis.call('ZCARD', KEYS[1])
"""


class _Script:
    """EVALSHA, falling back to EVAL (which also caches it) after a restart flushed scripts."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, client: Redis, keys: Sequence[str], *args: Any) -> Any:
        # A client exists, so redis is loaded: this import is a sys.modules lookup.
        from redis.exceptions import NoScriptError

        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)


_HIT = _Script(_HIT_SCRIPT)
_HEARTBEAT = _Script(_HEARTBEAT_SCRIPT)


def _bulk(data: bytes) -> bytes:
    """A RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


_EVALSHA_HIT = _bulk(b"EVALSHA") + _bulk(_HIT.sha.encode())
_MAX_CHUNKS = 10_000


def _pack_with_hiredis(client: Redis) -> None:
    """Have hiredis pack ``client``'s commands in C, as redis-py's synchronous client does.

    redis-py's asyncio connections pack in Python, a bytes join per argument, three per hit
    (key, limit, window): 22k of the store's 67k instructions per hit in batches of 16
    (cachegrind). Same bytes on the wire; without hiredis installed, nothing changes.
    """
    try:
        from hiredis import pack_command
    except ImportError:
        return
    from redis.exceptions import DataError

    def pack(self: object, *args: Any) -> list[bytes]:
        # As redis-py's HiredisRespSerializer, without its per-argument copy of bytearrays and
        # memoryviews, which this store never sends.
        name = args[0]
        if (isinstance(name, str) and " " in name) or (isinstance(name, bytes) and b" " in name):
            args = (*name.split(), *args[1:])  # "SCRIPT LOAD": words go as separate arguments
        try:
            return [pack_command(args)]
        except TypeError as exc:  # what redis-py's own packing raises for a bad argument
            raise DataError(str(exc)) from exc

    pool = client.connection_pool
    base = pool.connection_class  # Connection, SSLConnection or UnixDomainSocketConnection
    pool.connection_class = type(f"HiredisPacked{base.__name__}", (base,), {"pack_command": pack})


class _Batch:
    """One loop iteration's hits in arrival order, laid out as the script takes them:
    ``keys[i]`` with ``args[2i:2i + 2]`` (limit, window in µs), answered via ``futures[i]``.
    A tuple per hit, regrouped by the flusher, cost 8 % of the store's instructions per hit."""

    __slots__ = ("args", "futures", "keys")

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.args: list[int] = []
        # A future per awaiting hit (the script's reply), or hit_soon()'s callback (a Decision).
        self.futures: list[asyncio.Future[list[int]] | Callable[[Any], None]] = []


def _answer(callback: Callable[[Any], None], reply: Any) -> None:
    try:
        callback(reply)
    except Exception:  # one request's bug must not cost the rest of the batch their answer
        log.exception("rate-limit decision callback failed")


class RedisStore:
    """Counters in Redis, shared by every gateway replica: one script, one round trip.

    Hits share round trips: they are queued, and one flusher sends the queue as one EVALSHA
    over their keys (one atomic decision per key, in arrival order), answers each caller, and
    sends what queued meanwhile (`_flush_all`: one batch in flight at a time).
    The command, the reply and the connection checkout are paid once per batch, not per hit:
    that per-call work was most of the limiter's CPU (docs/adr/0002-rate-limit-algorithm.md).

    It sits on the request path, so it fails fast: every call has a ``timeout`` deadline, and
    after a failure (which fails every hit of its batch) it stops touching Redis (``hit``
    raises :class:`StoreUnavailable` at once) while a single background probe PINGs with a
    back-off of ``backoff`` seconds, doubling up to ``max_backoff``, until Redis answers again.

    ``start()`` also runs a heartbeat that registers this replica in ``<prefix>members`` and
    keeps :attr:`replicas` (the number of live replicas) for ``onStoreError: local``.
    Give it a client without retries (see :meth:`from_url`): the deadline caps a client that
    retries anyway, and bounds every call, so the client needs no socket timeouts of its own.
    """

    __slots__ = (
        "_background",
        "_backoff",
        "_batch",
        "_chunks",
        "_conn",
        "_deadline",
        "_flusher",
        "_heartbeat",
        "_heartbeat_interval",
        "_max_backoff",
        "_member_ttl_us",
        "_members_key",
        "_owns_client",
        "_prefix",
        "_probe",
        "_redis",
        "_timed_out",
        "_timeout",
        "_watchdog",
        "_windows_us",
        "degraded",
        "replica_id",
        "replicas",
    )

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "cityplane:rl:",
        replica_id: str | None = None,
        timeout: float = 0.1,
        backoff: float = 1.0,
        max_backoff: float = 5.0,
        heartbeat_interval: float = 5.0,
        member_ttl: float = 15.0,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._members_key = prefix + "members"
        self.replica_id = (
            replica_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        self._timeout = timeout
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._heartbeat_interval = heartbeat_interval
        self._member_ttl_us = round(member_ttl * _US)
        self._owns_client = False
        self.replicas = 1
        self.degraded = False
        self._probe: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._batch = _Batch()  # hits of this loop iteration, not yet sent
        self._flusher: asyncio.Task[None] | None = None
        # The deadline of the batch in flight (loop time), watched by one lazily re-armed
        # timer (`_check_deadline`) rather than an asyncio.timeout() per batch: that was ~2 %
        # of the gateway's CPU under load (py-spy), a context object and a timer per batch.
        self._deadline: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._timed_out = False  # the watchdog cancelled the flusher
        self._conn: Any = None  # the batches' own connection (_run_hits)
        self._chunks: dict[str | int, bytes] = {}  # RESP bulk strings of keys and numbers
        self._windows_us: dict[float, int] = {}  # window (seconds) -> microseconds
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 0.1, **options: Any) -> RedisStore:
        """A store with its own client tuned for the request path.

        No retries, a short connect timeout, and no timeout on reads and writes: every call
        the store makes already runs under its ``timeout`` deadline, and with a socket timeout
        redis-py runs each write in ``asyncio.wait_for`` (a task per command). Commands are
        packed in C by hiredis (:func:`_pack_with_hiredis`).
        """
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        client = Redis.from_url(
            url,
            socket_timeout=None,  # redis-py's default is 5 s
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        _pack_with_hiredis(client)
        store = cls(client, timeout=timeout, **options)
        store._owns_client = True
        return store

    async def hit(self, key: str, limit: int, window: float) -> Decision:
        if self.degraded:
            raise StoreUnavailable("redis is unreachable; waiting for the probe")
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._enqueue(key, limit, window, future)
        allowed, remaining, reset_us = await future
        # A script's numbers come back as ints (Redis integer replies), whatever the parser.
        return _new_tuple(Decision, (allowed == 1, limit, remaining, reset_us / _US))

    def hit_soon(
        self, key: str, limit: int, window: float, then: Callable[[Decision | Exception], None]
    ) -> None:
        """``hit`` through a callback, for a request handled without a task (ADR 14): ``then``
        gets the decision or the `StoreUnavailable` from the batch's flusher. Raises
        `StoreUnavailable` at once while Redis is known to be down."""
        if self.degraded:
            raise StoreUnavailable("redis is unreachable; waiting for the probe")
        self._enqueue(key, limit, window, then)

    def _enqueue(
        self,
        key: str,
        limit: int,
        window: float,
        waiter: asyncio.Future[list[int]] | Callable[[Any], None],
    ) -> None:
        batch = self._batch
        batch.keys.append(self._prefix + key)
        batch.args += (limit, window_micros(self._windows_us, window))
        batch.futures.append(waiter)
        if self._flusher is None:
            # The first hit starts the flusher; it runs on the next loop iteration, by when
            # every hit of this one has joined the batch.
            self._flusher = asyncio.get_running_loop().create_task(self._flush_all())

    async def _flush_all(self) -> None:
        """Send batches one at a time while hits keep coming: the hits that arrive while a
        batch is in flight make the next batch, so batches grow with the load (and the
        command's fixed cost, ~100 µs of CPU with redis-py, is paid once for more hits)
        without delaying a hit when Redis is idle."""
        try:
            while self._batch.futures:
                batch, self._batch = self._batch, _Batch()
                if self.degraded:  # the batch before failed: these fail at once as well
                    self._fail_batch(batch, "redis is unreachable; waiting for the probe", None)
                    continue
                await self._flush(batch)
        finally:
            self._flusher = None

    async def _flush(self, batch: _Batch) -> None:
        """Send the batch in one EVALSHA (per ``_MAX_BATCH`` hits) and answer each waiter."""
        keys, args, futures = batch.keys, batch.args, batch.futures
        try:
            self._watch()
            replies: list[Any] = []
            # Rarely more than one chunk; in order, so that a key repeated across chunks
            # is counted in arrival order (concurrent chunks could overtake each other).
            for start in range(0, len(keys), _MAX_BATCH):
                end = start + _MAX_BATCH
                replies += await self._run_hits(keys[start:end], args[2 * start : 2 * end])
            self._deadline = None
            if len(replies) != len(keys):
                raise ValueError(f"{len(replies)} answers to {len(keys)} hits")
        # Whatever the client raises (connection, timeout, OOM, READONLY, a driver bug), every
        # waiter must get a StoreUnavailable the policy knows how to handle, never a 500.
        except BaseException as caught:
            self._deadline = None
            exc = self._timeout_of(caught)
            self._drop_connection()  # its state is unknown (half a reply may be on the way)
            if isinstance(exc, Exception):
                self._fail(exc)
            detail = str(exc) or f"no answer within {self._timeout:g}s"
            self._fail_batch(batch, f"redis: {type(exc).__name__}: {detail}", exc)
            if not isinstance(exc, Exception):
                raise  # cancelled (close()): the waiters have their answer, the task stops
            return
        for i, (future, reply) in enumerate(zip(futures, replies, strict=True)):
            if not isinstance(future, asyncio.Future):  # hit_soon's callback: a Decision
                allowed, remaining, reset_us = reply
                _answer(
                    future,
                    _new_tuple(Decision, (allowed == 1, args[2 * i], remaining, reset_us / _US)),
                )
            elif not future.done():  # its caller may have been cancelled meanwhile
                future.set_result(reply)

    def _watch(self) -> None:
        """Start the deadline of the batch about to be sent (``timeout`` from now)."""
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self._timeout
        if self._watchdog is None:
            self._watchdog = loop.call_at(self._deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        """The watchdog's timer: cancel the flusher if its batch is past its deadline, else
        wait for the deadline of the batch now in flight, if any."""
        self._watchdog = None
        deadline = self._deadline
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < deadline:
            self._watchdog = loop.call_at(deadline, self._check_deadline)
            return
        if self._flusher is not None:
            self._timed_out = True
            self._flusher.cancel()

    def _timeout_of(self, caught: BaseException) -> BaseException:
        """The exception a failed batch ends with: a cancellation by the watchdog is a
        TimeoutError (as asyncio.timeout() would raise), any other exception itself."""
        if not self._timed_out:
            return caught
        self._timed_out = False
        if not isinstance(caught, asyncio.CancelledError):
            return caught
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return TimeoutError()

    async def _run_hits(self, keys: list[str], args: list[int]) -> list[Any]:
        """The hit script over ``keys`` on the store's own connection.

        The batches go one at a time, so they need one connection, and it is held rather than
        checked out of redis-py's pool for every batch: the checkout (a lock, a liveness check,
        observability events) and the command dispatch around it cost ~30 µs of CPU per batch,
        as much as the hits of a batch of ten. The commands are those of `_Script`.
        """
        from redis.exceptions import NoScriptError

        conn = self._conn
        if conn is None:
            conn = self._conn = await self._redis.connection_pool.get_connection()
        try:
            await conn.send_packed_command(self._evalsha(keys, args))
            return cast("list[Any]", await conn.read_response())
        except NoScriptError:  # a restarted or flushed Redis: EVAL also caches the script
            await conn.send_command("EVAL", _HIT.source, len(keys), *keys, *args)
            return cast("list[Any]", await conn.read_response())

    def _evalsha(self, keys: list[str], args: list[int]) -> bytes:
        """``EVALSHA`` of the hit script over ``keys`` and ``args`` in RESP, the bytes redis-py's
        ``pack_command`` makes (tested), from cached bulk strings: a batch repeats its route's
        two numbers for every hit, and a client's key for each of its requests. redis-py's
        encoder and packer cost ~6 µs per hit, more than the rest of a Redis decision."""
        chunks = self._chunks
        if len(chunks) >= _MAX_CHUNKS:  # keys name clients: bounded
            chunks.clear()
        parts = [b"*%d\r\n" % (3 + len(keys) + len(args)), _EVALSHA_HIT, _bulk(b"%d" % len(keys))]
        items: list[str | int] = [*keys, *args]
        for item in items:
            if item in chunks:  # `in` and [] are C calls compiled; .get() a call by name
                parts.append(chunks[item])
            else:
                chunk = chunks[item] = _bulk(
                    item.encode() if isinstance(item, str) else b"%d" % item
                )
                parts.append(chunk)
        return b"".join(parts)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # Closed without waiting (this may run as the flusher is cancelled), and handed
            # back to the pool, which reconnects it when it is next used.
            task = asyncio.get_running_loop().create_task(self._close_connection(conn))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _close_connection(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            await conn.disconnect(nowait=True)
        with contextlib.suppress(Exception):
            await self._redis.connection_pool.release(conn)

    @staticmethod
    def _fail_batch(batch: _Batch, message: str, cause: BaseException | None) -> None:
        for future in batch.futures:
            error = StoreUnavailable(message)  # each waiter raises its own
            error.__cause__ = cause
            if not isinstance(future, asyncio.Future):
                _answer(future, error)
            elif not future.done():
                future.set_exception(error)

    def _fail(self, exc: BaseException) -> None:
        metrics.RATELIMIT_DEGRADED.set(1)
        if self.degraded:
            return
        self.degraded = True
        log.debug("rate-limit redis failed, probing in the background: %r", exc)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(
                self._recover(), name="ratelimit-redis-probe"
            )

    async def _recover(self) -> None:
        delay = self._backoff
        while True:
            await asyncio.sleep(delay)
            try:
                async with asyncio.timeout(self._timeout):
                    await self._redis.ping()
            except Exception:  # noqa: BLE001 - any failure means "still down", try later
                delay = min(delay * 2, self._max_backoff)
                continue
            self.degraded = False
            metrics.RATELIMIT_DEGRADED.set(0)
            log.info("rate-limit redis is reachable again")
            return

    async def start(self) -> None:
        """Register this replica now (so :attr:`replicas` is right at once), then every interval."""
        await self._beat()
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(
                self._beat_forever(), name="ratelimit-heartbeat"
            )

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            if not self.degraded:
                await self._beat()

    async def _beat(self) -> None:
        try:
            async with asyncio.timeout(max(self._timeout, 1.0)):
                count = await _HEARTBEAT(
                    self._redis, (self._members_key,), self.replica_id, self._member_ttl_us
                )
        except Exception as exc:  # noqa: BLE001 - keep the last known count while Redis is down
            log.debug("rate-limit heartbeat failed: %r", exc)
            return
        self.replicas = max(1, int(count))

    async def close(self) -> None:
        """Stop the background tasks and leave the membership set."""
        for task in (self._heartbeat, self._probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._heartbeat = self._probe = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._flusher is not None:  # a batch in flight ends within the deadline
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await self._redis.connection_pool.release(conn)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if not self.degraded:
            try:
                async with asyncio.timeout(max(self._timeout, 1.0)):
                    await self._redis.zrem(self._members_key, self.replica_id)
            except Exception as exc:  # noqa: BLE001 - the member expires after member_ttl anyway
                log.debug("rate-limit membership removal failed: %r", exc)
        if self._owns_client:
            await self._redis.aclose()
