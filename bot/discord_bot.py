"""The Discord backend: a discord.py client that turns gateway events into `IncomingMessage`s and sends replies.

What a Discord user gets: every DM is answered; in servers (channels and threads) every text message is logged but
answered only when it mentions the bot, replies to it, or is a slash command. Other bots are never answered (no
bot loops), replies never ping @everyone, @here, roles or users from generated text, and long replies are split at
2,000 characters. Rate limits (429) and gateway reconnects/resumes are discord.py's job; this module only makes
sure a reply that finally fails is recorded as undelivered instead of being lost. A reply cut off by shutdown is
recorded as interrupted and left, like a message not yet answered, to the next start's recovery (`deliver_reply`).

Endpoints: discord.py has no per-client option for the REST base URL or the gateway URL, only the process-global
class attributes `discord.http.Route.BASE` and `discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY`. `use_endpoints`
is the one place that sets them (from DISCORD_API_BASE_URL / DISCORD_GATEWAY_URL); `DiscordBackend.start` calls
it, which changes them for every discord.py client in the process.
"""

from __future__ import annotations

import asyncio
import logging
import re
from contextlib import AsyncExitStack, suppress
from dataclasses import replace
from typing import Any

import aiohttp
import discord
import yarl

from bot.discord_commands import NO_MENTIONS, Sender, as_file, build_command_tree, followup_sender
from bot.text import split_message
from core.commands import parse_command
from core.errors import ConfigError, MagpieError
from core.messages import PRIVATE_COMMANDS, Attachment, ChatHandler, ChatKind, IncomingMessage, Reply
from core.settings import Settings

__all__ = ["DiscordBackend", "build_client", "to_incoming", "use_endpoints"]

log = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000
CLOSE_TIMEOUT_S = 10.0
SAFE_MENTIONS = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=True)
"""Generated text can never ping anyone; only the user the bot replies to is notified, as for a human reply."""
_USER_MENTION = re.compile(r"<@!?(\d+)>")
_CHAT_TYPES = frozenset({discord.MessageType.default, discord.MessageType.reply})
_SEND_ERRORS = (discord.HTTPException, aiohttp.ClientError, OSError, asyncio.TimeoutError)
CANNOT_DM = 50007
"""Discord's code for "Cannot send messages to this user" (DMs closed, or the bot blocked)."""


def use_endpoints(settings: Settings) -> None:
    """Points every discord.py client in this process at DISCORD_API_BASE_URL and DISCORD_GATEWAY_URL."""
    discord.http.Route.BASE = settings.discord_api_base_url.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


def build_intents(settings: Settings) -> discord.Intents:
    """Only what Magpie uses; message content is privileged, so it is asked for only when DISCORD_MESSAGE_CONTENT."""
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = settings.discord_message_content
    return intents


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
    return IncomingMessage(
        platform=PLATFORM,
        chat_id=str(message.channel.id),
        chat_kind=ChatKind.PRIVATE if private else ChatKind.GROUP,
        author_id=str(message.author.id),
        author_name=message.author.display_name,
        text=text,
        message_id=str(message.id),
        addressed=addressed,
        sent_at=message.created_at,
    )


def command_to_incoming(interaction: discord.Interaction, text: str) -> IncomingMessage:
    """A slash command, as the text a user would have typed, addressed to the bot."""
    return IncomingMessage(
        platform=PLATFORM,
        chat_id=str(interaction.channel_id),
        chat_kind=ChatKind.PRIVATE if interaction.guild_id is None else ChatKind.GROUP,
        author_id=str(interaction.user.id),
        author_name=interaction.user.display_name,
        text=text,
        message_id=str(interaction.id),
        addressed=True,
        sent_at=interaction.created_at,
    )


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


def _failure_reason(exc: BaseException) -> str:
    """Why a send failed, in words safe to store and log (Discord's error text, never a URL or token)."""
    if isinstance(exc, discord.HTTPException):
        return f"Discord HTTP {exc.status} (code {exc.code}): {exc.text[:200]}"
    return f"{type(exc).__name__} while sending to Discord"


