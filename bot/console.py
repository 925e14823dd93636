"""The console backend: chat with Magpie in a terminal, or script it through a pipe.

On a TTY it is an interactive chat with a prompt. With piped stdin it reads one message per line, prints one
reply per message on stdout (logs go to stderr), and finishes at end of input, so
`printf 'hello\\n/help\\n' | magpie run` works in scripts. The console user is local, hence an admin.

Either way a reply starts with a marker, ``magpie> `` (BOT_NAME, lower-cased; ``[Magpie] `` for a notification),
and its further lines are indented by the marker's width: a script can tell where each reply starts and match a
reply of several lines to the line it answers, since no line of a reply can start like a marker.

It runs the same conversation loop as the chat platforms (`bot.backend.ChatBackend`); what it supplies is a
printed "part" (a whole reply: a terminal has no length limit) and, for an export, a file in `exports_dir`.
"""

from __future__ import annotations

import asyncio
import codecs
import getpass
import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from bot.backend import ChatBackend, Part, Route
from core.chat.messages import ChatHandler, ChatKind, IncomingMessage
from core.i18n import speaking
from core.ops.telemetry import Telemetry
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
        lines = LineReader(self._stdin)
        try:
            while True:
                if self._interactive:
                    self._write("you> ")
                line = await lines.readline()
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
        await self.converse(message, Route(f"{self._bot_name.lower()}> "))

    async def _send_part(self, target: str, part: Part, *, quote: str | None) -> None:
        """Prints the reply; an attachment is saved under `exports_dir` and its path printed."""
        self._write(marked(target, part.text))
        if part.attachment is not None:
            self._exports_dir.mkdir(parents=True, exist_ok=True)
            path = self._exports_dir / part.attachment.filename
            path.write_bytes(part.attachment.content)
            with speaking(self._language):
                self._write(marked(target, export_saved(part.attachment.filename, str(path))))

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


def marked(marker: str, text: str) -> str:
    """`text` as printed: its first line after `marker`, the others indented by the marker's width (blank lines stay
    empty), so only the first line of a reply starts with a marker."""
    indent = " " * len(marker)
    first, *rest = text.split("\n")
    return "".join([marker + first, *(f"\n{indent}{line}" if line else "\n" for line in rest), "\n"])


class LineReader:
    """Lines of a text stream, read without a thread blocked on it.

    A thread stuck in `readline` cannot be cancelled: after Ctrl-C the process waited in it (Python joins such
    threads at exit) until another line was typed. So a pipe or terminal is read only when the event loop says it
    has data, and stopping is a plain cancellation. A regular file (`magpie run < script.txt`) and `/dev/null` can
    not be watched by the loop, but reading them never waits; an in-memory stream (tests) is read directly.
    """

    CHUNK = 65536

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        try:
            self._fd: int | None = stream.fileno()
        except (OSError, ValueError):  # io.StringIO: no descriptor
            self._fd = None
        encoding = getattr(stream, "encoding", None) or "utf-8"
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        self._buffer = ""
        self._ended = False

    async def readline(self) -> str:
        """The next line with its newline; the last one may lack it; "" at the end of input."""
        if self._fd is None:
            return self._stream.readline()
        while "\n" not in self._buffer and not self._ended:
            chunk = await self._read(self._fd)
            self._ended = not chunk
            self._buffer += self._decoder.decode(chunk, final=self._ended)
        line, newline, self._buffer = self._buffer.partition("\n")
        return line + newline

    async def _read(self, fd: int) -> bytes:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():  # the loop may call again before this coroutine runs and stops watching
                ready.set_result(None)

        try:
            loop.add_reader(fd, readable)
        except (OSError, ValueError, NotImplementedError):  # a regular file or /dev/null: reading never waits
            return await asyncio.to_thread(os.read, fd, self.CHUNK)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        return os.read(fd, self.CHUNK)
