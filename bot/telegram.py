"""The Telegram backend: python-telegram-bot v22 in, `core.messages` types out.

Everything Telegram-specific lives here and nothing of it leaves: a native message becomes an `IncomingMessage` in
`TelegramBackend._translate`, and every reply goes out through `TelegramBackend._send_text`. What this layer adds
to the bare client, and why:

- start-up retries `getMe` (PTB tries once) and bootstraps polling/webhook with retries, so a bot started during
  a network blip comes up when the network does;
- AIORateLimiter waits out 429s (PTB raises `RetryAfter` into the handler otherwise and the reply is lost), and the
  send path retries, with capped backoff, only what provably never reached Telegram (see `_never_arrived`): a
  read timeout may come after delivery, so it is not repeated. A reply that still fails is reported to the core as
  undelivered with how many of its parts arrived, never dropped silently; a send cut off by shutdown is reported
  as interrupted and left to the next start's recovery (`deliver_reply`);
- updates are handled concurrently (the core queues per user), with "typing…" shown while the model thinks;
- the token is inside every request URL, so nothing logged here is formatted without `_redact`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from telegram import BotCommand, BotCommandScopeChat, InputFile, Message, ReplyParameters, Update
from telegram.constants import ChatAction, ChatType, MessageEntityType, MessageLimit
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
    TimedOut,
)
from telegram.ext import AIORateLimiter, Application, ApplicationBuilder, ContextTypes, ExtBot, MessageHandler, filters

from bot.text import split_message, utf16_length
from core.errors import ConfigError, MagpieError
from core.messages import ADMIN_COMMANDS, COMMANDS, ChatHandler, ChatKind, IncomingMessage, Reply
from core.settings import Settings

__all__ = ["TelegramBackend"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_App = Application[ExtBot[int], ContextTypes.DEFAULT_TYPE, dict[Any, Any], dict[Any, Any], dict[Any, Any], None]

POLL_TIMEOUT_S = 30
"""Long-poll duration of one `getUpdates`; the HTTP read timeout is a little longer."""
TYPING_RENEW_S = 4.0
"""Telegram shows a chat action for 5 s; renewing a little sooner keeps "typing…" steady."""
SEND_ATTEMPTS = 5
STARTUP_ATTEMPTS = 8
BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 8.0
RATE_LIMIT_RETRIES = 3
READ_TIMEOUT_S = 30.0
"""How long a request waits for Telegram's answer; past it, the request may or may not have been carried out."""
_COMMAND = re.compile(r"^/(?P<name>[A-Za-z0-9_]{1,32})(?:@(?P<bot>[A-Za-z0-9_]+))?(?![\w@])")
_WEBHOOK_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")


@dataclass(frozen=True, slots=True)
class _Place:
    """Where a conversation happens: a chat, or one topic of a forum supergroup (topics are separate
    conversations, so each gets its own log and context; the core sees them as chats "<chat id>:<topic id>")."""

    chat_id: int
    thread_id: int | None = None

    @property
    def key(self) -> str:
        return f"{self.chat_id}:{self.thread_id}" if self.thread_id is not None else str(self.chat_id)

    @classmethod
    def of(cls, message: Message) -> _Place:
        return cls(message.chat_id, message.message_thread_id if message.is_topic_message else None)

    @classmethod
    def parse(cls, key: str) -> _Place:
        chat, _, thread = key.partition(":")
        return cls(int(chat), int(thread) if thread else None)


def _build_application(settings: Settings, token: str) -> _App:
    """The one place settings become a PTB Application: where it connects and how patient it is."""
    return (
        ApplicationBuilder()
        .token(token)
        .base_url(settings.telegram_base_url)
        .base_file_url(settings.telegram_base_file_url)
        .rate_limiter(AIORateLimiter(max_retries=RATE_LIMIT_RETRIES))
        .concurrent_updates(True)
        .connect_timeout(10.0)
        .read_timeout(READ_TIMEOUT_S)
        .write_timeout(30.0)
        .pool_timeout(30.0)
        .get_updates_read_timeout(POLL_TIMEOUT_S + 10.0)
        .job_queue(None)
        .build()
    )


