"""Crash recovery (the outbox): what a killed or stopped bot owed is answered on the next start, exactly once.

Service-level tests run the real `ChatService` with the tiny real model on SQLite and PostgreSQL; "the process was
killed after logging the message" is the database state `ReplyLog.log_incoming` leaves behind, and "killed
while sending" is a reply row still PENDING. The adapter-level tests hand recovered replies to the real Telegram
backend (python-telegram-bot against `tests/fake_telegram.py`) and to the Discord backend (discord.py against
`tests/fake_discord.py`) through the CLI's `_recover`, as `magpie run` does. The subprocess tests (SIGKILL,
SIGTERM) are in `tests/test_run.py`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.cli import _recover
from bot.telegram import TelegramBackend
from core.chat.messages import ChatKind, IncomingMessage, Reply
from core.chat.service import ChatService, Recovered
from core.serving.engine import Engine
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import Delivery, Message, Role
from core.texts import EXPORT_AFTER_RESTART
from tests.fake_telegram import FakeTelegram
from tests.recording_handler import RecordingHandler
from tests.service_support import msg as incoming
from tests.service_support import record_prompts


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        admin_ids=frozenset({"telegram:42"}),
        models_dir=tmp_path / "models",
        **overrides,
    )


@pytest.fixture
def service(tmp_path: Path, db: Database, engine: Engine) -> ChatService:
    return ChatService(settings=make_settings(tmp_path), db=db, engine=engine)


async def killed_after_logging(service: ChatService, message: IncomingMessage) -> None:
    """What a process killed while generating leaves behind: the message logged, no reply written."""
    assert await service._replies.log_incoming(message) is not None


async def recover_all(service: ChatService, platforms: tuple[str, ...] = ("telegram",)) -> list[Recovered]:
    plan = await service.plan_recovery(platforms)
    assert plan is not None
    return [item async for item in service.recover(plan)]


async def rows(db: Database) -> list[Message]:
    async with db.sessions() as session:
        return list((await session.scalars(select(Message).order_by(Message.id))).all())


# --- the flag and the query --------------------------------------------------------------------------------------


async def test_a_message_is_logged_as_awaiting_a_reply_exactly_when_the_service_answers_it(
    service: ChatService, db: Database
) -> None:
    group = {"chat": "-5", "kind": ChatKind.GROUP}
    await service.handle(incoming("hello", message_id="p1"))
    await service.handle(incoming("chatting among ourselves", message_id="g1", **group))  # type: ignore[arg-type]
    await service.handle(incoming("hey bot", message_id="g2", addressed=True, **group))  # type: ignore[arg-type]
    await service.handle(incoming("/help@OtherBot", message_id="g3", **group))  # type: ignore[arg-type]
    await service.handle(incoming("/help", message_id="g4", **group))  # type: ignore[arg-type]
    flags = {row.platform_message_id: row.awaits_reply for row in await rows(db) if row.role is Role.USER}
    assert flags == {"p1": True, "g1": False, "g2": True, "g3": False, "g4": True}


async def test_a_message_killed_before_its_answer_is_answered_once_without_being_logged_again(
    service: ChatService, db: Database
) -> None:
    await killed_after_logging(service, incoming("what is your favourite colour?", message_id="7", chat="100"))
    [item] = await recover_all(service)
    assert (item.platform, item.chat_id, item.parts_sent) == ("telegram", "100", 0)
    assert item.reply.text.strip() and item.reply.reply_to == "7" and item.reply.log_id is not None
    user_row, bot_row = await rows(db)
    assert (bot_row.id, bot_row.reply_to_id, bot_row.delivery) == (item.reply.log_id, user_row.id, Delivery.PENDING)
    assert bot_row.model_version_id is None and bot_row.text == item.reply.text
    await service.mark_delivered(item.reply, ["8"])
    assert await recover_all(service) == []
    assert [row.role for row in await rows(db)] == [Role.USER, Role.BOT]


async def test_a_reply_cut_off_while_sending_is_sent_again_from_the_part_after_those_that_arrived(
    service: ChatService, db: Database
) -> None:
    reply = await service.handle(incoming("hello there, how are you today?", message_id="9"))
    assert reply is not None
    await service.mark_interrupted(reply, parts_sent=1)
    [item] = await recover_all(service)
    assert (item.reply.log_id, item.reply.text, item.reply.reply_to, item.parts_sent) == (
        reply.log_id,
        reply.text,
        "9",
        1,
    )
    assert [row.role for row in await rows(db)] == [Role.USER, Role.BOT]  # nothing generated again
    await service.mark_undelivered(item.reply, "chat not found", parts_sent=1)
    bot_row = (await rows(db))[1]
    assert (bot_row.delivery, bot_row.parts_sent) == (Delivery.FAILED, 1)
    assert await recover_all(service) == []


async def test_settled_old_unaddressed_and_later_messages_are_left_alone(
    service: ChatService, db: Database, tmp_path: Path, engine: Engine
) -> None:
    sent = await service.handle(incoming("one", message_id="s"))
    failed = await service.handle(incoming("two", message_id="f"))
    assert sent is not None and failed is not None
    await service.mark_delivered(sent, ["1"])
    await service.mark_undelivered(failed, "bot was blocked by the user")
    old = datetime.now(UTC) - timedelta(minutes=20)
    await killed_after_logging(service, incoming("from long ago", message_id="old", sent_at=old))
    await killed_after_logging(service, incoming("just talking", message_id="u", chat="-5", kind=ChatKind.GROUP))
    await killed_after_logging(service, incoming("elsewhere", message_id="d", platform="discord"))
    plan = await service.plan_recovery(["telegram"])
    assert plan is not None
    await killed_after_logging(service, incoming("after the plan: the live path's", message_id="live"))
    assert [item async for item in service.recover(plan)] == []

    off = ChatService(settings=make_settings(tmp_path, recovery_window_minutes=0), db=db, engine=engine)
    assert await off.plan_recovery(["telegram"]) is None


async def test_recovered_answers_see_the_conversation_up_to_their_own_message(
    service: ChatService, db: Database, engine: Engine
) -> None:
    prompts = record_prompts(engine)
    await killed_after_logging(service, incoming("first question", message_id="1"))
    await killed_after_logging(service, incoming("second question", message_id="2"))
    items = await recover_all(service)
    assert sorted(item.reply.reply_to or "" for item in items) == ["1", "2"]
    assert sorted(prompt[-1] for prompt in prompts) == ["first question", "second question"]
    assert ["first question"] in prompts  # the first answer does not see the second question
    bot_rows = [row for row in await rows(db) if row.role is Role.BOT]
    assert len(bot_rows) == 2 and {row.reply_to_id for row in bot_rows} == {1, 2}


async def test_an_export_is_never_replayed_after_a_restart(service: ChatService, db: Database) -> None:
    """Personal data goes out only on a live request, with that request's privacy rules."""
    await killed_after_logging(service, incoming("/export", message_id="e"))
    [item] = await recover_all(service)
    assert item.reply.text == EXPORT_AFTER_RESTART and item.reply.attachment is None


