"""Discord sharding: DISCORD_SHARD_COUNT / DISCORD_SHARD_IDS drive discord.py's AutoShardedClient against the fake
gateway, which routes each guild's events to shard `(guild_id >> 22) % shard_count` and DMs to shard 0, as Discord
does. Two shards in one client, and two clients that split the shards the way two processes would (each gets only
its guilds' events and answers them).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import discord
import pytest

from bot.discord_bot import DiscordBackend
from bot.discord_shards import IDENTIFY_WINDOW_S, IdentifyPacer
from core.errors import ConfigError
from core.settings import Settings, load_settings
from tests.discord_support import mention
from tests.fake_discord import FakeDiscord, Json
from tests.recording_handler import RecordingHandler

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
STARTUP_S = 30.0


@pytest.fixture(autouse=True)
def _restore_discord_endpoints() -> Any:
    """`use_endpoints` changes process-global class attributes of discord.py; put them back after each test."""
    base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    yield
    discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = base, gateway


@asynccontextmanager
async def two_guild_discord(**options: Any) -> AsyncIterator[tuple[FakeDiscord, int, int]]:
    """A fake Discord with one guild on shard 0 of 2 and one on shard 1 of 2."""
    async with FakeDiscord(guild_count=0, max_concurrency=2, **options) as fake:
        yield fake, fake.add_guild(shard=0, of=2), fake.add_guild(shard=1, of=2)


def sharded_settings(fake: FakeDiscord, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "discord_bot_token": fake.token,
        "discord_api_base_url": fake.api_base_url,
        "discord_gateway_url": fake.gateway_url,
        "discord_guild_ids": ",".join(str(guild) for guild in fake.guilds),
    }
    return Settings(_env_file=None, **{**values, **overrides})  # type: ignore[call-arg]


@asynccontextmanager
async def started(fake: FakeDiscord, handler: RecordingHandler, **overrides: Any) -> AsyncIterator[DiscordBackend]:
    settings = sharded_settings(fake, **overrides)
    backend = DiscordBackend(settings=settings, handler=handler, ready_timeout=15, guild_ready_timeout=0.05)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


def channel(fake: FakeDiscord, guild: int) -> int:
    return int(fake.guilds[guild]["channel_id"])


def shard_events(fake: FakeDiscord, shard: tuple[int, int], event: str) -> list[Json]:
    return [payload["d"] for payload in fake.sessions[shard].events if payload["t"] == event]


async def ask(fake: FakeDiscord, user: Json, guild: int) -> Json:
    return await fake.send_message(user, f"{mention(fake.bot_user)} hello", channel_id=channel(fake, guild))


# --- one process, two shards ---------------------------------------------------------------------------------------
async def test_two_shards_in_one_process_answer_both_guilds_and_dms() -> None:
    async with two_guild_discord() as (fake, guild_a, guild_b):
        handler = RecordingHandler()
        async with started(fake, handler, discord_shard_count="2") as backend:
            assert sorted(fake.identified_shards) == [(0, 2), (1, 2)]
            assert len(fake.connections) == 2, "one websocket per shard"
            assert backend._client is not None and backend._client.shard_count == 2
            user = fake.add_user("alice")

            in_a, in_b = await ask(fake, user, guild_a), await ask(fake, user, guild_b)
            dm = await fake.send_message(user, "hi in private")

            for message in (in_a, in_b, dm):
                await handler.wait_handled(message["id"])
            await fake.wait_for_posts(channel(fake, guild_a), 1)
            await fake.wait_for_posts(channel(fake, guild_b), 1)
            await fake.wait_for_posts(fake.dm_channel(user), 1)

        assert [m["id"] for m in shard_events(fake, (0, 2), "MESSAGE_CREATE")] == [in_a["id"], dm["id"]]
        assert [m["id"] for m in shard_events(fake, (1, 2), "MESSAGE_CREATE")] == [in_b["id"]]
        assert [g["id"] for g in shard_events(fake, (1, 2), "GUILD_CREATE")] == [str(guild_b)]
        assert [call.status for call in fake.calls_to("GET /gateway/bot")] == [200], "session start limits read"


async def test_shard_count_auto_asks_discord_how_many() -> None:
    async with FakeDiscord(guild_count=0, shards=3, max_concurrency=3) as fake:
        guilds = [fake.add_guild(shard=shard, of=3) for shard in range(3)]
        handler = RecordingHandler()
        async with started(fake, handler, discord_shard_count="auto", discord_guild_ids=str(guilds[0])):
            assert sorted(fake.identified_shards) == [(0, 3), (1, 3), (2, 3)]
            message = await ask(fake, fake.add_user("bob"), guilds[2])
            await handler.wait_handled(message["id"])
            assert [m["id"] for m in shard_events(fake, (2, 3), "MESSAGE_CREATE")] == [message["id"]]


async def test_a_dropped_shard_resumes_alone() -> None:
    async with two_guild_discord() as (fake, _, guild_b):
        handler = RecordingHandler()
        async with started(fake, handler, discord_shard_count="2"):
            await fake.drop_connection(code=4000, shard=(1, 2))
            text = f"{mention(fake.bot_user)} hi"
            missed = await fake.send_message(
                fake.add_user("carol"), text, channel_id=channel(fake, guild_b), deliver=False
            )
            await fake.wait_until(lambda: fake.resumes == 1)
            await handler.wait_handled(missed["id"])
            assert fake.identifies == 2, "shard 1 resumed; shard 0 never noticed"


# --- two processes, disjoint shard ranges -------------------------------------------------------------------------
async def test_two_processes_each_answer_only_their_shards_guilds() -> None:
    async with two_guild_discord() as (fake, guild_a, guild_b), AsyncExitStack() as stack:
        first, second = (
            RecordingHandler(lambda m: f"first: {m.text}"),
            RecordingHandler(lambda m: f"second: {m.text}"),
        )
        await stack.enter_async_context(started(fake, first, discord_shard_count="2", discord_shard_ids="0"))
        await stack.enter_async_context(started(fake, second, discord_shard_count="2", discord_shard_ids="1"))
        assert sorted(fake.identified_shards) == [(0, 2), (1, 2)]
        syncs = [call for call in fake.calls if call.method == "PUT" and "/commands" in call.path]
        assert len(syncs) == 2, "only the process with shard 0 registered the commands (once per guild)"
        user = fake.add_user("dave")

        in_a, in_b = await ask(fake, user, guild_a), await ask(fake, user, guild_b)
        dm = await fake.send_message(user, "private hello")
        command = await fake.send_command(user, "chat", {"text": "slash in b"}, guild_id=guild_b)

        for handler, message in ((first, in_a), (second, in_b), (first, dm), (second, command)):
            await handler.wait_handled(message["id"])
        posts_a = await fake.wait_for_posts(channel(fake, guild_a), 1)
        posts_b = await fake.wait_for_posts(channel(fake, guild_b), 2)
        assert {m.message_id for m, _ in first.handled} == {in_a["id"], dm["id"]}
        assert {m.message_id for m, _ in second.handled} == {in_b["id"], command["id"]}
        assert [post["content"] for post in posts_a] == ["first: hello"]
        assert sorted(post["content"] for post in posts_b) == ["second: hello", "second: slash in b"]


async def test_two_real_processes_split_the_shards() -> None:
    """The same as above with two OS processes configured only through the environment, as an operator runs them."""
    async with two_guild_discord() as (fake, guild_a, guild_b), AsyncExitStack() as stack:
        for name, shard_ids in (("first", "0"), ("second", "1")):
            process = await stack.enter_async_context(shard_process(fake, name, shard_ids))
            assert process.stdout is not None
            assert await asyncio.wait_for(process.stdout.readline(), STARTUP_S) == b"ready\n"
        user = fake.add_user("erin")

        await ask(fake, user, guild_a)
        await ask(fake, user, guild_b)
        dm = await fake.send_message(user, "private hello")

        posts_a = await fake.wait_for_posts(channel(fake, guild_a), 1)
        posts_b = await fake.wait_for_posts(channel(fake, guild_b), 1)
        posts_dm = await fake.wait_for_posts(fake.dm_channel(user), 1)
        assert [post["content"] for post in (*posts_a, *posts_b, *posts_dm)] == [
            "first: hello",
            "second: hello",
            "first: private hello",
        ], "each process answered its shard's guild; DMs come on shard 0"
        assert dm["id"] in [m["id"] for m in shard_events(fake, (0, 2), "MESSAGE_CREATE")]


@asynccontextmanager
async def shard_process(fake: FakeDiscord, name: str, shard_ids: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`tests/shard_process.py` running shards `shard_ids` of 2; stopped with SIGTERM, and it must exit cleanly."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DISCORD_", "TELEGRAM_"))}
    env.update(
        PYTHONPATH=str(ROOT), SHARD_PROCESS_NAME=name, DISCORD_BOT_TOKEN=fake.token,
        DISCORD_API_BASE_URL=fake.api_base_url, DISCORD_GATEWAY_URL=fake.gateway_url,
        DISCORD_GUILD_IDS=",".join(str(guild) for guild in fake.guilds), DISCORD_SHARD_COUNT="2",
        DISCORD_SHARD_IDS=shard_ids,
    )  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.shard_process", cwd=ROOT, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), timeout=30)
        assert process.returncode == 0 and b"Traceback" not in err, err.decode()
        assert fake.token.encode() not in err, "the token never reaches the log"


# --- refusals and configuration ------------------------------------------------------------------------------------
async def test_a_bot_that_must_shard_gets_a_clear_error() -> None:
    async with two_guild_discord(shards=2, sharding_required=True) as (fake, _, _):
        with pytest.raises(ConfigError, match="DISCORD_SHARD_COUNT=auto"):
            async with started(fake, RecordingHandler()):
                pass
        assert fake.identifies == 0


@pytest.mark.parametrize("shard", [[2, 2], [0], [-1, 2], ["0", 2], [True, 2], "0,2", None])
async def test_the_fake_gateway_refuses_an_invalid_shard_like_discord(shard: Any) -> None:
    async with FakeDiscord() as fake, aiohttp.ClientSession() as http:
        async with http.ws_connect(fake.gateway_url + "?v=10&encoding=json") as ws:
            hello = await ws.receive_json()
            assert hello["op"] == 10
            identify = {"token": fake.token, "intents": 0, "properties": {}, "shard": shard}
            await ws.send_str(json.dumps({"op": 2, "d": identify}))
            closed = await ws.receive()
        assert closed.type is aiohttp.WSMsgType.CLOSE and closed.data == 4010
        assert fake.identifies == 0 and fake.sessions == {}


@pytest.mark.parametrize(
    ("count", "ids", "problem"),
    [
        ("", "0", "DISCORD_SHARD_IDS needs DISCORD_SHARD_COUNT"),
        ("auto", "0", "DISCORD_SHARD_IDS needs DISCORD_SHARD_COUNT"),
        ("2", "1-2", "below DISCORD_SHARD_COUNT (2)"),
        ("2", "0,0", "listed twice"),
        ("2", "1-0", "empty range"),
        ("2", "a", "is not a shard id"),
        ("-1", "", "DISCORD_SHARD_COUNT"),
        ("many", "", "DISCORD_SHARD_COUNT"),
    ],
)
def test_bad_shard_settings_fail_with_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, count: str, ids: str, problem: str
) -> None:
    monkeypatch.chdir(tmp_path)  # no developer's .env
    monkeypatch.setenv("DISCORD_SHARD_COUNT", count)
    monkeypatch.setenv("DISCORD_SHARD_IDS", ids)
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        load_settings()


def test_shard_settings_parse(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.chdir(tmp_path)
    assert not load_settings().discord_sharded, "no sharding by default"
    monkeypatch.setenv("DISCORD_SHARD_COUNT", "8")
    monkeypatch.setenv("DISCORD_SHARD_IDS", "4-5, 7")
    settings = load_settings()
    assert settings.discord_sharded and (settings.discord_shard_count, settings.discord_shard_ids) == (8, (4, 5, 7))
    monkeypatch.setenv("DISCORD_SHARD_COUNT", "AUTO")
    monkeypatch.delenv("DISCORD_SHARD_IDS")
    assert load_settings().discord_shard_count == "auto"


# --- pacing IDENTIFYs ---------------------------------------------------------------------------------------------
async def test_identifies_are_paced_per_rate_limit_bucket() -> None:
    now = [100.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pacer = IdentifyPacer(2, clock=lambda: now[0], sleep=sleep)
    for shard in (0, 1, 2, 3, 4):
        await pacer.wait(shard)
    assert slept == [IDENTIFY_WINDOW_S, IDENTIFY_WINDOW_S], (
        "shards 0 and 1 at once, 2 and 3 five seconds later, 4 after"
    )
    assert now[0] == 100.0 + 2 * IDENTIFY_WINDOW_S
