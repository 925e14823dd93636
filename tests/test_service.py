"""The chat service end to end: a real tiny GPT-2 behind the engine and a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import event, func, select

from core.chat.commands import COMMANDS
from core.chat.messages import ChatKind, IncomingMessage, Reply
from core.chat.service import ChatService
from core.serving.dialogue import Turn, speaker_key
from core.serving.engine import Engine
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import Delivery, Message, Role, User
from core.texts import (
    EXPORT_SENT_PRIVATELY,
    EXPORT_UNREACHABLE,
    GENERIC_FAILURE,
    NOT_LOGGED,
    NOT_TEXT,
)
from tests.service_support import msg, record_prompts


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        admin_ids=frozenset({"telegram:42"}),
        rate_limit_per_minute=5,
        max_input_chars=50,
        history_turns=6,
        models_dir=tmp_path / "models",
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def service(settings: Settings, db: Database, engine: Engine, clock: FakeClock) -> ChatService:
    return ChatService(settings=settings, db=db, engine=engine, clock=clock)


async def count_messages(db: Database, **filters: object) -> int:
    query = select(func.count()).select_from(Message)
    for name, value in filters.items():
        query = query.where(getattr(Message, name) == value)
    async with db.sessions() as session:
        return int((await session.execute(query)).scalar_one())


async def test_private_message_is_answered_and_both_sides_logged(
    service: ChatService, db: Database, engine: Engine
) -> None:
    reply = await service.handle(msg("hello there"))
    # The engine is greedy: the reply must be exactly the model's answer to the message as a person's turn.
    model_answer = await engine.generate_response([Turn(speaker_key(1, bot=False), "hello there")])
    assert reply is not None and reply.text == model_answer.text
    async with db.sessions() as session:
        rows = (await session.execute(select(Message).order_by(Message.id))).scalars().all()
    assert [(row.role, row.text) for row in rows] == [(Role.USER, "hello there"), (Role.BOT, reply.text)]
    assert rows[1].reply_to_id == rows[0].id and rows[1].delivery is Delivery.PENDING
    await service.mark_delivered(reply, ["555"])
    async with db.sessions() as session:
        bot = await session.get(Message, rows[1].id)
    assert bot is not None and bot.delivery is Delivery.SENT and bot.platform_message_id == "555"


async def test_duplicate_delivery_is_answered_and_logged_once(service: ChatService, db: Database) -> None:
    first = await service.handle(msg("hi", message_id="77"))
    second = await service.handle(msg("hi", message_id="77"))
    assert first is not None and second is None
    assert await count_messages(db, role=Role.USER) == 1
    assert await count_messages(db, role=Role.BOT) == 1


async def test_concurrent_duplicates_are_logged_once(service: ChatService, db: Database) -> None:
    replies = await asyncio.gather(*(service.handle(msg("same", message_id="88")) for _ in range(5)))
    assert sum(reply is not None for reply in replies) == 1
    assert await count_messages(db, role=Role.USER) == 1


async def test_group_messages_are_logged_but_answered_only_when_addressed(service: ChatService, db: Database) -> None:
    group = {"chat": "-5", "kind": ChatKind.GROUP}
    assert await service.handle(msg("just chatting", **group)) is None
    assert await service.handle(msg("/help@OtherBot", **group)) is None
    addressed = await service.handle(msg("what do you think?", addressed=True, **group))
    command = await service.handle(msg("/help", **group))
    assert addressed is not None and command is not None and "/reset" in command.text
    assert await count_messages(db, role=Role.USER) == 4


async def test_help_and_start_list_commands_admin_ones_only_for_admins(service: ChatService) -> None:
    user_help = await service.handle(msg("/help"))
    admin_help = await service.handle(msg("/help", user="42"))
    start = await service.handle(msg("/start"))
    assert user_help is not None and admin_help is not None and start is not None
    for name in ("reset", "forget", "export", "optout", "optin"):
        assert f"/{name}" in user_help.text
    assert "/retrain" not in user_help.text and "/retrain" in admin_help.text
    assert "/optout" in start.text


@pytest.mark.parametrize("command", ["/retrain", "/status", "/models", "/rollback", "/rollback v1"])
async def test_admin_commands_refuse_non_admins(
    service: ChatService, db: Database, command: str, caplog: pytest.LogCaptureFixture
) -> None:
    reply = await service.handle(msg(command, user="7"))
    assert reply is not None and "admin" in reply.text
    assert any(
        "Refused admin command" in record.getMessage() and "telegram:7" in record.getMessage()
        for record in caplog.records
    )
    assert await count_messages(db, role=Role.USER) == 1


async def test_admin_names_do_not_grant_rights(service: ChatService) -> None:
    impostor = IncomingMessage(
        platform="telegram",
        chat_id="1",
        chat_kind=ChatKind.PRIVATE,
        author_id="9",
        author_name="42",
        text="/status",
        message_id="x1",
    )
    reply = await service.handle(impostor)
    assert reply is not None and "admin" in reply.text


async def test_status_for_admins(service: ChatService) -> None:
    await service.handle(msg("hello"))
    reply = await service.handle(msg("/status", user="42"))
    assert reply is not None
    assert "Model: tiny" in reply.text and "Messages logged: 3" in reply.text
    assert "Last training run: none yet" in reply.text


async def test_trainer_commands_say_when_unavailable(service: ChatService) -> None:
    reply = await service.handle(msg("/retrain", user="42"))
    assert reply is not None and "not available" in reply.text


async def test_reset_starts_a_fresh_context(service: ChatService, db: Database, engine: Engine) -> None:
    seen = record_prompts(engine)
    await service.handle(msg("first topic"))
    await service.handle(msg("/reset"))
    await service.handle(msg("second topic"))
    assert seen[0] == ["first topic"]
    assert seen[1] == ["second topic"]


async def test_history_is_bounded_by_history_turns(service: ChatService, engine: Engine) -> None:
    seen: list[int] = []
    original = engine.generate_response

    async def spy(turns, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(len(turns))
        return await original(turns, **kwargs)

    engine.generate_response = spy  # type: ignore[method-assign]
    for index in range(5):
        await service.handle(msg(f"line {index}"))
    assert seen == [1, 3, 5, 7, 7]  # the message plus HISTORY_TURNS earlier turns


async def test_a_reply_that_was_never_delivered_is_not_history(service: ChatService, engine: Engine) -> None:
    """Nobody read a reply whose send failed: the next answer must not carry on from it. A delivered one counts."""
    seen = record_prompts(engine)
    lost = await service.handle(msg("first question"))
    assert lost is not None
    await service.mark_undelivered(lost, "chat not found")
    delivered = await service.handle(msg("second question"))
    assert delivered is not None
    await service.mark_delivered(delivered, ["501"])
    await service.handle(msg("third question"))
    assert seen[1] == ["first question", "second question"]
    assert seen[2] == ["first question", "second question", delivered.text, "third question"]


async def test_a_migrated_chat_keeps_its_history_even_when_the_new_id_spoke_first(
    service: ChatService, db: Database, engine: Engine
) -> None:
    said = partial(msg, kind=ChatKind.GROUP, addressed=True)
    await service.handle(said("old chat one", chat="-5", message_id="1"))
    await service.handle(said("new chat one", chat="-1005", message_id="1"))
    await service.migrate_chat("telegram", "-5", "-1005")
    await service.migrate_chat("telegram", "-5", "-1005")  # the second notice finds nothing left to move
    seen = record_prompts(engine)
    reply = await service.handle(said("new chat two", chat="-1005", message_id="2"))
    assert reply is not None
    assert seen[0][0] == "old chat one" and seen[0][-1] == "new chat two" and "new chat one" in seen[0]
    async with db.sessions() as session:
        rows = (await session.execute(select(Message).order_by(Message.id))).scalars().all()
    assert len({row.chat_id for row in rows}) == 1
    assert [row.platform_message_id for row in rows if row.role is Role.USER] == ["-5/1", "1", "2"]


async def test_edits_update_the_log_and_deletions_remove_the_message_and_its_answer(
    service: ChatService, db: Database
) -> None:
    await service.handle(msg("helo", message_id="31"))
    await service.handle(msg("/help", message_id="32"))
    await service.handle(msg("second thought", message_id="33"))
    await service.message_edited("telegram", "100", "31", "hello")
    await service.message_edited("telegram", "100", "31", "/reset")  # an edit never turns into a command
    await service.message_edited("telegram", "100", "31", "   ")  # nor into nothing
    await service.message_edited("telegram", "100", "32", "help me")  # commands keep their text
    await service.message_edited("telegram", "100", "999", "unknown")  # never logged: nothing to do
    await service.message_deleted("telegram", "100", "33")
    await service.message_deleted("telegram", "100", "33")  # a second notice finds nothing

    async with db.sessions() as session:
        rows = (await session.execute(select(Message).order_by(Message.id))).scalars().all()
    assert [row.text for row in rows if row.role is Role.USER] == ["hello", "/help"]
    assert len([row for row in rows if row.role is Role.BOT]) == 2  # the answer to the deleted message went too


async def test_forget_deletes_everything_the_user_sent_everywhere(service: ChatService, db: Database) -> None:
    await service.handle(msg("mine in private"))
    await service.handle(msg("mine in a group", chat="-9", kind=ChatKind.GROUP, addressed=True))
    await service.handle(msg("someone else's", user="2"))
    reply = await service.handle(msg("/forget"))
    assert reply is not None and "deleted 3 messages" in reply.text
    async with db.sessions() as session:
        texts = (await session.execute(select(Message.text).where(Message.role == Role.USER))).scalars().all()
    assert texts == ["someone else's"]


async def test_forget_in_a_group_confirms_with_a_count_and_none_of_the_words(service: ChatService) -> None:
    """/forget's confirmation stays in the chat it was asked in: it holds a count, never what was said."""
    await service.handle(msg("my secret, told in private"))
    reply = await service.handle(msg("/forget", chat="-9", kind=ChatKind.GROUP))
    assert reply is not None and reply.private is None and reply.attachment is None
    assert "deleted 2 messages" in reply.text and "secret" not in reply.text


