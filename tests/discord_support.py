"""Running Magpie's Discord adapter in tests, shared by every test file that does: settings aimed at the fake
Discord (`tests/fake_discord.py`), a started backend, and a mention."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import select

from bot.discord_bot import DiscordBackend
from core.chat.messages import ChatHandler
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import Message
from tests.fake_discord import FakeDiscord, Json


def settings_for(fake: FakeDiscord, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "discord_bot_token": fake.token,
        "discord_api_base_url": fake.api_base_url,
        "discord_gateway_url": fake.gateway_url,
        "discord_guild_ids": str(fake.guild_id),
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@asynccontextmanager
async def running(
    fake: FakeDiscord, handler: ChatHandler, settings: Settings | None = None, **overrides: Any
) -> AsyncIterator[DiscordBackend]:
    """A started backend (discord.py waits only 0.05 s for more guilds before READY), stopped afterwards."""
    settings = settings or settings_for(fake, **overrides)
    backend = DiscordBackend(settings=settings, handler=handler, ready_timeout=15, guild_ready_timeout=0.05)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


def mention(user: Json) -> str:
    return f"<@{user['id']}>"


async def logged_messages(db: Database) -> list[Message]:
    """Every logged message, oldest first."""
    async with db.sessions() as session:
        return list((await session.execute(select(Message).order_by(Message.id))).scalars())


# --- connecting ----------------------------------------------------------------------------------------------------
