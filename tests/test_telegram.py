"""The Telegram backend, driven through the real python-telegram-bot client against `tests/fake_telegram.py`.

Adapter-level tests use `RecordingHandler` (the model is irrelevant to them); the end-to-end tests at the bottom run
the real `ChatService` with the tiny real model and assert on what was logged in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot import telegram_requests
from bot.telegram import TelegramBackend
from core.chat.commands import COMMANDS
from core.chat.messages import ChatKind, IncomingMessage, Reply
from core.chat.service import ChatService
from core.errors import ConfigError, MagpieError
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import Delivery, Role
from core.texts import BUSY, EXPORT_SENT_PRIVATELY, EXPORT_UNREACHABLE, NOT_TEXT, OPTED_OUT
from tests.fake_telegram import FakeTelegram, utf16_length
from tests.recording_handler import RecordingHandler
from tests.telegram_support import logged, running, serving, settings_for

WAIT = 20.0


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake


@pytest.fixture
def no_token_in_logs(caplog: pytest.LogCaptureFixture, telegram: FakeTelegram) -> Any:
    """Captures every log record at DEBUG from Magpie and INFO from everything else, with httpx turned down as
    the CLI does, and checks afterwards that the token never appeared."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="bot")
    for noisy in ("httpx", "httpcore"):
        caplog.set_level(logging.WARNING, logger=noisy)
    yield caplog
    assert telegram.token not in caplog.text
    assert telegram.token.split(":", maxsplit=1)[1] not in caplog.text


async def test_fake_self_check_json_bodies_the_token_and_the_length_limit(telegram: FakeTelegram) -> None:
    """A self-check of the fake's strictness, not a test of Magpie: the fake must refuse what Telegram refuses, for
    the cases PTB never sends (it always posts form-encoded bodies), or the adapter tests could pass against a
    lenient fake. Magpie's side: test_a_10000_character_answer_is_split_within_limits_at_sentence_boundaries and
    test_a_wrong_token_is_a_clear_error_that_does_not_contain_it."""
    alice = telegram.user(1001, "Alice")
    telegram.private_chat(alice)
    api = f"{telegram.base_url}{telegram.token}"
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{api}/sendMessage", json={"chat_id": alice.id, "text": "hi"}) as ok:
            assert ok.status == 200 and (await ok.json())["result"]["text"] == "hi"
        async with client.post(f"{api}/sendMessage", json={"chat_id": alice.id, "text": "😀" * 2049}) as long:
            assert long.status == 400 and (await long.json())["description"] == "Bad Request: message is too long"
        async with client.post(f"{telegram.base_url}1:wrong/getMe") as wrong:
            assert wrong.status == 401
            assert await wrong.json() == {"ok": False, "error_code": 401, "description": "Unauthorized"}
        async with client.post(f"{api}/getUpdates", data={"offset": "0", "timeout": "0"}) as empty:
            assert (await empty.json())["result"] == []
    assert [m["text"] for m in telegram.sent_messages(alice.id)] == ["hi"]


async def test_fake_self_check_refuses_to_write_first_to_a_person_like_telegram(telegram: FakeTelegram) -> None:
    """A self-check of the fake's strictness, not a test of Magpie: a bot may not start a conversation, so someone
    seen in a group who never opened a private chat is refused. Magpie's side:
    test_export_for_someone_who_never_started_the_bot_stays_out_of_the_group."""
    bob = telegram.user(2001, "Bob")
    telegram.user_says(telegram.group(-100123), bob, "hi all")
    api = f"{telegram.base_url}{telegram.token}"
    refusal = {"ok": False, "error_code": 403, "description": "Forbidden: bot can't initiate conversation with a user"}
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{api}/sendMessage", json={"chat_id": bob.id, "text": "psst"}) as text:
            assert (text.status, await text.json()) == (403, refusal)
        form = aiohttp.FormData({"chat_id": str(bob.id)})
        form.add_field("document", b"{}", filename="export.json")
        async with client.post(f"{api}/sendDocument", data=form) as document:
            assert (document.status, await document.json()) == (403, refusal)
        telegram.private_chat(bob)  # Bob presses Start
        async with client.post(f"{api}/sendMessage", json={"chat_id": bob.id, "text": "psst"}) as ok:
            assert ok.status == 200
    assert [m["text"] for m in telegram.sent_messages(bob.id)] == ["psst"]


# --- start-up -------------------------------------------------------------------------------------------------


async def test_startup_survives_failing_get_me_and_delete_webhook(
    telegram: FakeTelegram, no_token_in_logs: Any
) -> None:
    telegram.fail_next("getMe", 2, status=502)
    telegram.fail_next("deleteWebhook", 1, status=502)
    alice = telegram.user(1001, "Alice")
    handler = RecordingHandler()
    async with running(settings_for(telegram), handler):
        telegram.user_says(telegram.private_chat(alice), alice, "still there?")
        [answer] = await telegram.wait_for_messages(alice.id, 1)
    assert answer["text"] == "echo: still there?"
    assert [call.status for call in telegram.calls_to("getMe")][:3] == [502, 502, 200]
    assert [call.status for call in telegram.calls_to("deleteWebhook")] == [502, 200]