async def test_export_returns_my_messages_as_json(service: ChatService) -> None:
    await service.handle(msg("안녕하세요 😀"))
    await service.handle(msg("not mine", user="2"))
    reply = await service.handle(msg("/export"))
    assert reply is not None and reply.attachment is not None and reply.private is None  # private chat: as is
    data = json.loads(reply.attachment.content)
    assert [item["text"] for item in data["messages"]] == ["안녕하세요 😀", "/export"]


async def test_export_in_a_group_goes_to_the_author_alone_and_the_group_sees_only_a_note(
    service: ChatService, db: Database
) -> None:
    group = partial(msg, chat="-9", kind=ChatKind.GROUP)
    await service.handle(msg("my secret, told in private"))
    await service.handle(group("said in the group", addressed=True))
    await service.handle(group("not mine", user="2"))
    reply = await service.handle(group("/export"))
    assert reply is not None and reply.private is not None and reply.private.attachment is not None
    # What the group may see: the note, no attachment, none of the user's words.
    assert (reply.text, reply.attachment) == (EXPORT_SENT_PRIVATELY, None)
    for said in ("my secret", "said in the group", "messages I have from you"):
        assert said not in reply.text
    data = json.loads(reply.private.attachment.content)
    assert [m["text"] for m in data["messages"]] == ["my secret, told in private", "said in the group", "/export"]
    assert reply.private.unreachable == EXPORT_UNREACHABLE and "/export" in EXPORT_UNREACHABLE
    # The group's log holds the note, as a system reply (never conversation, never trained on).
    async with db.sessions() as session:
        answer = await session.get(Message, reply.log_id)
    assert answer is not None and (answer.text, answer.is_command) == (EXPORT_SENT_PRIVATELY, True)
    for command in COMMANDS:  # every command that answers with personal data does the same
        if not command.private:
            continue
        other = await service.handle(group(f"/{command.name}"))
        assert other is not None and other.private is not None and other.attachment is None


