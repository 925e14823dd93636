"""The connection to Discord: the discord.py client built from settings, started and stopped.

Kept apart from `bot/discord_bot.py` (which translates events and sends replies) because connecting has concerns
of its own: which intents to ask for, where the endpoints are, registering slash commands, and turning every way
a start can fail into a clear error instead of a hang.

Sharding (DISCORD_SHARD_COUNT, DISCORD_SHARD_IDS): `MagpieShardedClient` is discord.py's `AutoShardedClient` with
the same events, running this process's shards in one client; only the process that runs shard 0 (which also gets
the DMs) registers the slash commands, and IDENTIFYs are paced to Discord's limit (`bot.discord_shards`).
Without those settings it is the plain single-connection client, exactly as before.

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
from bot.discord_shards import SHARDING_ERRORS, IdentifyPacer
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

    async def on_guild_join(self, guild: discord.Guild) -> None: ...


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

    def __init__(self, *, settings: Settings, events: Events, guild_ready_timeout: float, **options: Any) -> None:
        """`options` go on to discord.py's client (the sharded client's `shard_count` and `shard_ids`)."""
        intents = build_intents(settings)
        super().__init__(
            intents=intents, allowed_mentions=SAFE_MENTIONS, guild_ready_timeout=guild_ready_timeout, **options
        )
        self.settings = settings
        self.events = events
        runner: CommandRunner = events.run_command
        self.tree = build_command_tree(self, runner)
        self.ready = asyncio.Event()

    @property
    def registers_commands(self) -> bool:
        """Whether this process registers the slash commands (one process per bot does)."""
        return True

    async def setup_hook(self) -> None:
        """Registers the slash commands: per guild in DISCORD_GUILD_IDS (instant), else globally (up to an hour),
        with their descriptions' localizations from the message catalogue."""
        if not self.registers_commands:
            log.info("Slash commands are registered by the process that runs shard 0")
            return
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

    async def on_guild_join(self, guild: discord.Guild) -> None:
        """Someone added the bot to a server (a GUILD_CREATE for a guild it was not in)."""
        await self.events.on_guild_join(guild)

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self.events.on_delete(payload.channel_id, [payload.message_id])

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        """A moderator purged messages."""
        await self.events.on_delete(payload.channel_id, sorted(payload.message_ids))

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        """discord.py calls this for any exception escaping an event handler."""
        log.exception("Discord event %s failed", event_method)


class MagpieShardedClient(MagpieClient, discord.AutoShardedClient):
    """`MagpieClient` over several gateway shards (one websocket each) in this process; discord.py routes every
    guild's events by `(guild_id >> 22) % shard_count`, so each process sees only its shards' guilds."""

    def __init__(self, *, settings: Settings, events: Events, guild_ready_timeout: float) -> None:
        count = settings.discord_shard_count
        super().__init__(
            settings=settings,
            events=events,
            guild_ready_timeout=guild_ready_timeout,
            shard_count=count if isinstance(count, int) else None,  # None: as many as GET /gateway/bot says
            shard_ids=list(settings.discord_shard_ids) or None,
        )
        self.pacer = IdentifyPacer()

    @property
    def registers_commands(self) -> bool:
        return self.shard_ids is None or 0 in self.shard_ids

    async def setup_hook(self) -> None:
        """Learns how many shards may IDENTIFY at once (GET /gateway/bot), then registers the slash commands."""
        try:
            limits = await self.fetch_session_start_limits()
        except (discord.HTTPException, discord.GatewayNotFound) as exc:
            reason = failure_reason(exc)
            log.warning("Could not read Discord's session start limits (%s); identifying one shard at a time", reason)
        else:
            self.pacer.max_concurrency = max(1, limits.max_concurrency)
            if limits.remaining < len(self.shard_ids or range(self.shard_count or 1)):
                log.warning("Discord allows only %d more session starts today", limits.remaining)
        await super().setup_hook()

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """Waits only as long as Discord's IDENTIFY limit requires (discord.py's default waits 5 s per shard)."""
        await self.pacer.wait(shard_id or 0)

    async def on_shard_ready(self, shard_id: int) -> None:
        log.info("Discord shard %d of %s is ready", shard_id, self.shard_count)


def build_client(settings: Settings, events: Events, *, guild_ready_timeout: float) -> MagpieClient:
    """The sharded client when DISCORD_SHARD_COUNT is set, else the plain one."""
    kind = MagpieShardedClient if settings.discord_sharded else MagpieClient
    return kind(settings=settings, events=events, guild_ready_timeout=guild_ready_timeout)


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
    client = build_client(settings, events, guild_ready_timeout=guild_ready_timeout)
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


def is_connected(client: discord.Client) -> bool:
    """Ready, not closed, and the gateway's websocket open (discord.py keeps "ready" while it reconnects)."""
    ws = client.ws
    return client.is_ready() and not client.is_closed() and ws is not None and ws.open


async def disconnect(client: discord.Client, task: asyncio.Task[None]) -> None:
    await client.close()
    await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)


def _start_error(task: asyncio.Task[None], timeout: float) -> MagpieError:
    if not task.done() or task.cancelled():
        return MagpieError(f"Discord did not become ready within {timeout:g}s; check DISCORD_GATEWAY_URL.")
    exc = task.exception()
    if isinstance(exc, discord.LoginFailure):
        return ConfigError("Discord rejected DISCORD_BOT_TOKEN: copy a fresh token from the developer portal.")
    if isinstance(exc, discord.ConnectionClosed) and exc.code in SHARDING_ERRORS:
        return ConfigError(SHARDING_ERRORS[exc.code])
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