class MagpieClient(discord.Client):
    """The discord.py client: its dependencies come in through `__init__`, the command sync runs in `setup_hook`."""

    def __init__(
        self, *, settings: Settings, handler: ChatHandler, intents: discord.Intents, guild_ready_timeout: float = 2.0
    ) -> None:
        super().__init__(intents=intents, allowed_mentions=SAFE_MENTIONS, guild_ready_timeout=guild_ready_timeout)
        self.settings = settings
        self.handler = handler
        self.tree = build_command_tree(self, self.run_command)
        self.ready = asyncio.Event()
        self.in_flight: set[asyncio.Task[Any]] = set()

    async def setup_hook(self) -> None:
        """Registers the slash commands: per guild in DISCORD_GUILD_IDS (instant), else globally (up to an hour)."""
        guilds: list[discord.Object | None] = [discord.Object(id=gid) for gid in self.settings.discord_guild_ids]
        for guild in guilds or [None]:
            where = f"in guild {guild.id}" if guild else "globally"
            if guild is not None:
                self.tree.copy_global_to(guild=guild)
            try:
                synced = await self.tree.sync(guild=guild)
            except discord.HTTPException as exc:
                log.error(
                    "Could not register the slash commands %s (%s); invite the bot with the "
                    "'applications.commands' scope. Mentions and DMs still work.",
                    where,
                    _failure_reason(exc),
                )
            else:
                log.info("Registered %d slash commands %s", len(synced), where)

    async def on_ready(self) -> None:
        """Fires after every fresh session (not after a resume)."""
        log.info("Connected to Discord as %s (%s guilds)", self.user, len(self.guilds))
        self.ready.set()

    async def on_message(self, message: discord.Message) -> None:
        """Logs every text message through the core; answers the ones addressed to the bot."""
        if self.user is None:
            return
        incoming = to_incoming(message, self.user)
        if incoming is None:
            return
        self._track()
        async with AsyncExitStack() as stack:
            if incoming.addressed and incoming.text:
                with suppress(*_SEND_ERRORS):  # no typing indicator is better than no answer
                    await stack.enter_async_context(message.channel.typing())
            reply = await self.handler.handle(incoming)
        if reply is not None:
            reference = None
            if incoming.chat_kind is ChatKind.GROUP and reply.reply_to:
                reference = discord.MessageReference(
                    message_id=int(reply.reply_to), channel_id=message.channel.id, fail_if_not_exists=False
                )
            public = _channel_sender(message.channel, reference)
            if reply.private is not None:
                await self.deliver_privately(reply, public, _channel_sender(message.author, None))
            else:
                await self.deliver(reply, public)

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        """A person edited a message (raw: it may predate the cache): the log follows the edit, never re-answered."""
        incoming = to_incoming(payload.message, self.user) if self.user is not None else None
        if incoming is not None:
            await self.handler.message_edited(PLATFORM, incoming.chat_id, incoming.message_id, incoming.text)

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        """A person deleted a message: it leaves the log (and future training) too."""
        await self.handler.message_deleted(PLATFORM, str(payload.channel_id), str(payload.message_id))

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        """A moderator purged messages: each leaves the log."""
        for message_id in sorted(payload.message_ids):
            await self.handler.message_deleted(PLATFORM, str(payload.channel_id), str(message_id))

    async def run_command(self, interaction: discord.Interaction, text: str) -> None:
        """Defers first (generation can outlast Discord's 3-second window), then answers by follow-up.

        Whether the answer is ephemeral is fixed by the defer, before the core has answered: in a server, the
        commands whose answer is personal data (`PRIVATE_COMMANDS`) are deferred ephemerally, and that answer
        goes to the user alone. A personal answer to anything else goes by DM, with a note in the channel.
        """
        self._track()
        command = parse_command(text)
        ephemeral = interaction.guild_id is not None and command is not None and command.name in PRIVATE_COMMANDS
        await interaction.response.defer(thinking=True, ephemeral=ephemeral)
        reply = await self.handler.handle(command_to_incoming(interaction, text))
        if reply is None:  # a re-delivered interaction: nothing to say, so do not leave "thinking…" behind
            await interaction.delete_original_response()
            return
        send = followup_sender(interaction, ephemeral=ephemeral)
        if reply.private is not None and ephemeral:  # only its author sees this answer: it is private already
            private = reply.private
            reply = replace(reply, text=private.text, attachment=private.attachment, private=None)
        if reply.private is not None:
            await self.deliver_privately(reply, send, _channel_sender(interaction.user, None))
            return
        await self.deliver(reply, send)

    async def deliver(self, reply: Reply, send: Sender, *, parts_sent: int = 0) -> None:
        """The one send path: split at 2,000 characters, send in order (from the part after `parts_sent`), then
        record delivered, undelivered or interrupted, with how many parts arrived."""
        chunks = split_message(reply.text, MESSAGE_LIMIT) or [""]
        sent: list[str] = []
        try:
            for index, chunk in enumerate(chunks[parts_sent:], start=parts_sent):
                sent.append(str(await send(chunk, reply.attachment if index == 0 else None)))
        except _SEND_ERRORS as exc:
            reason = _failure_reason(exc)
            if parts_sent + len(sent):
                reason += f" (after {parts_sent + len(sent)} of {len(chunks)} parts)"
            log.warning("Discord reply %s was not delivered: %s", reply.log_id, reason)
            await self.handler.mark_undelivered(reply, reason, parts_sent=parts_sent + len(sent))
            return
        except asyncio.CancelledError:
            await self.handler.mark_interrupted(reply, parts_sent=parts_sent + len(sent))
            raise
        await self.handler.mark_delivered(reply, sent)

    async def deliver_privately(self, reply: Reply, public: Sender, author: Sender) -> None:
        """The author's own data goes to them by DM, then `public` gets the reply's note. When they do not accept
        DMs (Discord's 403, code 50007), nothing personal is sent anywhere and `public` is told how to ask."""
        assert reply.private is not None
        private = reply.private
        chunks = split_message(private.text, MESSAGE_LIMIT) or [""]
        try:
            for index, chunk in enumerate(chunks):
                await author(chunk, private.attachment if index == 0 else None)
        except _SEND_ERRORS as exc:
            if not (isinstance(exc, discord.Forbidden) and exc.code == CANNOT_DM):
                log.warning("Discord reply %s was not delivered by DM: %s", reply.log_id, _failure_reason(exc))
                await self.handler.mark_undelivered(reply, _failure_reason(exc))
                return
            log.info("Discord reply %s cannot reach its author by DM: %s", reply.log_id, _failure_reason(exc))
            await self.deliver(await self.handler.private_unreachable(reply, _failure_reason(exc)), public)
            return
        await self.deliver(replace(reply, private=None), public)

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        """discord.py calls this for any exception escaping an event handler."""
        log.exception("Discord event %s failed", event_method)

    def _track(self) -> None:
        """Remembers the running handler so `DiscordBackend.stop` can let it finish."""
        task = asyncio.current_task()
        if task is not None:
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)