async def test_an_export_that_cannot_reach_its_author_is_undelivered_and_the_group_is_told_how_to_ask(
    service: ChatService, db: Database
) -> None:
    await service.handle(msg("my secret, told in private"))
    reply = await service.handle(msg("/export", chat="-9", kind=ChatKind.GROUP))
    assert reply is not None and reply.log_id is not None
    note = await service.private_unreachable(reply, "Telegram: Forbidden: bot can't initiate conversation with a user")
    assert (note.text, note.attachment, note.private, note.reply_to) == (EXPORT_UNREACHABLE, None, None, reply.reply_to)
    await service.mark_delivered(note, ["31"])
    async with db.sessions() as session:
        export_row = await session.get(Message, reply.log_id)
        note_row = await session.get(Message, note.log_id)
    assert export_row is not None and note_row is not None
    assert export_row.delivery is Delivery.FAILED and "can't initiate conversation" in (export_row.delivery_error or "")
    assert (note_row.text, note_row.delivery, note_row.platform_message_id) == (EXPORT_UNREACHABLE, Delivery.SENT, "31")
    assert (note_row.chat_id, note_row.reply_to_id, note_row.is_command) == (
        export_row.chat_id,
        export_row.reply_to_id,
        True,
    )


async def test_optout_and_optin_flip_the_flag(service: ChatService, db: Database) -> None:
    async def opted_out() -> bool:
        async with db.sessions() as session:
            return bool((await session.execute(select(User.opted_out).where(User.platform_user_id == "1"))).scalar())

    reply = await service.handle(msg("/optout"))
    assert reply is not None and "won't be used for training" in reply.text and await opted_out()
    chat = await service.handle(msg("still talking"))
    assert chat is not None  # opted-out users keep chatting
    await service.handle(msg("/optin"))
    assert not await opted_out()


