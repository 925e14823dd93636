"""The per-user rules shared through Redis (issue #14, item 2): two `RedisUserLimits` with their own connections
stand for two replicas; the real local Redis keeps their state. Without REDIS_URL the in-process limits serve."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from bot.cli import open_user_limits
from core.chat.limits import LocalUserLimits
from core.chat.redis_limits import RedisUserLimits
from core.errors import ConfigError, MagpieError
from core.settings import Settings, load_settings
from tests.redis_support import redis_settings
from tests.throwaway_services import ThrowawayRedis


class Clock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[RedisUserLimits, RedisUserLimits, Clock]]:
    """Two replicas' limits (three messages a minute) on one Redis, with one test clock."""
    settings = redis_settings(rate_limit_per_minute=3, engine_timeout_s=5.0)
    clock = Clock()
    first = await RedisUserLimits.connect(settings, clock=clock)
    second = await RedisUserLimits.connect(settings, clock=clock)
    try:
        yield first, second, clock
    finally:
        await first.close()
        await second.close()


async def test_the_rate_limit_counts_a_users_messages_on_every_replica(
    replicas: tuple[RedisUserLimits, RedisUserLimits, Clock],
) -> None:
    first, second, clock = replicas
    assert await first.admit("telegram:1") is None
    clock.now += 10
    assert await second.admit("telegram:1") is None
    assert await first.admit("telegram:1") is None
    clock.now += 5
    assert await second.admit("telegram:1") == pytest.approx(45.0)  # the first message leaves the window in 45 s
    assert await first.admit("telegram:2") is None  # another user has a window of their own
    clock.now += 45
    assert await second.admit("telegram:1") is None
    assert await first.admit("telegram:1") == pytest.approx(10.0)


async def test_concurrent_messages_on_two_replicas_never_overshoot_the_limit(
    replicas: tuple[RedisUserLimits, RedisUserLimits, Clock],
) -> None:
    first, second, _ = replicas
    verdicts = await asyncio.gather(*(replica.admit("telegram:7") for replica in [first, second] * 10))
    assert sum(wait is None for wait in verdicts) == 3


async def test_redis_time_is_the_window_clock_when_none_is_injected() -> None:
    settings = redis_settings(rate_limit_per_minute=1)
    limits = await RedisUserLimits.connect(settings)
    try:
        assert await limits.admit("discord:5") is None
        wait = await limits.admit("discord:5")
        assert wait is not None and 59.0 < wait <= 60.0
    finally:
        await limits.close()


async def test_a_user_is_answered_by_one_replica_at_a_time(
    replicas: tuple[RedisUserLimits, RedisUserLimits, Clock],
) -> None:
    first, second, _ = replicas
    order: list[str] = []
    first_holds, second_entered = asyncio.Event(), asyncio.Event()
    release_first = asyncio.Event()

    async def answer(replica: RedisUserLimits, name: str, holding: asyncio.Event, until: asyncio.Event) -> None:
        async with replica.turn("telegram:9"):
            order.append(f"{name} in")
            holding.set()
            await until.wait()
            order.append(f"{name} out")

    done = asyncio.Event()
    done.set()
    one = asyncio.create_task(answer(first, "first", first_holds, release_first))
    await asyncio.wait_for(first_holds.wait(), 5)
    two = asyncio.create_task(answer(second, "second", second_entered, done))
    other_user = asyncio.Event()
    async with second.turn("telegram:10"):  # someone else is not held up meanwhile
        other_user.set()
    with pytest.raises(TimeoutError):  # the second replica keeps waiting while the first answers
        await asyncio.wait_for(asyncio.shield(second_entered.wait()), 0.3)
    release_first.set()
    await asyncio.wait_for(asyncio.gather(one, two), 5)
    assert order == ["first in", "first out", "second in", "second out"]
    assert other_user.is_set()


async def test_a_turn_left_by_a_dead_replica_expires(replicas: tuple[RedisUserLimits, RedisUserLimits, Clock]) -> None:
    first, second, _ = replicas
    dead = first._client.lock(f"{first._prefix}:turn:telegram:11", timeout=0.3)  # taken, never released
    assert await dead.acquire(blocking=False)
    async with asyncio.timeout(5), second.turn("telegram:11"):
        pass


async def test_without_redis_url_the_limits_stay_in_this_process() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    limits = await open_user_limits(settings, clock=Clock())
    assert isinstance(limits, LocalUserLimits)


async def test_an_unreachable_redis_stops_the_start_with_a_clear_line_and_no_password() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(_env_file=None, redis_url=f"redis://:hunter2-secret@127.0.0.1:{port}/0")  # type: ignore[call-arg]
    with pytest.raises(MagpieError) as info:
        await open_user_limits(settings, clock=Clock())
    assert f"Cannot reach Redis at 127.0.0.1:{port} (REDIS_URL)" in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("value", ["http://127.0.0.1:6379", "127.0.0.1:6379"])
def test_a_redis_url_that_is_not_one_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("REDIS_URL", value)
    with pytest.raises(ConfigError, match="REDIS_URL: expected redis://"):
        load_settings(_env_file=None)


# --- a Redis that goes away, and comes back ---------------------------------------------------------------------


async def test_a_redis_that_goes_away_leaves_the_limits_in_this_process_until_it_is_back(
    throwaway_redis: ThrowawayRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed mid-conversation: every message is still admitted and answered in turn (the replica's own limits,
    one warning); the limit itself still holds; when Redis is back the limits are shared again."""
    settings = Settings(_env_file=None, redis_url=throwaway_redis.url, rate_limit_per_minute=3)  # type: ignore[call-arg]
    limits = RedisUserLimits(
        Redis.from_url(throwaway_redis.url, socket_connect_timeout=2.0, socket_timeout=2.0),
        limit=settings.rate_limit_per_minute, prefix="magpie", turn_expiry_s=30.0, reconnect_s=0.1,
    )  # fmt: skip
    try:
        assert await limits.admit("telegram:1") is None and limits.shared
        await throwaway_redis.kill()
        with caplog.at_level(logging.WARNING, logger="core.chat.redis_limits"):
            assert await limits.admit("telegram:1") is None, "admitted although Redis is gone"
            assert not limits.shared
            async with limits.turn("telegram:1"):  # answered in turn, without Redis
                pass
            assert await limits.admit("telegram:1") is None
            assert await limits.admit("telegram:1") is None
            assert await limits.admit("telegram:1") is not None, "the replica's own limit still holds"
            assert await limits.admit("telegram:2") is None
            lost = [r.getMessage() for r in caplog.records if "not answering" in r.getMessage()]
            assert len(lost) == 1 and "127.0.0.1" in lost[0] and "per-user limits are kept in this process" in lost[0]

            await throwaway_redis.start()
            reconnecting = limits._reconnecting
            assert reconnecting is not None
            await asyncio.wait_for(reconnecting, 20.0)  # it asks every 0.1 s
            assert limits.shared
        assert any("answers again" in record.getMessage() for record in caplog.records)
        assert await limits.admit("telegram:3") is None
        assert await limits._client.zcard("magpie:rate:telegram:3") == 1, "counted in Redis again"
        async with limits.turn("telegram:3"):
            assert await limits._client.exists("magpie:turn:telegram:3") == 1
    finally:
        await limits.close()