class TelegramBackend:
    """A running Telegram bot that hands every message to a `ChatHandler` and delivers its replies."""

    platform = "telegram"

    def __init__(self, *, settings: Settings, handler: ChatHandler, stop_grace_s: float | None = None) -> None:
        if settings.telegram_bot_token is None or not settings.telegram_bot_token.get_secret_value().strip():
            raise ConfigError("TELEGRAM_BOT_TOKEN is not set: get one from @BotFather (see docs/telegram.md).")
        secret = settings.telegram_webhook_secret
        if secret is not None and not _WEBHOOK_SECRET.fullmatch(secret.get_secret_value()):
            raise ConfigError("TELEGRAM_WEBHOOK_SECRET may only use A-Z, a-z, 0-9, _ and - (1 to 256 characters).")
        self._settings = settings
        self._handler = handler
        self._stop_grace_s = settings.shutdown_grace_seconds if stop_grace_s is None else stop_grace_s
        self._token = settings.telegram_bot_token.get_secret_value().strip()
        self._app = _build_application(settings, self._token)
        self._app.add_handler(MessageHandler(filters.StatusUpdate.MIGRATE, self._on_migrate))
        self._app.add_handler(MessageHandler(filters.UpdateType.MESSAGE, self._on_message))
        self._app.add_handler(MessageHandler(filters.UpdateType.EDITED_MESSAGE, self._on_edit))
        self._app.add_error_handler(self._on_error)
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._cancelling = False

    async def start(self) -> None:
        """Connects, fills the command menu, and starts polling (or the webhook server); returns once running."""
        await self._connect()
        try:
            await self._app.start()
            await self._register_commands()
            await self._start_fetching()
        except BaseException:
            await self.stop()
            raise

    async def _start_fetching(self) -> None:
        """Long polling by default; a webhook when TELEGRAM_WEBHOOK_URL is set (it serves that URL's path)."""
        updater = self._app.updater
        url, secret = self._settings.telegram_webhook_url, self._settings.telegram_webhook_secret
        assert updater is not None
        if url:
            assert secret is not None  # Settings refuses a webhook without one
            await updater.start_webhook(
                listen=self._settings.telegram_webhook_listen,
                port=self._settings.telegram_webhook_port,
                url_path=urlsplit(url).path,
                webhook_url=url,
                secret_token=secret.get_secret_value(),
                bootstrap_retries=STARTUP_ATTEMPTS,
            )
        else:
            await updater.start_polling(
                timeout=POLL_TIMEOUT_S, bootstrap_retries=STARTUP_ATTEMPTS, error_callback=self._on_polling_error
            )
        mode = f"webhook on port {self._settings.telegram_webhook_port}" if url else "long polling"
        log.info("Telegram: @%s is up (%s)", self._app.bot.username, mode)

    async def stop(self) -> None:
        """Stops fetching, lets in-flight replies finish for `stop_grace_s`, cancels the rest, and disconnects.

        Updates already fetched are still logged; what is cut off (a message logged but not yet answered, a reply
        written but not yet sent) stays in the database's outbox and is answered by the next start's recovery."""
        updater = self._app.updater
        if updater is not None and updater.running:
            await updater.stop()
        if self._app.running:
            stopping = asyncio.create_task(self._app.stop())
            done, _ = await asyncio.wait({stopping}, timeout=self._stop_grace_s)
            if not done:
                self._cancelling = True
                log.warning("Telegram: cancelling %d replies still running at shutdown", len(self._in_flight))
                for task in list(self._in_flight):
                    task.cancel()
                await stopping
        await self._app.shutdown()
        log.info("Telegram: stopped")

    async def notify(self, chat_id: str, text: str) -> None:
        """Sends unsolicited text (e.g. retraining progress); failures are logged, never raised to the caller."""
        try:
            await self._following_migration(_Place.parse(chat_id), partial(self._send_text, text=text, reply_to=None))
        except (TelegramError, ValueError) as exc:
            log.warning("Telegram: could not notify chat %s: %s", chat_id, self._redact(repr(exc)))

    async def deliver_reply(self, chat_id: str, reply: Reply, *, parts_sent: int = 0) -> None:
        """Delivers a reply the core recovered after a restart into a chat by id ("<chat>:<topic>" for a forum
        topic), from the part after `parts_sent`. It quotes the message it answers, in private chats too: a late
        answer should say what it answers."""
        reply_to = int(reply.reply_to) if reply.reply_to and reply.reply_to.isdigit() else None
        await self._deliver(_Place.parse(chat_id), reply, reply_to, parts_sent)

    # --- receiving ------------------------------------------------------------------------------------------

    async def _on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Hands one new message to the core and delivers its reply (edits and channel posts never get here)."""
        message = update.message
        incoming = self._translate(message) if message is not None else None
        if message is None or incoming is None:
            return
        if self._cancelling:
            log.warning("Telegram: dropping update %s, shutting down", update.update_id)
            return
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            place = _Place.of(message)
            reply = await self._ask_core(place, incoming)
            if reply is not None:
                group = incoming.chat_kind is ChatKind.GROUP
                reply_to = int(reply.reply_to) if group and reply.reply_to and reply.reply_to.isdigit() else None
                if reply.private is not None:
                    await self._deliver_privately(place, _author_place(message), reply, reply_to)
                else:
                    await self._deliver(place, reply, reply_to)
        finally:
            self._in_flight.discard(task)

    async def _on_edit(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A person edited a message: the log follows the edit (an edit is never answered a second time)."""
        message = update.edited_message
        incoming = self._translate(message) if message is not None else None
        if incoming is not None:
            await self._handler.message_edited(self.platform, incoming.chat_id, incoming.message_id, incoming.text)

    async def _on_migrate(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A group became a supergroup (Telegram sends a notice in each): its log moves to the new chat id."""
        message = update.message
        if message is None:
            return
        if message.migrate_to_chat_id is not None:
            old, new = message.chat_id, message.migrate_to_chat_id
        elif message.migrate_from_chat_id is not None:
            old, new = message.migrate_from_chat_id, message.chat_id
        else:
            return
        await self._handler.migrate_chat(self.platform, str(old), str(new))

    def _translate(self, message: Message) -> IncomingMessage | None:
        """The one place a Telegram message becomes an `IncomingMessage`; None for what nobody said to anyone
        (service messages: joins, pins, title changes…) and for unaddressed non-text in groups."""
        if message.text is None and message.effective_attachment is None:
            return None
        private = message.chat.type == ChatType.PRIVATE
        text, mentioned = self._read_text(message) if message.text is not None else (None, False)
        replied_to = message.reply_to_message
        to_me = (
            replied_to is not None and replied_to.from_user is not None and replied_to.from_user.id == self._app.bot.id
        )
        addressed = private or mentioned or to_me
        if text is None and not addressed:
            return None
        if message.sender_chat is not None:  # anonymous group admin or a linked channel speaking as the chat
            author_id, author_name = message.sender_chat.id, message.sender_chat.effective_name or ""
        elif message.from_user is not None:
            author_id, author_name = message.from_user.id, message.from_user.full_name
        else:
            return None
        return IncomingMessage(
            platform=self.platform,
            chat_id=_Place.of(message).key,
            chat_kind=ChatKind.PRIVATE if private else ChatKind.GROUP,
            author_id=str(author_id),
            author_name=author_name,
            text=text,
            message_id=str(message.message_id),
            addressed=addressed,
            sent_at=message.date,
        )

    def _read_text(self, message: Message) -> tuple[str, bool]:
        """The text without this bot's @mentions, with `/cmd@ThisBot` rewritten to `/cmd`, and whether the
        text is meant for this bot (a mention or a command that is not `/cmd@OtherBot`)."""
        assert message.text is not None
        username = (self._app.bot.username or "").lower()
        ours = [
            entity
            for entity, value in message.parse_entities(
                [MessageEntityType.MENTION, MessageEntityType.TEXT_MENTION]
            ).items()
            if value.lower() == f"@{username}" or (entity.user is not None and entity.user.id == self._app.bot.id)
        ]
        text = _cut_utf16(message.text, [(entity.offset, entity.length) for entity in ours])
        command = _COMMAND.match(text)
        if command is None:
            return text, bool(ours)
        target = command.group("bot")
        if target is None or target.lower() == username:
            return f"/{command.group('name')}{text[command.end() :]}", True
        return text, bool(ours)

    async def _ask_core(self, place: _Place, incoming: IncomingMessage) -> Reply | None:
        """Awaits the core's answer, showing "typing…" meanwhile when an answer is expected."""
        if incoming.text is None or not incoming.addressed:
            return await self._handler.handle(incoming)
        done = asyncio.Event()
        typing = asyncio.create_task(self._keep_typing(place, done))
        try:
            return await self._handler.handle(incoming)
        finally:
            done.set()
            # Let a typing request in flight land first: one arriving after the reply would show "typing…" again.
            try:
                await asyncio.wait_for(typing, timeout=2.0)
            except TimeoutError:
                log.debug("Telegram: typing indicator for chat %s cancelled", place.key)

    async def _keep_typing(self, place: _Place, done: asyncio.Event) -> None:
        """Sends "typing…" at once and every TYPING_RENEW_S until `done`; it is cosmetic, so failures only log."""
        while not done.is_set():
            try:
                bot = self._app.bot
                await bot.send_chat_action(place.chat_id, ChatAction.TYPING, message_thread_id=place.thread_id)
            except TelegramError as exc:
                log.debug("Telegram: typing indicator failed: %s", self._redact(repr(exc)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=TYPING_RENEW_S)

    # --- sending --------------------------------------------------------------------------------------------

    async def _deliver(self, place: _Place, reply: Reply, reply_to: int | None, parts_sent: int = 0) -> None:
        """Sends a reply (from the part after `parts_sent`) and tells the core whether it arrived and how far it
        got, so that no reply is ever lost silently and a later re-send repeats no part that arrived."""
        sent: list[str] = []  # the ids of the text parts this call delivered, kept as they arrive
        try:
            # In the supergroup the answered message has another id: a reply there answers nothing.
            ids = await self._following_migration(
                place,
                lambda target: self._send_reply(target, reply, reply_to if target == place else None, sent, parts_sent),
            )
        except Exception as exc:  # retries exhausted, or a bug: either way the core must hear of it
            reason = self._redact(f"{type(exc).__name__}: {exc}")
            if isinstance(exc, NetworkError) and not isinstance(exc, BadRequest) and not _never_arrived(exc):
                reason = f"unconfirmed, may have arrived, so not sent again ({reason})"
            log.error("Telegram: reply %s to chat %s undelivered: %s", reply.log_id, place.key, reason)
            if not isinstance(exc, TelegramError):
                self._log_exception(f"sending reply {reply.log_id}", exc)
            await self._handler.mark_undelivered(reply, reason, parts_sent=parts_sent + len(sent))
            return
        except asyncio.CancelledError:
            await self._handler.mark_interrupted(reply, parts_sent=parts_sent + len(sent))
            raise
        await self._handler.mark_delivered(reply, ids)

    async def _deliver_privately(
        self, place: _Place, author: _Place | None, reply: Reply, reply_to: int | None
    ) -> None:
        """The author's own data goes to their private chat with the bot (its id is theirs), then `place` gets the
        reply's note. A bot cannot write first to someone who never started it (403), nor to an anonymous admin
        or a channel: then nothing personal is sent anywhere and `place` is told how to ask privately."""
        assert reply.private is not None
        personal = Reply(reply.private.text, attachment=reply.private.attachment)
        try:
            if author is None:
                raise _Unreachable("the author speaks as a chat, not as a person")
            await self._send_reply(author, personal, None)
        except asyncio.CancelledError:
            await self._handler.mark_undelivered(reply, "cancelled at shutdown")
            raise
        except Exception as exc:
            if not _cannot_reach(exc):  # retries exhausted: nothing reached anyone, as for any undelivered reply
                await self._handler.mark_undelivered(reply, self._redact(f"{type(exc).__name__}: {exc}"))
                return
            log.info("Telegram: reply %s cannot reach its author privately: %s", reply.log_id, self._redact(str(exc)))
            await self._deliver(
                place, await self._handler.private_unreachable(reply, self._redact(f"Telegram: {exc}")), reply_to
            )
            return
        await self._deliver(place, replace(reply, private=None), reply_to)

    async def _following_migration(self, place: _Place, send: Callable[[_Place], Awaitable[T]]) -> T:
        """Sends to `place`, or, when that group has become a supergroup, moves its log and sends there (a basic
        group has no topics, so the new place is the whole supergroup)."""
        try:
            return await send(place)
        except ChatMigrated as moved:
            new_place = _Place(int(moved.new_chat_id))
            await self._handler.migrate_chat(self.platform, place.key, new_place.key)
            return await send(new_place)

    async def _send_reply(
        self, place: _Place, reply: Reply, reply_to: int | None, sent: list[str] | None = None, parts_sent: int = 0
    ) -> list[str]:
        """The reply's text (split as needed, the parts after `parts_sent`) and its attachment, if any; the
        platform ids of what was sent."""
        ids = list(await self._send_text(place, text=reply.text, reply_to=reply_to, sent=sent, skip=parts_sent))
        if reply.attachment is not None:
            document = InputFile(reply.attachment.content, filename=reply.attachment.filename)
            send = partial(self._app.bot.send_document, place.chat_id, document, message_thread_id=place.thread_id)
            document_message = await self._retrying(send)
            ids.append(str(document_message.message_id))
        return ids

    async def _send_text(
        self, place: _Place, *, text: str, reply_to: int | None, sent: list[str] | None = None, skip: int = 0
    ) -> list[str]:
        """The send path: splits at paragraph/sentence/word boundaries within 4096 UTF-16 units; the first part
        answers `reply_to` (still sent, into the same topic, if that message was deleted meanwhile).

        The parts start after `skip` plus those already in `sent`; each part's id is appended to `sent` as soon
        as Telegram confirms it, so a caller whose send failed part-way knows how many parts arrived."""
        ids: list[str] = [] if sent is None else sent
        start = skip + len(ids)
        for part in split_message(text, MessageLimit.MAX_TEXT_LENGTH, utf16_length)[start:]:
            first = start == 0 and not ids
            answer = ReplyParameters(reply_to, allow_sending_without_reply=True) if reply_to and first else None
            send = partial(
                self._app.bot.send_message, place.chat_id, part, reply_parameters=answer,
                message_thread_id=place.thread_id,
            )  # fmt: skip
            message = await self._retrying(send)
            ids.append(str(message.message_id))
        return ids

    async def _retrying(
        self, call: Callable[[], Awaitable[T]], attempts: int = SEND_ATTEMPTS, *, repeatable: bool = False
    ) -> T:
        """Retries failed requests with capped, jittered backoff: any network error or 5xx for a `repeatable`
        call (one that does the same thing twice, such as getMe), otherwise only what provably never reached
        Telegram, so that a retry can never post a message twice. 429s rarely get here (AIORateLimiter waits them
        out underneath), and a 400 is final: retrying can't fix it."""
        delay = BACKOFF_FIRST_S
        for attempt in range(1, attempts):
            try:
                return await call()
            except BadRequest:
                raise
            except (NetworkError, RetryAfter) as exc:
                if not repeatable and not _never_arrived(exc):
                    raise
                log.warning("Telegram: request failed (%s), retry %d of %d", self._redact(str(exc)), attempt, attempts)
            await asyncio.sleep(delay * random.uniform(0.75, 1.0))
            delay = min(delay * 2, BACKOFF_CAP_S)
        return await call()

    # --- start-up and errors --------------------------------------------------------------------------------

    async def _connect(self) -> None:
        """Initializes the Application (`getMe`) with retries: PTB itself tries once."""
        rejected, failure = False, ""
        try:
            await self._retrying(self._app.initialize, attempts=STARTUP_ATTEMPTS, repeatable=True)
            return
        except InvalidToken:  # its message contains the token: raised below, so not even chained
            rejected = True
        except NetworkError as exc:
            failure = self._redact(str(exc))
        await self._app.bot.shutdown()
        if rejected:
            raise ConfigError("Telegram rejected TELEGRAM_BOT_TOKEN: check it with @BotFather.")
        host = urlsplit(self._settings.telegram_base_url).netloc
        raise MagpieError(f"Cannot reach the Telegram Bot API at {host}: {failure}")

    async def _register_commands(self) -> None:
        """Fills Telegram's "/" menu: user commands for everyone, and all commands in each admin's private chat."""
        everyone = [BotCommand(name, text) for name, text in COMMANDS.items() if name not in ADMIN_COMMANDS]
        admins = [BotCommand(name, text) for name, text in COMMANDS.items()]
        admin_ids = sorted(
            int(item.partition(":")[2]) for item in self._settings.admin_ids if item.startswith("telegram:")
        )
        scopes: list[BotCommandScopeChat | None] = [None, *(BotCommandScopeChat(ident) for ident in admin_ids)]
        for scope in scopes:
            try:
                commands = admins if scope else everyone
                await self._retrying(partial(self._app.bot.set_my_commands, commands, scope=scope), repeatable=True)
            except TelegramError as exc:  # the menu is a convenience: never a reason not to start
                where = f"admin chat {scope.chat_id}" if scope else "everyone"
                log.warning("Telegram: command menu for %s not set: %s", where, self._redact(str(exc)))

    def _on_polling_error(self, error: TelegramError) -> None:
        """getUpdates failed; PTB retries it forever with backoff, so one line per failure, not a traceback."""
        log.warning("Telegram: polling failed (%s); retrying", self._redact(str(error)))

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """The one error handler: logs what a handler let escape, with the update id and never the token."""
        update_id = update.update_id if isinstance(update, Update) else None
        self._log_exception(f"update {update_id}", context.error)

    def _log_exception(self, what: str, error: BaseException | None) -> None:
        """Logs a traceback as text, redacted: `exc_info` would be formatted later, past `_redact`."""
        trace = "".join(traceback.format_exception(error)) if error is not None else "(no exception)"
        log.error("Telegram: %s failed:\n%s", what, self._redact(trace))

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "<TELEGRAM_BOT_TOKEN>")


class _Unreachable(Exception):
    """The author of a message has no private chat the bot may write to."""


def _cannot_reach(exc: Exception) -> bool:
    """Telegram's ways of saying "this person cannot be written to": 403 (never started the bot, blocked it,
    deactivated) or, for an id Telegram does not know as a chat, 400 "chat not found"."""
    if isinstance(exc, Forbidden | _Unreachable):
        return True
    return isinstance(exc, BadRequest) and "chat not found" in exc.message.lower()


def _author_place(message: Message) -> _Place | None:
    """Where the author of `message` can be written to alone: their private chat with the bot, whose id is their
    user id; None for an anonymous admin or a channel speaking as a chat (their "id" is a group's or channel's)."""
    if message.sender_chat is not None or message.from_user is None or message.from_user.is_bot:
        return None
    return _Place(message.from_user.id)


def _never_arrived(exc: BaseException) -> bool:
    """Whether a failed request provably never reached Telegram's API, so that sending it again cannot post it twice.

    PTB raises `NetworkError` (`TimedOut` for timeouts) for transport failures and bad HTTP statuses alike; what
    tells them apart is the exception it chains as `__cause__`:

    - `httpx.ConnectError`, `ConnectTimeout`, `PoolTimeout`: no connection, so nothing was sent;
    - `RetryAfter` (429): Telegram refused the request without carrying it out;
    - a `TelegramError` cause: PTB could not parse the body of an error status, so the answer came from Telegram's
      front-end proxy (a 502/503 page), not from the Bot API: the request was not processed.

    Everything else is in doubt: a read or write timeout, a connection dropped before the answer, or a 5xx that the
    Bot API itself explained may all come after the message was delivered.
    """
    if isinstance(exc, RetryAfter):
        return True
    cause = exc.__cause__
    if isinstance(exc, TimedOut):
        return isinstance(cause, httpx.ConnectTimeout | httpx.PoolTimeout)
    if isinstance(exc, NetworkError):
        return isinstance(cause, httpx.ConnectError | TelegramError)
    return False


def _cut_utf16(text: str, spans: list[tuple[int, int]]) -> str:
    """Removes (offset, length) spans counted in UTF-16 units, as Telegram's entities are, and tidies the seams
    ("@Magpie, how are you?" -> "how are you?")."""
    units = text.encode("utf-16-le")
    pieces, cursor = [], 0
    for offset, length in sorted(spans):
        pieces.append(units[cursor * 2 : offset * 2].decode("utf-16-le"))
        cursor = offset + length
    pieces.append(units[cursor * 2 :].decode("utf-16-le"))
    kept = [pieces[0].strip()] + [piece.lstrip(" ,:;").strip() for piece in pieces[1:]]
    return " ".join(piece for piece in kept if piece)
