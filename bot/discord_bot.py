"""The Discord backend: gateway events become `IncomingMessage`s for the shared conversation loop
(`bot.backend.ChatBackend`), which answers, splits, sends and records; the connection itself is
`bot/discord_client.py`'s.

What a Discord user gets: every DM is answered; in servers (channels and threads) every text message is logged but
answered only when it mentions the bot, replies to it, or is a slash command (deferred, then answered by
follow-up; ephemeral in a server for the commands whose answer is personal data). Other bots are never answered
(no bot loops), replies never ping @everyone, @here, roles or users from generated text, and long replies are
split at 2,000 characters. Rate limits (429) and gateway reconnects/resumes are discord.py's job. Edits and
deletions arrive as raw events (they may predate the cache) and the log follows them.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import replace
from datetime import datetime

import aiohttp
import discord

from bot import discord_client
from bot.backend import ChatBackend, Part, Route
from bot.discord_commands import NO_MENTIONS, ChannelDestination, Destination, Followups
from core.chat.commands import parse_command
from core.chat.consent import platform_id
from core.chat.messages import Arrival, ChatHandler, ChatKind, IncomingMessage
from core.ops.telemetry import Telemetry
from core.settings import Settings

__all__ = ["DiscordBackend", "to_incoming"]

log = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000
_USER_MENTION = re.compile(r"<@!?(\d+)>")
_CHAT_TYPES = frozenset({discord.MessageType.default, discord.MessageType.reply})
_SEND_ERRORS = (discord.HTTPException, aiohttp.ClientError, OSError, asyncio.TimeoutError)
CANNOT_DM = 50007
"""Discord's code for "Cannot send messages to this user" (DMs closed, or the bot blocked)."""


