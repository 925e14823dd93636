"""Korean on every platform: each adapter puts the person's language on the message, the core answers in it, and
the command menus (Telegram's per `language_code`, Discord's localizations) carry the catalogue's Korean.

Driven like the platforms' own tests: the real python-telegram-bot and discord.py clients against the strict fakes,
the console through `magpie run`'s own composition (`bot.cli._backends`).
"""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from telegram import Bot, BotCommand
from telegram.error import BadRequest

from bot.cli import _backends
from bot.console import ConsoleBackend
from core.chat.commands import COMMANDS, command_named
from core.chat.service import ChatService
from core.i18n import translate
from core.ops.telemetry import Telemetry
from core.serving.engine import Engine
from core.settings import load_settings
from core.storage.db import Database
from core.texts import CHAT_COMMAND_DESCRIPTION, CHAT_TEXT_DESCRIPTION
from tests.discord_support import mention
from tests.discord_support import running as discord_running
from tests.fake_discord import FakeDiscord
from tests.fake_telegram import FakeTelegram
from tests.recording_handler import RecordingHandler
from tests.telegram_support import running as telegram_running
from tests.telegram_support import serving, settings_for

pytestmark = pytest.mark.timeout(120)

HELP = command_named("help")
assert HELP is not None
KOREAN_HELP = translate(HELP.help, "ko")


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake


# --- Telegram ------------------------------------------------------------------------------------------------------


async def test_telegram_menus_are_set_in_english_for_everyone_and_in_korean_for_korean_apps(
    telegram: FakeTelegram,
) -> None:
    admin = telegram.user(42, "Admin")
    telegram.private_chat(admin)
    async with telegram_running(settings_for(telegram, admin_ids="telegram:42"), RecordingHandler()):
        pass
    users = [command for command in COMMANDS if not command.admin]
    for scope, shown in (("default", users), ("chat:42", list(COMMANDS))):
        english, korean = telegram.commands[scope], telegram.localized_commands["ko"][scope]
        assert [c["command"] for c in english] == [c["command"] for c in korean] == [c.name for c in shown]
        assert [c["description"] for c in english] == [command.help for command in shown]
        assert [c["description"] for c in korean] == [translate(command.help, "ko") for command in shown]
    assert set(telegram.localized_commands) == {"ko"}


async def test_fake_self_check_command_menus_take_two_letter_language_codes_only(telegram: FakeTelegram) -> None:
    """A self-check of the fake's strictness, not a test of Magpie: Telegram takes ISO 639-1 codes (`ko`), not
    locales (`ko-KR`), and answers getMyCommands per scope and language."""
    async with Bot(telegram.token, base_url=telegram.base_url) as bot:
        with pytest.raises(BadRequest, match=r"(?i)invalid language code specified"):
            await bot.set_my_commands([BotCommand("help", "도움말")], language_code="ko-KR")
        assert await bot.set_my_commands([BotCommand("help", "도움말")], language_code="ko")
        assert [c.description for c in await bot.get_my_commands(language_code="ko")] == ["도움말"]
        assert await bot.get_my_commands() == ()


async def test_a_korean_telegram_user_is_answered_in_korean_and_an_english_one_in_english(
    telegram: FakeTelegram, db: Database, tiny_model_dir: Path
) -> None:
    minji = telegram.user(1001, "민지", language_code="ko")
    alice = telegram.user(1002, "Alice", language_code="en")
    async with serving(telegram, db, tiny_model_dir):
        telegram.user_says(telegram.private_chat(minji), minji, "/help")
        telegram.user_says(telegram.private_chat(alice), alice, "/help")
        [korean] = await telegram.wait_for_messages(minji.id, 1)
        [english] = await telegram.wait_for_messages(alice.id, 1)
    assert f"/help — {KOREAN_HELP}" in korean["text"] and "커뮤니티" in korean["text"]
    assert f"/help — {HELP.help}" in english["text"]


async def test_telegram_puts_the_authors_app_language_on_the_message(telegram: FakeTelegram) -> None:
    handler = RecordingHandler()
    minji, unknown = telegram.user(1001, "민지", language_code="ko"), telegram.user(1002, "Nobody")
    async with telegram_running(settings_for(telegram), handler):
        telegram.user_says(telegram.private_chat(minji), minji, "안녕하세요")
        telegram.user_says(telegram.private_chat(unknown), unknown, "hi")
        await handler.wait_until(lambda: len(handler.received) == 2)
    assert {m.text: m.language for m in handler.received} == {"안녕하세요": "ko", "hi": None}


