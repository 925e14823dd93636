"""The console backend: chat with Magpie in a terminal, or script it through a pipe.

On a TTY it is an interactive chat with a prompt. With piped stdin it reads one message per line, prints one
reply per message on stdout (logs go to stderr), and finishes at end of input, so
`printf 'hello\\n/help\\n' | magpie run` works in scripts. The console user is local, hence an admin.

It runs the same conversation loop as the chat platforms (`bot.backend.ChatBackend`); what it supplies is a
printed "part" (a whole reply: a terminal has no length limit) and, for an export, a file in `exports_dir`.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import sys
import time
from pathlib import Path
from typing import TextIO

from bot.backend import ChatBackend, Part, Route
from core.i18n import speaking
from core.messages import ChatHandler, ChatKind, IncomingMessage
from core.telemetry import Telemetry
from core.texts import answering_earlier, console_greeting, export_saved

log = logging.getLogger(__name__)

PLATFORM = "console"
CHAT_ID = "console"


class ConsoleBackend(ChatBackend[str]):
    """A `bot.backend.Backend` over stdin/stdout; a target is the prefix its lines are printed with."""

    platform = PLATFORM
    title = "Console"
    send_errors = (OSError,)

    def __init__(
        self,
        *,
        handler: ChatHandler,
        bot_name: str,
        exports_dir: Path,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        stop_grace_s: float = 0.0,
        telemetry: Telemetry | None = None,
        language: str | None = None,
    ) -> None:
        super().__init__(handler=handler, stop_grace_s=stop_grace_s, telemetry=telemetry)
        self._bot_name = bot_name
        self._language = language
        """The terminal's language tag (`Settings.console_language`): the core answers in it, and so does this."""
        self._exports_dir = exports_dir
        self._stdin = stdin or sys.stdin
        self._stdout = stdout or sys.stdout
        self._interactive = self._stdin.isatty()
        self._user = getpass.getuser()
        self._task: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()

    async def start(self) -> None:
        if self._interactive:
            with speaking(self._language):
                self._write(console_greeting(self._bot_name) + "\n")
        self._task = asyncio.create_task(self._read_loop(), name="console-reader")

    @property
    def connected(self) -> bool:
        """The terminal is "connected" while its input is being read."""
        return self._task is not None and not self._task.done()

    async def _stop_receiving(self) -> None:
        """Stops reading; the exchange in flight runs on (the loop gives it the grace)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _disconnect(self) -> None:
        self.finished.set()

    async def _read_loop(self) -> None:
        try:
            while True:
                if self._interactive:
                    self._write("you> ")
                line = await asyncio.to_thread(self._stdin.readline)
                if not line:  # end of input
                    break
                exchange = asyncio.create_task(self._exchange(line.rstrip("\r\n")))
                await asyncio.shield(exchange)  # one line at a time; stopping the reader does not cut it off
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
            language=self._language,
            community=PLATFORM,  # the operator's console is a community of its own
        )
        await self.converse(message, Route(f"{self._bot_name.lower()}> " if self._interactive else ""))

    async def _send_part(self, target: str, part: Part, *, quote: str | None) -> None:
        """Prints the reply; an attachment is saved under `exports_dir` and its path printed."""
        self._write(f"{target}{part.text}\n")
        if part.attachment is not None:
            self._exports_dir.mkdir(parents=True, exist_ok=True)
            path = self._exports_dir / part.attachment.filename
            path.write_bytes(part.attachment.content)
            with speaking(self._language):
                self._write(f"{target}{export_saved(part.attachment.filename, str(path))}\n")

    def _recovery_target(self, chat_id: str) -> str:
        """An answer to a message typed before a restart: shown like a notification, so it is not taken for the
        answer to the line just typed."""
        with speaking(self._language):
            return answering_earlier(self._bot_name)

    def _notification_target(self, chat_id: str) -> str:
        return f"[{self._bot_name}] "

    def _write(self, text: str) -> None:
        self._stdout.write(text)
        self._stdout.flush()
