"""The shared conversation loop (`bot.backend.ChatBackend`), run through every platform: the same scenarios against
python-telegram-bot and the fake Bot API, discord.py and the fake Discord, and the console over a pipe.

Each `Platform` harness starts the real backend with a `RecordingHandler` (the model is irrelevant here) and lets a
person say something addressed to the bot; the scenarios assert on what the platform received and on what the
core was told (delivered ids, parts_sent, interrupted).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import discord
import pytest

from bot import telegram_requests
from bot.backend import ChatBackend, Part
from bot.console import ConsoleBackend
from bot.discord_bot import DiscordBackend
from bot.telegram import TelegramBackend
from core.settings import Settings
from tests.fake_base import WAIT_S
from tests.fake_discord import FakeDiscord
from tests.fake_telegram import FakeTelegram
from tests.recording_handler import RecordingHandler

pytestmark = pytest.mark.timeout(90)

HELLO = "hello"
"""What the core answers where the answer does not matter."""


class Platform(Protocol):
    """One platform under the loop: its fake, a person talking to the bot, and ways to make its sends fail."""

    limit: int | None

    async def start(self, handler: RecordingHandler, grace: float, **settings: Any) -> ChatBackend[Any]:
        """`settings`: overrides of the platform's `Settings` (the console takes none)."""
        ...

    async def say(self, text: str) -> None: ...

    def received(self) -> list[tuple[str | None, str]]:
        """(platform id, text) of what the bot sent to the person, in order."""
        ...

    def fail_sends(self, after: int) -> None: ...


class TelegramPlatform:
    limit = 4096

    def __init__(self, fake: FakeTelegram) -> None:
        self.fake = fake
        self.person = fake.user(7001, "Ana")
        self.chat = fake.private_chat(self.person)

    async def start(self, handler: RecordingHandler, grace: float, **overrides: Any) -> ChatBackend[Any]:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            telegram_bot_token=self.fake.token,
            telegram_base_url=self.fake.base_url,
            telegram_base_file_url=self.fake.base_file_url,
            **overrides,
        )
        backend = TelegramBackend(settings=settings, handler=handler, stop_grace_s=grace)
        await backend.start()
        return backend

    async def say(self, text: str) -> None:
        self.fake.user_says(self.chat, self.person, text)

    def received(self) -> list[tuple[str | None, str]]:
        return [(str(m["message_id"]), m["text"]) for m in self.fake.sent_messages(self.person.id)]

    def fail_sends(self, after: int) -> None:
        self.fake.fail_next("sendMessage", status=500, explained=True, after=after)  # final: it may have arrived

    def hold_sends(self, after: int) -> None:
        self.fake.hold("sendMessage", after=after)

    async def wait_for_a_held_send(self) -> None:
        await self.fake.wait_until(lambda: len(self.fake.held_calls("sendMessage")) == 1)

    def typing_calls(self) -> list[float]:
        """When each "typing…" request reached the platform."""
        return [call.at for call in self.fake.calls_to("sendChatAction")]

    async def wait_for_typing(self) -> None:
        await self.fake.wait_until(lambda: bool(self.typing_calls()))


class DiscordPlatform:
    limit = 2000

    def __init__(self, fake: FakeDiscord) -> None:
        self.fake = fake
        self.person = fake.add_user("ana")
        self.channel = fake.dm_channel(self.person)

    async def start(self, handler: RecordingHandler, grace: float, **overrides: Any) -> ChatBackend[Any]:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            discord_bot_token=self.fake.token,
            discord_api_base_url=self.fake.api_base_url,
            discord_gateway_url=self.fake.gateway_url,
            discord_guild_ids=str(self.fake.guild_id),
            shutdown_grace_seconds=grace,
            **overrides,
        )
        backend = DiscordBackend(settings=settings, handler=handler, ready_timeout=15, guild_ready_timeout=0.05)
        await backend.start()
        return backend

    async def say(self, text: str) -> None:
        await self.fake.send_message(self.person, text)

    def received(self) -> list[tuple[str | None, str]]:
        return [(post["id"], post["content"]) for post in self.fake.posts_in(self.channel)]

    def fail_sends(self, after: int) -> None:
        self.fake.fail_next(rf"POST /channels/{self.channel}/messages", status=403, after=after)

    def hold_sends(self, after: int) -> None:
        self.fake.hold(rf"POST /channels/{self.channel}/messages", after=after)

    async def wait_for_a_held_send(self) -> None:
        await self.fake.wait_until(lambda: len(self.fake.held_calls()) == 1)

    def typing_calls(self) -> list[float]:
        """When each "typing…" request reached the platform."""
        return [call.at for call in self.fake.calls_to(rf"POST /channels/{self.channel}/typing")]

    async def wait_for_typing(self) -> None:
        await self.fake.wait_until(lambda: bool(self.typing_calls()))


