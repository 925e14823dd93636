"""The platform-free chat service: log, decide, answer.

One entry point, `ChatService.handle`, serves every platform. Each incoming message is logged exactly once (in
its own transaction, idempotent on the platform message id) before anything else happens, so that nothing a user
sent is lost even when the answer is a refusal or the model fails. Replies are logged in a second transaction
with the model version that wrote them.

The log is also the outbox. An incoming message the service means to answer is logged with `awaits_reply`, and
each reply row starts PENDING until the adapter reports it SENT or FAILED. After a crash, or a shutdown that cut
answers off, `plan_recovery` (before the adapters start) and `recover` (after) find the messages of the last
RECOVERY_WINDOW_MINUTES with no settled reply: a PENDING reply is handed back to be sent again (from the part where
it stopped), and a message with no reply at all is answered now, through the same path a live message takes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from core.commands import ParsedCommand, parse_command
from core.db import Database
from core.dialogue import Turn, speaker_key
from core.engine import Engine
from core.errors import EngineError
from core.limits import KeyedLock, RateLimiter
from core.messages import ADMIN_COMMANDS, Attachment, ChatKind, IncomingMessage, Private, Reply
from core.models import Delivery, Message, Role, User
from core.retraining import Retrainer
from core.serving import ModelServing
from core.settings import Settings
from core.storage import (
    Unanswered,
    collect_stats,
    delete_message,
    export_user,
    find_user_message,
    forget_user,
    last_message_id,
    log_message,
    migrate_chat,
    recent_history,
    set_delivery,
    unanswered_messages,
    upsert_chat,
    upsert_user,
)
from core.texts import (
    ADMINS_ONLY,
    BUSY,
    EMPTY,
    EXPORT_AFTER_RESTART,
    EXPORT_SENT_PRIVATELY,
    EXPORT_UNREACHABLE,
    GENERIC_FAILURE,
    MODELS_UNAVAILABLE,
    NOT_LOGGED,
    NOT_TEXT,
    OPTED_IN,
    OPTED_OUT,
    RESET_DONE,
    RETRAIN_UNAVAILABLE,
    ROLLBACK_UNAVAILABLE,
    export_ready,
    forgotten,
    help_text,
    rate_limited,
    run_request,
    start_text,
    status_text,
    switch,
    too_long,
    unknown_command,
    version_list,
)
from core.versions import training_in_progress, version_files_problem, versions_trained_on_user

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Logged:
    """An incoming message after it was stored: the ids the rest of the handling needs."""

    message: IncomingMessage
    row_id: int
    chat_row_id: int
    user_row_id: int
    command: ParsedCommand | None
    recovered: bool = False
    """Answered after a restart: its history ends at the message itself, not at what was said since."""
    busy: bool = False
    """The adapter's replies already queue for the platform: a model answer would arrive late (`handle`)."""


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
    """Implements `core.messages.ChatHandler` for every platform.

    `retrainer` (the trainer's orchestrator) answers `/retrain`; `serving` (which version serves) answers
    `/models` and `/rollback`. Without them those commands say they are not available in this setup.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        engine: Engine,
        retrainer: Retrainer | None = None,
        serving: ModelServing | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._db = db
        self._engine = engine
        self._retrainer = retrainer
        self._serving = serving
        self._limiter = RateLimiter(limit=settings.rate_limit_per_minute, clock=clock)
        self._user_turns = KeyedLock()

    async def handle(self, message: IncomingMessage, *, busy: bool = False) -> Reply | None:
        """Logs `message` once and returns the reply, or None when the bot should stay quiet. `busy` (the adapter's
        sends are backlogged): a chat message gets the short busy note instead of a model answer; commands still
        run, since their replies cost the platform no more than the note and what they do must not be lost."""
        try:
            logged = await self._log_incoming(message)
        except Exception:  # the database is down or refused the row: say so rather than drop the message
            log.exception("Could not log %s message %s", message.platform, message.message_id)
            command = parse_command(message.text)
            return Reply(NOT_LOGGED, reply_to=message.message_id) if self._should_answer(message, command) else None
        if logged is None or not self._should_answer(message, logged.command):
            return None
        return await self._answer_or_apologise(replace(logged, busy=busy))

    async def _answer_or_apologise(self, logged: Logged) -> Reply:
        """The answer, or a generic apology when answering failed: the user is never left without a word."""
        message = logged.message
        try:
            return await self._answer(logged)
        except Exception:
            log.exception("Failed to answer %s message %s", message.platform, message.message_id)
        try:
            return await self._system_reply(logged, GENERIC_FAILURE)
        except Exception:  # the database went away mid-answer: the apology still goes out, unlogged
            log.exception("Could not log the failure reply to %s message %s", message.platform, message.message_id)
            return Reply(GENERIC_FAILURE, reply_to=message.message_id)

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

    async def private_unreachable(self, reply: Reply, reason: str) -> Reply:
        """The author could not be reached privately: the personal part stays undelivered (and is never shown in
        the chat); the chat gets a note on how to ask privately, logged beside the reply it replaces."""
        await self.mark_undelivered(reply, f"not delivered privately: {reason}")
        note = reply.private.unreachable if reply.private is not None else GENERIC_FAILURE
        try:
            log_id = await self._log_beside(reply, note)
        except Exception:  # the note still goes out, unlogged, like the apology when the database is gone
            log.exception("Could not log the note replacing reply %s", reply.log_id)
            log_id = None
        return Reply(note, reply_to=reply.reply_to, log_id=log_id)

    async def _log_beside(self, reply: Reply, text: str) -> int | None:
        """Logs `text` as another system reply to the message `reply` answered, in the same chat."""
        if reply.log_id is None:
            return None
        async with self._db.sessions.begin() as session:
            replaced = await session.get(Message, reply.log_id)
            if replaced is None:  # forgotten meanwhile
                return None
            row = Message(
                chat_id=replaced.chat_id, author_id=None, role=Role.BOT, text=text, is_command=True,
                reply_to_id=replaced.reply_to_id, delivery=Delivery.PENDING,
            )  # fmt: skip
            session.add(row)
        return row.id

    async def _record_delivery(
        self,
        reply: Reply,
        delivery: Delivery,
        *,
        platform_message_id: str | None,
        error: str | None,
        parts_sent: int | None = None,
    ) -> None:
        """Bookkeeping only: a database hiccup here is logged, never raised into the adapter's send path."""
        if reply.log_id is None:
            return
        try:
            async with self._db.sessions.begin() as session:
                await set_delivery(
                    session, message_id=reply.log_id, delivery=delivery, platform_message_id=platform_message_id,
                    error=error, parts_sent=parts_sent,
                )  # fmt: skip
        except Exception:
            log.exception("Could not record reply %s as %s", reply.log_id, delivery.value)

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
            if item.pending is None or _asks_for_export(item.message):
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
        )
        command = parse_command(message.text) if message.is_command else None
        logged = Logged(incoming, message.id, chat.id, author.id, command, recovered=True)
        async with slots:
            if _asks_for_export(message):  # personal data goes out only on a live request
                reply = await self._system_reply(logged, EXPORT_AFTER_RESTART)
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

    # --- logging ----------------------------------------------------------------------------------------------

    async def _log_incoming(self, message: IncomingMessage) -> Logged | None:
        command = parse_command(message.text)
        async with self._db.sessions.begin() as session:
            user = await upsert_user(
                session,
                platform=message.platform,
                platform_user_id=message.author_id,
                display_name=message.author_name,
            )
            chat = await upsert_chat(
                session, platform=message.platform, platform_chat_id=message.chat_id, kind=message.chat_kind.value
            )
            row = Message(
                chat_id=chat.id,
                author_id=user.id,
                role=Role.USER,
                text=message.text or "",
                platform_message_id=message.message_id,
                is_command=command is not None,
                resets_context=command is not None and command.name == "reset",
                awaits_reply=self._should_answer(message, command),
            )
            if message.sent_at is not None:
                row.created_at = message.sent_at
            if not await log_message(session, row):
                log.info("Ignoring re-delivered %s message %s", message.platform, message.message_id)
                return None
            return Logged(message, row.id, chat.id, user.id, command)

    async def _system_reply(self, logged: Logged, text: str, attachment: Attachment | None = None) -> Reply:
        """A reply that is not model output (help, refusals); logged, but never used as conversation."""
        return await self._log_reply(logged, text, attachment=attachment, model_version_id=None, system=True)

    async def _log_reply(
        self,
        logged: Logged,
        text: str,
        *,
        attachment: Attachment | None = None,
        model_version_id: int | None,
        system: bool,
        answers_logged: bool = True,
        private: Private | None = None,
    ) -> Reply:
        """Stores a bot reply; `answers_logged=False` when the message it answers no longer exists. With a
        `private` part, `text` is what the chat sees, and the only thing logged: the personal part is not
        conversation and is never stored a second time."""
        async with self._db.sessions.begin() as session:
            row = Message(
                chat_id=logged.chat_row_id,
                author_id=None,
                role=Role.BOT,
                text=text,
                is_command=system,
                reply_to_id=logged.row_id if answers_logged else None,
                model_version_id=model_version_id,
                delivery=Delivery.PENDING,
            )
            session.add(row)
        return Reply(
            text=text, reply_to=logged.message.message_id, attachment=attachment, log_id=row.id, private=private
        )

    # --- deciding and answering -------------------------------------------------------------------------------

    def _should_answer(self, message: IncomingMessage, command: ParsedCommand | None) -> bool:
        """Private chats: always. Groups: only when addressed, or for a command not aimed at another bot."""
        if message.chat_kind is ChatKind.PRIVATE or message.addressed:
            return True
        return command is not None and command.target is None

    async def _answer(self, logged: Logged) -> Reply:
        message = logged.message
        user_key = f"{message.platform}:{message.author_id}"
        # Admins (and the console's local operator) are exempt: they run the bot, and a scripted console session
        # or an admin checking /status must not be told to wait.
        if not self._is_admin(logged) and not self._limiter.allow(user_key):
            wait = max(1, round(self._limiter.retry_after(user_key)))
            return await self._system_reply(logged, rate_limited(self._settings.rate_limit_per_minute, wait))
        if message.text is None:
            return await self._system_reply(logged, NOT_TEXT)
        if logged.command is not None:
            return await self._run_command(logged, logged.command)
        text = message.text.strip()
        if not text:
            return await self._system_reply(logged, EMPTY)
        if len(text) > self._settings.max_input_chars:
            return await self._system_reply(logged, too_long(len(text), self._settings.max_input_chars))
        if logged.busy:
            log.info("Sends are backlogged: %s message %s gets the busy note", message.platform, message.message_id)
            return await self._system_reply(logged, BUSY)
        return await self._chat(logged)

    async def _chat(self, logged: Logged) -> Reply:
        """Generates an answer; one generation per user at a time, later messages wait their turn."""
        message = logged.message
        user_key = f"{message.platform}:{message.author_id}"
        async with self._user_turns.hold(user_key):
            turns = await self._history(logged)
            try:
                generation = await self._engine.generate_response(turns)
            except EngineError as exc:
                log.warning("Engine could not answer %s: %s", user_key, type(exc).__name__)
                return await self._system_reply(logged, exc.user_message)
            return await self._log_reply(
                logged, generation.text, model_version_id=generation.model.version_id, system=False
            )

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

    # --- commands ---------------------------------------------------------------------------------------------

    async def _run_command(self, logged: Logged, command: ParsedCommand) -> Reply:
        message = logged.message
        is_admin = self._settings.is_admin(message.platform, message.author_id)
        if command.name in ADMIN_COMMANDS and not is_admin:
            log.warning(
                "Refused admin command /%s from %s:%s (not in ADMIN_IDS)",
                command.name,
                message.platform,
                message.author_id,
            )
            return await self._system_reply(logged, ADMINS_ONLY)
        handler = self._command_handlers().get(command.name)
        if handler is None:
            return await self._system_reply(logged, unknown_command(command.name))
        return await handler(logged, command)

    def _command_handlers(self) -> dict[str, Callable[[Logged, ParsedCommand], Awaitable[Reply]]]:
        return {
            "start": self._cmd_start,
            "help": self._cmd_help,
            "reset": self._cmd_reset,
            "forget": self._cmd_forget,
            "export": self._cmd_export,
            "optout": self._cmd_optout,
            "optin": self._cmd_optin,
            "retrain": self._cmd_retrain,
            "status": self._cmd_status,
            "models": self._cmd_models,
            "rollback": self._cmd_rollback,
        }

    def _is_admin(self, logged: Logged) -> bool:
        return self._settings.is_admin(logged.message.platform, logged.message.author_id)

    async def _cmd_start(self, logged: Logged, _: ParsedCommand) -> Reply:
        learned = self._settings.learns_from_private_chats(logged.message.platform)
        text = start_text(self._settings.bot_name, is_admin=self._is_admin(logged), private_chats_learned=learned)
        return await self._system_reply(logged, text)

    async def _cmd_help(self, logged: Logged, _: ParsedCommand) -> Reply:
        learned = self._settings.learns_from_private_chats(logged.message.platform)
        text = help_text(self._settings.bot_name, is_admin=self._is_admin(logged), private_chats_learned=learned)
        return await self._system_reply(logged, text)

    async def _cmd_reset(self, logged: Logged, _: ParsedCommand) -> Reply:
        return await self._system_reply(logged, RESET_DONE)

    async def _cmd_forget(self, logged: Logged, _: ParsedCommand) -> Reply:
        async with self._db.sessions.begin() as session:
            count = await forget_user(session, user_id=logged.user_row_id)
            trained_on = await versions_trained_on_user(session, user_id=logged.user_row_id)
            training = await training_in_progress(session)
        log.info("Forgot %d messages of user row %d", count, logged.user_row_id)
        names = [version.name for version in trained_on]
        text = forgotten(count, trained_on=names, training_now=training)
        return await self._log_reply(logged, text, model_version_id=None, system=True, answers_logged=False)

    async def _cmd_export(self, logged: Logged, _: ParsedCommand) -> Reply:
        async with self._db.sessions() as session:
            rows = await export_user(session, user_id=logged.user_row_id)
        content = json.dumps({"messages": rows}, ensure_ascii=False, indent=2).encode()
        attachment = Attachment(filename="magpie-export.json", content=content)
        text = export_ready(len(rows))
        if logged.message.chat_kind is ChatKind.PRIVATE:
            return await self._system_reply(logged, text, attachment)
        # Everything the user ever sent, private chats included: never for the eyes of a group.
        private = Private(text, attachment, unreachable=EXPORT_UNREACHABLE)
        return await self._log_reply(logged, EXPORT_SENT_PRIVATELY, model_version_id=None, system=True, private=private)

    async def _set_opt_out(self, logged: Logged, opted_out: bool) -> None:
        async with self._db.sessions.begin() as session:
            user = await session.get(User, logged.user_row_id)
            if user is not None:
                user.opted_out = opted_out

    async def _cmd_optout(self, logged: Logged, _: ParsedCommand) -> Reply:
        await self._set_opt_out(logged, True)
        return await self._system_reply(logged, OPTED_OUT)

    async def _cmd_optin(self, logged: Logged, _: ParsedCommand) -> Reply:
        await self._set_opt_out(logged, False)
        return await self._system_reply(logged, OPTED_IN)

    async def _cmd_retrain(self, logged: Logged, _: ParsedCommand) -> Reply:
        if self._retrainer is None:
            return await self._system_reply(logged, RETRAIN_UNAVAILABLE)
        message = logged.message
        result = await self._retrainer.request(
            triggered_by=f"{message.platform}:{message.author_id}",
            notify_platform=message.platform,
            notify_chat_id=message.chat_id,
        )
        return await self._system_reply(logged, run_request(result))

    async def _cmd_status(self, logged: Logged, _: ParsedCommand) -> Reply:
        async with self._db.sessions() as session:
            stats = await collect_stats(session)
        ref = self._engine.model_ref
        model_name = ref.name if ref is not None else "none loaded"
        active = stats.active_version
        problem = version_files_problem(active.path) if active is not None and active.name != model_name else None
        text = status_text(stats, model_name=model_name, queue_depth=self._engine.queue_depth, active_problem=problem)
        return await self._system_reply(logged, text)

    async def _cmd_models(self, logged: Logged, _: ParsedCommand) -> Reply:
        if self._serving is None:
            return await self._system_reply(logged, MODELS_UNAVAILABLE)
        return await self._system_reply(logged, version_list(await self._serving.list_versions()))

    async def _cmd_rollback(self, logged: Logged, command: ParsedCommand) -> Reply:
        if self._serving is None:
            return await self._system_reply(logged, ROLLBACK_UNAVAILABLE)
        message = logged.message
        result = await self._serving.rollback(
            version=command.args or None, triggered_by=f"{message.platform}:{message.author_id}"
        )
        return await self._system_reply(logged, switch(result))


def _asks_for_export(message: Message) -> bool:
    command = parse_command(message.text) if message.is_command else None
    return command is not None and command.name == "export"