class DiscordBackend(ChatBackend[Destination]):
    """Magpie on Discord: `start` connects and returns once the gateway session is ready; events go through the
    conversation loop, which sends through `_send_part`; `stop` (the loop's) lets replies finish, then closes."""

    platform = PLATFORM
    title = "Discord"
    message_limit = MESSAGE_LIMIT
    typing_renew_s = 5.0
    """Discord shows "typing…" for 10 s; discord.py renews it every 5."""
    send_errors = _SEND_ERRORS

    def __init__(
        self,
        *,
        settings: Settings,
        handler: ChatHandler,
        ready_timeout: float = 60.0,
        guild_ready_timeout: float = 2.0,
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__(
            handler=handler, stop_grace_s=settings.shutdown_grace_seconds,
            typing_after_s=settings.typing_after_ms / 1000, send_queue_limit=settings.send_queue_limit,
            telemetry=telemetry,
        )  # fmt: skip
        self._settings = settings
        self._ready_timeout = ready_timeout
        self._guild_ready_timeout = guild_ready_timeout
        self._client: discord_client.MagpieClient | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Logs in, syncs the slash commands and waits for READY; raises a clear error instead of hanging."""
        self._client, self._task = await discord_client.connect(
            self._settings, self, ready_timeout=self._ready_timeout, guild_ready_timeout=self._guild_ready_timeout
        )

    @property
    def connected(self) -> bool:
        """Ready and with an open gateway connection (false while discord.py reconnects)."""
        return self._client is not None and discord_client.is_connected(self._client)

    async def _disconnect(self) -> None:
        client, task = self._client, self._task
        self._client = self._task = None
        if client is not None and task is not None:
            await discord_client.disconnect(client, task)

    # --- events -----------------------------------------------------------------------------------------------

    async def on_message(self, message: discord.Message, me: discord.ClientUser) -> None:
        """Every text message is logged through the core; the ones addressed to the bot are answered in their
        channel (in a server as a reply, "typing…" meanwhile), a private part by DM."""
        incoming = to_incoming(message, me)
        if incoming is None:
            return
        group = incoming.chat_kind is ChatKind.GROUP
        channel = ChannelDestination(message.channel, channel_id=message.channel.id, quotes=group)
        await self.converse(incoming, Route(channel, author=ChannelDestination(message.author), typing=channel))

    async def on_edit(self, message: discord.Message, me: discord.ClientUser) -> None:
        """A person edited a message: the log follows the edit; it is never answered again."""
        incoming = to_incoming(message, me)
        if incoming is not None:
            await self._handler.message_edited(PLATFORM, incoming.chat_id, incoming.message_id, incoming.text)

    async def on_delete(self, channel_id: int, message_ids: list[int]) -> None:
        """A person (or a moderator's purge) deleted messages: they leave the log, and future training, too."""
        for message_id in message_ids:
            await self._handler.message_deleted(PLATFORM, str(channel_id), str(message_id))

    async def on_guild_join(self, guild: discord.Guild) -> None:
        """Added to a server: the greeting goes to its system channel when the bot may write there (else it is
        not said), in the server's preferred language; outside ALLOWED_CHATS the bot says why and leaves."""
        channel = guild.system_channel
        writable = channel is not None and channel.permissions_for(guild.me).send_messages
        target = ChannelDestination(channel, mentions=NO_MENTIONS) if channel is not None and writable else None
        with self.tracked() as accepted:
            if accepted:
                await self.arrived(Arrival(PLATFORM, f"{PLATFORM}:{guild.id}", guild.preferred_locale.value), target)

    async def _leave(self, community: str) -> None:
        if self._client is not None:
            await self._client.http.leave_guild(int(platform_id(community)))

    async def run_command(self, interaction: discord.Interaction, text: str) -> None:
        """A slash command: defers first (generation can outlast Discord's 3-second window), then answers by
        follow-up.

        Whether the answer is ephemeral is fixed by the defer, before the core has answered: in a server, the
        commands whose answer is personal data (`private` in the command registry) are deferred ephemerally, and
        that answer goes to the user alone. A personal answer to anything else goes by DM, with a note in the channel.
        """
        with self.exchange() as accepted:
            if not accepted:
                return
            command = parse_command(text)
            spec = command.spec if command is not None else None
            ephemeral = interaction.guild_id is not None and spec is not None and spec.private
            await interaction.response.defer(thinking=True, ephemeral=ephemeral)
            reply = await self.ask_core(command_to_incoming(interaction, text), None)  # "thinking…" shows already
            if reply is None:  # a re-delivered interaction: nothing to say, so do not leave "thinking…" behind
                await interaction.delete_original_response()
                return
            if reply.private is not None and ephemeral:  # only its author sees this answer: it is private already
                private = reply.private
                reply = replace(reply, text=private.text, attachment=private.attachment, private=None)
            route: Route[Destination] = Route(Followups(interaction, ephemeral), ChannelDestination(interaction.user))
            await self.answer(reply, route)

    # --- sending: what the conversation loop asks of Discord ----------------------------------------------------

    async def _send_part(self, target: Destination, part: Part, *, quote: str | None) -> str:
        return str(await target.send(part, quote))

    async def _show_typing(self, target: Destination) -> None:
        if target.channel is not None:
            await target.channel.typing()

    def _recovery_target(self, chat_id: str) -> Destination | None:
        """A channel (or DM channel) by id, where a late answer is a reply to the message it answers (if that
        still exists)."""
        if self._client is None:
            return None
        channel = self._client.get_partial_messageable(int(chat_id))
        return ChannelDestination(channel, channel_id=channel.id, quotes=True)

    def _notification_target(self, chat_id: str) -> Destination | None:
        if self._client is None:
            return None
        return ChannelDestination(self._client.get_partial_messageable(int(chat_id)), mentions=NO_MENTIONS)

    def _unreachable(self, error: Exception) -> bool:
        """Discord's 403 with code 50007: the user does not accept DMs (or blocked the bot)."""
        return isinstance(error, discord.Forbidden) and error.code == CANNOT_DM

    def _failure_reason(self, error: BaseException) -> str:
        return discord_client.failure_reason(error)


def to_incoming(message: discord.Message, me: discord.abc.User) -> IncomingMessage | None:
    """The one place a Discord message becomes an `IncomingMessage`; None means "ignore it, do not even log it".

    Bots (itself included) and system messages are ignored. Media without text reaches the core as `text=None`
    when the bot was addressed, so the user hears why there is no answer; unaddressed it is ignored, as are the
    blank guild messages Discord sends without the message-content intent.
    """
    if message.author.bot or message.author.id == me.id or message.type not in _CHAT_TYPES:
        return None
    private = _is_private(message.channel)
    reference = message.reference.resolved if message.reference else None
    replied_to_me = isinstance(reference, discord.Message) and reference.author.id == me.id
    addressed = private or replied_to_me or any(user.id == me.id for user in message.mentions)
    text: str | None = _clean_text(message, me.id)
    if not text:
        if not addressed:
            return None
        if message.attachments or message.stickers:
            text = None
    kind = ChatKind.PRIVATE if private else ChatKind.GROUP
    # A message does not carry its author's locale (only interactions do): the server's preferred one is the best
    # guess, and a DM has none (English).
    language = message.guild.preferred_locale.value if message.guild is not None else None
    guild = message.guild.id if message.guild is not None else getattr(message.channel, "guild_id", None)
    incoming = _incoming(
        message.channel.id, kind, message.author, text, ident=message.id, addressed=addressed, at=message.created_at,
        language=language, guild=None if private else guild,
    )  # fmt: skip
    incoming = replace(incoming, reply_to_message_id=_referenced_id(message))
    if message.guild is None:
        return incoming
    manager = isinstance(message.author, discord.Member) and message.author.guild_permissions.manage_guild
    return replace(incoming, chat_admin=manager)


def command_to_incoming(interaction: discord.Interaction, text: str) -> IncomingMessage:
    """A slash command, as the text a user would have typed, addressed to the bot."""
    kind = ChatKind.PRIVATE if interaction.guild_id is None else ChatKind.GROUP
    incoming = _incoming(
        interaction.channel_id,
        kind,
        interaction.user,
        text,
        ident=interaction.id,
        addressed=True,
        at=interaction.created_at,
        language=interaction.locale.value,  # the user's own client language, which every interaction carries
        guild=interaction.guild_id,
    )
    if interaction.guild_id is None:
        return incoming
    # The member's permissions as Discord computed them for this interaction (roles and channel overwrites).
    manager = interaction.permissions.manage_guild
    return replace(incoming, chat_admin=manager)


def _incoming(
    chat: int | None, kind: ChatKind, author: discord.abc.User, text: str | None, *, ident: int, addressed: bool,
    at: datetime, language: str | None, guild: int | None,
) -> IncomingMessage:  # fmt: skip
    """`guild`: the server, whose voice every channel and thread of it shares (None in a DM: no community)."""
    return IncomingMessage(
        platform=PLATFORM, chat_id=str(chat), chat_kind=kind, author_id=str(author.id),
        author_name=author.display_name, text=text, message_id=str(ident), addressed=addressed, sent_at=at,
        language=language, community=f"{PLATFORM}:{guild}" if guild is not None else None,
    )  # fmt: skip


def _referenced_id(message: discord.Message) -> str | None:
    """The id of the message this one replies to, when it is in the same channel (a reference may point to a
    message elsewhere, e.g. a crosspost, which is no line of this conversation)."""
    reference = message.reference
    if reference is None or reference.message_id is None or reference.channel_id != message.channel.id:
        return None
    return str(reference.message_id)


def _is_private(channel: object) -> bool:
    """DMs; a channel discord.py has not cached is private only if it carries no guild id."""
    if isinstance(channel, discord.PartialMessageable):
        return channel.guild_id is None
    return isinstance(channel, discord.DMChannel)


def _clean_text(message: discord.Message, my_id: int) -> str:
    """Drops the bot's own mention and shows other mentioned users by name, as Discord displays them."""
    names = {user.id: user.display_name for user in message.mentions}
    text = re.sub(rf"\s*<@!?{my_id}>\s*", " ", message.content).strip()
    return _USER_MENTION.sub(lambda m: f"@{names[int(m[1])]}" if int(m[1]) in names else m[0], text)
