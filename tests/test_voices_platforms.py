"""VOICE_SCOPE=community through the real platform clients: two communities teach different answers to the same
question, each in one long conversation; after /retrain each hears its own answer and never the other's, and a
private chat hears neither.

Telegram through python-telegram-bot against `tests/fake_telegram.py`; Discord through discord.py against
`tests/fake_discord.py`. The bot is assembled as `magpie run` assembles it (engine on the base model, serving with
voices, the orchestrator's real training processes, the chat service, the platform backend as notifier).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord
import pytest

from bot.backend import BackendNotifier
from bot.discord_bot import DiscordBackend
from bot.telegram import TelegramBackend
from core.storage.db import Database
from tests.fake_discord import FakeDiscord, Json
from tests.fake_telegram import ChatRef, FakeTelegram, Person
from tests.voice_support import (
    PHRASE_A,
    PHRASE_B,
    QUESTION,
    build_voice_model,
    lesson,
    start_voice_bot,
    voice_settings,
    wait_logged,
)

pytestmark = pytest.mark.slow

ADMIN = 42


@pytest.fixture(scope="session")
def platform_voice_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_voice_model(tmp_path_factory.mktemp("platform-voice-model"))


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake


async def _teach(telegram: FakeTelegram, db: Database, group: ChatRef, answer: str, people: int, *, logged: int) -> int:
    """One long conversation in `group` (no pause, no /reset) teaching `answer`; returns the messages sent.

    Each line waits until the one before it is logged (`logged` lines were before the lesson): people take turns,
    and the bot handles updates side by side, so lines sent at once could be logged in another order, and an
    answer would then follow an answer."""
    lines = lesson(QUESTION, answer, askers=range(people, people + 3), answerers=range(people + 10, people + 20))
    for said, (user, text) in enumerate(lines, start=1):
        telegram.user_says(group, Person(int(user), f"P{user}"), text)
        await wait_logged(db, logged + said)
    return len(lines)


async def _retrain_in(telegram: FakeTelegram, group: ChatRef, admin: Person) -> str:
    """An admin's /retrain in the group; returns the outcome the bot reported there."""
    before = len(telegram.sent_messages(group.id))
    telegram.user_says(group, admin, "/retrain")
    await telegram.wait_until(
        lambda: any("finished" in m.get("text", "") for m in telegram.sent_messages(group.id)[before:]), 240
    )
    return next(m["text"] for m in telegram.sent_messages(group.id)[before:] if "finished" in m.get("text", ""))


async def _ask(telegram: FakeTelegram, chat: ChatRef, person: Person, text: str) -> str:
    before = len(telegram.sent_messages(chat.id))
    telegram.user_says(chat, person, text)
    [*_, answer] = await telegram.wait_for_messages(chat.id, before + 1)
    return str(answer["text"])


async def test_two_telegram_groups_each_hear_their_own_voice(
    telegram: FakeTelegram, db: Database, database_url: str, platform_voice_model_dir: Path, tmp_path: Path
) -> None:
    settings = voice_settings(
        tmp_path, database_url, platform_voice_model_dir, **_telegram_settings(telegram), admin_ids="telegram:42"
    )
    notifier = BackendNotifier()
    bot = await start_voice_bot(settings, db, notifier=notifier)
    backend = TelegramBackend(settings=settings, handler=bot.service)
    try:
        await backend.start()
        notifier.attach([backend])
        first, second = telegram.group(-1001, "Zebras"), telegram.group(-1002, "Otters")
        admin, visitor = Person(ADMIN, "Admin"), Person(900, "Visitor")
        sent = await _teach(telegram, db, first, PHRASE_A, 1000, logged=0)
        sent += await _teach(telegram, db, second, PHRASE_B, 3000, logged=sent)
        await wait_logged(db, sent)

        assert "v1 is now the active model" in await _retrain_in(telegram, first, admin)
        assert "v2 is now the active model" in await _retrain_in(telegram, second, admin)

        question = f"@{telegram.bot.username} {QUESTION}"
        heard_first = await _ask(telegram, first, visitor, question)
        heard_second = await _ask(telegram, second, visitor, question)
        telegram.private_chat(visitor)
        heard_private = await _ask(telegram, ChatRef(visitor.id, "private"), visitor, QUESTION)
    finally:
        await backend.stop()
        await bot.stop()
    assert PHRASE_A in heard_first and PHRASE_B not in heard_first
    assert PHRASE_B in heard_second and PHRASE_A not in heard_second
    assert PHRASE_A not in heard_private and PHRASE_B not in heard_private


