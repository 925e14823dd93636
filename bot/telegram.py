"""The Telegram backend: python-telegram-bot v22 in, `core.chat.messages` types out.

Everything Telegram-specific lives here (and, for how requests are made and retried, in `bot/telegram_requests.py`)
and nothing of it leaves: a native message becomes an `IncomingMessage` in `TelegramBackend._translate`, and the
shared conversation loop (`bot.backend.ChatBackend`) does the rest, sending each part through `_send_part`. What
this layer adds to the bare client and the loop, and why:

- start-up retries `getMe` (PTB tries once) and bootstraps polling/webhook with retries, so a bot started during
  a network blip comes up when the network does;
- a send is retried only when it provably never reached Telegram (`telegram_requests.never_arrived`): a read
  timeout may come after delivery, so it is not repeated;
- forum topics are conversations of their own ("<chat id>:<topic id>"), a group that became a supergroup takes
  its log along (`_on_migrate`, `_redirect`), and the author of an /export in a group is written to in their
  private chat, which Telegram refuses (403) when they never started the bot;
- updates are handled concurrently (the core queues per user);
- the token is inside every request URL, so nothing logged here is formatted without `_redact`.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
from dataclasses import dataclass, replace
from functools import partial

from telegram import InputFile, Message, ReplyParameters, Update
from telegram.constants import ChatAction, ChatMemberStatus, ChatType, MessageEntityType, MessageLimit
from telegram.error import BadRequest, ChatMigrated, Forbidden, TelegramError
from telegram.ext import ChatMemberHandler, ContextTypes, MessageHandler, filters

from bot import telegram_requests as requests
from bot.backend import ChatBackend, Part, Route
from bot.text import split_message, utf16_length
from core.chat.commands import parse_command
from core.chat.consent import platform_id
from core.chat.messages import Arrival, ChatHandler, ChatKind, IncomingMessage, Reply
from core.errors import ConfigError
from core.ops.telemetry import Telemetry
from core.settings import Settings

__all__ = ["TelegramBackend"]

log = logging.getLogger(__name__)

_COMMAND = re.compile(r"^/(?P<name>[A-Za-z0-9_]{1,32})(?:@(?P<bot>[A-Za-z0-9_]+))?(?![\w@])")
_WEBHOOK_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")
_GROUP_ADMINS = frozenset({ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER})
_PRESENT = frozenset({ChatMemberStatus.MEMBER, ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.RESTRICTED})
POLLING_HEALTH_WINDOW_S = 60.0
"""After a failed getUpdates, how long `/healthz` reports Telegram as not connected (PTB retries with a backoff of
at most 30 s, so a lasting failure keeps it there; it turns healthy a minute after the last failure)."""


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


@dataclass(frozen=True, slots=True)
class _Target:
    """A place to send to, and whether a reply's first part quotes the message it answers there (in groups, and
    for late answers; in the supergroup a moved group became, the answered message has another id)."""

    place: _Place
    quotes: bool = False


class TelegramBackend(ChatBackend[_Target]):
    """A running Telegram bot that hands every message to a `ChatHandler` and delivers its replies."""

    platform = "telegram"
    title = "Telegram"
    message_limit = MessageLimit.MAX_TEXT_LENGTH
    typing_renew_s = 4.0
    """Telegram shows a chat action for 5 s; renewing a little sooner keeps "typing…" steady."""
    send_errors = (TelegramError,)

    def __init__(
        self,
        *,
        settings: Settings,
        handler: ChatHandler,
        stop_grace_s: float | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        if settings.telegram_bot_token is None or not settings.telegram_bot_token.get_secret_value().strip():
            raise ConfigError("TELEGRAM_BOT_TOKEN is not set: get one from @BotFather (see docs/telegram.md).")
        secret = settings.telegram_webhook_secret
        if secret is not None and not _WEBHOOK_SECRET.fullmatch(secret.get_secret_value()):
            raise ConfigError("TELEGRAM_WEBHOOK_SECRET may only use A-Z, a-z, 0-9, _ and - (1 to 256 characters).")
        grace = settings.shutdown_grace_seconds if stop_grace_s is None else stop_grace_s
        super().__init__(
            handler=handler, stop_grace_s=grace, typing_after_s=settings.typing_after_ms / 1000,
            send_queue_limit=settings.send_queue_limit, telemetry=telemetry,
        )  # fmt: skip
        self._settings = settings
        self._polling_failed_at: float | None = None
        self._token = settings.telegram_bot_token.get_secret_value().strip()
        self._app = requests.build_application(settings, self._token)
        self._app.add_handler(MessageHandler(filters.StatusUpdate.MIGRATE, self._on_migrate))
        self._app.add_handler(MessageHandler(filters.UpdateType.MESSAGE, self._on_message))
        self._app.add_handler(MessageHandler(filters.UpdateType.EDITED_MESSAGE, self._on_edit))
        self._app.add_handler(ChatMemberHandler(self._on_my_membership, ChatMemberHandler.MY_CHAT_MEMBER))
        self._app.add_error_handler(self._on_error)

    # --- connecting and disconnecting -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connects, fills the command menu, and starts polling (or the webhook server); returns once running."""
        await requests.connect(self._app, self._settings, self._redact)
        try:
            await self._app.start()
            await requests.register_commands(self._app, self._settings, self._redact)
            await requests.start_fetching(self._app, self._settings, self._on_polling_error)
        except BaseException:
            await self.stop()
            raise

    @property
    def connected(self) -> bool:
        """Receiving updates, and no failed getUpdates within the last `POLLING_HEALTH_WINDOW_S`."""
        updater = self._app.updater
        if not self._app.running or updater is None or not updater.running:
            return False
        failed_at = self._polling_failed_at
        return failed_at is None or time.monotonic() - failed_at > POLLING_HEALTH_WINDOW_S

    async def _stop_receiving(self) -> None:
        """Stops fetching: updates already fetched are still handled (and logged) within the grace."""
        updater = self._app.updater
        if updater is not None and updater.running:
            await updater.stop()

    async def _drain(self) -> None:
        if self._app.running:  # PTB's stop handles the updates already fetched and waits for their handlers
            await self._app.stop()
        await super()._drain()

    async def _disconnect(self) -> None:
        await self._app.shutdown()

    # --- receiving ------------------------------------------------------------------------------------------

    async def _on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Hands one new message to the conversation loop (edits and channel posts never get here)."""
        message = update.message
        incoming = self._translate(message) if message is not None else None
        if message is None or incoming is None:
            return
        if _decides_for_group(incoming) and not incoming.as_chat and message.from_user is not None:
            incoming = replace(incoming, chat_admin=await self._is_group_admin(message.chat_id, message.from_user.id))
        chat = _Target(_Place.of(message), quotes=incoming.chat_kind is ChatKind.GROUP)
        author = _author_place(message)
        await self.converse(incoming, Route(chat, author=_Target(author) if author else None, typing=chat))

    async def _is_group_admin(self, chat_id: int, user_id: int) -> bool:
        """Asked at the moment it matters (getChatMember): an admin demoted a minute ago is no longer one."""
        try:
            member = await requests.retrying(
                partial(self._app.bot.get_chat_member, chat_id, user_id), self._redact, repeatable=True
            )
        except TelegramError as exc:
            log.warning("Telegram: could not check whether %s is an admin of %s: %s", user_id, chat_id, exc)
            return False
        return member.status in _GROUP_ADMINS

    async def _on_my_membership(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """The bot was added to a group (my_chat_member): it says what it logs, or why it leaves."""
        change = update.my_chat_member
        if change is None or change.chat.type not in (ChatType.GROUP, ChatType.SUPERGROUP):
            return
        if change.old_chat_member.status in _PRESENT or change.new_chat_member.status not in _PRESENT:
            return  # a promotion, a demotion, or the bot leaving: not an arrival
        arrival = Arrival(self.platform, f"{self.platform}:{change.chat.id}", language=change.from_user.language_code)
        with self.tracked() as accepted:
            if accepted:
                await self.arrived(arrival, _Target(_Place(change.chat.id)))

    async def _leave(self, community: str) -> None:
        leave = partial(self._app.bot.leave_chat, int(platform_id(community)))
        await requests.retrying(leave, self._redact, repeatable=True)

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
        language = None  # a chat speaking as itself has no language; a person's app reports theirs
        # Only a group's admins may speak as the group itself (a linked channel's posts are not theirs).
        anonymous_admin = message.sender_chat is not None and message.sender_chat.id == message.chat_id
        if message.sender_chat is not None:  # anonymous group admin or a linked channel speaking as the chat
            author_id, author_name = message.sender_chat.id, message.sender_chat.effective_name or ""
        elif message.from_user is not None:
            author_id, author_name = message.from_user.id, message.from_user.full_name
            language = message.from_user.language_code
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
            language=language,
            # A group's voice: every topic of a forum is its group's; a private chat belongs to no community.
            community=None if private else f"{self.platform}:{message.chat_id}",
            chat_admin=anonymous_admin,
            as_chat=message.sender_chat is not None,
            reply_to_message_id=_replied_to_id(message),
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

    # --- sending: what the conversation loop asks of Telegram -----------------------------------------------

    def _length(self, text: str) -> int:
        return utf16_length(text)  # Telegram's limit counts UTF-16 code units

    def _parts(self, reply: Reply) -> list[Part]:
        """The text within 4096 UTF-16 units a part, then the attachment as a document of its own."""
        parts = [Part(text) for text in split_message(reply.text, MessageLimit.MAX_TEXT_LENGTH, utf16_length)]
        return parts if reply.attachment is None else [*parts, Part("", reply.attachment)]

    async def _send_part(self, target: _Target, part: Part, *, quote: str | None) -> str:
        """One message (or document) into the target's chat or topic; a quoted message deleted meanwhile does
        not stop the reply."""
        place = target.place
        if part.attachment is not None:
            document = InputFile(part.attachment.content, filename=part.attachment.filename)
            send = partial(self._app.bot.send_document, place.chat_id, document, message_thread_id=place.thread_id)
        else:
            reply_to = int(quote) if target.quotes and quote is not None and quote.isdigit() else None
            answer = ReplyParameters(reply_to, allow_sending_without_reply=True) if reply_to else None
            send = partial(
                self._app.bot.send_message, place.chat_id, part.text, reply_parameters=answer,
                message_thread_id=place.thread_id,
            )  # fmt: skip
        message = await requests.retrying(send, self._redact)
        return str(message.message_id)

    async def _show_typing(self, target: _Target) -> None:
        place = target.place
        await self._app.bot.send_chat_action(place.chat_id, ChatAction.TYPING, message_thread_id=place.thread_id)

    def _recovery_target(self, chat_id: str) -> _Target:
        """A chat by id ("<chat>:<topic>" for a forum topic); a late answer quotes its message, in private chats
        too: it should say what it answers."""
        return _Target(_Place.parse(chat_id), quotes=True)

    async def _redirect(self, target: _Target, error: Exception) -> _Target | None:
        """A group that became a supergroup: its log moves, and the rest of the reply goes there (a basic group
        has no topics, so the new place is the whole supergroup)."""
        if not isinstance(error, ChatMigrated):
            return None
        new_place = _Place(int(error.new_chat_id))
        await self._handler.migrate_chat(self.platform, target.place.key, new_place.key)
        return _Target(new_place)

    def _unreachable(self, error: Exception) -> bool:
        """Telegram's ways of saying "this person cannot be written to": 403 (never started the bot, blocked it,
        deactivated) or, for an id Telegram does not know as a chat, 400 "chat not found"."""
        if isinstance(error, Forbidden):
            return True
        return isinstance(error, BadRequest) and "chat not found" in error.message.lower()

    def _failure_reason(self, error: BaseException) -> str:
        return requests.failure_reason(error, self._redact)

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "<TELEGRAM_BOT_TOKEN>")

    # --- errors -----------------------------------------------------------------------------------------------

    def _on_polling_error(self, error: TelegramError) -> None:
        """getUpdates failed; PTB retries it forever with backoff, so one line per failure, not a traceback."""
        self._polling_failed_at = time.monotonic()
        log.warning("Telegram: polling failed (%s); retrying", self._redact(str(error)))

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """The one error handler: logs what a handler let escape, with the update id and never the token (as
        text: `exc_info` would be formatted later, past `_redact`)."""
        update_id = update.update_id if isinstance(update, Update) else None
        error = context.error
        trace = "".join(traceback.format_exception(error)) if error is not None else "(no exception)"
        log.error("Telegram: update %s failed:\n%s", update_id, self._redact(trace))


def _decides_for_group(incoming: IncomingMessage) -> bool:
    """A command for a group's own admins (`/learning off|on`) with an argument, in a group: the one kind of
    message whose author's admin status must be asked for."""
    command = parse_command(incoming.text) if incoming.chat_kind is ChatKind.GROUP else None
    spec = command.spec if command is not None else None
    return spec is not None and spec.chat_admin and command is not None and bool(command.args)


def _author_place(message: Message) -> _Place | None:
    """Where the author of `message` can be written to alone: their private chat with the bot, whose id is their
    user id; None for an anonymous admin or a channel speaking as a chat (their "id" is a group's or channel's)."""
    if message.sender_chat is not None or message.from_user is None or message.from_user.is_bot:
        return None
    return _Place(message.from_user.id)


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


def _replied_to_id(message: Message) -> str | None:
    """The id of the message this one replies to. In a forum topic every message "replies" to the topic's first
    message unless the person picked another: that implicit link says nothing about what it answers."""
    replied_to = message.reply_to_message
    if replied_to is None or (message.is_topic_message and replied_to.message_id == message.message_thread_id):
        return None
    return str(replied_to.message_id)