class _Screen(io.StringIO):
    """The console's stdout: what was printed, and a terminal that fails (OSError) after `works` more writes."""

    def __init__(self) -> None:
        super().__init__()
        self.works: int | None = None
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        if self.works is not None:
            if self.works <= 0:
                raise OSError("the terminal went away")
            self.works -= 1
        self.writes.append(text)
        return super().write(text)


class ConsolePlatform:
    limit = None

    def __init__(self, tmp_path: Path) -> None:
        read, self._write_end = os.pipe()
        self.stdin = os.fdopen(read, "r")
        self.stdout = _Screen()
        self.tmp_path = tmp_path

    async def start(self, handler: RecordingHandler, grace: float, **overrides: Any) -> ChatBackend[Any]:
        backend = ConsoleBackend(
            handler=handler, bot_name="Magpie", exports_dir=self.tmp_path, stdin=self.stdin, stdout=self.stdout,
            stop_grace_s=grace,
        )  # fmt: skip
        await backend.start()
        return backend

    async def say(self, text: str) -> None:
        os.write(self._write_end, f"{text}\n".encode())

    def received(self) -> list[tuple[str | None, str]]:
        """One write a reply, read back without the marker and indentation the console prints it with."""
        replies = []
        for printed in self.stdout.writes:
            first, *rest = printed.removesuffix("\n").split("\n")
            width = len("magpie> ")
            assert first.startswith("magpie> ") and all(not line or line.startswith(" " * width) for line in rest)
            replies.append((None, "\n".join(line[width:] for line in [first, *rest])))
        return replies

    def fail_sends(self, after: int) -> None:
        self.stdout.works = after

    def close(self) -> None:
        os.close(self._write_end)  # the reader thread sees the end of input
        self.stdin.close()


@pytest.fixture(params=["telegram", "discord", "console"])
async def platform(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Platform]:
    if request.param == "telegram":
        async with FakeTelegram() as telegram:
            yield TelegramPlatform(telegram)
    elif request.param == "discord":
        base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
        try:
            async with FakeDiscord() as fake:
                yield DiscordPlatform(fake)
        finally:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = base, gateway
    else:
        console = ConsolePlatform(tmp_path)
        try:
            yield console
        finally:
            console.close()


@contextlib.asynccontextmanager
async def running(
    platform: Platform, handler: RecordingHandler, grace: float = 10.0, **settings: Any
) -> AsyncIterator[ChatBackend[Any]]:
    backend = await platform.start(handler, grace, **settings)
    try:
        yield backend
    finally:
        await backend.stop()


def long_reply(limit: int | None) -> str:
    """Three paragraphs, each close to the platform's limit (the console has none: then 1,500 characters each)."""
    size = int((limit or 1_500) * 0.9)
    return "\n\n".join(f"Part {n}. " + ("word " * size)[: size - 8].strip() for n in (1, 2, 3))


def parts_for(platform: Platform) -> int:
    return 1 if platform.limit is None else 3


async def test_a_long_reply_is_split_at_the_platforms_limit_and_its_ids_are_recorded(platform: Platform) -> None:
    answer = long_reply(platform.limit)
    handler = RecordingHandler(lambda _message: answer)
    async with running(platform, handler):
        await platform.say("tell me everything")
        await handler.wait_until(lambda: len(handler.delivered) == 1)
    received = platform.received()
    assert len(received) == parts_for(platform)
    assert all(platform.limit is None or len(text) <= platform.limit for _, text in received)
    assert " ".join(text for _, text in received).split() == answer.split()
    [(_, ids)] = handler.delivered
    assert ids == [ident for ident, _ in received if ident is not None]
    assert handler.undelivered == [] and handler.interrupted == []


async def test_a_send_failing_part_way_records_how_many_parts_arrived(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telegram_requests, "BACKOFF_FIRST_S", 0.01)
    answer = long_reply(platform.limit)
    handler = RecordingHandler(lambda _message: answer)
    arrive = parts_for(platform) - 1  # all but the last part (the console's one part: none)
    async with running(platform, handler):
        platform.fail_sends(after=arrive)
        await platform.say("tell me everything")
        await handler.wait_until(lambda: len(handler.undelivered) == 1)
    [(reply, reason, parts_sent)] = handler.undelivered
    assert parts_sent == arrive == len(platform.received())
    assert reply.text == answer and reason and handler.delivered == []


