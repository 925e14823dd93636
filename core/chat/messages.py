"""Platform-neutral message types: what adapters hand to the core and what they get back.

Adapters translate a native event into an `IncomingMessage` in one place, call `ChatHandler.handle`, and send the
`Reply` through their own send path. Nothing in here knows Telegram or Discord.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from core.i18n import N_


class ChatKind(StrEnum):
    """Whether everyone in the chat is talking to the bot (private) or to each other (group)."""

    PRIVATE = "private"
    GROUP = "group"


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """One message as the core sees it.

    Ids are strings so that every platform fits (Telegram and Discord ids are numeric, the console's is not).
    `text` is None for non-text content (stickers, photos…), which gets a short note instead of silence.
    `addressed` is the adapter's verdict on "was this meant for the bot" (mention, reply to the bot, slash
    command); private chats are always addressed. `language` is the person's language tag as the platform gives
    it (`ko`, `en-US`, `ko_KR.UTF-8`; None when it says nothing): the core answers in it when it has a catalogue for
    it (`core.i18n`), else in English.

    The last three are the adapter's answers to questions only the platform can settle: `community` is the group
    the chat belongs to (below), which ALLOWED_CHATS and `/learning` are about too; `chat_admin` is whether the
    author may decide for that group (Telegram: administrator or creator, asked with getChatMember when it
    matters; Discord: Manage Server); `as_chat` is a message sent as the chat itself (Telegram's anonymous admins,
    a linked channel): its author id is shared by everyone who may speak as that chat, so it names no one person.
    """

    platform: str
    chat_id: str
    chat_kind: ChatKind
    author_id: str
    author_name: str
    text: str | None
    message_id: str
    addressed: bool = False
    sent_at: datetime | None = None
    language: str | None = None
    community: str | None = None
    """Whose voice answers and learns from this chat (VOICE_SCOPE=community), decided once by the adapter that
    translates the event: `telegram:<group id>` (forum topics are their group's), `discord:<guild id>` (every
    channel and thread of the server), `console`; None in a private chat, which belongs to no community."""
    chat_admin: bool = False
    as_chat: bool = False

    reply_to_message_id: str | None = None
    """The platform id of the message this one replies to in the same chat (a Telegram reply, a Discord
    reference), None when it replies to nothing: training takes it as the line this one answers."""


@dataclass(frozen=True, slots=True)
class Arrival:
    """The bot was added to a group: `community` as on `IncomingMessage`, `language` the best guess at the
    group's (the person who added the bot, the guild's preferred locale; None: English)."""

    platform: str
    community: str
    language: str | None = None


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file to send with a reply (e.g. `/export`)."""

    filename: str
    content: bytes
    mime_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class Private:
    """The part of a reply that is its author's own data (an export): for their eyes only.

    An adapter delivers it where nobody else can read it (the author's private chat with the bot, a DM, an
    ephemeral answer) and shows the chat the command came from only the reply's `text`, a note saying where it
    went. When the author cannot be reached privately (they never started a chat with the bot, or refuse DMs),
    none of it is sent anywhere: the adapter hands the reply to `ChatHandler.private_unreachable`, which answers
    with `unreachable`, the note that tells the author how to ask privately instead.
    """

    text: str
    attachment: Attachment | None = None
    unreachable: str = N_("I can't reach you privately. Send me that command in a private chat instead.")


@dataclass(frozen=True, slots=True)
class Reply:
    """What the bot answers. `log_id` names the stored bot message, for delivery bookkeeping.

    `text` and `attachment` go to the chat the message came from; `private`, when set, goes to the author alone
    (see `Private`). The core sets it only outside private chats: in a private chat everything is private already.
    """

    text: str
    reply_to: str | None = None
    attachment: Attachment | None = None
    log_id: int | None = None
    private: Private | None = None
    leave: bool = False
    """The chat is outside ALLOWED_CHATS: after sending `text`, the adapter leaves it where the platform lets a
    bot leave (a Telegram group, a Discord guild)."""


class ChatHandler(Protocol):
    """What an adapter needs from the core."""

    async def handle(self, message: IncomingMessage, *, busy: bool = False) -> Reply | None:
        """Logs the message and returns the reply, or None when the bot should stay quiet. `busy`: the adapter's
        replies already queue for the platform, so an answer would arrive late; the message is logged and
        commands run as usual, but what would be a model answer is the short busy note instead."""
        ...

    async def mark_delivered(self, reply: Reply, platform_message_ids: list[str]) -> None:
        """Records that a reply reached the platform (and under which ids)."""
        ...

    async def mark_undelivered(self, reply: Reply, reason: str, *, parts_sent: int = 0) -> None:
        """Records that a reply could not be delivered (and how many of its parts did), so it is never lost
        silently."""
        ...

    async def mark_interrupted(self, reply: Reply, *, parts_sent: int) -> None:
        """Records that shutdown cut a send off after `parts_sent` parts: the reply is left for recovery."""
        ...

    async def private_unreachable(self, reply: Reply, reason: str) -> Reply:
        """The author of a reply with a `private` part cannot be reached privately: records that reply as
        undelivered and returns the note to show the chat instead (logged as a reply of its own)."""
        ...

    async def message_edited(self, platform: str, chat_id: str, message_id: str, text: str | None) -> None:
        """A person edited a message the bot may have logged: the log follows the edit."""
        ...

    async def message_deleted(self, platform: str, chat_id: str, message_id: str) -> None:
        """A person deleted a message on the platform: it leaves the log too."""
        ...

    async def migrate_chat(self, platform: str, old_chat_id: str, new_chat_id: str) -> None:
        """The platform moved a chat to a new id (a Telegram group became a supergroup): keep its history."""
        ...

    async def joined(self, arrival: Arrival) -> Reply | None:
        """The bot was added to a group: what to say there (what it logs and how to opt out, or, outside
        ALLOWED_CHATS, why it leaves; then `Reply.leave` is set), or None to say nothing."""
        ...


class Notifier(Protocol):
    """Pushes unsolicited text to a chat (retraining progress, outcomes)."""

    async def notify(self, platform: str, chat_id: str, text: str) -> None:
        """Sends `text` to `chat_id` on `platform`; failures are logged by the implementation, not raised."""
        ...
