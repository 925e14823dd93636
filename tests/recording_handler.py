"""The tests' one `core.chat.messages.ChatHandler`: a recorder that stands in for the core (or wraps the real one), like
errbot's test backend, so adapter and conversation-loop tests await what happened instead of sleeping.

Alone, it answers every message meant for the bot (`addressed`; private chats always are) with `answer(message)`
(an echo unless told otherwise) and with `attachment` if one is set; a group message not meant for the bot gets
None, as from the core. Given `inner` (the real `ChatService`), every call goes through to it and is recorded on the
way back. Either way it records each call in the order it came; `wait_until(condition)` awaits a condition over the
records. `release` (when set to an unset event) holds every message in the core until it is set; `gates[text]`
holds the messages with that text until theirs is.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

from core.chat.messages import Arrival, Attachment, ChatHandler, IncomingMessage, Reply

WAIT_S = 30.0


def echo(message: IncomingMessage) -> str:
    return f"echo: {message.text}"


class RecordingHandler:
    """See the module docstring. `log_id(message)` numbers the replies it writes (by default 1, 2, 3…)."""

    def __init__(
        self,
        answer: Callable[[IncomingMessage], str] = echo,
        *,
        inner: ChatHandler | None = None,
        log_id: Callable[[IncomingMessage], int] | None = None,
    ) -> None:
        self.answer = answer
        self.inner = inner
        self.attachment: Attachment | None = None
        numbers = itertools.count(1)
        self._log_id = log_id or (lambda _message: next(numbers))
        self.release: asyncio.Event | None = None
        self.gates: dict[str, asyncio.Event] = {}
        self.received: list[IncomingMessage] = []
        """Every message, as it entered the core (`entered`: their texts; `entered_at`: when each text first did)."""
        self.entered: set[str] = set()
        self.entered_at: dict[str, float] = {}
        self.cancelled: set[str] = set()
        """Texts whose handling was cancelled while held (a shutdown without grace)."""
        self.handled: list[tuple[IncomingMessage, Reply | None]] = []
        self.failed: list[tuple[IncomingMessage, Exception]] = []
        self.delivered: list[tuple[Reply, list[str]]] = []
        self.undelivered: list[tuple[Reply, str, int]] = []
        """(reply, reason, parts sent before it failed)."""
        self.interrupted: list[tuple[Reply, int]] = []
        self.unreachable: list[tuple[Reply, str]] = []
        self.edits: list[tuple[str, str, str | None]] = []
        """(chat id, message id, new text)."""
        self.deletions: list[tuple[str, str]] = []
        self.migrated: list[tuple[str, str]] = []
        self.arrivals: list[Arrival] = []
        self._changed = asyncio.Condition()

    # --- awaiting what happened -----------------------------------------------------------------------------------

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(condition)

    async def wait_handled(self, message_id: str) -> Reply | None:
        """The reply the core gave to message `message_id`, once it has."""
        await self.wait_until(lambda: any(m.message_id == message_id for m, _ in self.handled))
        return next(reply for m, reply in self.handled if m.message_id == message_id)

    def incoming(self, message_id: str) -> IncomingMessage:
        return next(m for m, _ in self.handled if m.message_id == message_id)

    async def _note(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- the ChatHandler --------------------------------------------------------------------------------------------

    async def handle(self, message: IncomingMessage, *, busy: bool = False) -> Reply | None:
        text = message.text or ""
        self.received.append(message)
        self.entered.add(text)
        self.entered_at.setdefault(text, time.monotonic())
        await self._note()
        try:
            await self._held(text)
            reply = await self._reply(message, busy=busy)
        except Exception as exc:
            self.failed.append((message, exc))
            await self._note()
            raise
        self.handled.append((message, reply))
        await self._note()
        return reply

    async def _held(self, text: str) -> None:
        gate = self.gates.get(text, self.release)
        if gate is None:
            return
        try:
            await gate.wait()
        except asyncio.CancelledError:
            self.cancelled.add(text)
            raise

    async def _reply(self, message: IncomingMessage, *, busy: bool) -> Reply | None:
        if self.inner is not None:
            return await self.inner.handle(message, busy=busy)
        if not message.addressed:
            return None
        answer = self.answer(message)
        return Reply(answer, reply_to=message.message_id, attachment=self.attachment, log_id=self._log_id(message))

    async def mark_delivered(self, reply: Reply, platform_message_ids: list[str]) -> None:
        if self.inner is not None:
            await self.inner.mark_delivered(reply, platform_message_ids)
        self.delivered.append((reply, platform_message_ids))
        await self._note()

    async def mark_undelivered(self, reply: Reply, reason: str, *, parts_sent: int = 0) -> None:
        if self.inner is not None:
            await self.inner.mark_undelivered(reply, reason, parts_sent=parts_sent)
        self.undelivered.append((reply, reason, parts_sent))
        await self._note()

    async def mark_interrupted(self, reply: Reply, *, parts_sent: int) -> None:
        if self.inner is not None:
            await self.inner.mark_interrupted(reply, parts_sent=parts_sent)
        self.interrupted.append((reply, parts_sent))
        await self._note()

    async def private_unreachable(self, reply: Reply, reason: str) -> Reply:
        self.unreachable.append((reply, reason))
        if self.inner is not None:
            note = await self.inner.private_unreachable(reply, reason)
        else:
            assert reply.private is not None
            note = Reply(reply.private.unreachable, reply_to=reply.reply_to, log_id=-len(self.unreachable))
        await self._note()
        return note

    async def message_edited(self, platform: str, chat_id: str, message_id: str, text: str | None) -> None:
        if self.inner is not None:
            await self.inner.message_edited(platform, chat_id, message_id, text)
        self.edits.append((chat_id, message_id, text))
        await self._note()

    async def message_deleted(self, platform: str, chat_id: str, message_id: str) -> None:
        if self.inner is not None:
            await self.inner.message_deleted(platform, chat_id, message_id)
        self.deletions.append((chat_id, message_id))
        await self._note()

    async def migrate_chat(self, platform: str, old_chat_id: str, new_chat_id: str) -> None:
        if self.inner is not None:
            await self.inner.migrate_chat(platform, old_chat_id, new_chat_id)
        self.migrated.append((old_chat_id, new_chat_id))
        await self._note()

    async def joined(self, arrival: Arrival) -> Reply | None:
        reply = await self.inner.joined(arrival) if self.inner is not None else None
        self.arrivals.append(arrival)
        await self._note()
        return reply