async def test_stop_waits_for_the_reply_in_flight_within_the_grace(
    platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot.backend")
    handler = RecordingHandler(lambda _message: HELLO)
    handler.gates["slow one"] = asyncio.Event()
    backend = await platform.start(handler, grace=WAIT_S)
    await platform.say("slow one")
    await handler.wait_until(lambda: "slow one" in handler.entered)
    stopping = asyncio.create_task(backend.stop())
    await _logged("letting 1 replies finish")
    done, _ = await asyncio.wait({stopping}, timeout=0.5)  # a stop that does not wait is over long before this
    assert not done and handler.delivered == []
    handler.gates["slow one"].set()
    await asyncio.wait_for(stopping, WAIT_S)
    assert [text for _, text in platform.received()] == ["hello"]
    assert len(handler.delivered) == 1 and handler.cancelled == set()


async def test_stop_cancels_what_is_still_in_the_core_after_the_grace(platform: Platform) -> None:
    handler = RecordingHandler(lambda _message: HELLO)
    handler.gates["endless"] = asyncio.Event()  # never opened
    backend = await platform.start(handler, grace=0.2)
    await platform.say("endless")
    await handler.wait_until(lambda: "endless" in handler.entered)
    await asyncio.wait_for(backend.stop(), WAIT_S)
    assert handler.cancelled == {"endless"}
    assert platform.received() == [] and handler.delivered == handler.undelivered == []


@pytest.mark.parametrize("platform", ["telegram", "discord"], indirect=True)
async def test_a_send_cut_off_by_stop_is_left_to_recovery_with_the_parts_that_arrived(platform: Any) -> None:
    answer = long_reply(platform.limit)
    handler = RecordingHandler(lambda _message: answer)
    backend = await platform.start(handler, grace=0.2)
    platform.hold_sends(after=1)
    await platform.say("tell me everything")
    await platform.wait_for_a_held_send()
    await asyncio.wait_for(backend.stop(), WAIT_S)
    [(reply, parts_sent)] = handler.interrupted
    assert parts_sent == 1 and reply.text == answer
    assert handler.delivered == handler.undelivered == []


@pytest.mark.parametrize("platform", ["telegram", "discord"], indirect=True)
async def test_a_quick_answer_shows_no_typing(platform: Any) -> None:
    """Each "typing…" is a call against the platform's budget (Telegram: ~30 a second in all): an answer ready
    within TYPING_AFTER_MS (default 1 s) goes out without one."""
    handler = RecordingHandler(lambda _message: HELLO)
    async with running(platform, handler):
        await platform.say("quick one")
        await handler.wait_until(lambda: len(handler.delivered) == 1)
    assert [text for _, text in platform.received()] == ["hello"]
    assert platform.typing_calls() == []


@pytest.mark.parametrize("platform", ["telegram", "discord"], indirect=True)
async def test_a_slow_answer_shows_typing_once_it_took_longer_than_the_delay(platform: Any) -> None:
    handler = RecordingHandler(lambda _message: HELLO)
    handler.gates["slow one"] = asyncio.Event()
    async with running(platform, handler, typing_after_ms=300):
        await platform.say("slow one")
        await platform.wait_for_typing()
        assert handler.delivered == [], "typing while the core still works"
        handler.gates["slow one"].set()
        await handler.wait_until(lambda: len(handler.delivered) == 1)
    first_typing = platform.typing_calls()[0]
    assert first_typing - handler.entered_at["slow one"] >= 0.3
    assert [text for _, text in platform.received()] == ["hello"]


async def _logged(needle: str) -> None:
    """Awaits a log record of `bot.backend` containing `needle`."""
    seen = asyncio.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if needle in record.getMessage():
                seen.set()

    watcher = Seen()
    logging.getLogger("bot.backend").addHandler(watcher)
    try:
        await asyncio.wait_for(seen.wait(), WAIT_S)
    finally:
        logging.getLogger("bot.backend").removeHandler(watcher)


async def test_one_typing_indicator_serves_every_answer_awaited_in_a_chat(tmp_path: Path) -> None:
    """ "typing…" shows for the whole chat: while one shows (`typing_renew_s`), a second answer awaited in the same
    chat sends none; another chat still gets its own."""
    backend = ConsoleBackend(
        handler=RecordingHandler(lambda _message: HELLO), bot_name="Magpie", exports_dir=tmp_path, stop_grace_s=1.0
    )
    assert backend._typing_due("chat a")
    assert not backend._typing_due("chat a")
    assert backend._typing_due("chat b")
    backend._typing_shown["chat a"] -= backend.typing_renew_s  # the indicator has faded: renew it
    assert backend._typing_due("chat a")
    assert not backend._typing_due("chat a")
    await backend._send_parts("chat a", [Part("an answer")], [], quote=None)  # the bot's message ends it
    assert backend._typing_due("chat a")