# --- Discord -------------------------------------------------------------------------------------------------------


@pytest.fixture
async def korean_guild() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(preferred_locale="ko") as server:
        yield server


async def test_discord_commands_sync_with_korean_description_localizations(korean_guild: FakeDiscord) -> None:
    fake = korean_guild
    async with discord_running(fake, RecordingHandler()):
        synced = {command["name"]: command for command in fake.commands[fake.guild_id]}
    for name, description in [*((c.name, c.help) for c in COMMANDS), ("chat", CHAT_COMMAND_DESCRIPTION)]:
        assert synced[name]["description"] == description
        assert synced[name]["description_localizations"] == {"ko": translate(description, "ko")}
        assert synced[name]["name_localizations"] == {}, "names stay the same in every language"
    [text] = synced["chat"]["options"]
    [version] = synced["rollback"]["options"]
    assert text["description_localizations"] == {"ko": translate(CHAT_TEXT_DESCRIPTION, "ko")}
    rollback = command_named("rollback")
    assert rollback is not None and rollback.argument is not None and version["name"] == rollback.argument.name
    assert version["description_localizations"] == {"ko": translate(rollback.argument.description, "ko")}


async def test_fake_self_check_discord_refuses_localizations_discord_refuses(korean_guild: FakeDiscord) -> None:
    """A self-check of the fake's strictness, not a test of Magpie: unknown locales, over-long descriptions and
    names that are not lower case are a 400 (50035) on Discord, so they are here."""
    fake = korean_guild
    url = f"{fake.api_base_url}/applications/{fake.app_id}/commands"
    good = {"name": "help", "description": "List the commands", "description_localizations": {"ko": "명령 목록"}}
    bad = [
        {**good, "description_localizations": {"ko-KR": "명령 목록"}},
        {**good, "description_localizations": {"ko": "가" * 101}},
        {**good, "name_localizations": {"ko": "Help"}},
    ]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bot {fake.token}"}) as client:
        async with client.put(url, json=[good]) as accepted:
            assert accepted.status == 200
        for body in bad:
            async with client.put(url, json=[body]) as refused:
                assert refused.status == 400 and (await refused.json())["code"] == 50035, body


async def test_discord_language_is_the_interaction_locale_else_the_servers(korean_guild: FakeDiscord) -> None:
    fake = korean_guild
    handler = RecordingHandler()
    ann, minji = fake.add_user("ann"), fake.add_user("minji")
    async with discord_running(fake, handler):
        english_command = await fake.send_command(ann, "help", guild=True, locale="en-US")
        korean_command = await fake.send_command(minji, "help", guild=True, locale="ko")
        in_guild = await fake.send_message(minji, f"{mention(fake.bot_user)} 안녕", guild=True)
        in_dm = await fake.send_message(ann, "hello")
        for event in (english_command, korean_command, in_guild, in_dm):
            await handler.wait_handled(str(event["id"]))
    languages = [handler.incoming(str(event["id"])).language for event in (english_command, korean_command)]
    assert languages == ["en-US", "ko"]
    assert handler.incoming(str(in_guild["id"])).language == "ko", "a message carries no locale: the server's"
    assert handler.incoming(str(in_dm["id"])).language is None


# --- the console ---------------------------------------------------------------------------------------------------


async def test_the_console_speaks_the_terminals_locale(
    db: Database, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("LC_ALL", "LC_MESSAGES", "TELEGRAM_BOT_TOKEN", "DISCORD_BOT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANG", "ko_KR.UTF-8")
    monkeypatch.chdir(tmp_path)
    stdout = io.StringIO()
    monkeypatch.setattr(sys, "stdin", io.StringIO("/help\n"))
    monkeypatch.setattr(sys, "stdout", stdout)
    settings = load_settings(database_url="unused")
    [console] = _backends(settings, ChatService(settings=settings, db=db, engine=engine), Telemetry())
    assert isinstance(console, ConsoleBackend)
    await console.start()
    await asyncio.wait_for(console.finished.wait(), 60)
    await console.stop()
    assert f"/help — {KOREAN_HELP}" in stdout.getvalue()
