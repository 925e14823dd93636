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

import pytest

from bot.backend import BackendNotifier
from bot.telegram import TelegramBackend
from core.db import Database
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


def _teach(telegram: FakeTelegram, group: ChatRef, answer: str, people: int) -> int:
    """One long conversation in `group` (no pause, no /reset) teaching `answer`; returns the messages sent."""
    lines = lesson(QUESTION, answer, askers=range(people, people + 3), answerers=range(people + 10, people + 20))
    for user, text in lines:
        telegram.user_says(group, Person(int(user), f"P{user}"), text)
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
        sent = _teach(telegram, first, PHRASE_A, 1000) + _teach(telegram, second, PHRASE_B, 3000)
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
