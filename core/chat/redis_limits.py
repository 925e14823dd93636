"""The per-user rules shared by every replica, kept in Redis (REDIS_URL), so that a user whose messages a load
balancer spreads over several processes is limited and answered exactly as if one process served them all.

- **Rate limit**: a sliding window per user, stored as a sorted set of message times. One Lua script trims the
  times older than the window, counts, and adds the new one, atomically: two replicas counting the same user at
  the same instant cannot both let the message over the limit through. Times come from Redis's own clock (`TIME`),
  so replicas whose clocks drift apart still share one window.
- **One answer at a time per user**: a lock key taken with `SET NX PX` (redis-py's `Lock`, whose release is a Lua
  compare-and-delete, so a replica never frees a lock that expired and was taken by another). It expires
  ENGINE_TIMEOUT_S plus a margin after it was taken, so a replica that dies holding it keeps that user waiting at
  most that long. Within a replica, a user's waiters first queue on an in-process lock: they keep their order, and
  only one of them at a time polls Redis.

Keys are `<REDIS_KEY_PREFIX>:rate:<platform>:<user id>` and `<REDIS_KEY_PREFIX>:turn:<platform>:<user id>`; both
expire on their own, so Redis holds nothing for users who went quiet.

**When Redis goes away** (after the start, which refuses an unreachable REDIS_URL): the first call that fails
switches this replica to its own in-process limits (`core.chat.limits.LocalUserLimits`: the same rules, blind to the
other replicas) with one warning, and the message goes on as if nothing happened; no message is refused or lost
because Redis is down. A background task asks Redis every RECONNECT_S; once it answers, the limits are shared
again (one line in the log). A user's turn taken in Redis when it went away is released locally; Redis expires it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import LockNotOwnedError, RedisError

from core.chat.limits import KeyedLock, LocalUserLimits
from core.errors import MagpieError
from core.settings import Settings

log = logging.getLogger(__name__)

WINDOW_S = 60.0
"""RATE_LIMIT_PER_MINUTE's window, as `core.chat.limits.RateLimiter` uses it."""
TURN_MARGIN_S = 30.0
"""How much longer than ENGINE_TIMEOUT_S a turn lock lives: reading history and logging the reply take time too."""
LOCK_POLL_S = 0.05
"""How often a replica waiting for another replica's turn lock asks Redis again."""
RECONNECT_S = 5.0
"""How often a replica that lost Redis asks whether it is back."""
SOCKET_TIMEOUT_S = 2.0
"""How long one Redis call may take before Redis counts as gone: a message waits at most this long for it."""
_GONE = (RedisError, OSError)
"""What a Redis that went away raises (refused or reset connections, timeouts, a server that is loading)."""

# KEYS[1]: the user's window. ARGV: now ("" = Redis's clock), window seconds, limit, a unique member.
# Returns nil when admitted, else the seconds until the oldest counted message leaves the window (as a string:
# Redis would truncate a Lua number to an integer).
_ADMIT = """
local now = tonumber(ARGV[1])
if now == nil then
  local time = redis.call('TIME')
  now = tonumber(time[1]) + tonumber(time[2]) / 1000000
end
local window, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tostring(math.max(0, window - (now - tonumber(oldest[2]))))
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
return false
"""


class RedisUserLimits:
    """`core.chat.limits.UserLimits` over one Redis shared by every replica; see the module docstring."""

    def __init__(
        self,
        client: Redis,
        *,
        limit: int,
        prefix: str,
        turn_expiry_s: float,
        clock: Callable[[], float] | None = None,
        reconnect_s: float = RECONNECT_S,
    ) -> None:
        """`clock` (seconds) replaces Redis's clock in the rate window: tests drive time with it."""
        self._client = client
        self._limit = limit
        self._prefix = prefix
        self._turn_expiry_s = turn_expiry_s
        self._clock = clock
        self._admit = client.register_script(_ADMIT)
        self._local_turns = KeyedLock()
        self._reconnect_s = reconnect_s
        self._fallback = LocalUserLimits(limit=limit, clock=time.monotonic)
        self._reconnecting: asyncio.Task[None] | None = None

    @property
    def shared(self) -> bool:
        """Whether the limits are kept in Redis now (False while it is away and this replica keeps its own)."""
        return self._reconnecting is None

    @classmethod
    async def connect(cls, settings: Settings, *, clock: Callable[[], float] | None = None) -> RedisUserLimits:
        """Connects to REDIS_URL and checks that it answers; a clear error (never the URL's password) if not."""
        assert settings.redis_url is not None
        client = Redis.from_url(
            settings.redis_url, socket_connect_timeout=SOCKET_TIMEOUT_S, socket_timeout=SOCKET_TIMEOUT_S
        )
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise MagpieError(f"Cannot reach Redis at {_where(client)} (REDIS_URL): {type(exc).__name__}") from None
        log.info("Per-user limits are shared through Redis at %s", _where(client))
        return cls(
            client, limit=settings.rate_limit_per_minute, prefix=settings.redis_key_prefix,
            turn_expiry_s=settings.engine_timeout_s + TURN_MARGIN_S, clock=clock,
        )  # fmt: skip

    async def admit(self, key: str) -> float | None:
        if not self.shared:
            return await self._fallback.admit(key)
        now = "" if self._clock is None else repr(self._clock())
        args: list[str | float] = [now, WINDOW_S, self._limit, f"{now or 'redis'}:{uuid.uuid4().hex}"]
        try:
            wait = await self._admit(keys=[f"{self._prefix}:rate:{key}"], args=args)
        except _GONE as exc:
            self._lost(exc)
            return await self._fallback.admit(key)
        return None if wait is None else float(wait)

    def turn(self, key: str) -> AbstractAsyncContextManager[None]:
        return self._turn(key)

    @asynccontextmanager
    async def _turn(self, key: str) -> AsyncIterator[None]:
        async with self._local_turns.hold(key):  # this replica's order; Redis's lock adds the other replicas'
            lock = None
            if self.shared:
                lock = self._client.lock(
                    f"{self._prefix}:turn:{key}", timeout=self._turn_expiry_s, sleep=LOCK_POLL_S, blocking=True
                )
                try:
                    await lock.acquire()
                except _GONE as exc:
                    self._lost(exc)
                    lock = None
            try:
                yield
            finally:
                if lock is not None:
                    await _release(lock, key)

    def _lost(self, exc: BaseException) -> None:
        """Redis went away: this replica keeps its own limits, and a task watches for Redis to come back."""
        if self._reconnecting is not None:
            return
        log.warning(
            "Redis at %s is not answering (%s): per-user limits are kept in this process until it is back",
            _where(self._client), type(exc).__name__,
        )  # fmt: skip
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(self._reconnect_s)
            try:
                await self._client.ping()
            except _GONE:
                continue
            log.warning("Redis at %s answers again: per-user limits are shared again", _where(self._client))
            self._reconnecting = None
            return

    async def close(self) -> None:
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnecting
        await self._client.aclose()


async def _release(lock: Any, key: str) -> None:
    """Frees the turn; one that outlived its expiry (and may be someone else's now) is left alone, with a warning;
    one Redis lost meanwhile expires there by itself."""
    try:
        await lock.release()
    except LockNotOwnedError:
        log.warning("The answer to %s took longer than its Redis turn lock lives; another may have overlapped", key)
    except _GONE:
        log.debug("Redis went away while %s was answered: its turn lock expires there", key)


def _where(client: Redis) -> str:
    """host:port (or the socket path) of a client, never its password."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