async def test_rate_limit_replies_and_still_logs(service: ChatService, db: Database, clock: FakeClock) -> None:
    replies = [await service.handle(msg("/help")) for _ in range(6)]
    assert all(reply is not None for reply in replies)
    assert "try again in" in replies[-1].text  # type: ignore[union-attr]
    assert await count_messages(db, role=Role.USER) == 6
    clock.now += 61
    again = await service.handle(msg("/help"))
    assert again is not None and "try again" not in again.text


@pytest.mark.parametrize(("platform", "user"), [("telegram", "42"), ("console", "local")])
async def test_admins_and_the_console_are_not_rate_limited(service: ChatService, platform: str, user: str) -> None:
    replies = [await service.handle(msg("/help", user=user, platform=platform)) for _ in range(8)]
    assert all(reply is not None and "try again in" not in reply.text for reply in replies)


async def test_long_empty_and_non_text_input_get_clear_replies(service: ChatService, db: Database) -> None:
    long_reply = await service.handle(msg("x" * 51))
    empty_reply = await service.handle(msg("   "))
    sticker_reply = await service.handle(msg(None))
    unknown = await service.handle(msg("/frobnicate"))
    assert long_reply is not None and "too long" in long_reply.text and "50" in long_reply.text
    assert empty_reply is not None and "text" in empty_reply.text
    assert sticker_reply is not None and sticker_reply.text == NOT_TEXT
    assert unknown is not None and "/help" in unknown.text
    assert await count_messages(db, role=Role.USER) == 4


async def test_one_generation_per_user_at_a_time(service: ChatService, engine: Engine) -> None:
    running = 0
    peak = 0
    original = engine.generate_response

    async def spy(turns, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            return await original(turns, **kwargs)
        finally:
            running -= 1

    engine.generate_response = spy  # type: ignore[method-assign]
    replies = await asyncio.gather(*(service.handle(msg(f"q{index}")) for index in range(3)))
    assert all(reply is not None for reply in replies)
    assert peak == 1


async def test_group_context_per_user(settings: Settings, db: Database, engine: Engine, clock: FakeClock) -> None:
    service = ChatService(
        settings=settings.model_copy(update={"group_context": "user"}), db=db, engine=engine, clock=clock
    )
    seen = record_prompts(engine)
    group = {"chat": "-1", "kind": ChatKind.GROUP, "addressed": True}
    await service.handle(msg("alice here", user="1", **group))
    await service.handle(msg("bob here", user="2", **group))
    assert seen[1] == ["bob here"]


async def test_a_database_outage_gets_a_clear_reply_not_silence(settings: Settings, engine: Engine) -> None:
    """A database still away after DATABASE_RETRY_SECONDS (a shorter outage is waited out: tests/test_db_retry.py,
    tests/test_database_outage.py): the author is asked to send the message again."""
    down = Database.connect("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")  # nothing listens on port 1
    patient = settings.model_copy(update={"database_retry_seconds": 0.5})
    service = ChatService(settings=patient, db=down, engine=engine)
    try:
        private = await service.handle(msg("hello?", message_id="5"))
        unaddressed = await service.handle(msg("chatter", chat="-3", kind=ChatKind.GROUP))
    finally:
        await down.close()
    assert private is not None and private.text == NOT_LOGGED and private.reply_to == "5"
    assert private.log_id is None  # nothing to mark delivered
    assert unaddressed is None  # a group message nobody addressed to the bot stays unanswered, as always


async def test_a_database_lost_mid_answer_still_gets_the_user_a_reply(
    service: ChatService, db: Database, engine: Engine
) -> None:
    """The message is logged, then every statement fails (as when the server goes away) while the model writes:
    the user still hears back, and delivery bookkeeping logs the failure instead of raising into the adapter."""
    down = False

    def refuse(*_: object) -> None:
        if down:
            raise OSError("connection lost")

    event.listen(db.engine.sync_engine, "before_cursor_execute", refuse)
    original = engine.generate_response

    async def generate_then_lose_the_database(turns, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal down
        result = await original(turns, **kwargs)
        down = True
        return result

    engine.generate_response = generate_then_lose_the_database  # type: ignore[method-assign]
    try:
        reply = await service.handle(msg("are you there?", message_id="9"))
        assert reply is not None and reply.text == GENERIC_FAILURE and reply.log_id is None
        await service.mark_delivered(Reply("earlier answer", log_id=1), ["77"])  # logged, not raised
    finally:
        down = False
        event.remove(db.engine.sync_engine, "before_cursor_execute", refuse)
    assert await count_messages(db, role=Role.USER) == 1


async def test_undelivered_replies_are_recorded(service: ChatService, db: Database) -> None:
    reply = await service.handle(msg("hello"))
    assert reply is not None
    await service.mark_undelivered(reply, "chat not found")
    async with db.sessions() as session:
        row = await session.get(Message, reply.log_id)
    assert row is not None and row.delivery is Delivery.FAILED and row.delivery_error == "chat not found"
