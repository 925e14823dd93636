"""The Discord adapter, driven end to end: the real discord.py client against the fake Discord in fake_discord.py.

The issue's scenarios run against the real `ChatService` with a tiny real model and the real database (SQLite and
PostgreSQL) and assert on what got logged; adapter details where the model is irrelevant (splitting, mentions,
translation, reconnect variants) use a scripted handler whose answer the test chooses.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord
import pytest
import yarl
from sqlalchemy import select

from bot.discord_bot import DiscordBackend
from core.chat.commands import COMMANDS
from core.chat.messages import Attachment, ChatKind, IncomingMessage
from core.chat.service import ChatService
from core.errors import ConfigError
from core.serving.engine import Engine
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import Chat, Delivery, Role, User
from core.texts import EXPORT_SENT_PRIVATELY, EXPORT_UNREACHABLE
from tests.discord_support import logged_messages, mention, running, settings_for
from tests.fake_discord import MESSAGE_CONTENT, WAIT_S, FakeDiscord, Json
from tests.recording_handler import RecordingHandler

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _restore_discord_endpoints() -> Any:
    """`use_endpoints` changes process-global class attributes of discord.py; put them back after each test."""
    base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    yield
    discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = base, gateway


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


async def test_start_logs_in_syncs_commands_and_returns_once_ready(fake: FakeDiscord) -> None:
    async with running(fake, RecordingHandler()):
        assert [(c.method, c.path) for c in fake.calls[:2]] == [
            ("GET", "/users/@me"),
            ("GET", "/oauth2/applications/@me"),
        ]
        assert all(call.authorization == f"Bot {fake.token}" for call in fake.calls)
        names = {command["name"] for command in fake.commands[fake.guild_id]}
        assert names == {"chat", "start", "help", "reset", "forget", "export", "optout", "optin"} | {
            "retrain",
            "status",
            "models",
            "rollback",
            "learning",
        }
        assert fake.connections == ["/gateway?v=10&encoding=json&compress=zlib-stream"]
        assert fake.identifies == 1 and fake.heartbeats >= 1
        base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
        assert (base, gateway) == (fake.api_base_url, yarl.URL(fake.gateway_url))


async def test_commands_sync_globally_without_guild_ids(fake: FakeDiscord) -> None:
    async with running(fake, RecordingHandler(), discord_guild_ids=""):
        assert fake.calls_to(rf"PUT /applications/{fake.app_id}/commands")
        assert not fake.calls_to(r"PUT /applications/\d+/guilds/\d+/commands")
        assert len(fake.commands[None]) == len(COMMANDS) + 1  # and /chat


async def test_a_rejected_token_is_a_clear_config_error_without_the_token(
    fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    backend = DiscordBackend(
        settings=settings_for(fake, discord_bot_token="wrong-secret-token"),
        handler=RecordingHandler(),
        ready_timeout=15,
    )
    with pytest.raises(ConfigError, match="DISCORD_BOT_TOKEN") as info:
        await backend.start()
    assert "wrong-secret-token" not in str(info.value)
    assert "wrong-secret-token" not in caplog.text
    assert fake.calls[0].status == 401


async def test_message_content_intent_not_enabled_in_the_portal_says_how_to_fix_it(fake: FakeDiscord) -> None:
    fake.message_content_enabled = False
    backend = DiscordBackend(settings=settings_for(fake), handler=RecordingHandler(), ready_timeout=15)
    with pytest.raises(ConfigError, match="DISCORD_MESSAGE_CONTENT=false"):
        await backend.start()


# --- end to end: the real ChatService, a real tiny model and the real database -------------------------------------
@pytest.fixture
def admin(fake: FakeDiscord) -> Json:
    return fake.add_user("admin")


@pytest.fixture
def live_settings(fake: FakeDiscord, admin: Json, tmp_path: Path) -> Settings:
    return settings_for(fake, admin_ids=f"discord:{admin['id']}", models_dir=tmp_path / "models")


@pytest.fixture
def service(live_settings: Settings, db: Database, engine: Engine) -> RecordingHandler:
    return RecordingHandler(inner=ChatService(settings=live_settings, db=db, engine=engine))


async def test_dm_round_trip_is_logged(
    fake: FakeDiscord, service: RecordingHandler, live_settings: Settings, db: Database
) -> None:
    alice = fake.add_user("alice")
    at_once = live_settings.model_copy(update={"typing_after_ms": 0})  # "typing…" from the start, however quick
    async with running(fake, service, settings=at_once):
        sent = await fake.send_message(alice, "hello there, how are you today?")
        [post] = await fake.wait_for_posts(fake.dm_channel(alice), 1)
        await service.wait_until(lambda: len(service.delivered) == 1)
    question, answer = await logged_messages(db)
    assert (question.role, question.text, question.platform_message_id) == (Role.USER, sent["content"], sent["id"])
    assert (answer.role, answer.text, answer.platform_message_id) == (Role.BOT, post["content"], post["id"])
    assert answer.text.strip(), "the tiny model wrote something"
    assert (answer.delivery, answer.reply_to_id) == (Delivery.SENT, question.id)
    async with db.sessions() as session:
        chat = (await session.execute(select(Chat))).scalar_one()
        user = (await session.execute(select(User))).scalar_one()
    assert (chat.platform, chat.platform_chat_id, chat.kind) == ("discord", str(fake.dm_channel(alice)), "private")
    assert (user.platform_user_id, user.display_name) == (alice["id"], "alice")
    assert "message_reference" not in post, "in a DM the answer is not a reply"
    typing = fake.calls_to(rf"POST /channels/{fake.dm_channel(alice)}/typing")
    send = fake.calls_to(r"POST /channels/\d+/messages")
    assert typing and fake.calls.index(typing[0]) < fake.calls.index(send[0]), "typing while generating"


async def test_guild_messages_are_logged_but_answered_only_when_addressed(
    fake: FakeDiscord, service: RecordingHandler, live_settings: Settings, db: Database
) -> None:
    alice, robot = fake.add_user("alice"), fake.add_user("robot", bot=True)
    async with running(fake, service, settings=live_settings):
        chatter = await fake.send_message(alice, "what is your favourite colour?", guild=True)
        assert await service.wait_handled(chatter["id"]) is None
        await fake.send_message(robot, f"{mention(fake.bot_user)} bots talking", guild=True)
        asked = await fake.send_message(alice, f"{mention(fake.bot_user)} I like blue and green", guild=True)
        [post] = await fake.wait_for_posts(fake.channel_id, 1)
        typed = await fake.send_message(alice, "/help", guild=True)  # a command typed as text is for the bot too
        [_, help_post] = await fake.wait_for_posts(fake.channel_id, 2)
        await service.wait_until(lambda: len(service.delivered) == 2)
    rows = await logged_messages(db)
    assert [(row.role, row.text) for row in rows] == [
        (Role.USER, "what is your favourite colour?"),
        (Role.USER, "I like blue and green"),
        (Role.BOT, post["content"]),
        (Role.USER, "/help"),
        (Role.BOT, help_post["content"]),
    ]
    assert rows[2].reply_to_id == rows[1].id and rows[2].delivery is Delivery.SENT
    assert post["message_reference"]["message_id"] == asked["id"]
    assert help_post["message_reference"]["message_id"] == typed["id"] and "/reset" in help_post["content"]


async def test_edits_update_the_log_and_deletions_remove_it(
    fake: FakeDiscord, service: RecordingHandler, live_settings: Settings, db: Database
) -> None:
    alice = fake.add_user("alice")
    async with running(fake, service, settings=live_settings):
        typo = await fake.send_message(alice, "what is yuor favourite colour?", guild=True)
        regret = await fake.send_message(alice, "something I regret saying", guild=True)
        await service.wait_until(lambda: len(service.handled) == 2)
        await fake.edit_message(typo, "what is your favourite colour?")
        await fake.delete_message(regret)
        await service.wait_until(lambda: len(service.edits) == 1 and len(service.deletions) == 1)
    rows = await logged_messages(db)
    assert [(row.text, row.platform_message_id) for row in rows] == [("what is your favourite colour?", typo["id"])]
    assert len(service.handled) == 2, "an edit is not a new message: it is not answered or logged again"


async def test_slash_chat_is_deferred_then_answered_by_followup(
    fake: FakeDiscord, service: RecordingHandler, live_settings: Settings, db: Database
) -> None:
    alice = fake.add_user("alice")
    async with running(fake, service, settings=live_settings):
        interaction = await fake.send_command(alice, "chat", {"text": "do you like pizza or pasta more?"}, guild=True)
        [post] = await fake.wait_for_posts(fake.channel_id, 1)
        await service.wait_until(lambda: len(service.delivered) == 1)
    [callback] = fake.calls_to(rf"POST /interactions/{interaction['id']}/.+/callback")
    [followup] = fake.calls_to(rf"POST /webhooks/{fake.app_id}/.+")
    assert callback.body["type"] == 5 and fake.calls.index(callback) < fake.calls.index(followup)
    question, answer = await logged_messages(db)
    assert (question.text, question.platform_message_id) == ("do you like pizza or pasta more?", interaction["id"])
    assert (answer.text, answer.platform_message_id, answer.delivery) == (post["content"], post["id"], Delivery.SENT)


async def test_a_non_admin_retrain_is_refused(
    fake: FakeDiscord, service: RecordingHandler, live_settings: Settings, db: Database, admin: Json
) -> None:
    alice = fake.add_user("alice")
    for manager in (alice, admin):  # members who may manage the server see the admin commands; ADMIN_IDS decides
        fake.make_manager(manager)
    async with running(fake, service, settings=live_settings):
        await fake.send_command(alice, "retrain", guild=True)
        [refusal] = await fake.wait_for_posts(fake.channel_id, 1)
        await fake.send_command(admin, "retrain", guild=True)
        [_, accepted] = await fake.wait_for_posts(fake.channel_id, 2)
    assert refusal["content"] == "Sorry, only the bot's admins can use that command."
    assert accepted["content"] == "Retraining is not available in this setup.", "the admin got past the check"
    commands = [row for row in await logged_messages(db) if row.role is Role.USER]
    assert [(row.text, row.is_command) for row in commands] == [("/retrain", True), ("/retrain", True)]


async def test_slash_export_in_a_server_is_an_ephemeral_file_nobody_else_sees(
    fake: FakeDiscord, service: RecordingHandler, live_settings: Settings, db: Database
) -> None:
    alice = fake.add_user("alice")
    async with running(fake, service, settings=live_settings):
        await fake.send_message(alice, "my address is 12 Elm Street")
        await fake.wait_for_posts(fake.dm_channel(alice), 1)
        await fake.send_message(alice, f"{mention(fake.bot_user)} hello there", guild=True)
        await fake.wait_for_posts(fake.channel_id, 1)
        interaction = await fake.send_command(alice, "export", guild=True)
        await fake.wait_for_posts(fake.channel_id, 2)
        await service.wait_until(lambda: len(service.delivered) == 3)
    [callback] = fake.calls_to(rf"POST /interactions/{interaction['id']}/.+/callback")
    assert (callback.body["type"], callback.body["data"]["flags"]) == (5, 64), "deferred ephemerally"
    [followup] = fake.calls_to(rf"POST /webhooks/{fake.app_id}/{interaction['token']}")
    [(filename, content)] = followup.files
    exported = [m["text"] for m in json.loads(content)["messages"]]
    assert filename == "magpie-export.json" and followup.body["content"] == "Here are the 3 messages I have from you."
    assert exported == ["my address is 12 Elm Street", "hello there", "/export"]
    *_, private = fake.posts_in(fake.channel_id)
    assert private["flags"] == 64 and private["interaction_id"] == interaction["id"]
    assert len(fake.visible_posts_in(fake.channel_id)) == 1, "the channel sees the earlier answer, nothing of this"
    assert not fake.calls_to(r"POST /users/@me/channels"), "no DM needed"
    *_, answer = await logged_messages(db)
    assert (answer.delivery, answer.platform_message_id) == (Delivery.SENT, private["id"])


async def test_a_typed_export_in_a_server_goes_by_dm_and_the_channel_sees_only_a_note(
    fake: FakeDiscord, service: RecordingHandler, live_settings: Settings, db: Database
) -> None:
    alice = fake.add_user("alice")
    async with running(fake, service, settings=live_settings):
        await fake.send_message(alice, f"{mention(fake.bot_user)} I live at 7 Oak Road", guild=True)
        await fake.wait_for_posts(fake.channel_id, 1)
        asked = await fake.send_message(alice, "/export", guild=True)
        await fake.wait_for_posts(fake.channel_id, 2)
        await service.wait_until(lambda: len(service.delivered) == 2)
    [opened] = fake.calls_to(r"POST /users/@me/channels")
    assert opened.body == {"recipient_id": int(alice["id"])}
    [dm] = fake.posts_in(fake.dm_channel(alice))
    assert dm["content"] == "Here are the 2 messages I have from you."
    assert [a["filename"] for a in dm["attachments"]] == ["magpie-export.json"]
    [dm_call] = fake.calls_to(rf"POST /channels/{fake.dm_channel(alice)}/messages")
    assert [m["text"] for m in json.loads(dm_call.files[0][1])["messages"]] == ["I live at 7 Oak Road", "/export"]
    _, note = fake.visible_posts_in(fake.channel_id)
    assert note["content"] == EXPORT_SENT_PRIVATELY and note["message_reference"]["message_id"] == asked["id"]
    assert not note["attachments"] and "Oak Road" not in note["content"]
    *_, answer = await logged_messages(db)
    assert (answer.text, answer.delivery, answer.platform_message_id) == (
        EXPORT_SENT_PRIVATELY,
        Delivery.SENT,
        note["id"],
    )


async def test_an_export_for_someone_with_closed_dms_stays_out_of_the_channel(
    fake: FakeDiscord, service: RecordingHandler, live_settings: Settings, db: Database
) -> None:
    bob = fake.add_user("bob")
    fake.close_dms(bob)
    async with running(fake, service, settings=live_settings):
        await fake.send_message(bob, f"{mention(fake.bot_user)} I live at 7 Oak Road", guild=True)
        await fake.wait_for_posts(fake.channel_id, 1)
        asked = await fake.send_message(bob, "/export", guild=True)
        await fake.wait_for_posts(fake.channel_id, 2)
        await service.wait_until(lambda: len(service.delivered) == 2)
    [refused] = fake.calls_to(rf"POST /channels/{fake.dm_channel(bob)}/messages")
    assert (refused.status, refused.files != []) == (403, True)
    assert fake.posts_in(fake.dm_channel(bob)) == [] and not any(post["attachments"] for post in fake.posts)
    _, note = fake.visible_posts_in(fake.channel_id)
    assert note["content"] == EXPORT_UNREACHABLE and note["message_reference"]["message_id"] == asked["id"]
    *_, export, told = await logged_messages(db)
    assert (export.text, export.delivery) == (EXPORT_SENT_PRIVATELY, Delivery.FAILED)
    assert "code 50007" in (export.delivery_error or "")
    assert (told.text, told.delivery, told.platform_message_id) == (EXPORT_UNREACHABLE, Delivery.SENT, note["id"])


async def test_429s_with_retry_after_are_survived_and_the_replies_recorded_as_sent(
    fake: FakeDiscord, service: RecordingHandler, live_settings: Settings, db: Database
) -> None:
    alice = fake.add_user("alice")
    async with running(fake, service, settings=live_settings):
        channel = fake.dm_channel(alice)
        fake.fail_next(rf"POST /channels/{channel}/messages", status=429, retry_after=0.2)
        fake.fail_next(rf"POST /webhooks/{fake.app_id}/.+", status=429, retry_after=0.2)
        await fake.send_message(alice, "hello there")
        [post] = await fake.wait_for_posts(channel, 1)
        await fake.send_command(alice, "help", guild=True)
        [followup] = await fake.wait_for_posts(fake.channel_id, 1)
        await service.wait_until(lambda: len(service.delivered) == 2)
    assert [call.status for call in fake.calls_to(rf"POST /channels/{channel}/messages")] == [429, 200]
    assert [call.status for call in fake.calls_to(rf"POST /webhooks/{fake.app_id}/.+")] == [429, 200]
    answers = [row for row in await logged_messages(db) if row.role is Role.BOT]
    assert [(row.delivery, row.platform_message_id) for row in answers] == [
        (Delivery.SENT, post["id"]),
        (Delivery.SENT, followup["id"]),
    ]
    assert "/help" in followup["content"] and not service.undelivered


async def test_a_reply_discord_refuses_is_recorded_as_failed(
    fake: FakeDiscord, service: RecordingHandler, live_settings: Settings, db: Database
) -> None:
    alice = fake.add_user("alice")
    async with running(fake, service, settings=live_settings):
        fake.fail_next(rf"POST /channels/{fake.channel_id}/messages", status=403)
        await fake.send_message(alice, f"{mention(fake.bot_user)} hello there", guild=True)
        await service.wait_until(lambda: len(service.undelivered) == 1)
    answer = (await logged_messages(db))[-1]
    assert answer.delivery is Delivery.FAILED
    assert answer.delivery_error is not None and "HTTP 403" in answer.delivery_error
    assert fake.posts == []


async def test_after_a_gateway_drop_the_missed_message_is_answered_and_nothing_twice(
    fake: FakeDiscord, service: RecordingHandler, live_settings: Settings, db: Database
) -> None:
    alice = fake.add_user("alice")
    channel = fake.dm_channel(alice)
    async with running(fake, service, settings=live_settings):
        first = await fake.send_message(alice, "hello there")
        await fake.wait_for_posts(channel, 1)
        missed = await fake.send_message(alice, "do you like pizza?", deliver=False)
        await fake.drop_connection(code=4000)
        await fake.wait_until(lambda: fake.resumes == 1)
        await fake.wait_for_posts(channel, 2)
        await fake.dispatch("MESSAGE_CREATE", first)  # the same message delivered again
        await service.wait_until(lambda: [m.message_id for m, _ in service.handled].count(first["id"]) == 2)
        await service.wait_until(lambda: len(service.delivered) == 2)
    assert [reply is None for m, reply in service.handled if m.message_id == first["id"]] == [False, True]
    assert len(fake.posts_in(channel)) == 2
    rows = await logged_messages(db)
    assert [row.platform_message_id for row in rows if row.role is Role.USER] == [first["id"], missed["id"]]
    assert [row.delivery for row in rows if row.role is Role.BOT] == [Delivery.SENT, Delivery.SENT]


# --- adapter behaviour where the model is irrelevant (scripted answers) -------------------------------------------
async def test_mentions_and_replies_to_the_bot_address_it_and_mentions_become_names(fake: FakeDiscord) -> None:
    handler = RecordingHandler()
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    bot = fake.bot_user
    thread = fake.add_thread()  # the unaddressed chatter goes there, so any "typing…" it caused would show
    async with running(fake, handler, typing_after_ms=0):  # "typing…" at once, however quick the answer
        chatter = await fake.send_message(alice, f"just chatting with {mention(bob)}", channel_id=thread)
        assert await handler.wait_handled(chatter["id"]) is None
        asked = await fake.send_message(alice, f"{mention(bot)} how are you {mention(bob)}?", guild=True)
        [answer] = await fake.wait_for_posts(fake.channel_id, 1)
        followup = await fake.send_message(bob, "and you?", guild=True, reply_to=answer, ping_reply=False)
        await fake.wait_for_posts(fake.channel_id, 2)
    logged = handler.incoming(chatter["id"])
    assert (logged.chat_kind, logged.addressed, logged.text) == (ChatKind.GROUP, False, "just chatting with @bob")
    assert handler.incoming(asked["id"]).text == "how are you @bob?"
    assert handler.incoming(asked["id"]).addressed
    assert answer["message_reference"]["message_id"] == asked["id"]
    assert [user["id"] for user in answer["mentions"]] == [alice["id"]], "only the asker is notified"
    assert handler.incoming(followup["id"]).addressed, "a reply to the bot's message addresses it"
    assert handler.incoming(followup["id"]).reply_to_message_id == str(answer["id"]), "what it replies to, for training"
    assert handler.incoming(asked["id"]).reply_to_message_id is None
    # Typing is renewed while the core works, so how often it shows depends on the machine: at least once for each
    # of the two addressed messages, and never for the chatter (stop waited for every exchange to finish).
    assert len(fake.calls_to(rf"POST /channels/{fake.channel_id}/typing")) >= 2
    assert fake.calls_to(rf"POST /channels/{thread}/typing") == [], "typing only when addressed"


async def test_a_mention_in_a_thread_is_answered_in_the_thread(fake: FakeDiscord) -> None:
    handler = RecordingHandler()
    alice = fake.add_user("alice")
    thread = fake.add_thread()
    async with running(fake, handler):
        asked = await fake.send_message(alice, f"{mention(fake.bot_user)} in a thread", channel_id=thread)
        [post] = await fake.wait_for_posts(thread, 1)
    incoming = handler.incoming(asked["id"])
    assert (incoming.chat_id, incoming.chat_kind, incoming.text) == (str(thread), ChatKind.GROUP, "in a thread")
    assert post["message_reference"]["message_id"] == asked["id"]


async def test_other_bots_and_the_bot_itself_are_never_answered(fake: FakeDiscord) -> None:
    handler = RecordingHandler()
    robot, alice = fake.add_user("robot", bot=True), fake.add_user("alice")
    async with running(fake, handler):
        await fake.send_message(robot, f"{mention(fake.bot_user)} hello fellow bot", guild=True)
        await fake.send_message(robot, "a DM from a bot")
        await fake.send_message(fake.bot_user, f"{mention(fake.bot_user)} talking to myself", guild=True)
        barrier = await fake.send_message(alice, "hi")
        await handler.wait_handled(barrier["id"])
    assert [m.message_id for m, _ in handler.handled] == [barrier["id"]]
    assert [post["channel_id"] for post in fake.posts] == [barrier["channel_id"]]


async def test_media_without_text_gets_text_none_when_addressed_and_is_ignored_otherwise(fake: FakeDiscord) -> None:
    handler = RecordingHandler(lambda m: "I can only read text" if m.text is None else "?")
    alice = fake.add_user("alice")
    async with running(fake, handler):
        await fake.send_message(alice, "", guild=True, attachments=[("cat.png", b"png")])
        photo = await fake.send_message(alice, "", attachments=[("cat.png", b"png")])
        sticker = await fake.send_message(alice, mention(fake.bot_user), guild=True, sticker=True)
        await handler.wait_until(lambda: len(handler.delivered) == 2)
    assert [m.message_id for m, _ in handler.handled] == [photo["id"], sticker["id"]]
    assert all(m.text is None for m, _ in handler.handled)


async def test_a_long_answer_is_split_into_messages_of_at_most_2000_characters(fake: FakeDiscord) -> None:
    words = " ".join(f"word{i}" for i in range(1000))[:5000]
    handler = RecordingHandler(lambda m: words)
    alice = fake.add_user("alice")
    async with running(fake, handler):
        asked = await fake.send_message(alice, f"{mention(fake.bot_user)} talk a lot", guild=True)
        posts = await fake.wait_for_posts(fake.channel_id, 3)
        await handler.wait_until(lambda: len(handler.delivered) == 1)
    assert len(words) == 5000 and len(posts) == 3
    assert all(0 < len(post["content"]) <= 2000 for post in posts)
    assert " ".join(post["content"] for post in posts) == words
    assert posts[0]["message_reference"]["message_id"] == asked["id"]
    assert all("message_reference" not in post for post in posts[1:])
    assert handler.delivered[0][1] == [post["id"] for post in posts]
    assert all(call.status == 200 for call in fake.calls_to(r"POST /channels/\d+/messages"))


async def test_generated_mentions_never_ping_anyone(fake: FakeDiscord) -> None:
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    handler = RecordingHandler(lambda m: f"@everyone @here {mention(bob)} look at this")
    async with running(fake, handler):
        await fake.send_message(alice, f"{mention(fake.bot_user)} ping people", guild=True)
        [post] = await fake.wait_for_posts(fake.channel_id, 1)
        await fake.send_command(alice, "chat", {"text": "ping people"}, guild=True)
        [_, followup] = await fake.wait_for_posts(fake.channel_id, 2)
    assert post["content"].startswith("@everyone @here")
    assert post["mention_everyone"] is False and followup["mention_everyone"] is False
    assert [user["id"] for user in post["mentions"]] == [alice["id"]], "not bob: only the replied-to asker"
    assert followup["mentions"] == []
    assert post["allowed_mentions"] == {"parse": [], "replied_user": True}
    assert followup["allowed_mentions"] == {"parse": []}


async def test_without_message_content_the_bot_still_answers_mentions_dms_and_commands(fake: FakeDiscord) -> None:
    handler = RecordingHandler()
    alice = fake.add_user("alice")
    async with running(fake, handler, discord_message_content=False):
        assert fake.session is not None and not fake.session.intents & MESSAGE_CONTENT
        await fake.send_message(alice, "unaddressed chatter", guild=True)  # arrives blank: nothing to log
        asked = await fake.send_message(alice, f"{mention(fake.bot_user)} can you hear me", guild=True)
        dm = await fake.send_message(alice, "private words")
        await fake.send_command(alice, "chat", {"text": "via slash"}, guild=True)
        await handler.wait_until(lambda: len(handler.delivered) == 3)
    assert sorted(m.text or "" for m, _ in handler.handled) == ["can you hear me", "private words", "via slash"]
    assert handler.incoming(asked["id"]).addressed and handler.incoming(dm["id"]).chat_kind is ChatKind.PRIVATE


# --- slash commands ------------------------------------------------------------------------------------------------
async def test_slash_command_defers_then_answers_by_followup(fake: FakeDiscord) -> None:
    handler = RecordingHandler(lambda m: f"ran {m.text}")
    admin = fake.add_user("admin")
    fake.make_manager(admin)
    async with running(fake, handler):
        interaction = await fake.send_command(admin, "rollback", {"version": "v2"}, guild=True)
        [post] = await fake.wait_for_posts(fake.channel_id, 1)
        await handler.wait_until(lambda: len(handler.delivered) == 1)
    token = interaction["token"]
    [callback] = fake.calls_to(rf"POST /interactions/{interaction['id']}/{token}/callback")
    [followup] = fake.calls_to(rf"POST /webhooks/{fake.app_id}/{token}")
    assert callback.body["type"] == 5, "deferred (thinking) first"
    assert fake.calls.index(callback) < fake.calls.index(followup)
    incoming = handler.incoming(interaction["id"])
    assert (incoming.text, incoming.addressed, incoming.chat_kind) == ("/rollback v2", True, ChatKind.GROUP)
    assert post["content"] == "ran /rollback v2" and post["interaction_id"] == interaction["id"]


async def test_slash_chat_in_a_dm_is_plain_text_and_a_file_is_attached(fake: FakeDiscord) -> None:
    handler = RecordingHandler(lambda m: "here you go")
    handler.attachment = Attachment("magpie-export.json", b'{"messages": []}')
    alice = fake.add_user("alice")
    async with running(fake, handler, discord_guild_ids=""):
        interaction = await fake.send_command(alice, "chat", {"text": "hello"})
        [post] = await fake.wait_for_posts(fake.dm_channel(alice), 1)
    incoming = handler.incoming(interaction["id"])
    assert (incoming.text, incoming.chat_kind) == ("hello", ChatKind.PRIVATE)
    [followup] = fake.calls_to(rf"POST /webhooks/{fake.app_id}/{interaction['token']}")
    assert followup.files == [("magpie-export.json", b'{"messages": []}')]
    assert post["attachments"][0]["filename"] == "magpie-export.json"


# --- failures ------------------------------------------------------------------------------------------------------
async def test_a_reply_that_finally_fails_is_marked_undelivered(fake: FakeDiscord) -> None:
    handler = RecordingHandler()
    alice = fake.add_user("alice")
    async with running(fake, handler):
        channel = fake.dm_channel(alice)
        fake.fail_next(rf"POST /channels/{channel}/messages", status=429, via=False)  # Cloudflare: no retry
        fake.fail_next(rf"POST /channels/{channel}/typing", status=403)
        await fake.send_message(alice, "hello")
        await handler.wait_until(lambda: len(handler.undelivered) == 1)
        fake.fail_next(rf"POST /channels/{channel}/messages", status=403)
        await fake.send_message(alice, "again")
        await handler.wait_until(lambda: len(handler.undelivered) == 2)
    # The reasons carry what Discord answered: Cloudflare's ban page (text, so discord.py knows no code), and the
    # error code Discord's JSON gives a 403 (the fake answers in Discord's shape, never with an invented code).
    banned, refused = (reason for _, reason, _ in handler.undelivered)
    assert banned.startswith("Discord HTTP 429") and "error code: 1015" in banned
    assert refused == "Discord HTTP 403 (code 50013): Missing Permissions"
    assert not handler.delivered and fake.posts == []


async def test_notify_sends_to_a_channel_and_swallows_failures(
    fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(fake, RecordingHandler()) as backend:
        await backend.notify(str(fake.channel_id), "Training finished: v2 is live")
        await backend.notify("123456789", "to a channel that does not exist")
    assert [post["content"] for post in fake.posts] == ["Training finished: v2 is live"]
    assert "Discord: could not notify chat 123456789" in caplog.text


# --- gateway reconnects ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [4000, 1000, None], ids=["close-4000", "close-1000", "tcp-reset"])
async def test_a_dropped_gateway_resumes_replays_the_missed_message_and_answers_it_once(
    fake: FakeDiscord, code: int | None
) -> None:
    handler = RecordingHandler()
    alice = fake.add_user("alice")
    channel = fake.dm_channel(alice)
    async with running(fake, handler):
        first = await fake.send_message(alice, "before the drop")
        await fake.wait_for_posts(channel, 1)
        missed = await fake.send_message(alice, "lost on the way", deliver=False)
        await fake.drop_connection(code=code)
        await fake.wait_until(lambda: fake.resumes == 1)
        await fake.wait_for_posts(channel, 2)
        after = await fake.send_message(alice, "after the resume")
        await fake.wait_for_posts(channel, 3)
    assert fake.identifies == 1, "resumed, not re-identified"
    assert fake.connections[-1].startswith("/resume?"), "resumed at READY's resume_gateway_url"
    assert [m.message_id for m, _ in handler.handled] == [first["id"], missed["id"], after["id"]]
    assert [post["content"] for post in fake.posts_in(channel)] == [
        "echo: before the drop",
        "echo: lost on the way",
        "echo: after the resume",
    ]


async def test_a_drop_with_an_expired_session_reconnects_with_a_fresh_identify(fake: FakeDiscord) -> None:
    """Slow on purpose (about 5 s): discord.py waits that long before a non-initial IDENTIFY."""
    handler = RecordingHandler()
    alice = fake.add_user("alice")
    async with running(fake, handler):
        fake.forget_session()
        await fake.drop_connection(code=4000)
        await fake.wait_until(lambda: fake.identifies == 2)
        sent = await fake.send_message(alice, "still there?")
        [post] = await fake.wait_for_posts(fake.dm_channel(alice), 1)
    assert fake.resumes == 0 and len(fake.connections) == 3, "connect, failed resume, fresh identify"
    assert post["content"] == "echo: still there?"
    assert [m.message_id for m, _ in handler.handled] == [sent["id"]]


# --- errors and shutdown -------------------------------------------------------------------------------------------
def explode(_message: IncomingMessage) -> str:
    raise RuntimeError("the core broke")


async def test_unexpected_errors_are_logged_once_without_secrets_and_slash_users_get_a_generic_answer(
    fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    handler = RecordingHandler(explode)
    alice = fake.add_user("alice")
    async with running(fake, handler):
        await fake.send_message(alice, "hello")
        await fake.send_command(alice, "help", guild=True)
        [post] = await fake.wait_for_posts(fake.channel_id, 1)
        await handler.wait_until(lambda: len(handler.failed) == 2)
    # stop() waited for the in-flight handlers, so their error reports are in the log by now
    assert post["content"] == "Sorry, something went wrong on my side."
    assert "Discord event on_message failed" in caplog.text
    assert "Discord slash command /help failed" in caplog.text
    assert "the core broke" in caplog.text, "the traceback is kept for the operator"
    assert fake.token not in caplog.text
    assert fake.posts_in(fake.dm_channel(alice)) == [], "a failed DM gets no half-made answer"


async def test_stop_lets_an_in_flight_reply_finish_before_disconnecting(fake: FakeDiscord) -> None:
    handler = RecordingHandler()
    handler.release = asyncio.Event()
    alice = fake.add_user("alice")
    async with running(fake, handler) as backend:
        await fake.send_message(alice, "slow one")
        await handler.wait_until(lambda: bool(handler.entered))
        stopping = asyncio.create_task(backend.stop())
        await asyncio.sleep(0)  # one loop iteration: stop() runs up to its wait for the in-flight reply
        assert not stopping.done()
        handler.release.set()
        await asyncio.wait_for(stopping, WAIT_S)
    assert [post["content"] for post in fake.posts] == ["echo: slow one"]
    assert len(handler.delivered) == 1