async def test_a_pending_group_export_note_is_not_replayed_without_its_export(
    service: ChatService, db: Database
) -> None:
    """Killed after writing "I sent your export to you privately" but before sending anything: replaying that note
    would be a lie (the export itself was never sent, and is not replayed), so the person is asked again."""
    asked = incoming("/export", chat="-100", kind=ChatKind.GROUP, addressed=True, message_id="g")
    reply = await service.handle(asked)  # written and left PENDING: the process died before the adapter sent it
    assert reply is not None and reply.private is not None
    [item] = await recover_all(service)
    assert item.chat_id == "-100" and item.reply.text == EXPORT_AFTER_RESTART and item.reply.private is None


# --- handed to the real adapters ----------------------------------------------------------------------------------


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake


async def test_telegram_redelivery_and_recovery_answer_a_message_once(
    telegram: FakeTelegram, db: Database, engine: Engine, tmp_path: Path
) -> None:
    """The dead process logged the message but Telegram delivers the update again (it was never confirmed): the
    live path sees it was logged and stays quiet, recovery answers it, as a reply to it, once."""
    settings = make_settings(
        tmp_path, telegram_bot_token=telegram.token, telegram_base_url=telegram.base_url, shutdown_grace_seconds=5
    )
    service = ChatService(settings=settings, db=db, engine=engine)
    una = telegram.user(6001, "Una")
    chat = telegram.private_chat(una)
    asked = telegram.user_says(chat, una, "hello there, how are you today?")  # queued until the bot polls
    await killed_after_logging(service, incoming(asked["text"], user="6001", chat="6001", message_id="1"))
    plan = await service.plan_recovery(["telegram"])
    assert plan is not None
    backend = TelegramBackend(settings=settings, handler=service)
    await backend.start()
    try:
        await telegram.wait_until(lambda: len(telegram.calls_to("getUpdates")) >= 2)  # the update was fetched
        await _recover(service, plan, [backend])
        [answer] = await telegram.wait_for_messages(una.id, 1)
        telegram.user_says(chat, una, "and now?")  # the live path goes on as usual
        await telegram.wait_for_messages(una.id, 2)
    finally:
        await backend.stop()
    assert answer["reply_to_message"]["message_id"] == asked["message_id"]
    user_rows = [row for row in await rows(db) if row.role is Role.USER]
    bot_rows = [row for row in await rows(db) if row.role is Role.BOT]
    assert [row.platform_message_id for row in user_rows] == ["1", "3"]
    assert [(row.reply_to_id, row.delivery) for row in bot_rows] == [
        (user_rows[0].id, Delivery.SENT),
        (user_rows[1].id, Delivery.SENT),
    ]


