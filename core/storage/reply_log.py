"""The chat log's writes: an incoming message logged exactly once, and every bot reply stored before it is sent.

The log is also the outbox: an incoming message the bot means to answer is logged with `awaits_reply`, and each
reply row starts PENDING until the adapter reports it SENT or FAILED (`record_delivery`), which is what crash
recovery reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from core.chat.commands import ParsedCommand, parse_command
from core.chat.messages import Attachment, ChatKind, IncomingMessage, Private, Reply
from core.storage.chat_log import log_message, set_delivery, upsert_chat, upsert_user
from core.storage.db import Database
from core.storage.db_retry import patiently
from core.storage.models import Delivery, Message, Role

log = logging.getLogger("core.chat.service")


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
    community: str | None = None
    """The chat's community as recorded (a migrated group keeps its own): whose voice answers."""


def should_answer(message: IncomingMessage, command: ParsedCommand | None) -> bool:
    """Private chats: always. Groups: only when addressed, or for a command not aimed at another bot."""
    if message.chat_kind is ChatKind.PRIVATE or message.addressed:
        return True
    return command is not None and command.target is None


class ReplyLog:
    """Writes to the log for the chat service (and its commands), one transaction per message or reply."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def log_incoming(self, message: IncomingMessage) -> Logged | None:
        command = parse_command(message.text)
        async with self._db.sessions.begin() as session:
            user = await upsert_user(
                session,
                platform=message.platform,
                platform_user_id=message.author_id,
                display_name=message.author_name,
            )
            chat = await upsert_chat(
                session,
                platform=message.platform,
                platform_chat_id=message.chat_id,
                kind=message.chat_kind.value,
                community=message.community,
            )
            row = Message(
                chat_id=chat.id,
                author_id=user.id,
                role=Role.USER,
                text=message.text or "",
                platform_message_id=message.message_id,
                is_command=command is not None,
                resets_context=command is not None and command.name == "reset",
                awaits_reply=should_answer(message, command),
                replies_to_platform_id=message.reply_to_message_id,
            )
            if message.sent_at is not None:
                row.created_at = message.sent_at
            if not await log_message(session, row):
                log.info("Ignoring re-delivered %s message %s", message.platform, message.message_id)
                return None
            return Logged(message, row.id, chat.id, user.id, command, community=chat.community)

    async def system_reply(self, logged: Logged, text: str, attachment: Attachment | None = None) -> Reply:
        """A reply that is not model output (help, refusals); logged, but never used as conversation."""
        return await self.log_reply(logged, text, attachment=attachment, model_version_id=None, system=True)

    async def log_reply(
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
            await log_message(session, row)
        return Reply(
            text=text, reply_to=logged.message.message_id, attachment=attachment, log_id=row.id, private=private
        )

    async def log_beside(self, reply: Reply, text: str) -> int | None:
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
            await log_message(session, row)
        return row.id

    async def record_delivery(
        self,
        reply: Reply,
        delivery: Delivery,
        *,
        platform_message_id: str | None,
        error: str | None,
        parts_sent: int | None = None,
        patience_s: float = 0.0,
    ) -> None:
        """Bookkeeping only: a database that went away is waited for up to `patience_s` (a delivery left unrecorded
        would make the next start's recovery send the reply again), and whatever still fails is logged, never
        raised into the adapter's send path."""
        if reply.log_id is None:
            return
        log_id = reply.log_id

        async def write() -> None:
            async with self._db.sessions.begin() as session:
                await set_delivery(
                    session, message_id=log_id, delivery=delivery, platform_message_id=platform_message_id,
                    error=error, parts_sent=parts_sent,
                )  # fmt: skip

        try:
            await patiently(write, what=f"the delivery of reply {log_id}", budget_s=patience_s)
        except Exception:
            log.exception("Could not record reply %s as %s", reply.log_id, delivery.value)