def _channel_sender(channel: discord.abc.Messageable, reply_to: discord.MessageReference | None) -> Sender:
    """Sends into a channel; only the first chunk is a reply to the user's message."""
    pending = [reply_to] if reply_to is not None else []

    async def send(text: str, attachment: Attachment | None) -> int:
        kwargs: dict[str, Any] = {"allowed_mentions": SAFE_MENTIONS}
        if attachment is not None:
            kwargs["file"] = as_file(attachment)
        if pending:
            kwargs["reference"] = pending.pop()
        message = await channel.send(text or None, **kwargs)
        return message.id

    return send


def build_client(settings: Settings, handler: ChatHandler, *, guild_ready_timeout: float = 2.0) -> MagpieClient:
    """The one function that builds the discord.py client from settings.

    `guild_ready_timeout` is how long discord.py waits after READY for more GUILD_CREATEs before firing `on_ready`
    (its default, 2 s, suits Discord; tests against a local fake shorten it).
    """
    intents = build_intents(settings)
    return MagpieClient(settings=settings, handler=handler, intents=intents, guild_ready_timeout=guild_ready_timeout)


class DiscordBackend:
    """Magpie on Discord: `start` connects and returns once the gateway session is ready; `stop` disconnects."""

    platform = PLATFORM

    def __init__(
        self,
        *,
        settings: Settings,
        handler: ChatHandler,
        ready_timeout: float = 60.0,
        guild_ready_timeout: float = 2.0,
    ) -> None:
        self._settings = settings
        self._handler = handler
        self._ready_timeout = ready_timeout
        self._guild_ready_timeout = guild_ready_timeout
        self._client: MagpieClient | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Logs in, syncs the slash commands and waits for READY; raises a clear error instead of hanging."""
        token = self._settings.discord_bot_token
        if token is None or not token.get_secret_value().strip():
            raise ConfigError("DISCORD_BOT_TOKEN is empty: copy the bot token from the Discord developer portal.")
        use_endpoints(self._settings)
        client = build_client(self._settings, self._handler, guild_ready_timeout=self._guild_ready_timeout)
        task = asyncio.create_task(client.start(token.get_secret_value()), name="discord-client")
        ready = asyncio.create_task(client.ready.wait())
        done, _ = await asyncio.wait({task, ready}, timeout=self._ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if ready not in done:
            await client.close()
            await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
            if not task.done():
                task.cancel()
            raise _start_error(task, self._ready_timeout)
        self._client, self._task = client, task
        task.add_done_callback(_report_exit)

    async def stop(self) -> None:
        """Gives in-flight replies SHUTDOWN_GRACE_SECONDS to finish, cancels the rest, then closes the connection.

        What is cut off (a message logged but not answered, a reply written but not sent) stays in the database's
        outbox, and the next start's recovery answers it."""
        client, task = self._client, self._task
        self._client = self._task = None
        if client is None or task is None:
            return
        if client.in_flight:
            _, pending = await asyncio.wait(set(client.in_flight), timeout=self._settings.shutdown_grace_seconds)
            if pending:
                log.warning("Discord: cancelling %d replies still running at shutdown", len(pending))
            for straggler in pending:
                straggler.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await client.close()
        await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)

    async def notify(self, chat_id: str, text: str) -> None:
        """Sends unsolicited text (e.g. retraining progress) to a channel or DM channel; failures are logged."""
        client = self._client
        if client is None:
            log.warning("Discord is not connected; dropped a notification for chat %s", chat_id)
            return
        channel = client.get_partial_messageable(int(chat_id))
        try:
            for chunk in split_message(text, MESSAGE_LIMIT):
                await channel.send(chunk, allowed_mentions=NO_MENTIONS)
        except _SEND_ERRORS as exc:
            log.warning("Could not notify Discord chat %s: %s", chat_id, _failure_reason(exc))

    async def deliver_reply(self, chat_id: str, reply: Reply, *, parts_sent: int = 0) -> None:
        """Delivers a reply the core recovered after a restart into a channel (or DM channel) by id, from the
        part after `parts_sent`, as a reply to the message it answers (if that still exists)."""
        client = self._client
        if client is None:
            log.warning("Discord is not connected; reply %s is left for the next start", reply.log_id)
            return
        channel = client.get_partial_messageable(int(chat_id))
        reference = None
        if reply.reply_to and reply.reply_to.isdigit():
            reference = discord.MessageReference(
                message_id=int(reply.reply_to), channel_id=channel.id, fail_if_not_exists=False
            )
        await client.deliver(reply, _channel_sender(channel, reference), parts_sent=parts_sent)


def _start_error(task: asyncio.Task[None], timeout: float) -> MagpieError:
    if not task.done() or task.cancelled():
        return MagpieError(f"Discord did not become ready within {timeout:g}s; check DISCORD_GATEWAY_URL.")
    exc = task.exception()
    if isinstance(exc, discord.LoginFailure):
        return ConfigError("Discord rejected DISCORD_BOT_TOKEN: copy a fresh token from the developer portal.")
    if isinstance(exc, discord.PrivilegedIntentsRequired):
        return ConfigError(
            "Discord refused the message-content intent: enable 'Message Content Intent' for the bot in the "
            "developer portal, or set DISCORD_MESSAGE_CONTENT=false (mentions and slash commands only)."
        )
    return MagpieError(f"Could not connect to Discord: {_failure_reason(exc) if exc else 'the client stopped'}")


def _report_exit(task: asyncio.Task[None]) -> None:
    """The client task ends only on stop or on a failure discord.py does not retry; the latter must be seen."""
    if not task.cancelled() and task.exception() is not None:
        log.error("The Discord connection stopped: %s", _failure_reason(task.exception() or Exception()))
