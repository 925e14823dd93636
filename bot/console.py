"""The console backend: chat with Magpie in a terminal, or script it through a pipe.

On a TTY it is an interactive chat with a prompt. With piped stdin it reads one message per line, prints one
reply per message on stdout (logs go to stderr), and finishes at end of input, so
`printf 'hello\\n/help\\n' | magpie run` works in scripts. The console user is local, hence an admin.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import sys
import time
from pathlib import Path
from typing import TextIO

from core.messages import ChatHandler, ChatKind, IncomingMessage, Reply

log = logging.getLogger(__name__)

PLATFORM = "console"
CHAT_ID = "console"


class ConsoleBackend:
    """A `bot.backend.Backend` over stdin/stdout."""

    platform = PLATFORM

    def __init__(
        self,
        *,
        handler: ChatHandler,
        bot_name: str,
        exports_dir: Path,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
    ) -> None:
        self._handler = handler
        self._bot_name = bot_name
        self._exports_dir = exports_dir
        self._stdin = stdin or sys.stdin
        self._stdout = stdout or sys.stdout
        self._interactive = self._stdin.isatty()
        self._user = getpass.getuser()
        self._task: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()

    async def start(self) -> None:
        if self._interactive:
            self._write(f"Chatting with {self._bot_name}. Type /help for commands, Ctrl-D to quit.\n")
        self._task = asyncio.create_task(self._read_loop(), name="console-reader")

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.finished.set()

    async def notify(self, chat_id: str, text: str) -> None:
        self._write(f"[{self._bot_name}] {text}\n")

    async def deliver_reply(self, chat_id: str, reply: Reply, *, parts_sent: int = 0) -> None:
        """An answer to a message typed before a restart: shown like a notification, so it is not taken for the
        answer to the line just typed."""
        self._write(f"[{self._bot_name}, answering an earlier message] {reply.text}\n")
        await self._handler.mark_delivered(reply, [])

    async def _read_loop(self) -> None:
        try:
            while True:
                if self._interactive:
                    self._write("you> ")
                line = await asyncio.to_thread(self._stdin.readline)
                if not line:  # end of input
                    break
                await self._exchange(line.rstrip("\r\n"))
        finally:
            if self._interactive:
                self._write("\n")
            self.finished.set()

    async def _exchange(self, text: str) -> None:
        message = IncomingMessage(
            platform=PLATFORM,
            chat_id=CHAT_ID,
            chat_kind=ChatKind.PRIVATE,
            author_id=self._user,
            author_name=self._user,
            text=text,
            message_id=str(time.time_ns()),
            addressed=True,
        )
        reply = await self._handler.handle(message)
        if reply is None:
            return
        self._show(reply)
        await self._handler.mark_delivered(reply, [])

    def _show(self, reply: Reply) -> None:
        prefix = f"{self._bot_name.lower()}> " if self._interactive else ""
        self._write(f"{prefix}{reply.text}\n")
        if reply.attachment is not None:
            self._exports_dir.mkdir(parents=True, exist_ok=True)
            path = self._exports_dir / reply.attachment.filename
            path.write_bytes(reply.attachment.content)
            self._write(f"{prefix}(saved {reply.attachment.filename} to {path})\n")

    def _write(self, text: str) -> None:
        self._stdout.write(text)
        self._stdout.flush()
