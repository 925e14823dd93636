"""One Discord process of a sharded bot, for `tests/test_discord_shards.py`: the real Discord backend with settings
from the environment (DISCORD_SHARD_COUNT, DISCORD_SHARD_IDS…), answering every addressed message with
"<SHARD_PROCESS_NAME>: <text>", so a test can tell which process answered. Prints "ready" once its shards are
connected; SIGTERM stops it. No model and no database: what is under test is which process gets which events.

Run as `python -m tests.shard_process`.
"""

from __future__ import annotations

import asyncio
import os
import signal

from bot.discord_bot import DiscordBackend
from core.settings import load_settings
from tests.recording_handler import RecordingHandler


async def main() -> None:
    settings = load_settings()
    name = os.environ["SHARD_PROCESS_NAME"]
    handler = RecordingHandler(lambda message: f"{name}: {message.text}")  # answers name the process
    backend = DiscordBackend(settings=settings, handler=handler, ready_timeout=30, guild_ready_timeout=0.05)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await backend.start()
    print("ready", flush=True)
    await stop.wait()
    await backend.stop()


if __name__ == "__main__":
    asyncio.run(main())
