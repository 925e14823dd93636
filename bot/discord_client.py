"""The connection to Discord: the discord.py client built from settings, started and stopped.

Kept apart from `bot/discord_bot.py` (which translates events and sends replies) because connecting has concerns
of its own: which intents to ask for, where the endpoints are, registering slash commands, and turning every way
a start can fail into a clear error instead of a hang.

Endpoints: discord.py has no per-client option for the REST base URL or the gateway URL, only the process-global
class attributes `discord.http.Route.BASE` and `discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY`. `use_endpoints`
is the one place that sets them (from DISCORD_API_BASE_URL / DISCORD_GATEWAY_URL); `connect` calls it, which
changes them for every discord.py client in the process.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import discord
import yarl

from bot.discord_commands import SAFE_MENTIONS, CatalogueTranslator, CommandRunner, build_command_tree
from core.errors import ConfigError, MagpieError
from core.settings import Settings

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 10.0


class Events(Protocol):
    """What the client hands on: the backend's side of every event Magpie listens to."""

    async def on_message(self, message: discord.Message, me: discord.ClientUser) -> None: ...

    async def on_edit(self, message: discord.Message, me: discord.ClientUser) -> None: ...

    async def on_delete(self, channel_id: int, message_ids: list[int]) -> None: ...

    async def run_command(self, interaction: discord.Interaction, text: str) -> None: ...


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


def failure_reason(exc: BaseException) -> str:
    """Why a request failed, in words safe to store and log (Discord's error text, never a URL or token)."""
    if isinstance(exc, discord.HTTPException):
        return f"Discord HTTP {exc.status} (code {exc.code}): {exc.text[:200]}"
    return f"{type(exc).__name__} while sending to Discord"


class MagpieClient(discord.Client):
    """The discord.py client: its dependencies come in through `__init__`, the command sync runs in `setup_hook`,
    and every event Magpie listens to goes on to `events`."""

    def __init__(self, *, settings: Settings, events: Events, guild_ready_timeout: float) -> None:
        intents = build_intents(settings)
        super().__init__(intents=intents, allowed_mentions=SAFE_MENTIONS, guild_ready_timeout=guild_ready_timeout)
        self.settings = settings
        self.events = events
        runner: CommandRunner = events.run_command
        self.tree = build_command_tree(self, runner)
        self.ready = asyncio.Event()

    async def setup_hook(self) -> None:
        """Registers the slash commands: per guild in DISCORD_GUILD_IDS (instant), else globally (up to an hour),
        with their descriptions' localizations from the message catalogue."""
        await self.tree.set_translator(CatalogueTranslator())
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
                    failure_reason(exc),
                )
            else:
                log.info("Registered %d slash commands %s", len(synced), where)

    async def on_ready(self) -> None:
        """Fires after every fresh session (not after a resume)."""
        log.info("Connected to Discord as %s (%s guilds)", self.user, len(self.guilds))
        self.ready.set()

    async def on_message(self, message: discord.Message) -> None:
        """Messages may come before READY's `on_ready` (while discord.py waits for the guilds): they count too."""
        if self.user is not None:
            await self.events.on_message(message, self.user)

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        """Raw: an edited message may predate the cache."""
        if self.user is not None:
            await self.events.on_edit(payload.message, self.user)

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self.events.on_delete(payload.channel_id, [payload.message_id])

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        """A moderator purged messages."""
        await self.events.on_delete(payload.channel_id, sorted(payload.message_ids))

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        """discord.py calls this for any exception escaping an event handler."""
        log.exception("Discord event %s failed", event_method)


async def connect(
    settings: Settings, events: Events, *, ready_timeout: float, guild_ready_timeout: float
) -> tuple[MagpieClient, asyncio.Task[None]]:
    """Logs in, syncs the slash commands and waits for READY; raises a clear error instead of hanging.

    `guild_ready_timeout` is how long discord.py waits after READY for more GUILD_CREATEs before firing `on_ready`
    (its default, 2 s, suits Discord; tests against a local fake shorten it).
    """
    token = settings.discord_bot_token
    if token is None or not token.get_secret_value().strip():
        raise ConfigError("DISCORD_BOT_TOKEN is empty: copy the bot token from the Discord developer portal.")
    use_endpoints(settings)
    client = MagpieClient(settings=settings, events=events, guild_ready_timeout=guild_ready_timeout)
    task = asyncio.create_task(client.start(token.get_secret_value()), name="discord-client")
    ready = asyncio.create_task(client.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if ready not in done:
        await disconnect(client, task)
        if not task.done():
            task.cancel()
        raise _start_error(task, ready_timeout)
    task.add_done_callback(_report_exit)
    return client, task


async def disconnect(client: discord.Client, task: asyncio.Task[None]) -> None:
    await client.close()
    await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)


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
    return MagpieError(f"Could not connect to Discord: {failure_reason(exc) if exc else 'the client stopped'}")


def _report_exit(task: asyncio.Task[None]) -> None:
    """The client task ends only on stop or on a failure discord.py does not retry; the latter must be seen."""
    if not task.cancelled() and task.exception() is not None:
        log.error("The Discord connection stopped: %s", failure_reason(task.exception() or Exception()))
