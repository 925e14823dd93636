"""The conversation loop every platform shares (in the spirit of errbot's backend base), and what the CLI sees.

The message path, written once here for Telegram, Discord and the console alike:

    platform event ─► the platform's translate ─► `ChatBackend.converse`: the core answers ("typing…" once it
        takes longer than TYPING_AFTER_MS; the short busy note instead of a model answer while more than
        SEND_QUEUE_LIMIT platform calls wait to go out)
        ─► `_parts`: split at the platform's limit ─► `_send_part`, one part at a time ─► the core hears delivered
        (with the platform ids), undelivered (why, and how many parts arrived) or interrupted (cut off by stop)

A reply with a `Reply.private` part goes to its author alone first, and the chat sees only the note; when the
author cannot be reached privately nothing personal is sent anywhere and the chat gets the core's
`private_unreachable` note instead. Crash recovery hands owed replies in through `deliver_reply` (from the part
after those that arrived), retraining progress through `notify`. `stop` stops receiving, lets the replies in
flight finish for SHUTDOWN_GRACE_SECONDS and cancels the rest: their messages stay in the outbox for recovery.

Every send and "typing…" spends the platform's call budget (Telegram: ~30 calls/s, queued by PTB's rate limiter),
so under load the queue that decides how late an answer arrives is the platform's, not the engine's. Hence
"typing…" only for slow answers, and the busy check: the backend counts the platform calls it has waiting and,
past the bound, asks the core for the busy note (`ChatHandler.handle(busy=True)`: the message is logged, commands
run). The check is made once, when a message arrives; the note itself then queues like any reply and counts
against the bound, as it is a call too.

A platform subclasses `ChatBackend[Target]`, where `Target` is whatever names a place it can send to, and supplies
only: `start`, `_send_part`, `_recovery_target` (a chat by id), and, where it has them, `_show_typing`,
`_stop_receiving`/`_drain`/`_disconnect`, and its quirks (`_parts`, `_redirect`, `_unreachable`,
`_failure_reason`, `_redact`). Its event handlers translate a native event in one place and call `converse`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from bot.text import split_message
from core.chat.consent import community_of
from core.chat.messages import Arrival, Attachment, ChatHandler, IncomingMessage, Reply
from core.ops.logging_setup import correlated
from core.ops.telemetry import ReplyOutcome, Telemetry

log = logging.getLogger(__name__)

Target = TypeVar("Target")

TYPING_LANDING_S = 2.0
"""How long a finished exchange waits for a "typing…" request in flight: one landing after the reply would show
"typing…" again."""
TYPING_CHATS_REMEMBERED = 4096
"""Chats whose last "typing…" time is kept before the expired ones are dropped."""

_received_at: ContextVar[float | None] = ContextVar("magpie_received_at", default=None)
"""When the message being answered in this context reached the backend (None: recovery, a notification)."""


class Backend(Protocol):
    """A running connection to one chat platform, as the composition root (`bot/cli.py`) starts and stops it."""

    platform: str

    @property
    def connected(self) -> bool:
        """Whether the platform can be reached now (for `/healthz`)."""
        ...

    async def start(self) -> None:
        """Connects and begins receiving messages; returns once it is running (does not block until stop)."""
        ...

    async def stop(self) -> None:
        """Stops receiving, lets in-flight replies finish or cancels them, and disconnects."""
        ...

    async def notify(self, chat_id: str, text: str) -> None:
        """Sends unsolicited text (e.g. retraining progress) to a chat; logs and swallows delivery failures."""
        ...

    async def deliver_reply(self, chat_id: str, reply: Reply, *, parts_sent: int = 0) -> None:
        """Delivers a reply that crash recovery found unsent into a chat by id, from the part after `parts_sent`,
        and reports the outcome to the core like any reply; only called once the backend has started."""
        ...


@dataclass(frozen=True, slots=True)
class Part:
    """One message of a reply as the platform sends it: some text, or a file, or both."""

    text: str
    attachment: Attachment | None = None


@dataclass(frozen=True, slots=True)
class Route(Generic[Target]):
    """Where the answer to one incoming message goes: `chat`, `author` for a reply's private part (None: they
    cannot be written to alone), and `typing`, where "typing…" shows while the core works (None: nowhere, e.g.
    where the platform shows its own "thinking…")."""

    chat: Target
    author: Target | None = None
    typing: Target | None = None


class ChatBackend(ABC, Generic[Target]):
    """The loop: receive -> core -> typing -> split -> send -> record, in-flight tracking and graceful stop."""

    platform: str
    title: str
    """The platform's name in log lines."""
    message_limit: ClassVar[int | None] = None
    """The longest message the platform takes, as `_length` counts; None: no limit."""
    typing_renew_s: ClassVar[float] = 4.0
    send_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    """What a send is expected to fail with (logged as a line); anything else is a bug, logged with its traceback."""

    def __init__(
        self,
        *,
        handler: ChatHandler,
        stop_grace_s: float,
        typing_after_s: float = 1.0,
        send_queue_limit: int | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        """`typing_after_s`: how long an answer may take before "typing…" shows; `send_queue_limit`: how many
        platform calls may wait to go out before new messages get the busy note (None: no bound); `telemetry`
        counts replies and their latency."""
        self._handler = handler
        self._telemetry = telemetry or Telemetry()
        self._stop_grace_s = stop_grace_s
        self._typing_after_s = typing_after_s
        self._send_queue_limit = send_queue_limit
        self._calls_waiting = 0
        """Sends and "typing…" calls started and not yet answered: the platform's queue as this backend sees it."""
        self._typing_shown: dict[Target, float] = {}
        """When "typing…" last went to each chat (event-loop time): one indicator serves every answer it awaits."""
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._cancelling = False

    # --- what a platform supplies -----------------------------------------------------------------------------

    @abstractmethod
    async def start(self) -> None:
        """Connects and begins receiving; returns once running, or raises a clear `MagpieError`."""

    @abstractmethod
    async def _send_part(self, target: Target, part: Part, *, quote: str | None) -> str | None:
        """Sends one part; `quote` is the id of the message a reply's first part answers (the target decides
        whether it shows as a reply there). Returns the id the platform gave the part (None where it gives none)."""

    @abstractmethod
    def _recovery_target(self, chat_id: str) -> Target | None:
        """A chat by the id the core knows it by, where a late answer quotes the message it answers; None when
        not connected."""

    def _notification_target(self, chat_id: str) -> Target | None:
        return self._recovery_target(chat_id)

    @property
    def connected(self) -> bool:
        """Whether the platform can be reached now (for `/healthz`); platforms with a connection override it."""
        return True

    async def _show_typing(self, target: Target) -> None:
        """Shows "typing…" once (the loop renews it every `typing_renew_s`)."""

    async def _stop_receiving(self) -> None:
        """Takes no new events from the platform."""

    async def _drain(self) -> None:
        """Returns once the work in flight is done (the stop grace bounds it)."""
        while self._in_flight:
            await asyncio.wait(set(self._in_flight))

    async def _disconnect(self) -> None:
        """Closes the connection; harmless when it never opened."""

    async def _leave(self, community: str) -> None:
        """Leaves a group (`IncomingMessage.community`) the core turned away; platforms where a bot can leave
        override it."""

    def _length(self, text: str) -> int:
        return len(text)

    def _parts(self, reply: Reply) -> list[Part]:
        """The reply's text split at the platform's limit, its attachment (if any) with the first part."""
        texts = (
            [reply.text] if self.message_limit is None else split_message(reply.text, self.message_limit, self._length)
        )
        texts = texts or [""]
        return [Part(text, reply.attachment if index == 0 else None) for index, text in enumerate(texts)]

    async def _redirect(self, target: Target, error: Exception) -> Target | None:
        """Where to send instead after `error` (a chat that moved), or None: the error stands."""
        return None

    def _unreachable(self, error: Exception) -> bool:
        """Whether `error` says the author cannot be written to alone (rather than that sending failed)."""
        return False

    def _failure_reason(self, error: BaseException) -> str:
        """Why a send failed, in words safe to store and log."""
        return self._redact(f"{type(error).__name__}: {error}")

    def _redact(self, text: str) -> str:
        """Removes secrets (a token inside URLs) from text about to be logged or stored."""
        return text

    # --- the conversation -------------------------------------------------------------------------------------

    async def converse(self, incoming: IncomingMessage, route: Route[Target]) -> None:
        """The one path a platform's message takes: the core answers it, the answer goes out and is recorded."""
        with self.exchange() as accepted:
            if not accepted:
                return
            reply = await self.ask_core(incoming, route.typing, busy=self.backlogged)
            if reply is not None:
                await self.answer(reply, route)
            if reply is not None and reply.leave:
                await self.leave(community_of(incoming) or incoming.chat_id)

    async def arrived(self, arrival: Arrival, target: Target | None) -> None:
        """The bot was added to a group: the core's greeting goes to `target` (what it logs and how to say no),
        or, outside ALLOWED_CHATS, why it leaves, and then it leaves. `target` None: nowhere it may write."""
        reply = await self._handler.joined(arrival)
        if reply is None:
            return
        if target is None:
            log.info("%s: added to group %s, with nowhere to say what I log", self.title, arrival.community)
        else:
            await self._greet(target, reply, arrival.community)
        if reply.leave:
            await self.leave(arrival.community)

    async def _greet(self, target: Target, reply: Reply, community: str) -> None:
        try:
            await self._send_parts(target, self._parts(reply), [], quote=None)
        except Exception as exc:  # a group that lets nobody write is still left
            self._log_failure(f"could not greet group {community}: {self._failure_reason(exc)}", exc)

    async def leave(self, community: str) -> None:
        """Leaves a group the core turned away; a failure is logged (the core keeps ignoring the group anyway)."""
        try:
            await self._leave(community)
        except Exception as exc:
            self._log_failure(f"could not leave group {community}: {self._failure_reason(exc)}", exc)
        else:
            log.info("%s: left group %s (not in ALLOWED_CHATS)", self.title, community)

    @contextmanager
    def exchange(self) -> Iterator[bool]:
        """One incoming message's exchange: work in flight (`tracked`), with a correlation id of its own on every
        log line on the way (`core.ops.logging_setup`) and its start, from which the reply's latency is measured."""
        with self.tracked() as accepted, correlated():
            received = _received_at.set(time.monotonic())
            try:
                yield accepted
            finally:
                _received_at.reset(received)

    @contextmanager
    def tracked(self) -> Iterator[bool]:
        """Counts the running task as work in flight, which `stop` lets finish; False once stop has given up
        waiting (then nothing new is started)."""
        task = asyncio.current_task()
        if self._cancelling:
            log.warning("%s: dropping a message, shutting down", self.title)
            yield False
            return
        if task is None or task in self._in_flight:
            yield True
            return
        self._in_flight.add(task)
        try:
            yield True
        finally:
            self._in_flight.discard(task)

    @property
    def backlogged(self) -> bool:
        """Whether more platform calls wait to go out than SEND_QUEUE_LIMIT: a new answer would arrive late."""
        return self._send_queue_limit is not None and self._calls_waiting > self._send_queue_limit

    @contextmanager
    def _platform_call(self) -> Iterator[None]:
        """Counts a call to the platform while it waits (in its rate limiter) and runs."""
        self._calls_waiting += 1
        try:
            yield
        finally:
            self._calls_waiting -= 1

    async def ask_core(
        self, incoming: IncomingMessage, typing_at: Target | None, *, busy: bool = False
    ) -> Reply | None:
        """Awaits the core's answer, showing "typing…" at `typing_at` once it takes longer than TYPING_AFTER_MS
        when an answer is expected. `busy`: the core answers with its busy note (quick: no "typing…", which
        would only spend another call)."""
        log.debug("%s: message %s in chat %s", self.title, incoming.message_id, incoming.chat_id)
        if busy:
            log.debug("%s: %d platform calls waiting: new messages get the busy note", self.title, self._calls_waiting)
            return await self._handler.handle(incoming, busy=True)
        if typing_at is None or incoming.text is None or not incoming.addressed:
            return await self._handler.handle(incoming)
        done = asyncio.Event()
        typing = asyncio.create_task(self._keep_typing(typing_at, done))
        try:
            return await self._handler.handle(incoming)
        finally:
            done.set()
            try:
                await asyncio.wait_for(typing, timeout=TYPING_LANDING_S)
            except TimeoutError:
                log.debug("%s: typing indicator cancelled", self.title)

    async def _keep_typing(self, target: Target, done: asyncio.Event) -> None:
        """Shows "typing…" once the answer has taken `typing_after_s` (at once when 0, even when the answer came
        first: it lands before the answer is sent) and every `typing_renew_s` until `done`; a quick answer costs
        no call at all. It is cosmetic, so failures only log."""
        if self._typing_after_s > 0:
            with suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=self._typing_after_s)
            if done.is_set():
                return
        while True:
            if self._typing_due(target):
                try:
                    with self._platform_call():
                        await self._show_typing(target)
                except Exception as exc:
                    log.debug("%s: typing indicator failed: %s", self.title, self._failure_reason(exc))
            with suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=self.typing_renew_s)
            if done.is_set():
                return

    def _typing_due(self, target: Target) -> bool:
        """Whether "typing…" must go to `target` now. It shows for the whole chat, so while one is still showing
        (`typing_renew_s`, and no message of the bot's has ended it) a second answer awaited there sends none:
        several people waiting in one group cost one call per renewal, not one each (issue #12: typing took 15-40%
        of Telegram's budget under load)."""
        now = asyncio.get_running_loop().time()
        if now < self._typing_shown.get(target, -math.inf) + self.typing_renew_s:
            log.debug("%s: typing already shows in %s", self.title, target)
            return False
        if len(self._typing_shown) > TYPING_CHATS_REMEMBERED:
            self._typing_shown = {t: at for t, at in self._typing_shown.items() if now < at + self.typing_renew_s}
        self._typing_shown[target] = now
        return True

    async def answer(self, reply: Reply, route: Route[Target]) -> None:
        """Delivers a reply along `route`: a private part to the author alone first, then the chat's text."""
        if reply.private is None:
            await self._deliver(route.chat, reply)
            return
        personal = Reply(reply.private.text, attachment=reply.private.attachment)
        if route.author is None:
            await self._instead(reply, route, "the author speaks as a chat, not as a person")
            return
        try:
            await self._send_parts(route.author, self._parts(personal), [], quote=None)
        except asyncio.CancelledError:
            await self._handler.mark_undelivered(reply, "cancelled at shutdown")
            self._count(reply, "undelivered")
            raise
        except Exception as exc:
            if not self._unreachable(exc):  # nothing reached anyone, as for any undelivered reply
                reason = self._failure_reason(exc)
                self._log_failure(f"reply {reply.log_id} to its author undelivered: {reason}", exc)
                await self._handler.mark_undelivered(reply, reason)
                self._count(reply, "undelivered")
                return
            await self._instead(reply, route, self._failure_reason(exc))
            return
        await self._deliver(route.chat, replace(reply, private=None))

    async def _instead(self, reply: Reply, route: Route[Target], reason: str) -> None:
        """The author cannot be reached privately: the chat gets the core's note saying how to ask instead."""
        log.info("%s: reply %s cannot reach its author privately: %s", self.title, reply.log_id, reason)
        await self._deliver(route.chat, await self._handler.private_unreachable(reply, reason))

    async def _deliver(self, target: Target, reply: Reply, *, parts_sent: int = 0) -> None:
        """Sends a reply (from the part after `parts_sent`) and tells the core whether it arrived and how far it
        got, so that no reply is ever lost silently and a later re-send repeats no part that arrived."""
        parts = self._parts(reply)
        sent: list[str | None] = []  # one entry per part this call delivered, kept as they arrive
        try:
            await self._send_parts(target, parts, sent, quote=reply.reply_to, start=parts_sent)
        except asyncio.CancelledError:
            await self._handler.mark_interrupted(reply, parts_sent=parts_sent + len(sent))
            self._count(reply, "interrupted")
            raise
        except Exception as exc:  # retries exhausted, or a bug: either way the core must hear of it
            arrived = parts_sent + len(sent)
            reason = self._failure_reason(exc)
            if arrived:
                reason += f" (after {arrived} of {len(parts)} parts)"
            self._log_failure(f"reply {reply.log_id} undelivered: {reason}", exc)
            await self._handler.mark_undelivered(reply, reason, parts_sent=arrived)
            self._count(reply, "undelivered")
            return
        await self._handler.mark_delivered(reply, [ident for ident in sent if ident is not None])
        self._count(reply, "delivered")

    def _count(self, reply: Reply, outcome: ReplyOutcome) -> None:
        """Counts a reply's fate and, for one delivered in answer to a live message, its latency."""
        received = _received_at.get()
        latency = time.monotonic() - received if received is not None and outcome == "delivered" else None
        self._telemetry.reply_finished(self.platform, outcome, latency_s=latency)
        log.debug("%s: reply %s %s", self.title, reply.log_id, outcome)

    async def _send_parts(
        self, target: Target, parts: Sequence[Part], sent: list[str | None], *, quote: str | None, start: int = 0
    ) -> None:
        """Sends `parts[start:]` in order, the first part of all quoting message `quote`, appending each part's id
        to `sent` as soon as it arrived; follows the platform's redirect (a chat that moved) once."""
        index, redirected = start, False
        while index < len(parts):
            try:
                with self._platform_call():
                    sent.append(await self._send_part(target, parts[index], quote=quote if index == 0 else None))
                self._typing_shown.pop(target, None)  # a message from the bot ends "typing…" there
            except Exception as exc:
                moved = None if redirected else await self._redirect(target, exc)
                if moved is None:
                    raise
                target, redirected = moved, True
                continue
            index += 1

    def _log_failure(self, message: str, error: BaseException) -> None:
        """An expected failure is one line; anything else is a bug, logged with its traceback (as text, redacted:
        `exc_info` would be formatted later, past `_redact`)."""
        if isinstance(error, self.send_errors):
            log.warning("%s: %s", self.title, message)
            return
        trace = self._redact("".join(traceback.format_exception(error)))
        log.error("%s: %s\n%s", self.title, message, trace)

    # --- the outside world's entry points ---------------------------------------------------------------------

    async def deliver_reply(self, chat_id: str, reply: Reply, *, parts_sent: int = 0) -> None:
        """Crash recovery's way out: a reply owed since before a restart, into a chat by id, quoting the message
        it answers, from the part after `parts_sent`; its outcome is recorded like any reply's."""
        target = self._recovery_target(chat_id)
        if target is None:
            log.warning("%s is not connected; reply %s is left for the next start", self.title, reply.log_id)
            return
        await self._deliver(target, reply, parts_sent=parts_sent)

    async def notify(self, chat_id: str, text: str) -> None:
        """Sends unsolicited text (e.g. retraining progress); failures are logged, never raised to the caller."""
        try:
            target = self._notification_target(chat_id)
            if target is None:
                log.warning("%s is not connected; dropped a notification for chat %s", self.title, chat_id)
                return
            await self._send_parts(target, self._parts(Reply(text)), [], quote=None)
        except Exception as exc:
            self._log_failure(f"could not notify chat {chat_id}: {self._failure_reason(exc)}", exc)

    async def stop(self) -> None:
        """Stops receiving, lets the replies in flight finish for the grace period, cancels the rest (each is
        recorded as interrupted and left, with its message, to the next start's recovery), and disconnects."""
        await self._stop_receiving()
        if self._in_flight:
            log.info("%s: letting %d replies finish (up to %gs)", self.title, len(self._in_flight), self._stop_grace_s)
        draining = asyncio.ensure_future(self._drain())
        done, _ = await asyncio.wait({draining}, timeout=self._stop_grace_s)
        if not done:
            self._cancelling = True
            log.warning("%s: cancelling %d replies still running at shutdown", self.title, len(self._in_flight))
            for task in list(self._in_flight):
                task.cancel()
            await draining
        await self._disconnect()
        log.info("%s: stopped", self.title)


class BackendNotifier:
    """Routes `core.chat.messages.Notifier` calls to the running backend of the named platform."""

    def __init__(self, backends: Sequence[Backend] = ()) -> None:
        self._by_platform = {backend.platform: backend for backend in backends}

    def attach(self, backends: Sequence[Backend]) -> None:
        """Backends are built after the services that notify through them; they are attached once running."""
        self._by_platform = {backend.platform: backend for backend in backends}

    async def notify(self, platform: str, chat_id: str, text: str) -> None:
        backend = self._by_platform.get(platform)
        if backend is None:
            log.warning("Cannot notify chat %s: platform %r is not running", chat_id, platform)
            return
        await backend.notify(chat_id, text)
