"""Consent (issue #21): which groups Magpie may be in (ALLOWED_CHATS), a group's own `/learning off`, the greeting
that tells a group what is logged, and the smaller holes (look-alike blocklist evasion, commands sent as the group,
SQLite's secure_delete, hidden Discord admin commands, names left behind by /forget).

Driven like the platforms' own tests: the real python-telegram-bot and discord.py clients against the strict fakes
(which answer getChatMember, send my_chat_member, take leaveChat; and have Discord roles, Manage Server, system
channels and guild joins), on SQLite and PostgreSQL where storage is involved.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from bot.discord_commands import MANAGERS
from core.chat.commands import COMMANDS
from core.chat.consent import learning_paused
from core.chat.messages import ChatKind, IncomingMessage
from core.chat.service import ChatService
from core.i18n import _, speaking
from core.serving.engine import Engine
from core.storage.chat_log import FORGOTTEN_MENTION
from core.storage.db import Database, upgrade
from core.storage.models import Message, Role
from core.texts import (
    LEARNING_ADMINS_ONLY,
    LEARNING_IS_OFF,
    LEARNING_OFF_DONE,
    LEARNING_ON_DONE,
    NOT_ALLOWED_HERE,
    NOT_AS_CHAT,
    welcome_text,
)
from tests.discord_support import logged_messages, mention
from tests.discord_support import running as discord_running
from tests.discord_support import settings_for as discord_settings
from tests.fake_discord import MANAGE_GUILD, FakeDiscord
from tests.fake_telegram import ChatRef, FakeTelegram, Person
from tests.recording_handler import RecordingHandler
from tests.telegram_support import logged, serving
from trainer.dataset import build_dataset
from trainer.filters import is_blocklisted
from trainer.samples import DatasetReport

pytestmark = pytest.mark.timeout(120)

WHY = NOT_ALLOWED_HERE.format(bot_name="Magpie")


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake


@pytest.fixture
async def discord_fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as fake:
        yield fake


# --- 1. ALLOWED_CHATS ------------------------------------------------------------------------------------------------


async def test_a_telegram_group_outside_allowed_chats_hears_why_once_is_left_and_nothing_is_logged(
    telegram: FakeTelegram, db: Database, tiny_model_dir: Path
) -> None:
    alice = telegram.user(1001, "Alice")
    ours, theirs = telegram.group(-100111, "Ours"), telegram.group(-100222, "Theirs")
    async with serving(telegram, db, tiny_model_dir, allowed_chats="telegram:-100111"):
        telegram.user_says(theirs, alice, "@MagpieTestBot learn this: buy my coin")
        telegram.user_says(theirs, alice, "/help")
        [why] = await telegram.wait_for_messages(theirs.id, 1)
        await telegram.wait_until(lambda: telegram.left_chats == [theirs.id])
        telegram.user_says(ours, alice, "/help")
        telegram.user_says(telegram.private_chat(alice), alice, "/help")  # private chats are never turned away
        await telegram.wait_for_messages(ours.id, 1)
        await telegram.wait_for_messages(alice.id, 1)
    assert why["text"] == WHY and len(telegram.sent_messages(theirs.id)) == 1, "said once"
    assert await logged(db, theirs.id) == [], "neither logged nor answered"
    [question, _answer] = await logged(db, ours.id)
    [private_question, _private_answer] = await logged(db, alice.id)
    assert (question.role, question.text, private_question.text) == (Role.USER, "/help", "/help")


async def test_a_discord_guild_outside_allowed_chats_hears_why_once_and_is_left(
    discord_fake: FakeDiscord, db: Database, engine: Engine, tmp_path: Path
) -> None:
    fake, alice = discord_fake, discord_fake.add_user("alice")
    settings = discord_settings(fake, allowed_chats="discord:1", models_dir=tmp_path)
    service = RecordingHandler(inner=ChatService(settings=settings, db=db, engine=engine))
    async with discord_running(fake, service, settings=settings):
        await fake.send_message(alice, f"{mention(fake.bot_user)} learn this", guild=True)
        await fake.send_message(alice, "and this", guild=True)
        [why] = await fake.wait_for_posts(fake.channel_id, 1)
        await fake.wait_until(lambda: fake.left_guilds == [fake.guild_id])
        await fake.send_message(alice, "hello in private")
        await fake.wait_for_posts(fake.dm_channel(alice), 1)
    assert why["content"] == WHY and len(fake.posts_in(fake.channel_id)) == 1
    assert [row.text for row in await logged_messages(db) if row.role is Role.USER] == ["hello in private"]


# --- 3. the greeting when the bot is added ---------------------------------------------------------------------------


async def test_added_to_a_telegram_group_the_bot_says_what_it_logs_in_the_adders_language(
    telegram: FakeTelegram, db: Database, tiny_model_dir: Path
) -> None:
    minji, bob = telegram.user(1001, "민지", language_code="ko"), telegram.user(1002, "Bob")
    ours, theirs = telegram.group(-100111), telegram.group(-100222)
    async with serving(telegram, db, tiny_model_dir, allowed_chats="telegram:-100111"):
        telegram.bot_added(ours, by=minji)
        telegram.bot_added(theirs, by=bob)
        [hello] = await telegram.wait_for_messages(ours.id, 1)
        [why] = await telegram.wait_for_messages(theirs.id, 1)
        await telegram.wait_until(lambda: telegram.left_chats == [theirs.id])
    with speaking("ko"):
        korean = welcome_text("Magpie")
    assert hello["text"] == korean != welcome_text("Magpie")
    assert all(command in korean for command in ("/optout", "/forget", "/export", "/learning off"))
    assert why["text"] == WHY
    assert ours.id not in telegram.left_chats


async def test_added_to_a_discord_server_the_bot_greets_in_its_system_channel_when_it_may_write_there(
    discord_fake: FakeDiscord, db: Database, engine: Engine, tmp_path: Path
) -> None:
    fake = discord_fake
    settings = discord_settings(fake, models_dir=tmp_path)  # ALLOWED_CHATS empty: every server may add it
    service = RecordingHandler(inner=ChatService(settings=settings, db=db, engine=engine))
    async with discord_running(fake, service, settings=settings):
        korean = await fake.bot_added(locale="ko")
        mute = await fake.bot_added(bot_may_write=False)
        [hello] = await fake.wait_for_posts(int(fake.guilds[korean]["channel_id"]), 1)
    with speaking("ko"):
        assert hello["content"] == welcome_text("Magpie")
    assert fake.posts_in(int(fake.guilds[mute]["channel_id"])) == [], "no post where the bot may not write"
    assert len(fake.calls_to(r"POST /channels/\d+/messages")) == 1, "not even tried"
    assert fake.left_guilds == []


async def test_a_discord_server_outside_allowed_chats_that_adds_the_bot_is_told_why_and_left(
    discord_fake: FakeDiscord, db: Database, engine: Engine, tmp_path: Path
) -> None:
    fake = discord_fake
    settings = discord_settings(fake, allowed_chats=f"discord:{fake.guild_id}", models_dir=tmp_path)
    service = RecordingHandler(inner=ChatService(settings=settings, db=db, engine=engine))
    async with discord_running(fake, service, settings=settings):
        stranger = await fake.bot_added()
        [why] = await fake.wait_for_posts(int(fake.guilds[stranger]["channel_id"]), 1)
        await fake.wait_until(lambda: fake.left_guilds == [stranger])
    assert why["content"] == WHY


# --- 2. /learning off and on -----------------------------------------------------------------------------------------


async def test_learning_off_by_a_telegram_group_admin_keeps_what_the_group_says_out_of_training(
    telegram: FakeTelegram, db: Database, tiny_model_dir: Path
) -> None:
    alice, bob, carol = telegram.user(1001, "Alice"), telegram.user(1002, "Bob"), telegram.user(1003, "Carol")
    admin = telegram.user(42, "Operator")  # in ADMIN_IDS (`serving`)
    quiet, other = telegram.group(-100333, "Quiet"), telegram.group(-100444, "Other")
    telegram.make_admin(quiet, bob)
    overrides: dict[str, Any] = {"train_user_share_cap": 1.0, "train_conversation_gap_minutes": 0}
    async with serving(telegram, db, tiny_model_dir, **overrides) as served:
        replies = _replies_in(telegram, quiet)
        await _chat(telegram, other, [(alice, "other group says hello"), (carol, "and other group answers")])
        await _chat(telegram, quiet, [(alice, "said before it was off"), (carol, "an answer before it was off")])
        assert await replies(alice, "/learning off") == _(LEARNING_ADMINS_ONLY), "a member may not"
        assert await replies(bob, "/learning off") == _(LEARNING_OFF_DONE), "the group's administrator may"
        await _chat(telegram, quiet, [(alice, "a secret said while it was off"), (carol, "kept in this group")])
        assert _(LEARNING_IS_OFF) in await replies(admin, "/status")
        paused = await build_dataset(served.settings, db)
        telegram.make_admin(quiet, bob, "member")  # demoted: the status is asked at the moment of the command
        assert await replies(bob, "/learning on") == _(LEARNING_ADMINS_ONLY)
        telegram.make_admin(quiet, carol, "creator")
        assert await replies(carol, "/learning on") == _(LEARNING_ON_DONE)
        await _chat(telegram, quiet, [(alice, "said after it was back on"), (bob, "an answer after it was on")])
        resumed = await build_dataset(served.settings, db)
    asked = [call.params["user_id"] for call in telegram.calls_to("getChatMember")]
    assert asked == [alice.id, bob.id, bob.id, carol.id], "asked for each /learning on|off, never for chatter"
    assert {"other group says hello", "and other group answers"} <= _texts(paused)
    assert not {line for line in _texts(paused) if "off" in line or "before" in line}, "nothing of the quiet group"
    assert paused.excluded["learning_off"] >= 4
    assert "a secret said while it was off" not in _texts(resumed) and "kept in this group" not in _texts(resumed)
    assert {"said before it was off", "an answer after it was on"} <= _texts(resumed)


async def test_an_anonymous_telegram_admin_may_turn_learning_off_but_not_forget_or_opt_out_for_everyone(
    telegram: FakeTelegram, db: Database, tiny_model_dir: Path
) -> None:
    group = telegram.group(-100555)
    async with serving(telegram, db, tiny_model_dir):
        replies = _replies_in(telegram, group)
        telegram.anonymous_admin_says(group, "announcement from the admins")
        assert await replies(None, "/forget") == _(NOT_AS_CHAT)
        assert await replies(None, "/optout") == _(NOT_AS_CHAT)
        assert await replies(None, "/learning off") == _(LEARNING_OFF_DONE), "only admins may speak as the group"
    assert not telegram.calls_to("getChatMember"), "Telegram itself says who may speak as the group"
    texts = [row.text for row in await logged(db, group.id) if row.role is Role.USER]
    assert "announcement from the admins" in texts, "nothing was forgotten"


async def test_learning_off_on_discord_needs_manage_server_and_the_admin_commands_are_hidden_from_members(
    discord_fake: FakeDiscord, db: Database, engine: Engine, tmp_path: Path
) -> None:
    fake = discord_fake
    alice, mod = fake.add_user("alice"), fake.add_user("mod")
    fake.make_manager(mod)
    settings = discord_settings(fake, models_dir=tmp_path)
    service = RecordingHandler(inner=ChatService(settings=settings, db=db, engine=engine))
    async with discord_running(fake, service, settings=settings):
        await fake.send_message(alice, "/learning off", guild=True)
        [refused] = await fake.wait_for_posts(fake.channel_id, 1)
        with pytest.raises(PermissionError):
            await fake.send_command(alice, "learning", {"setting": "off"}, guild=True)
        await fake.send_command(mod, "learning", {"setting": "off"}, guild=True)
        [_refused, done] = await fake.wait_for_posts(fake.channel_id, 2)
        async with db.sessions() as session:
            assert await learning_paused(session, platform="discord", community=f"discord:{fake.guild_id}") is not None
        await fake.send_message(mod, "/learning on", guild=True)  # typed: the author's roles say Manage Server
        [*_earlier, typed_on] = await fake.wait_for_posts(fake.channel_id, 3)
        synced = {command["name"]: command for command in fake.commands[fake.guild_id]}
    assert (refused["content"], done["content"]) == (_(LEARNING_ADMINS_ONLY), _(LEARNING_OFF_DONE))
    assert typed_on["content"] == _(LEARNING_ON_DONE)
    hidden = {name for name, command in synced.items() if command.get("default_member_permissions")}
    assert hidden == {c.name for c in COMMANDS if c.admin} | {"learning"} and MANAGERS.value == MANAGE_GUILD
    assert all(int(synced[name]["default_member_permissions"]) == MANAGE_GUILD for name in hidden)
    assert {c.name for c in COMMANDS} - hidden <= set(synced), "everyone still sees the rest"


async def test_a_group_that_becomes_a_supergroup_keeps_its_learning_off_with_its_community(
    db: Database, engine: Engine, tmp_path: Path
) -> None:
    """`/learning` is about the chat's recorded community (`chats.community`, the voices' one), which a Telegram
    group keeps when it moves to a supergroup id: the pause follows it, and `/learning on` there closes it."""
    settings = discord_settings(FakeDiscord(), models_dir=tmp_path, train_user_share_cap=1.0)
    service = ChatService(settings=settings, db=db, engine=engine)
    old, new, ids = "-100", "-1001234", count(1)

    async def say(chat: str, text: str, *, admin: bool = False) -> str | None:
        reply = await service.handle(_group(chat, text, str(next(ids)), admin=admin))
        return None if reply is None else reply.text

    await say(old, "said before it was off")
    assert await say(old, "/learning off", admin=True) == _(LEARNING_OFF_DONE)
    await service.migrate_chat("telegram", old, new)
    assert await say(new, "/learning") == _(LEARNING_IS_OFF), "the supergroup is the same group"
    await say(new, "a secret said in the supergroup")
    assert await say(new, "/learning on", admin=True) == _(LEARNING_ON_DONE)
    await say(new, "said after it was on")
    report = await build_dataset(settings, db)
    assert "a secret said in the supergroup" not in _texts(report)
    assert {"said before it was off", "said after it was on"} <= _texts(report)


# --- 9. the smaller holes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["buy ｃｒｙｐｔｏ now", "buy cr\u0443pto now", "CRYPTO!", "c\u200bry\u00adpto", "buy \u0441r\u0443pt\u043e"],
)
def test_the_blocklist_catches_fullwidth_cyrillic_and_invisible_look_alikes(text: str) -> None:
    assert is_blocklisted(text, ["crypto"])


def test_the_blocklist_does_not_catch_what_merely_contains_other_letters() -> None:
    assert not is_blocklisted("a cryptic remark", ["crypto"])
    assert is_blocklisted("비트코인 사세요", ["비트코인"]), "non-Latin entries still match themselves"


async def test_forget_on_discord_takes_the_name_out_of_other_peoples_mentions(
    discord_fake: FakeDiscord, db: Database, engine: Engine, tmp_path: Path
) -> None:
    fake = discord_fake
    alice, bob, alicia = fake.add_user("alice"), fake.add_user("bob"), fake.add_user("alicia")
    settings = discord_settings(fake, models_dir=tmp_path)
    service = RecordingHandler(inner=ChatService(settings=settings, db=db, engine=engine))
    async with discord_running(fake, service, settings=settings):
        said = [
            await fake.send_message(alice, "hi all", guild=True),
            await fake.send_message(bob, f"{mention(alice)} you were right, {mention(alicia)} too", guild=True),
        ]
        for message in said:
            await service.wait_handled(message["id"])
        await fake.send_message(alice, "/forget", guild=True)
        await fake.wait_for_posts(fake.channel_id, 1)
    texts = [row.text for row in await logged_messages(db) if row.role is Role.USER]
    assert texts == [f"{FORGOTTEN_MENTION} you were right, @alicia too"]


async def test_sqlite_overwrites_what_is_deleted_even_where_the_build_would_not(tmp_path: Path, engine: Engine) -> None:
    """secure_delete's default is the SQLite build's (on in Debian's, off in others): simulated off here."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'magpie.db'}"
    await upgrade(url)
    db = Database.connect(url)
    event.listen(db.engine.sync_engine, "connect", _secure_delete_off, insert=True)  # before Magpie's pragmas
    service = ChatService(settings=discord_settings(FakeDiscord(), models_dir=tmp_path), db=db, engine=engine)
    secret = "my-unforgettable-secret-phrase"
    try:
        await service.handle(_private("42", f"{secret} {secret}", "1"))
        await service.handle(_private("42", "/forget", "2"))
        async with db.sessions() as session:
            assert not (await session.scalars(select(Message).where(Message.text.contains(secret)))).all()
    finally:
        await db.close()
    assert secret.encode() not in (tmp_path / "magpie.db").read_bytes()


# --- helpers ----------------------------------------------------------------------------------------------------------


def _secure_delete_off(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA secure_delete=OFF")
    cursor.close()


def _private(user: str, text: str, message_id: str) -> IncomingMessage:
    return IncomingMessage(
        platform="discord", chat_id=user, chat_kind=ChatKind.PRIVATE, author_id=user, author_name="Ann",
        text=text, message_id=message_id,
    )  # fmt: skip


def _group(chat: str, text: str, message_id: str, *, admin: bool) -> IncomingMessage:
    return IncomingMessage(
        platform="telegram", chat_id=chat, chat_kind=ChatKind.GROUP, author_id="7" if admin else "8",
        author_name="Ann" if admin else "Bo", text=text, message_id=message_id, addressed=text.startswith("/"),
        community=f"telegram:{chat}", chat_admin=admin,
    )  # fmt: skip


def _replies_in(telegram: FakeTelegram, chat: ChatRef) -> Callable[[Person | None, str], Awaitable[str]]:
    """`await replies(person, text)`: `person` (None: an anonymous admin) says `text` in `chat`; the bot's answer."""

    async def replies(person: Person | None, text: str) -> str:
        before = len(telegram.sent_messages(chat.id))
        if person is None:
            telegram.anonymous_admin_says(chat, text)
        else:
            telegram.user_says(chat, person, text)
        answers = await telegram.wait_for_messages(chat.id, before + 1)
        return str(answers[before]["text"])

    return replies


async def _chat(telegram: FakeTelegram, chat: ChatRef, lines: list[tuple[Person, str]]) -> None:
    """People talk to the bot in a group, one after another (each answered before the next: all of it logged)."""
    replies = _replies_in(telegram, chat)
    for person, text in lines:
        await replies(person, f"@{telegram.bot.username} {text}")


def _texts(report: DatasetReport) -> set[str]:
    """Every line of a dataset, targets and context."""
    return {line.text for sample in report.train + report.eval for line in (*sample.context, sample.target)}