async def test_a_wrong_token_is_a_clear_error_that_does_not_contain_it(
    telegram: FakeTelegram, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "987654321:AAWrongTokenWrongTokenWrongToken"
    caplog.set_level(logging.DEBUG, logger="bot")
    backend = TelegramBackend(settings=settings_for(telegram, token=wrong), handler=RecordingHandler())
    with pytest.raises(ConfigError, match="rejected TELEGRAM_BOT_TOKEN") as raised:
        await backend.start()
    assert wrong not in str(raised.value) and raised.value.__cause__ is None and raised.value.__context__ is None
    assert wrong not in caplog.text
    assert [call.status for call in telegram.calls_to("getMe")] == [401]


async def test_an_unreachable_api_is_a_clear_error_after_the_retries(
    telegram: FakeTelegram, monkeypatch: pytest.MonkeyPatch, no_token_in_logs: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(telegram_requests, "STARTUP_ATTEMPTS", 3)
    monkeypatch.setattr(telegram_requests, "BACKOFF_FIRST_S", 0.01)
    telegram.fail_next("getMe", 3, status=502)
    backend = TelegramBackend(settings=settings_for(telegram), handler=RecordingHandler())
    with pytest.raises(MagpieError, match=r"Cannot reach the Telegram Bot API at 127\.0\.0\.1:\d+: Bad Gateway"):
        await backend.start()
    assert [call.status for call in telegram.calls_to("getMe")] == [502, 502, 502]
    assert no_token_in_logs.text.count("retry") == 2


async def test_a_missing_token_or_a_bad_webhook_secret_is_refused_before_connecting(telegram: FakeTelegram) -> None:
    with pytest.raises(ConfigError, match="TELEGRAM_BOT_TOKEN"):
        TelegramBackend(settings=settings_for(telegram, token=None), handler=RecordingHandler())
    bad_secret = settings_for(telegram, telegram_webhook_url="https://example.org/tg", telegram_webhook_secret="a b")
    with pytest.raises(ConfigError, match="TELEGRAM_WEBHOOK_SECRET"):
        TelegramBackend(settings=bad_secret, handler=RecordingHandler())
    assert telegram.calls == []


async def test_command_menu_has_user_commands_for_everyone_and_all_commands_for_admins(
    telegram: FakeTelegram, caplog: pytest.LogCaptureFixture
) -> None:
    admin = telegram.user(42, "Admin")
    telegram.private_chat(admin)  # an admin who never opened a chat with the bot (777) gets no menu, with a warning
    settings = settings_for(telegram, admin_ids="telegram:42,telegram:777,discord:5")
    async with running(settings, RecordingHandler()):
        pass
    everyone = [command["command"] for command in telegram.commands["default"]]
    assert everyone == [command.name for command in COMMANDS if not command.admin]
    assert [command["command"] for command in telegram.commands["chat:42"]] == [c.name for c in COMMANDS]
    assert "chat:777" not in telegram.commands
    assert "command menu for admin chat 777 not set" in caplog.text
    assert telegram.commands["default"][0]["description"] == COMMANDS[0].help


# --- translating updates --------------------------------------------------------------------------------------


async def test_group_messages_are_all_handed_over_and_only_addressed_ones_answered_as_replies(
    telegram: FakeTelegram,
) -> None:
    group = telegram.group(-100123, "Friends")
    bob, carol = telegram.user(2001, "Bob", "bob"), telegram.user(2002, "Carol")
    handler = RecordingHandler()
    async with running(settings_for(telegram), handler):
        plain = telegram.user_says(group, bob, "morning all")
        telegram.user_says(group, carol, "hey @bob look")
        mention = telegram.user_says(group, bob, "@MagpieTestBot what's up?")
        [first] = await telegram.wait_for_messages(group.id, 1)
        reply = telegram.user_says(group, carol, "and you?", reply_to=first)
        telegram.user_says(group, bob, "/help@MagpieTestBot")
        telegram.user_says(group, bob, "/help@SomeOtherBot")
        telegram.user_says(group, bob, "/reset")
        telegram.user_says(group, carol, "ok 😀 @magpietestbot, tell me\nmore")
        await handler.wait_until(lambda: len(handler.received) == 8)
        answers = await telegram.wait_for_messages(group.id, 5)
        await handler.wait_until(lambda: len(handler.delivered) == 5)

    by_id = {message.message_id: message for message in handler.received}
    assert all(message.chat_kind is ChatKind.GROUP and message.chat_id == "-100123" for message in handler.received)
    assert [(message.text, message.addressed) for message in handler.received] == [
        ("morning all", False),
        ("hey @bob look", False),
        ("what's up?", True),
        ("and you?", True),
        ("/help", True),
        ("/help@SomeOtherBot", False),
        ("/reset", True),
        ("ok 😀 tell me\nmore", True),
    ]
    assert by_id[str(plain["message_id"])].author_id == "2001"
    assert by_id[str(plain["message_id"])].author_name == "Bob"
    # What a message replies to reaches the core (the dataset trains a reply as the answer to that line).
    assert by_id[str(reply["message_id"])].reply_to_message_id == str(first["message_id"])
    assert by_id[str(plain["message_id"])].reply_to_message_id is None
    # Every answer replies to the message it answers, and nothing answered the unaddressed ones.
    answered = [answer["reply_to_message"]["message_id"] for answer in answers]
    assert answered[:2] == [mention["message_id"], reply["message_id"]]
    assert len(answers) == len(set(answered)) == 5 and plain["message_id"] not in answered


async def test_non_text_updates_never_crash_and_edits_update_the_log_without_a_second_answer(
    telegram: FakeTelegram, no_token_in_logs: pytest.LogCaptureFixture
) -> None:
    group = telegram.group(-100555)
    dave = telegram.user(3001, "Dave")
    private = telegram.private_chat(dave)
    handler = RecordingHandler(lambda message: "note" if message.text is None else f"echo: {message.text}")
    async with running(settings_for(telegram), handler):
        first = telegram.user_says(private, dave, "hello")
        await telegram.wait_for_messages(dave.id, 1)
        telegram.user_edits(first, "hello, edited")
        telegram.user_sends_sticker(private, dave)
        telegram.user_sends_voice(private, dave)
        telegram.user_sends_photo(private, dave, caption="look")
        telegram.member_joins(group, dave)
        telegram.user_sends_sticker(group, dave)
        telegram.channel_post(telegram.group(-100777, "News", kind="channel"), "breaking")
        [bot_in_group] = await _say_and_wait(telegram, group, dave, "@MagpieTestBot hi")
        telegram.user_sends_sticker(group, dave, reply_to=bot_in_group)
        await telegram.wait_for_messages(group.id, 2)
        await telegram.wait_for_messages(dave.id, 4)
        await handler.wait_until(lambda: len(handler.delivered) == 6 and len(handler.edits) == 1)

    assert handler.edits == [(str(dave.id), str(first["message_id"]), "hello, edited")]
    assert [(m.chat_kind, m.text) for m in handler.received] == [
        (ChatKind.PRIVATE, "hello"),
        (ChatKind.PRIVATE, None),
        (ChatKind.PRIVATE, None),
        (ChatKind.PRIVATE, None),
        (ChatKind.GROUP, "hi"),
        (ChatKind.GROUP, None),
    ]
    assert all(message.addressed for message in handler.received)
    assert [m["text"] for m in telegram.sent_messages(dave.id)] == ["echo: hello", "note", "note", "note"]
    assert not [record for record in no_token_in_logs.records if record.levelno >= logging.ERROR]


async def _say_and_wait(telegram: FakeTelegram, chat: Any, person: Any, text: str) -> list[dict[str, Any]]:
    before = len(telegram.sent_messages(chat.id))
    telegram.user_says(chat, person, text)
    return (await telegram.wait_for_messages(chat.id, before + 1))[before:]


# --- sending --------------------------------------------------------------------------------------------------


async def test_a_10000_character_answer_is_split_within_limits_at_sentence_boundaries(telegram: FakeTelegram) -> None:
    sentence = "Magpies collect shiny things 🪙 and remember faces for years. "
    paragraph = sentence * 20
    long_answer = "\n\n".join([paragraph] * 9)[:10_000].rsplit(" ", 1)[0]
    assert len(long_answer) > 9_900
    group = telegram.group(-100999)
    erin = telegram.user(4001, "Erin")
    handler = RecordingHandler(lambda _: long_answer)
    async with running(settings_for(telegram), handler):
        asked = telegram.user_says(group, erin, "@MagpieTestBot tell me everything")
        await handler.wait_until(lambda: len(handler.delivered) == 1)
    parts = [message["text"] for message in telegram.sent_messages(group.id)]
    assert len(parts) == 3 and handler.delivered[0][1] == [str(m["message_id"]) for m in telegram.sent_messages()]
    assert all(utf16_length(part) <= 4096 for part in parts)
    assert sum(len(part) for part in parts) > 9_800
    assert " ".join(parts).split() == long_answer.split()
    assert all(part.endswith(".") for part in parts[:-1])
    first, *rest = telegram.sent_messages(group.id)
    assert first["reply_to_message"]["message_id"] == asked["message_id"]
    assert all("reply_to_message" not in message for message in rest)


async def test_typing_is_shown_at_once_renewed_while_thinking_and_never_after_the_reply(
    telegram: FakeTelegram, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TelegramBackend, "typing_renew_s", 0.05)
    frank = telegram.user(5001, "Frank")
    handler = RecordingHandler()
    handler.release = asyncio.Event()
    async with running(settings_for(telegram, typing_after_ms=0), handler):
        telegram.user_says(telegram.private_chat(frank), frank, "think hard")
        await telegram.wait_until(lambda: len(telegram.calls_to("sendChatAction")) >= 3)
        handler.release.set()
        await telegram.wait_for_messages(frank.id, 1)
        sent_at = telegram.calls_to("sendMessage")[0].at
    actions = telegram.calls_to("sendChatAction")
    assert all(call.params == {"chat_id": frank.id, "action": "typing"} for call in actions)
    assert all(call.at < sent_at for call in actions)


async def test_a_reply_that_cannot_be_delivered_is_reported_undelivered(
    telegram: FakeTelegram, monkeypatch: pytest.MonkeyPatch, no_token_in_logs: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(telegram_requests, "BACKOFF_FIRST_S", 0.01)
    hank = telegram.user(7001, "Hank")
    handler = RecordingHandler()
    async with running(settings_for(telegram), handler) as backend:
        telegram.fail_next("sendMessage", telegram_requests.SEND_ATTEMPTS, status=502)
        telegram.user_says(telegram.private_chat(hank), hank, "hello?")
        await handler.wait_until(lambda: len(handler.undelivered) == 1)
        await backend.notify("424242", "training finished")  # an unknown chat: logged, not raised
    [(reply, reason, _)] = handler.undelivered
    assert reply.text == "echo: hello?" and "Bad Gateway" in reason and "NetworkError" in reason
    assert len(telegram.calls_to("sendMessage")) == telegram_requests.SEND_ATTEMPTS + 1
    assert handler.delivered == []
    assert "undelivered" in no_token_in_logs.text and "could not notify chat 424242" in no_token_in_logs.text


async def test_export_attachment_is_sent_as_a_document_after_the_text(telegram: FakeTelegram) -> None:
    from core.chat.messages import Attachment

    ivy = telegram.user(8001, "Ivy")
    handler = RecordingHandler(lambda _: "Here you go.")
    handler.attachment = Attachment("me.json", b'{"a": 1}')
    async with running(settings_for(telegram), handler):
        telegram.user_says(telegram.private_chat(ivy), ivy, "/export")
        text, document = await telegram.wait_for_messages(ivy.id, 2)
        await handler.wait_until(lambda: len(handler.delivered) == 1)
    assert text["text"] == "Here you go."
    assert document["document"]["file_name"] == "me.json" and document["_content"] == b'{"a": 1}'
    assert handler.delivered[0][1] == [str(text["message_id"]), str(document["message_id"])]


async def test_notify_pushes_text_to_a_chat(telegram: FakeTelegram) -> None:
    admin = telegram.user(42, "Admin")
    telegram.private_chat(admin)
    async with running(settings_for(telegram), RecordingHandler()) as backend:
        await backend.notify("42", "Training finished: v3 is live.")
    assert [m["text"] for m in telegram.sent_messages(42)] == ["Training finished: v3 is live."]


# --- concurrency, errors and shutdown -------------------------------------------------------------------------


async def test_upgrade_notices_move_the_chat_and_are_not_messages(telegram: FakeTelegram) -> None:
    handler = RecordingHandler()
    group, bob = telegram.group(-4001, "Garden club", kind="group"), telegram.user(2001, "Bob")
    async with running(settings_for(telegram), handler):
        supergroup = telegram.upgrade_group(group, -1004001)
        telegram.announce_upgrade(group, supergroup, bob)
        await handler.wait_until(lambda: len(handler.migrated) == 2)
    assert handler.migrated == [("-4001", "-1004001")] * 2
    assert handler.received == []


async def test_updates_are_handled_concurrently(telegram: FakeTelegram) -> None:
    people = [telegram.user(9000 + n, f"User {n}") for n in range(5)]
    handler = RecordingHandler()
    handler.release = asyncio.Event()
    async with running(settings_for(telegram), handler):
        for person in people:
            telegram.user_says(telegram.private_chat(person), person, "hi")
        # All five are inside the handler at once: a serialized bot would never get here.
        await handler.wait_until(lambda: len(handler.received) == 5)
        handler.release.set()
        for person in people:
            await telegram.wait_for_messages(person.id, 1)


async def test_the_error_handler_logs_the_update_id_never_the_token(
    telegram: FakeTelegram, no_token_in_logs: pytest.LogCaptureFixture
) -> None:
    def boom(_message: IncomingMessage) -> str:
        raise RuntimeError(f"boom near {telegram.base_url}{telegram.token}/sendMessage")

    jack = telegram.user(10001, "Jack")
    errors = _ErrorSeen()
    logging.getLogger("bot.telegram").addHandler(errors)
    async with running(settings_for(telegram), RecordingHandler(boom)):
        update = telegram.user_says(telegram.private_chat(jack), jack, "hi")
        await asyncio.wait_for(errors.seen.wait(), WAIT)
    [record] = [r for r in no_token_in_logs.records if r.levelno == logging.ERROR]
    assert record.name == "bot.telegram"
    assert "update 1 failed" in record.getMessage() and update["message_id"] == 1
    assert "RuntimeError: boom near" in record.getMessage() and "<TELEGRAM_BOT_TOKEN>" in record.getMessage()
    logging.getLogger("bot.telegram").removeHandler(errors)


class _ErrorSeen(logging.Handler):
    """Turns "an ERROR was logged" into an event a test can await."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.set()


async def test_stop_lets_in_flight_replies_finish(telegram: FakeTelegram, caplog: pytest.LogCaptureFixture) -> None:
    """The reply is released only once stop has stopped fetching and is waiting for it: a stop that did not wait
    would be done (or would have cut the reply off) by then."""
    kim = telegram.user(11001, "Kim")
    handler = RecordingHandler()
    handler.release = asyncio.Event()
    backend = TelegramBackend(settings=settings_for(telegram), handler=handler)
    await backend.start()
    telegram.user_says(telegram.private_chat(kim), kim, "slow one")
    await handler.wait_until(lambda: bool(handler.entered))
    caplog.set_level(logging.INFO, logger="bot.backend")
    waiting = _Seen("letting 1 replies finish")
    logging.getLogger("bot.backend").addHandler(waiting)
    try:
        stopping = asyncio.create_task(backend.stop())
        await asyncio.wait_for(waiting.seen.wait(), WAIT)
        done, _ = await asyncio.wait({stopping}, timeout=0.5)  # a stop that does not wait is over long before this
        assert not done and handler.delivered == [] and not handler.cancelled
        handler.release.set()
        await asyncio.wait_for(stopping, WAIT)
    finally:
        logging.getLogger("bot.backend").removeHandler(waiting)
    assert [m["text"] for m in telegram.sent_messages(kim.id)] == ["echo: slow one"]
    assert len(handler.delivered) == 1 and handler.interrupted == []


async def test_stop_cancels_replies_still_running_after_the_grace_period(telegram: FakeTelegram) -> None:
    lea = telegram.user(12001, "Lea")
    handler = RecordingHandler()
    handler.release = asyncio.Event()  # never set
    backend = TelegramBackend(settings=settings_for(telegram), handler=handler, stop_grace_s=0.1)
    await backend.start()
    telegram.user_says(telegram.private_chat(lea), lea, "endless")
    await handler.wait_until(lambda: bool(handler.entered))
    await asyncio.wait_for(backend.stop(), WAIT)
    assert handler.cancelled
    assert telegram.sent_messages(lea.id) == []


# --- sends that must not be repeated, and sends cut off part-way (issue #10, items 8 and 10) -------------------

THREE_PARTS = "\n\n".join(f"Part {n}. " + "word " * 700 for n in (1, 2, 3))
"""A reply Telegram's 4096-character limit splits into three messages."""


class _Seen(logging.Handler):
    """Turns "a record containing `needle` was logged" into an event a test can await."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.seen.set()


async def test_a_read_timeout_after_delivery_is_not_sent_again(
    telegram: FakeTelegram, monkeypatch: pytest.MonkeyPatch, no_token_in_logs: pytest.LogCaptureFixture
) -> None:
    """Telegram carried the message out but answered after the client stopped waiting: a blind retry would post it
    twice, so the reply is recorded as unconfirmed instead."""
    monkeypatch.setattr(telegram_requests, "READ_TIMEOUT_S", 0.3)
    monkeypatch.setattr(telegram_requests, "BACKOFF_FIRST_S", 0.01)
    mia = telegram.user(13001, "Mia")
    handler = RecordingHandler()
    async with running(settings_for(telegram), handler):
        telegram.answer_late("sendMessage", 10.0)
        telegram.user_says(telegram.private_chat(mia), mia, "are you there?")
        await handler.wait_until(lambda: len(handler.undelivered) == 1)
    assert [m["text"] for m in telegram.sent_messages(mia.id)] == ["echo: are you there?"]
    assert len(telegram.calls_to("sendMessage")) == 1
    [(_, reason, _)] = handler.undelivered
    assert "may have arrived" in reason and "TimedOut" in reason


async def test_a_5xx_page_from_telegrams_front_is_retried_and_delivered_once(
    telegram: FakeTelegram, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telegram_requests, "BACKOFF_FIRST_S", 0.01)
    nia = telegram.user(13002, "Nia")
    handler = RecordingHandler()
    async with running(settings_for(telegram), handler):
        telegram.fail_next("sendMessage", 1, status=502)
        telegram.user_says(telegram.private_chat(nia), nia, "hi")
        await handler.wait_until(lambda: len(handler.delivered) == 1)
    assert [call.status for call in telegram.calls_to("sendMessage")] == [502, 200]
    assert [m["text"] for m in telegram.sent_messages(nia.id)] == ["echo: hi"]


async def test_a_5xx_the_bot_api_explained_is_not_repeated(
    telegram: FakeTelegram, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JSON error from the Bot API itself means it saw the request, which may have been carried out."""
    monkeypatch.setattr(telegram_requests, "BACKOFF_FIRST_S", 0.01)
    oto = telegram.user(13003, "Oto")
    handler = RecordingHandler()
    async with running(settings_for(telegram), handler):
        telegram.fail_next("sendMessage", 1, status=500, explained=True)
        telegram.user_says(telegram.private_chat(oto), oto, "hi")
        await handler.wait_until(lambda: len(handler.undelivered) == 1)
    assert [call.status for call in telegram.calls_to("sendMessage")] == [500]
    assert "may have arrived" in handler.undelivered[0][1]


async def test_a_refused_connection_is_retried_until_telegram_is_back(telegram: FakeTelegram) -> None:
    """Nothing was sent when the connection was refused, so sending again is safe."""
    pia = telegram.user(13004, "Pia")
    handler = RecordingHandler()
    handler.release = asyncio.Event()
    retrying = _Seen("request failed")
    logging.getLogger("bot.telegram_requests").addHandler(retrying)
    try:
        async with running(settings_for(telegram), handler):
            telegram.user_says(telegram.private_chat(pia), pia, "knock knock")
            await handler.wait_until(lambda: bool(handler.entered))
            await telegram.refuse_connections()
            handler.release.set()
            await asyncio.wait_for(retrying.seen.wait(), WAIT)
            await telegram.accept_connections()
            await handler.wait_until(lambda: len(handler.delivered) == 1)
    finally:
        logging.getLogger("bot.telegram_requests").removeHandler(retrying)
    assert [m["text"] for m in telegram.sent_messages(pia.id)] == ["echo: knock knock"]
    assert handler.undelivered == []


async def test_a_split_reply_that_fails_part_way_records_how_many_parts_arrived(
    telegram: FakeTelegram, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telegram_requests, "BACKOFF_FIRST_S", 0.01)
    quin = telegram.user(13005, "Quin")
    handler = RecordingHandler(answer=lambda message: THREE_PARTS)
    async with running(settings_for(telegram), handler):
        telegram.fail_next("sendMessage", telegram_requests.SEND_ATTEMPTS, status=502, after=1)
        telegram.user_says(telegram.private_chat(quin), quin, "tell me everything")
        await handler.wait_until(lambda: len(handler.undelivered) == 1)
    [(_, _, parts_sent)] = handler.undelivered
    assert parts_sent == 1
    [first] = telegram.sent_messages(quin.id)
    assert first["text"].startswith("Part 1.")


async def test_a_send_cut_off_by_shutdown_is_left_to_recovery_with_the_parts_that_arrived(
    telegram: FakeTelegram,
) -> None:
    rey = telegram.user(13006, "Rey")
    handler = RecordingHandler(answer=lambda message: THREE_PARTS)
    backend = TelegramBackend(settings=settings_for(telegram), handler=handler, stop_grace_s=0.2)
    await backend.start()
    telegram.hold("sendMessage", after=1)
    telegram.user_says(telegram.private_chat(rey), rey, "tell me everything")
    await telegram.wait_until(lambda: len(telegram.held_calls("sendMessage")) == 1)
    await asyncio.wait_for(backend.stop(), WAIT)
    telegram.release(arrived=0)
    [(reply, parts_sent)] = handler.interrupted
    assert parts_sent == 1 and reply.text == THREE_PARTS
    assert handler.undelivered == [] and handler.delivered == []


async def test_deliver_reply_sends_the_remaining_parts_into_a_chat_by_id(telegram: FakeTelegram) -> None:
    """Crash recovery's way out: a reply delivered by chat id (a forum topic too), quoting the message it answers
    when it starts from the first part, and skipping the parts that already arrived."""
    forum, sam = telegram.group(-100700, "Forum", forum=True), telegram.user(13007, "Sam")
    handler = RecordingHandler()
    async with running(settings_for(telegram), handler) as backend:
        asked = telegram.user_says(forum, sam, "@MagpieTestBot long story please", topic=4)
        await handler.wait_until(lambda: len(handler.delivered) == 1)
        late = Reply("I'm back: hello!", reply_to=str(asked["message_id"]), log_id=70)
        await backend.deliver_reply("-100700:4", late)
        rest = Reply(THREE_PARTS, reply_to=str(asked["message_id"]), log_id=71)
        await backend.deliver_reply("-100700:4", rest, parts_sent=1)
    _, back, part2, part3 = telegram.sent_messages(forum.id)
    assert back["text"] == "I'm back: hello!" and back["reply_to_message"]["message_id"] == asked["message_id"]
    assert part2["text"].startswith("Part 2.") and part3["text"].startswith("Part 3.")
    assert "reply_to_message" not in part2
    assert {m["message_thread_id"] for m in (back, part2, part3)} == {4}
    assert [reply.log_id for reply, _ in handler.delivered[1:]] == [70, 71]


# --- webhook mode ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_webhook_mode_serves_updates_and_rejects_requests_without_the_secret(telegram: FakeTelegram) -> None:
    port = _free_port()
    telegram.public_host("https://bot.example.org", [f"http://127.0.0.1:{port}"])  # the reverse proxy
    settings = settings_for(
        telegram,
        telegram_webhook_url="https://bot.example.org/telegram/hook",
        telegram_webhook_listen="127.0.0.1",
        telegram_webhook_port=port,
        telegram_webhook_secret="s3cret-Token_1",
    )
    mia = telegram.user(13001, "Mia")
    chat = telegram.private_chat(mia)
    handler = RecordingHandler()
    async with running(settings, handler):
        assert telegram.webhook_url == "https://bot.example.org/telegram/hook"
        assert telegram.webhook_secret == "s3cret-Token_1"
        forged = {"update_id": 999, "message": {**_message_dict(chat, mia, "forged"), "message_id": 99}}
        assert await telegram.post_to_webhook(forged, secret=None) == 403
        assert await telegram.post_to_webhook(forged, secret="wrong") == 403
        telegram.user_says(chat, mia, "via webhook")
        [answer] = await telegram.wait_for_messages(mia.id, 1)
        await telegram.wait_until(lambda: telegram.webhook_deliveries == [200])
        assert telegram.calls_to("getUpdates") == []
    assert answer["text"] == "echo: via webhook"
    assert [message.text for message in handler.received] == ["via webhook"]
    assert telegram.webhook_deliveries == [200]
    async with aiohttp.ClientSession() as client:  # the webhook server is gone after stop()
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.post(f"http://127.0.0.1:{port}/telegram/hook", json={})


async def test_an_update_whose_message_is_not_logged_is_never_confirmed(telegram: FakeTelegram) -> None:
    """A message still waiting to be logged when the bot stops (the database is away): PTB's last getUpdates at the
    stop would confirm it, and Telegram would forget it. It is not confirmed: the next start gets it again."""
    settings = settings_for(telegram)
    mia = telegram.user(13003, "Mia")
    chat = telegram.private_chat(mia)
    waiting = RecordingHandler()
    waiting.release = asyncio.Event()  # never set: the message never gets logged
    async with running(settings, waiting, stop_grace_s=0.2):
        sent = telegram.user_says(chat, mia, "logged later")
        await waiting.wait_until(lambda: "logged later" in waiting.entered)
    assert "logged later" in waiting.cancelled, "the stop cut it off"
    assert telegram.pending_update_ids() != [], "not confirmed to Telegram"
    after_restart = RecordingHandler()
    async with running(settings, after_restart):
        [answer] = await telegram.wait_for_messages(mia.id, 1)
    assert answer["text"] == "echo: logged later"
    assert [message.message_id for message in after_restart.received] == [str(sent["message_id"])]


def test_the_webhook_server_listens_on_localhost_unless_told_otherwise() -> None:
    """Telegram reaches the webhook through a TLS proxy on this machine (docs/security.md), never on plain HTTP."""
    assert Settings(_env_file=None).telegram_webhook_listen == "127.0.0.1"  # type: ignore[call-arg]


async def _raw_post(port: int, head: bytes, body_chunks: list[bytes]) -> bytes:
    """Sends a request's head and then `body_chunks` (stopping when the server answers or hangs up); returns the
    status line of the answer, read within 20 s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        answer = asyncio.create_task(reader.readline())
        for chunk in body_chunks:
            if answer.done():
                break
            writer.write(chunk)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        return await asyncio.wait_for(answer, 20.0)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_huge_webhook_request_is_refused_before_its_body_is_read(telegram: FakeTelegram) -> None:
    """PTB's server would read (and parse) up to 100 MiB before checking the secret: a 90 MiB request without the
    secret is refused as soon as its headers are read, before one byte of its body is sent; a chunked one (no
    length announced) after its first MiB, not at its end (with a 403 from the secret check)."""
    port = _free_port()
    telegram.public_host("https://bot.example.org", [f"http://127.0.0.1:{port}"])
    settings = settings_for(
        telegram,
        telegram_webhook_url="https://bot.example.org/hook",
        telegram_webhook_port=port,
        telegram_webhook_secret="s3cret-Token_1",
    )
    mia = telegram.user(13002, "Mia")
    chat = telegram.private_chat(mia)
    async with running(settings, RecordingHandler()):
        announced = b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        assert await _raw_post(port, announced % (90 << 20), []) == b"HTTP/1.1 400 Bad Request\r\n"
        chunked = (
            b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (64 << 10, b" " * (64 << 10))
        assert await _raw_post(port, chunked, [chunk] * 40 + [b"0\r\n\r\n"]) == b"HTTP/1.1 400 Bad Request\r\n"
        telegram.user_says(chat, mia, "still served")  # an update of ordinary size still goes through
        [answer] = await telegram.wait_for_messages(mia.id, 1)
    assert answer["text"] == "echo: still served"


async def test_a_webhook_port_in_use_fails_the_start_cleanly(telegram: FakeTelegram) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        telegram.public_host("https://bot.example.org", [f"http://127.0.0.1:{port}"])
        settings = settings_for(
            telegram,
            telegram_webhook_url="https://bot.example.org/hook",
            telegram_webhook_listen="127.0.0.1",
            telegram_webhook_port=port,
            telegram_webhook_secret="secret",
        )
        backend = TelegramBackend(settings=settings, handler=RecordingHandler())
        with pytest.raises(OSError):
            await backend.start()
    await backend.stop()  # harmless after a failed start, which already stopped everything
    assert telegram.calls_to("getUpdates") == []


def _message_dict(chat: Any, person: Any, text: str) -> dict[str, Any]:
    return {"message_id": 1, "date": 0, "chat": chat.as_dict(), "from": person.as_dict(), "text": text}


# --- end to end: the real ChatService, the tiny real model, the real database ---------------------------------


async def test_private_chat_round_trip_is_logged_with_typing_before_the_reply(
    telegram: FakeTelegram, db: Database, tiny_model_dir: Path
) -> None:
    alice = telegram.user(1001, "Alice")
    chat = telegram.private_chat(alice)
    async with serving(telegram, db, tiny_model_dir, typing_after_ms=0):  # "typing…" at once, however quick
        asked = telegram.user_says(chat, alice, "hello there, how are you today?")
        [answer] = await telegram.wait_for_messages(alice.id, 1)
    user_row, bot_row = await logged(db, alice.id)
    assert (user_row.role, user_row.text, user_row.platform_message_id) == (
        Role.USER,
        "hello there, how are you today?",
        str(asked["message_id"]),
    )
    assert (bot_row.role, bot_row.text, bot_row.reply_to_id) == (Role.BOT, answer["text"], user_row.id)
    assert bot_row.delivery is Delivery.SENT and bot_row.platform_message_id == str(answer["message_id"])
    assert answer["text"].strip()
    methods = [call.method for call in telegram.calls if call.method in ("sendChatAction", "sendMessage")]
    assert methods[0] == "sendChatAction" and methods[-1] == "sendMessage"


async def test_while_replies_queue_for_telegram_new_messages_get_the_busy_note_and_are_still_logged(
    telegram: FakeTelegram, db: Database, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More platform calls waiting than SEND_QUEUE_LIMIT: a new chat message gets the short busy note at once
    instead of an answer that would arrive late, a command still runs, everything is logged, and once the queue has
    drained answers resume."""
    delivered = asyncio.Condition()
    recorded: list[Reply] = []
    record_delivery = ChatService.mark_delivered

    async def noting(self: ChatService, reply: Reply, platform_message_ids: list[str]) -> None:
        await record_delivery(self, reply, platform_message_ids)
        async with delivered:
            recorded.append(reply)
            delivered.notify_all()

    monkeypatch.setattr(ChatService, "mark_delivered", noting)
    names = ["Ana", "Ben", "Cid", "Dora", "Eve"]
    ana, ben, cid, dora, eve = (telegram.user(8001 + n, name) for n, name in enumerate(names))
    async with serving(telegram, db, tiny_model_dir, send_queue_limit=1, typing_after_ms=60_000):
        telegram.hold("sendMessage")
        for person in (ana, ben):
            telegram.user_says(telegram.private_chat(person), person, "hello, how are you?")
        await telegram.wait_until(lambda: len(telegram.held_calls("sendMessage")) == 2)  # past the limit of 1
        telegram.user_says(telegram.private_chat(cid), cid, "anyone there?")
        telegram.user_says(telegram.private_chat(dora), dora, "/optout")
        await telegram.wait_until(lambda: len(telegram.held_calls("sendMessage")) == 4)
        telegram.release()
        async with asyncio.timeout(WAIT), delivered:
            await delivered.wait_for(lambda: len(recorded) == 4)  # every call answered: the queue is empty
        telegram.user_says(telegram.private_chat(eve), eve, "hello, how are you?")
        await telegram.wait_for_messages(eve.id, 1)
    [[busy], [opted_out], [answer]] = [telegram.sent_messages(p.id) for p in (cid, dora, eve)]
    assert (busy["text"], opted_out["text"]) == (BUSY, OPTED_OUT), "a command still runs while busy"
    assert all(telegram.sent_messages(p.id)[0]["text"] != BUSY for p in (ana, ben, eve))
    question, note = await logged(db, cid.id)
    assert (question.role, question.text) == (Role.USER, "anyone there?"), "nothing a person sent is lost"
    assert (note.text, note.is_command, note.delivery) == (BUSY, True, Delivery.SENT), "kept out of training"
    assert [row.is_command for row in await logged(db, eve.id)] == [False, False], "a model answer again"
    assert answer["text"].strip()


async def test_group_chat_is_logged_whole_but_answered_only_when_addressed(
    telegram: FakeTelegram, db: Database, tiny_model_dir: Path
) -> None:
    group = telegram.group(-100200, "Book club")
    bob, carol = telegram.user(2001, "Bob"), telegram.user(2002, "Carol")
    async with serving(telegram, db, tiny_model_dir):
        plain = telegram.user_says(group, bob, "has anyone read the new one?")
        telegram.user_sends_sticker(group, carol)
        mention = telegram.user_says(group, carol, "@MagpieTestBot do you like pizza?")
        [first] = await telegram.wait_for_messages(group.id, 1)
        follow_up = telegram.user_says(group, bob, "and pasta?", reply_to=first)
        await telegram.wait_for_messages(group.id, 2)
        command = telegram.user_says(group, bob, "/help@MagpieTestBot")
        await telegram.wait_for_messages(group.id, 3)
        telegram.user_says(group, carol, "/help@SomeOtherBot")
        telegram.user_edits(plain, "has anyone read the new one? (edited)")
        telegram.user_sends_sticker(telegram.private_chat(carol), carol)
        await telegram.wait_for_messages(carol.id, 1)
    rows = await logged(db, group.id)
    user_rows = sorted(
        (row for row in rows if row.role is Role.USER), key=lambda row: int(row.platform_message_id or 0)
    )
    assert [row.text for row in user_rows] == [  # handled concurrently, so logged in any order
        "has anyone read the new one? (edited)",  # the log follows an edit
        "do you like pizza?",
        "and pasta?",
        "/help",
        "/help@SomeOtherBot",
    ]
    answers = telegram.sent_messages(group.id)
    assert [a["reply_to_message"]["message_id"] for a in answers] == [
        mention["message_id"],
        follow_up["message_id"],
        command["message_id"],
    ]
    bot_rows = [row for row in rows if row.role is Role.BOT]
    assert [row.platform_message_id for row in bot_rows] == [str(a["message_id"]) for a in answers]
    assert all(row.delivery is Delivery.SENT for row in bot_rows)
    assert "/reset — " in answers[2]["text"] and "/retrain" not in answers[2]["text"]
    assert [note["text"] for note in telegram.sent_messages(carol.id)] == [NOT_TEXT]


async def test_forum_topics_are_separate_conversations_answered_in_their_topic(
    telegram: FakeTelegram, db: Database, tiny_model_dir: Path
) -> None:
    forum = telegram.group(-100300, "Hobbies", forum=True)
    bob, carol = telegram.user(2001, "Bob"), telegram.user(2002, "Carol")
    async with serving(telegram, db, tiny_model_dir, typing_after_ms=0):  # "typing…" in each topic, however quick
        telegram.user_says(forum, bob, "@MagpieTestBot which guitar should I buy?", topic=5)
        telegram.user_says(forum, carol, "@MagpieTestBot who won the match?", topic=9)
        telegram.user_says(forum, carol, "anyone here?")  # the General topic: no thread id
        await telegram.wait_for_messages(forum.id, 2)
    answers = telegram.sent_messages(forum.id)
    assert sorted(a["message_thread_id"] for a in answers) == [5, 9]
    assert sorted(int(c.params["message_thread_id"]) for c in telegram.calls_to("sendChatAction")) == [5, 9]
    assert [row.text for row in await logged(db, "-100300:5")] == ["which guitar should I buy?", answers_in(answers, 5)]
    assert [row.text for row in await logged(db, "-100300:9")] == ["who won the match?", answers_in(answers, 9)]
    assert [row.text for row in await logged(db, forum.id)] == ["anyone here?"]


def answers_in(answers: list[dict[str, Any]], topic: int) -> str:
    [answer] = [a["text"] for a in answers if a["message_thread_id"] == topic]
    return str(answer)


async def test_a_group_upgraded_to_a_supergroup_keeps_its_log_and_its_replies(
    telegram: FakeTelegram, db: Database, tiny_model_dir: Path
) -> None:
    """Telegram moves an upgraded group to a new chat id and numbers its messages afresh: a reply racing the upgrade
    is re-sent to the new chat, the history moves along, and new message ids that equal old ones are not taken for
    redeliveries."""
    group = telegram.group(-4001, "Garden club", kind="group")
    bob = telegram.user(2001, "Bob")
    async with serving(telegram, db, tiny_model_dir):
        telegram.user_says(group, bob, "@MagpieTestBot hello")  # id 1; the reply is id 2
        await telegram.wait_for_messages(group.id, 1)
        supergroup = telegram.upgrade_group(group, -1004001)
        telegram.user_says(group, bob, "@MagpieTestBot still there?")  # id 3, its reply meets the new id
        [moved] = await telegram.wait_for_messages(supergroup.id, 1)
        telegram.announce_upgrade(group, supergroup, bob)  # id 4 there, id 2 here: nothing left to move
        again = telegram.user_says(supergroup, bob, "@MagpieTestBot and now?")  # id 3, as "still there?" was
        await telegram.wait_for_messages(supergroup.id, 2)
    assert "reply_to_message" not in moved
    assert again["message_id"] == 3
    assert await logged(db, group.id) == []
    rows = await logged(db, supergroup.id)
    assert [(row.role, row.text) for row in rows if row.role is Role.USER] == [
        (Role.USER, "hello"),
        (Role.USER, "still there?"),
        (Role.USER, "and now?"),
    ]
    old_ids, new_ids = ["-4001/1", "-4001/2", "-4001/3"], [str(moved["message_id"]), "3", "4"]
    assert [row.platform_message_id for row in rows] == old_ids + new_ids
    assert all(row.delivery is Delivery.SENT for row in rows if row.role is Role.BOT)


async def test_429_and_502_are_survived_with_every_message_answered_and_logged_once(
    telegram: FakeTelegram, db: Database, tiny_model_dir: Path
) -> None:
    people = [telegram.user(3000 + n, f"User {n}") for n in range(3)]
    async with serving(telegram, db, tiny_model_dir):
        telegram.fail_next("sendMessage", 1, status=429, retry_after=1)
        telegram.fail_next("sendMessage", 1, status=502)
        for person in people:
            telegram.user_says(telegram.private_chat(person), person, "what is your favourite colour?")
        for person in people:
            await telegram.wait_for_messages(person.id, 1)
    statuses = [call.status for call in telegram.calls_to("sendMessage")]
    assert statuses.count(429) == 1 and statuses.count(502) == 1 and statuses.count(200) == 3
    rows = await logged(db)
    assert [row.role for row in rows].count(Role.USER) == 3
    bot_rows = [row for row in rows if row.role is Role.BOT]
    assert len(bot_rows) == 3 and all(row.delivery is Delivery.SENT for row in bot_rows)
    assert len({row.reply_to_id for row in bot_rows}) == 3
    assert all(len(telegram.sent_messages(person.id)) == 1 for person in people)


async def test_20_users_with_5_messages_each_are_all_answered_and_logged_exactly_once(
    telegram: FakeTelegram, db: Database, tiny_model_dir: Path
) -> None:
    people = [telegram.user(4000 + n, f"User {n}") for n in range(20)]
    async with serving(telegram, db, tiny_model_dir):
        for round_ in range(5):
            for person in people:
                telegram.user_says(telegram.private_chat(person), person, f"message {round_} from {person.first_name}")
        for person in people:
            await telegram.wait_for_messages(person.id, 5, within=120)
    rows = await logged(db)
    user_rows = [row for row in rows if row.role is Role.USER]
    bot_rows = [row for row in rows if row.role is Role.BOT]
    assert len(user_rows) == 100 and len({(r.chat_id, r.platform_message_id) for r in user_rows}) == 100
    assert len(bot_rows) == 100 and {row.reply_to_id for row in bot_rows} == {row.id for row in user_rows}
    assert all(row.delivery is Delivery.SENT for row in bot_rows)
    assert len({(row.chat_id, row.platform_message_id) for row in bot_rows}) == 100
    assert all(len(telegram.sent_messages(person.id)) == 5 for person in people)
    statuses = [call.status for call in telegram.calls_to("sendMessage")]  # five quick answers in one private chat
    assert statuses.count(200) == 100 and set(statuses) <= {200, 429}, "Telegram's flood refusals are waited out"


async def test_admin_commands_are_refused_to_non_admins_and_run_for_admins(
    telegram: FakeTelegram, db: Database, tiny_model_dir: Path
) -> None:
    mallory, admin = telegram.user(555, "Mallory"), telegram.user(42, "Admin")
    async with serving(telegram, db, tiny_model_dir) as served:
        telegram.user_says(telegram.private_chat(mallory), mallory, "/retrain")
        [refusal] = await telegram.wait_for_messages(mallory.id, 1)
        telegram.user_says(telegram.private_chat(admin), admin, "/retrain")
        [accepted] = await telegram.wait_for_messages(admin.id, 1)
    # What the admin reads is the service's business (and the retrainer stub's words prove nothing): what this
    # adapter test checks is that only the admin's command reached the retrainer, and each got its own answer.
    assert "admin" in refusal["text"].lower() and accepted["text"] != refusal["text"]
    assert served.retrainer.requests == ["telegram:42"]


# --- personal data stays personal -----------------------------------------------------------------------------


async def test_export_in_a_group_goes_to_the_private_chat_and_the_group_sees_only_a_note(
    telegram: FakeTelegram, db: Database, tiny_model_dir: Path
) -> None:
    group = telegram.group(-100400, "Neighbours")
    bob, carol = telegram.user(2001, "Bob"), telegram.user(2002, "Carol")
    async with serving(telegram, db, tiny_model_dir):
        telegram.user_says(telegram.private_chat(bob), bob, "my address is 12 Elm Street")
        await telegram.wait_for_messages(bob.id, 1)
        await _say_and_wait(telegram, group, bob, "@MagpieTestBot hello everyone")
        telegram.user_says(group, carol, "hi Bob")
        asked = telegram.user_says(group, bob, "/export")
        await telegram.wait_for_messages(group.id, 2)
        await telegram.wait_for_messages(bob.id, 3)
    *_, note = in_group = telegram.sent_messages(group.id)
    assert note["text"] == EXPORT_SENT_PRIVATELY and note["reply_to_message"]["message_id"] == asked["message_id"]
    assert len(in_group) == 2 and not any("document" in m or "Elm Street" in m.get("text", "") for m in in_group)
    assert telegram.calls_to("sendDocument")[0].params["chat_id"] == bob.id
    *_, text, document = telegram.sent_messages(bob.id)
    assert text["text"] == "Here are the 3 messages I have from you." and "reply_to_message" not in text
    exported = [m["text"] for m in json.loads(document["_content"])["messages"]]
    assert exported == ["my address is 12 Elm Street", "hello everyone", "/export"]
    *_, answer = await logged(db, group.id)
    assert (answer.role, answer.text, answer.is_command) == (Role.BOT, EXPORT_SENT_PRIVATELY, True)
    assert (answer.delivery, answer.platform_message_id) == (Delivery.SENT, str(note["message_id"]))


async def test_export_for_someone_who_never_started_the_bot_stays_out_of_the_group(
    telegram: FakeTelegram, db: Database, tiny_model_dir: Path
) -> None:
    group = telegram.group(-100400, "Neighbours")
    carol = telegram.user(2002, "Carol")
    async with serving(telegram, db, tiny_model_dir):
        await _say_and_wait(telegram, group, carol, "@MagpieTestBot I live at 7 Oak Road")
        asked = telegram.user_says(group, carol, "/export@MagpieTestBot")
        await telegram.wait_for_messages(group.id, 2)
    to_carol = [call for call in telegram.calls if call.params.get("chat_id") == carol.id]
    assert [(call.method, call.status) for call in to_carol] == [("sendMessage", 403)], "refused, never retried"
    assert telegram.calls_to("sendDocument") == [] and telegram.sent_messages(carol.id) == []
    *_, note = telegram.sent_messages(group.id)
    assert note["text"] == EXPORT_UNREACHABLE and note["reply_to_message"]["message_id"] == asked["message_id"]
    *_, export, told = await logged(db, group.id)
    assert (export.text, export.delivery) == (EXPORT_SENT_PRIVATELY, Delivery.FAILED)
    assert "can't initiate conversation" in (export.delivery_error or "")
    assert (told.text, told.delivery, told.platform_message_id) == (
        EXPORT_UNREACHABLE,
        Delivery.SENT,
        str(note["message_id"]),
    )


async def test_an_anonymous_admins_export_is_never_sent_to_the_group_it_speaks_as(
    telegram: FakeTelegram, db: Database, tiny_model_dir: Path
) -> None:
    """An anonymous admin's "author id" is the group's own id: writing to it privately would post into the group."""
    group = telegram.group(-100400, "Neighbours")
    async with serving(telegram, db, tiny_model_dir):
        telegram.anonymous_admin_says(group, "@MagpieTestBot the door code is 4321")
        await telegram.wait_for_messages(group.id, 1)
        telegram.anonymous_admin_says(group, "/export")
        await telegram.wait_for_messages(group.id, 2)
    assert telegram.calls_to("sendDocument") == []
    assert [m["text"] for m in telegram.sent_messages(group.id)][1:] == [EXPORT_UNREACHABLE], "nothing else"
