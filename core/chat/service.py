"""The platform-free chat service: log, decide, answer.

One entry point, `ChatService.handle`, serves every platform. Each incoming message is logged exactly once (in
its own transaction, idempotent on the platform message id) before anything else happens, so that nothing a user
sent is lost even when the answer is a refusal or the model fails. Replies are logged in a second transaction
with the model version that wrote them (`core.storage.reply_log`); commands are run by `core.chat.chat_commands`.

The log is also the outbox. An incoming message the service means to answer is logged with `awaits_reply`, and
each reply row starts PENDING until the adapter reports it SENT or FAILED. After a crash, or a shutdown that cut
answers off, `plan_recovery` (before the adapters start) and `recover` (after) find the messages of the last
RECOVERY_WINDOW_MINUTES with no settled reply: a PENDING reply is handed back to be sent again (from the part where
it stopped), and a message with no reply at all is answered now, through the same path a live message takes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Collection
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from core.chat.chat_commands import ChatCommands
from core.chat.commands import parse_command
from core.chat.consent import ChatGate, community_of
from core.chat.limits import LocalUserLimits, UserLimits
from core.chat.messages import Arrival, ChatKind, IncomingMessage, Reply
from core.chat.settling import message_settled
from core.errors import EngineError, UnknownVoiceError
from core.i18n import _, speaking
from core.ops.telemetry import Telemetry, refusal_for
from core.retraining import Retrainer
from core.serving.dialogue import Turn, speaker_key
from core.serving.engine import Engine, Generation
from core.serving.model_serving import ModelServing
from core.settings import Settings
from core.storage.chat_log import (
    Unanswered,
    delete_message,
    find_user_message,
    last_message_id,
    migrate_chat,
    recent_history,
    unanswered_messages,
)
from core.storage.db import Database
from core.storage.db_retry import patiently
from core.storage.models import Delivery, Message, Role
from core.storage.reply_log import Logged, ReplyLog, should_answer
from core.texts import (
    BUSY,
    EMPTY,
    EXPORT_AFTER_RESTART,
    GENERIC_FAILURE,
    NOT_LOGGED,
    NOT_TEXT,
    rate_limited,
    too_long,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RecoveryPlan:
    """Which logged messages crash recovery may answer, fixed before the adapters start taking new ones."""

    since: datetime
    up_to_id: int
    platforms: frozenset[str]


@dataclass(frozen=True, slots=True)
class Recovered:
    """A reply to deliver after a restart: where it goes, and how many of its parts already arrived."""

    platform: str
    chat_id: str
    reply: Reply
    parts_sent: int = 0


class ChatService:
    """Implements `core.chat.messages.ChatHandler` for every platform.

    `retrainer` (the trainer's orchestrator) answers `/retrain`; `serving` (which version serves) answers
    `/models` and `/rollback`. Without them those commands say they are not available in this setup.
    `telemetry` counts the messages received and the refusals (a private one when none is given). `limits`
    (the per-user rate limit and one answer at a time per user) are this process's own unless given: replicas
    share theirs through Redis (`core.chat.redis_limits`, picked by `bot.cli.open_user_limits`).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        engine: Engine,
        retrainer: Retrainer | None = None,
        serving: ModelServing | None = None,
        telemetry: Telemetry | None = None,
        limits: UserLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._telemetry = telemetry or Telemetry()
        self._db = db
        self._engine = engine
        self._serving = serving
        self._replies = ReplyLog(db)
        self._commands = ChatCommands(
            settings=settings, db=db, engine=engine, replies=self._replies, retrainer=retrainer, serving=serving
        )
        self._limits = limits or LocalUserLimits(limit=settings.rate_limit_per_minute, clock=clock)
        self._gate = ChatGate(settings)

    async def handle(self, message: IncomingMessage, *, busy: bool = False) -> Reply | None:
        """Logs `message` once and returns the reply, or None when the bot should stay quiet. `busy` (the adapter's
        sends are backlogged): a chat message gets the short busy note instead of a model answer; commands still
        run, since their replies cost the platform no more than the note and what they do must not be lost.
        Everything said while handling it is in the author's language (`message.language`, see `core.i18n`)."""
        self._telemetry.message_received(message.platform)
        if not self._gate.admits(message):  # outside ALLOWED_CHATS: not even logged
            community = community_of(message)
            assert community is not None  # a private chat is always admitted
            return self._gate.turn_away(community, message.language)
        with speaking(message.language):
            return await self._handle(message, busy=busy)

    async def joined(self, arrival: Arrival) -> Reply | None:
        """Added to a group: the greeting that says what Magpie logs and how to say no (or why it leaves)."""
        return self._gate.greet(arrival)

    async def _handle(self, message: IncomingMessage, *, busy: bool) -> Reply | None:
        what = f"{message.platform} message {message.message_id}"
        try:  # a database that went away is waited for (DATABASE_RETRY_SECONDS): the message must not be lost
            logged = await patiently(
                lambda: self._replies.log_incoming(message), what=what, budget_s=self._settings.database_retry_seconds
            )
        except Exception:  # the database is still down, or refused the row: say so rather than drop the message
            log.exception("Could not log %s", what)
            command = parse_command(message.text)
            return Reply(_(NOT_LOGGED), reply_to=message.message_id) if should_answer(message, command) else None
        finally:
            message_settled()
        if logged is None or not should_answer(message, logged.command):
            return None
        return await self._answer_or_apologise(replace(logged, busy=busy))

    async def _answer_or_apologise(self, logged: Logged) -> Reply:
        """The answer, or a generic apology when answering failed: the user is never left without a word. A
        database that goes away while the answer is made is waited for like the message's own logging."""
        message = logged.message
        try:
            return await patiently(
                lambda: self._answer(logged),
                what=f"the answer to {message.platform} message {message.message_id}",
                budget_s=self._settings.database_retry_seconds,
            )
        except Exception:
            log.exception("Failed to answer %s message %s", message.platform, message.message_id)
        try:
            return await self._replies.system_reply(logged, _(GENERIC_FAILURE))
        except Exception:  # the database went away mid-answer: the apology still goes out, unlogged
            log.exception("Could not log the failure reply to %s message %s", message.platform, message.message_id)
            return Reply(_(GENERIC_FAILURE), reply_to=message.message_id)

    async def mark_delivered(self, reply: Reply, platform_message_ids: list[str]) -> None:
        first = platform_message_ids[0] if platform_message_ids else None
        await self._record_delivery(reply, Delivery.SENT, platform_message_id=first, error=None)

    async def mark_undelivered(self, reply: Reply, reason: str, *, parts_sent: int = 0) -> None:
        log.warning("Reply %s could not be delivered: %s", reply.log_id, reason)
        await self._record_delivery(
            reply, Delivery.FAILED, platform_message_id=None, error=reason, parts_sent=parts_sent
        )

    async def mark_interrupted(self, reply: Reply, *, parts_sent: int) -> None:
        """A send cut off by shutdown: the reply stays PENDING in the outbox, and the next start's recovery sends
        the parts after `parts_sent` (the part that was in flight may then arrive twice)."""
        log.info("Reply %s was interrupted after %d parts: left to recovery", reply.log_id, parts_sent)
        await self._record_delivery(
            reply, Delivery.PENDING, platform_message_id=None, error="interrupted by shutdown", parts_sent=parts_sent
        )

    async def _record_delivery(self, reply: Reply, delivery: Delivery, **fields: Any) -> None:
        await self._replies.record_delivery(reply, delivery, **fields, patience_s=self._settings.database_retry_seconds)

    async def private_unreachable(self, reply: Reply, reason: str) -> Reply:
        """The author could not be reached privately: the personal part stays undelivered (and is never shown in
        the chat); the chat gets a note on how to ask privately, logged beside the reply it replaces."""
        await self.mark_undelivered(reply, f"not delivered privately: {reason}")
        note = reply.private.unreachable if reply.private is not None else _(GENERIC_FAILURE)
        try:
            log_id = await self._replies.log_beside(reply, note)
        except Exception:  # the note still goes out, unlogged, like the apology when the database is gone
            log.exception("Could not log the note replacing reply %s", reply.log_id)
            log_id = None
        return Reply(note, reply_to=reply.reply_to, log_id=log_id)

    # --- crash recovery (the outbox) --------------------------------------------------------------------------

    async def plan_recovery(self, platforms: Collection[str]) -> RecoveryPlan | None:
        """Fixes what `recover` may answer: the messages logged so far. Called before the adapters start, so
        recovery and the live path (which ignores re-delivered messages) never answer the same message. None
        when RECOVERY_WINDOW_MINUTES is 0."""
        minutes = self._settings.recovery_window_minutes
        if minutes <= 0:
            return None
        async with self._db.sessions() as session:
            up_to_id = await last_message_id(session)
        since = datetime.now(UTC) - timedelta(minutes=minutes)
        return RecoveryPlan(since=since, up_to_id=up_to_id, platforms=frozenset(platforms))

    async def recover(self, plan: RecoveryPlan) -> AsyncGenerator[Recovered, None]:
        """Yields every reply the plan's messages still owe: PENDING ones first (they only need sending), then
        the answers written now, concurrently and as they finish. A yielded reply stays PENDING until the
        adapter reports it, so a crash during recovery leaves it to the next start."""
        async with self._db.sessions() as session:
            owed = await unanswered_messages(
                session, since=plan.since, up_to_id=plan.up_to_id, platforms=plan.platforms
            )
        if owed:
            log.info("Recovery: %d messages were left without a delivered answer", len(owed))
        unwritten = []
        for item in owed:
            # A pending /export note ("sent to you privately") would be a lie without the export: ask again instead.
            if item.pending is None or _asks_for_personal_data(item.message):
                unwritten.append(item)
                continue
            reply = Reply(item.pending.text, reply_to=item.message.platform_message_id, log_id=item.pending.id)
            yield Recovered(item.chat.platform, item.chat.platform_chat_id, reply, item.pending.parts_sent or 0)
        slots = asyncio.Semaphore(self._settings.engine_max_batch_size)
        tasks = [asyncio.ensure_future(self._recover_one(item, slots)) for item in unwritten]
        try:
            for finished in asyncio.as_completed(tasks):
                yield await finished
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _recover_one(self, item: Unanswered, slots: asyncio.Semaphore) -> Recovered:
        """Answers a logged message as the live path would have, without logging it again."""
        message, chat, author = item.message, item.chat, item.author
        incoming = IncomingMessage(
            platform=chat.platform,
            chat_id=chat.platform_chat_id,
            chat_kind=ChatKind(chat.kind),
            author_id=author.platform_user_id,
            author_name=author.display_name,
            text=message.text or None,  # non-text content was logged as ""
            message_id=message.platform_message_id or "",
            addressed=True,
            sent_at=message.created_at,
            community=chat.community,  # a recovered /learning decides for the group it was sent in
        )
        command = parse_command(message.text) if message.is_command else None
        logged = Logged(incoming, message.id, chat.id, author.id, command, recovered=True, community=chat.community)
        async with slots:
            if _asks_for_personal_data(message):  # personal data goes out only on a live request
                reply = await self._replies.system_reply(logged, _(EXPORT_AFTER_RESTART))
            else:
                reply = await self._answer_or_apologise(logged)
        return Recovered(chat.platform, chat.platform_chat_id, reply)

    async def migrate_chat(self, platform: str, old_chat_id: str, new_chat_id: str) -> None:
        async with self._db.sessions.begin() as session:
            moved = await migrate_chat(session, platform=platform, old_chat_id=old_chat_id, new_chat_id=new_chat_id)
        if moved:
            log.info("%s chat %s is now %s: its history moved with it", platform, old_chat_id, new_chat_id)

    async def message_edited(self, platform: str, chat_id: str, message_id: str, text: str | None) -> None:
        """The log follows a person's edit (a fixed typo is what the model should learn); commands and messages
        edited into commands or into nothing keep their logged text."""
        if not text or not text.strip() or parse_command(text) is not None:
            return
        async with self._db.sessions.begin() as session:
            row = await find_user_message(
                session, platform=platform, platform_chat_id=chat_id, platform_message_id=message_id
            )
            if row is None or row.is_command:
                return
            row.text = text
        log.info("%s message %s in chat %s was edited: log updated", platform, message_id, chat_id)

    async def message_deleted(self, platform: str, chat_id: str, message_id: str) -> None:
        """A person deleted their message on the platform: it leaves the log (and future training) too."""
        async with self._db.sessions.begin() as session:
            row = await find_user_message(
                session, platform=platform, platform_chat_id=chat_id, platform_message_id=message_id
            )
            if row is None:
                return
            removed = await delete_message(session, message_id=row.id)
        log.info("%s message %s in chat %s was deleted: %d logged rows removed", platform, message_id, chat_id, removed)

    # --- deciding and answering -------------------------------------------------------------------------------

    async def _answer(self, logged: Logged) -> Reply:
        message = logged.message
        user_key = f"{message.platform}:{message.author_id}"
        # Admins (and the console's local operator) are exempt: they run the bot, and a scripted console session
        # or an admin checking /status must not be told to wait.
        if not self._settings.is_admin(message.platform, message.author_id):
            wait_s = await self._limits.admit(user_key)
            if wait_s is not None:
                self._telemetry.refused("rate_limit")
                limit = self._settings.rate_limit_per_minute
                return await self._replies.system_reply(logged, rate_limited(limit, max(1, round(wait_s))))
        if message.text is None:
            return await self._replies.system_reply(logged, _(NOT_TEXT))
        if logged.command is not None:
            return await self._commands.run(logged, logged.command)
        text = message.text.strip()
        if not text:
            return await self._replies.system_reply(logged, _(EMPTY))
        if len(text) > self._settings.max_input_chars:
            self._telemetry.refused("too_long")
            return await self._replies.system_reply(logged, too_long(len(text), self._settings.max_input_chars))
        if logged.busy:
            log.info("Sends are backlogged: %s message %s gets the busy note", message.platform, message.message_id)
            self._telemetry.refused("busy")
            return await self._replies.system_reply(logged, _(BUSY))
        return await self._chat(logged)

    async def _chat(self, logged: Logged) -> Reply:
        """Generates an answer; one generation per user at a time, later messages wait their turn."""
        message = logged.message
        user_key = f"{message.platform}:{message.author_id}"
        async with self._limits.turn(user_key):
            turns = await self._history(logged)
            log.debug(
                "%s message %s: asking the engine, with %d turns", message.platform, message.message_id, len(turns)
            )
            try:
                generation = await self._generate(turns, logged.community)
            except EngineError as exc:
                log.warning("Engine could not answer %s: %s", user_key, type(exc).__name__)
                if (refusal := refusal_for(exc)) is not None:
                    self._telemetry.refused(refusal)
                return await self._replies.system_reply(logged, _(exc.user_message))
            version_id = generation.model.version_id
            if generation.voice is not None and self._serving is not None:
                version_id = self._serving.version_of_voice(generation.voice.source)
            return await self._replies.log_reply(logged, generation.text, model_version_id=version_id, system=False)

    async def _generate(self, turns: list[Turn], community: str | None) -> Generation:
        """The answer in the chat's voice (`ModelServing.voice_for`); a voice unloaded in between (a newer
        version, an erasure) leaves the answer to the engine's model alone rather than to an error."""
        voice = self._serving.voice_for(community) if self._serving is not None else None
        try:
            return await self._engine.generate_response(turns, voice=voice)
        except UnknownVoiceError:
            log.info("voice %s was unloaded meanwhile: answering with the base model", voice)
            return await self._engine.generate_response(turns)

    async def _history(self, logged: Logged) -> list[Turn]:
        per_user = logged.message.chat_kind is ChatKind.GROUP and self._settings.group_context == "user"
        async with self._db.sessions() as session:
            rows = await recent_history(
                session,
                chat_id=logged.chat_row_id,
                limit=self._settings.history_turns + 1,  # the message being answered plus its history
                user_id=logged.user_row_id if per_user else None,
                up_to_id=logged.row_id if logged.recovered else None,
            )
        return [Turn(speaker_key(row.author_id, bot=row.role is Role.BOT), row.text) for row in rows]


def _asks_for_personal_data(message: Message) -> bool:
    """A command whose answer is the author's own data (`private` in the command registry: `/export`)."""
    command = parse_command(message.text) if message.is_command else None
    spec = command.spec if command is not None else None
    return spec is not None and spec.private
