"""Per-user flow limits: how many messages a user may send a minute, and one answer at a time per user.

`UserLimits` is the seam the chat service asks. `LocalUserLimits` keeps both rules in this process's memory (a
sliding-window `RateLimiter` with an injectable clock, so tests drive time and nothing sleeps, and a `KeyedLock`
that queues a user's messages behind their own pending one): right for one process, and what runs without
REDIS_URL. Several replicas share the rules through Redis instead (`core.chat.redis_limits`, which builds on this
module; this module knows nothing of it): the composition root picks one (`bot.cli.open_user_limits`).
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol


class UserLimits(Protocol):
    """The per-user rules the chat service enforces, wherever their state lives."""

    async def admit(self, key: str) -> float | None:
        """Counts a message from `key`; None when it is within the rate limit, else the seconds until it is."""

    def turn(self, key: str) -> AbstractAsyncContextManager[None]:
        """Held while `key` is being answered: later messages from the same user wait their turn."""

    async def close(self) -> None:
        """Releases connections (nothing for the in-process limits)."""


class LocalUserLimits:
    """Both rules in this process's memory: exact for one process, blind to other replicas."""

    def __init__(self, *, limit: int, clock: Callable[[], float]) -> None:
        self._limiter = RateLimiter(limit=limit, clock=clock)
        self._turns = KeyedLock()

    async def admit(self, key: str) -> float | None:
        if self._limiter.allow(key):
            return None
        return self._limiter.retry_after(key)

    def turn(self, key: str) -> AbstractAsyncContextManager[None]:
        return self._turns.hold(key)

    async def close(self) -> None:
        return None


class RateLimiter:
    """A sliding window: at most `limit` events per `window` seconds per key."""

    def __init__(self, *, limit: int, window: float = 60.0, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._window = window
        self._clock = clock
        self._events: dict[str, deque[float]] = {}

    def allow(self, key: str) -> bool:
        """Records an event for `key` and says whether it is within the limit (refused events don't count)."""
        now = self._clock()
        events = self._events.setdefault(key, deque())
        while events and now - events[0] >= self._window:
            events.popleft()
        if len(events) >= self._limit:
            return False
        events.append(now)
        return True

    def retry_after(self, key: str) -> float:
        """Seconds until `key` may send again."""
        events = self._events.get(key)
        if not events or len(events) < self._limit:
            return 0.0
        return max(0.0, self._window - (self._clock() - events[0]))


class KeyedLock:
    """One lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._holders: Counter[str] = Counter()

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._holders[key] += 1
        try:
            async with lock:
                yield
        finally:
            self._holders[key] -= 1
            if not self._holders[key]:
                del self._holders[key]
                self._locks.pop(key, None)
