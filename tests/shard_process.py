"""One Discord process of a sharded bot, for `tests/test_discord_shards.py`: the real Discord backend with settings
from the environment (DISCORD_SHARD_COUNT, DISCORD_SHARD_IDS…), answering every addressed message with
"<SHARD_PROCESS_NAME>: <text>", so a test can tell which process answered. Prints "ready" once its shards are
connected; SIGTERM stops it. No model and no database: what is under test is which process gets which events.

Run as `python -m tests.shard_process`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal

from bot.discord_bot import DiscordBackend
from core.messages import ChatKind, IncomingMessage, Reply
from core.settings import load_settings
from tests.handler_base import IgnoresLogEvents


class NamedEcho(IgnoresLogEvents):
    """A `ChatHandler` whose answers name the process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._log_ids = itertools.count(1)

    async def handle(self, message: IncomingMessage, *, busy: bool = False) -> Reply | None:
        if message.chat_kind is ChatKind.GROUP and not message.addressed:
            return None
        return Reply(f"{self.name}: {message.text}", reply_to=message.message_id, log_id=next(self._log_ids))

    async def mark_delivered(self, reply: Reply, platform_message_ids: list[str]) -> None:
        return None

    async def mark_undelivered(self, reply: Reply, reason: str, *, parts_sent: int = 0) -> None:
        return None

    async def mark_interrupted(self, reply: Reply, *, parts_sent: int) -> None:
        return None

    async def private_unreachable(self, reply: Reply, reason: str) -> Reply:
        return Reply("unreachable", reply_to=reply.reply_to)


async def main() -> None:
    settings = load_settings()
    handler = NamedEcho(os.environ["SHARD_PROCESS_NAME"])
    backend = DiscordBackend(settings=settings, handler=handler, ready_timeout=30, guild_ready_timeout=0.05)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await backend.start()
    print("ready", flush=True)
    await stop.wait()
    await backend.stop()


if __name__ == "__main__":
    asyncio.run(main())
