"""`magpie run` as a user runs it: one process serving Telegram and Discord at once (one engine, one database),
against the fake platform servers, stopped cleanly by SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from sqlalchemy import select

from core.db import Database
from core.models import Chat, Delivery, Message, Role
from tests.fake_discord import FakeDiscord
from tests.fake_telegram import FakeTelegram

ROOT = Path(__file__).resolve().parent.parent
STARTUP_S = 90.0


def _env(telegram: FakeTelegram, discord: FakeDiscord, database_url: str, model_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        DATABASE_URL=database_url,
        BASE_MODEL=str(model_dir),
        MAX_NEW_TOKENS="8",
        TEMPERATURE="0",
        TELEGRAM_BOT_TOKEN=telegram.token,
        TELEGRAM_BASE_URL=telegram.base_url,
        TELEGRAM_BASE_FILE_URL=telegram.base_file_url,
        DISCORD_BOT_TOKEN=discord.token,
        DISCORD_API_BASE_URL=discord.api_base_url,
        DISCORD_GATEWAY_URL=discord.gateway_url,
    )
    return env


async def test_one_process_serves_both_platforms_and_stops_on_sigterm(
    db: Database, database_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with FakeTelegram() as telegram:
        discord = FakeDiscord()
        await discord.start()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            "run",
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
            env=_env(telegram, discord, database_url, tiny_model_dir),
        )
        try:
            async with asyncio.timeout(STARTUP_S):
                # getMe completes at start-up (a long-polling getUpdates only notifies when it returns); updates
                # injected before polling begins wait in the fake's queue
                await telegram.wait_until(lambda: bool(telegram.calls_to("getMe")), within=STARTUP_S)
                await discord.wait_until(lambda: discord.session is not None)
            person = telegram.user(501, "Ana")
            telegram.user_says(telegram.private_chat(person), person, "hello from telegram")
            user = discord.add_user("ben")
            await discord.send_message(user, "hello from discord")
            await telegram.wait_for_messages(501, 1, within=60)
            await discord.wait_for_posts(discord.dm_channel(user), 1)
        finally:
            process.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(process.communicate(), timeout=60)
            await discord.close()
        stderr = err.decode()
        assert process.returncode == 0, stderr
        assert "Traceback" not in stderr
        assert telegram.token not in stderr and discord.token not in stderr

    async with db.sessions() as session:
        rows = (await session.execute(select(Message, Chat.platform).join(Chat))).all()
    by_platform = {(platform, message.role, message.delivery) for message, platform in rows}
    assert by_platform == {
        ("telegram", Role.USER, None),
        ("telegram", Role.BOT, Delivery.SENT),
        ("discord", Role.USER, None),
        ("discord", Role.BOT, Delivery.SENT),
    }