async def test_discord_recovery_answers_in_the_channel_as_a_reply_to_the_message(
    db: Database, engine: Engine, tmp_path: Path
) -> None:
    """A DM the dead process logged but never answered is answered after the restart, by channel id, once."""
    import discord

    from bot.discord_bot import DiscordBackend
    from tests.fake_discord import FakeDiscord

    base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY  # set by start()
    fake = FakeDiscord()
    await fake.start()
    settings = make_settings(
        tmp_path,
        discord_bot_token=fake.token,
        discord_api_base_url=fake.api_base_url,
        discord_gateway_url=fake.gateway_url,
        discord_guild_ids=str(fake.guild_id),
    )
    service = ChatService(settings=settings, db=db, engine=engine)
    backend = DiscordBackend(settings=settings, handler=service, ready_timeout=15, guild_ready_timeout=0.05)
    vic = fake.add_user("vic")
    channel = fake.dm_channel(vic)
    await backend.start()
    try:
        asked = await fake.send_message(vic, "what is your favourite colour?", deliver=False)  # seen by the dead one
        await killed_after_logging(
            service,
            incoming(asked["content"], user=vic["id"], chat=str(channel), message_id=asked["id"], platform="discord"),
        )
        plan = await service.plan_recovery(["discord"])
        assert plan is not None
        await _recover(service, plan, [backend])
        [answer] = await fake.wait_for_posts(channel, 1)
        assert await recover_all(service, ("discord",)) == []
    finally:
        await backend.stop()
        await fake.close()
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = base, gateway
    assert answer["message_reference"]["message_id"] == asked["id"]
    user_row, bot_row = await rows(db)
    assert (bot_row.reply_to_id, bot_row.delivery, bot_row.platform_message_id) == (
        user_row.id,
        Delivery.SENT,
        answer["id"],
    )


async def test_the_console_shows_a_recovered_answer_as_one_to_an_earlier_message(
    service: ChatService, db: Database, tmp_path: Path
) -> None:
    import io

    from bot.console import ConsoleBackend

    await killed_after_logging(service, incoming("hello there", chat="console", user="me", platform="console"))
    out = io.StringIO()
    console = ConsoleBackend(
        handler=service, bot_name="Magpie", exports_dir=tmp_path, stdin=io.StringIO(""), stdout=out
    )
    plan = await service.plan_recovery(["console"])
    assert plan is not None
    await _recover(service, plan, [console])
    [line] = out.getvalue().splitlines()
    assert line.startswith("[Magpie, answering an earlier message] ")
    assert [row.delivery for row in await rows(db)] == [None, Delivery.SENT]


async def test_discord_sends_only_the_remaining_parts_and_leaves_a_send_cut_off_at_stop_to_recovery(
    tmp_path: Path,
) -> None:
    import discord

    from bot.discord_bot import DiscordBackend
    from tests.fake_discord import FakeDiscord

    base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    fake = FakeDiscord()
    await fake.start()
    settings = make_settings(
        tmp_path,
        discord_bot_token=fake.token,
        discord_api_base_url=fake.api_base_url,
        discord_gateway_url=fake.gateway_url,
        discord_guild_ids=str(fake.guild_id),
        shutdown_grace_seconds=0.2,
    )
    long_reply = "\n\n".join(f"Part {n}. " + "word " * 350 for n in (1, 2, 3))  # three Discord messages
    handler = RecordingHandler(lambda _message: long_reply, log_id=lambda message: int(message.message_id))
    backend = DiscordBackend(settings=settings, handler=handler, ready_timeout=15, guild_ready_timeout=0.05)
    wen = fake.add_user("wen")
    channel = fake.dm_channel(wen)
    await backend.start()
    try:
        earlier = await fake.send_message(wen, "from before the restart", deliver=False)
        rest = Reply(long_reply, reply_to=earlier["id"], log_id=1)
        await backend.deliver_reply(str(channel), rest, parts_sent=1)
        assert [post["content"].split(".")[0] for post in fake.posts_in(channel)] == ["Part 2", "Part 3"]
        fake.hold(rf"POST /channels/{channel}/messages", after=1)
        asked = await fake.send_message(wen, "tell me a long story")
        await fake.wait_until(lambda: len(fake.held_calls()) == 1)
        await backend.stop()
    finally:
        await fake.close()
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = base, gateway
    assert [reply.log_id for reply, _ in handler.delivered] == [1]
    assert [(reply.log_id, parts) for reply, parts in handler.interrupted] == [(int(asked["id"]), 1)]
    assert handler.undelivered == []
