"""What sharding on Discord asks of a client beyond discord.py's `AutoShardedClient`: pacing IDENTIFYs, and the
gateway's sharding close codes in words an operator can act on.

Discord lets a bot start `max_concurrency` sessions per 5 seconds (from GET /gateway/bot's `session_start_limit`):
shard `i` is in rate-limit bucket `i % max_concurrency`, and each bucket may IDENTIFY once per 5 s. discord.py's
default hook simply sleeps 5 s before every IDENTIFY but the first, which makes a 16-shard start take 75 s even
where Discord allows all 16 at once. The limit is per bot, across processes: processes that run disjoint shard
ranges each pace only their own shards, so start them a few seconds apart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["IDENTIFY_WINDOW_S", "SHARDING_ERRORS", "IdentifyPacer"]

IDENTIFY_WINDOW_S = 5.0

SHARDING_ERRORS = {
    4010: "Discord refused the shard (close code 4010, invalid shard): DISCORD_SHARD_IDS must name shards below "
    "DISCORD_SHARD_COUNT, and every process of the bot must use the same DISCORD_SHARD_COUNT.",
    4011: "Discord requires this bot to connect in shards (close code 4011, sharding required): set "
    "DISCORD_SHARD_COUNT=auto, or to a number of shards.",
}
"""The gateway's close codes for sharding mistakes: a configuration problem, never retried."""


class IdentifyPacer:
    """Holds each shard's IDENTIFY back until its rate-limit bucket has been quiet for `IDENTIFY_WINDOW_S`."""

    def __init__(
        self,
        max_concurrency: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.max_concurrency = max_concurrency
        self._clock = clock
        self._sleep = sleep
        self._last: dict[int, float] = {}  # bucket -> when its last IDENTIFY went out

    async def wait(self, shard_id: int) -> None:
        """The slot is taken before sleeping, so shards that wait at the same time queue up one window apart."""
        bucket = shard_id % self.max_concurrency
        now = self._clock()
        last = self._last.get(bucket)
        start = now if last is None else max(now, last + IDENTIFY_WINDOW_S)
        self._last[bucket] = start
        if start > now:
            await self._sleep(start - now)