def _telegram_settings(telegram: FakeTelegram) -> dict[str, Any]:
    return {
        "telegram_bot_token": telegram.token,
        "telegram_base_url": telegram.base_url,
        "telegram_base_file_url": telegram.base_file_url,
    }


# --- Discord ---------------------------------------------------------------------------------------------------


@pytest.fixture
def _discord_endpoints() -> Any:
    """`use_endpoints` changes process-global class attributes of discord.py; put them back afterwards."""
    base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    yield
    discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = base, gateway


@pytest.fixture
async def discord_fake(_discord_endpoints: Any) -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(guild_count=2) as server:
        yield server


async def _teach_guild(fake: FakeDiscord, db: Database, channel: int, answer: str, *, logged: int) -> int:
    """One long conversation in a guild's channel teaching `answer` (new people every time); the messages sent.
    Each line waits until the one before it is logged (see `_teach`)."""
    people: dict[str, Json] = {}
    lines = lesson(QUESTION, answer, askers=range(3), answerers=range(10, 20))
    for said, (user, text) in enumerate(lines, start=1):
        author = people.setdefault(user, fake.add_user(f"{answer[:5]}-{user}"))
        await fake.send_message(author, text, channel_id=channel)
        await wait_logged(db, logged + said)
    return len(lines)


async def _retrain_in_guild(fake: FakeDiscord, channel: int, admin: Json) -> str:
    before = len(fake.posts_in(channel))
    await fake.send_message(admin, "/retrain", channel_id=channel)
    await fake.wait_until(lambda: any("finished" in p.get("content", "") for p in fake.posts_in(channel)[before:]), 240)
    return next(str(p["content"]) for p in fake.posts_in(channel)[before:] if "finished" in p.get("content", ""))


async def _ask_discord(fake: FakeDiscord, person: Json, text: str, *, channel: int | None) -> str:
    where = channel if channel is not None else fake.dm_channel(person)
    before = len(fake.posts_in(where))
    await fake.send_message(person, text, channel_id=channel)
    [*_, answer] = await fake.wait_for_posts(where, before + 1)
    return str(answer["content"])


async def test_two_discord_guilds_each_hear_their_own_voice(
    discord_fake: FakeDiscord, db: Database, database_url: str, platform_voice_model_dir: Path, tmp_path: Path
) -> None:
    fake = discord_fake
    admin, visitor = fake.add_user("admin"), fake.add_user("visitor")
    first, second = (int(guild["channel_id"]) for guild in fake.guilds.values())
    settings = voice_settings(
        tmp_path, database_url, platform_voice_model_dir, **_discord_settings(fake), admin_ids=f"discord:{admin['id']}"
    )
    notifier = BackendNotifier()
    bot = await start_voice_bot(settings, db, notifier=notifier)
    backend = DiscordBackend(settings=settings, handler=bot.service, ready_timeout=15, guild_ready_timeout=0.05)
    try:
        await backend.start()
        notifier.attach([backend])
        sent = await _teach_guild(fake, db, first, PHRASE_A, logged=0)
        sent += await _teach_guild(fake, db, second, PHRASE_B, logged=sent)
        await wait_logged(db, sent)

        assert "v1 is now the active model" in await _retrain_in_guild(fake, first, admin)
        assert "v2 is now the active model" in await _retrain_in_guild(fake, second, admin)

        question = f"<@{fake.bot_user['id']}> {QUESTION}"
        heard_first = await _ask_discord(fake, visitor, question, channel=first)
        heard_second = await _ask_discord(fake, visitor, question, channel=second)
        heard_private = await _ask_discord(fake, visitor, QUESTION, channel=None)
    finally:
        await backend.stop()
        await bot.stop()
    assert PHRASE_A in heard_first and PHRASE_B not in heard_first
    assert PHRASE_B in heard_second and PHRASE_A not in heard_second
    assert PHRASE_A not in heard_private and PHRASE_B not in heard_private


def _discord_settings(fake: FakeDiscord) -> dict[str, Any]:
    return {
        "discord_bot_token": fake.token,
        "discord_api_base_url": fake.api_base_url,
        "discord_gateway_url": fake.gateway_url,
        "discord_guild_ids": ",".join(str(guild) for guild in fake.guilds),
    }
