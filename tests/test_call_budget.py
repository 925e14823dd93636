"""The platform's call budget (issue #12, item 4) under the fake Bot API's flood limits, through the real
python-telegram-bot client, the real ChatService and the tiny real model.

A group's budget is 20 messages a minute (`tests/fake_flood.py`); PTB's AIORateLimiter keeps to it by holding
the 21st reply about 3 s, the 22nd about 6 s, and so on. Those held replies are the send queue the busy check
counts: nothing here is held by the test, and nothing waits on a clock."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from bot.telegram import TelegramBackend
from core.chat.messages import IncomingMessage, Reply
from core.chat.service import ChatService
from core.serving.engine import Engine, ModelRef
from core.settings import Settings
from core.storage.db import Database, upgrade
from core.texts import BUSY
from tests.fake_telegram import FakeTelegram

WAIT = 60.0
GROUP_BUDGET = 20
"""Telegram's messages a minute into one group, as the fake enforces it and PTB paces to it."""
QUEUED = 12
"""Replies past the budget: at one per 3 s they keep more than SEND_QUEUE_LIMIT=2 waiting for about half a minute,
however slowly the machine made them."""


class Answers:
    """What the core answered each message with, and whether the backend asked for the busy note, as they come."""

    def __init__(self) -> None:
        self.by_text: dict[str, tuple[bool, str]] = {}
        self.delivered = 0
        self.changed = asyncio.Condition()

    async def noted(self, message: IncomingMessage, busy: bool, reply: Reply | None) -> None:
        async with self.changed:
            self.by_text[message.text or ""] = (busy, reply.text if reply is not None else "")
            self.changed.notify_all()

    async def was_delivered(self) -> None:
        async with self.changed:
            self.delivered += 1
            self.changed.notify_all()

    async def wait_for(self, count: int, *, delivered: int = 0) -> None:
        async with asyncio.timeout(WAIT), self.changed:
            await self.changed.wait_for(lambda: len(self.by_text) >= count and self.delivered >= delivered)


@contextlib.asynccontextmanager
async def serving(telegram: FakeTelegram, db: Database, model_dir: Path, **overrides: Any) -> AsyncIterator[None]:
    """`magpie run`'s assembly; a stop cancels the replies still queued for Telegram (no grace)."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        telegram_bot_token=SecretStr(telegram.token),
        telegram_base_url=telegram.base_url,
        telegram_base_file_url=telegram.base_file_url,
        base_model=str(model_dir),
        device="cpu",
        temperature=0.0,
        max_new_tokens=8,
        torch_threads=1,  # on a busy machine a second thread stalls more than it helps
        shutdown_grace_seconds=0,
        **overrides,
    )
    engine = Engine.from_settings(settings)
    await engine.start(ModelRef(source=str(model_dir), name="tiny"))
    backend = TelegramBackend(settings=settings, handler=ChatService(settings=settings, db=db, engine=engine))
    try:
        await backend.start()
        yield
    finally:
        await backend.stop()
        await engine.close()


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """A fresh SQLite database: what is tested is the adapter's queue, which no database changes."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'magpie.db'}"
    await upgrade(url)
    database = Database.connect(url)
    try:
        yield database
    finally:
        await database.close()


async def test_replies_queued_by_a_groups_flood_limit_make_new_messages_get_the_busy_note(
    db: Database, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 replies spend the group's budget for the minute; the next ones wait in PTB's rate limiter (more than
    SEND_QUEUE_LIMIT=2), so the message after them gets the busy note at once, and Telegram refused nothing."""
    answers = Answers()
    handle, mark_delivered = ChatService.handle, ChatService.mark_delivered

    async def noting(self: ChatService, message: IncomingMessage, *, busy: bool = False) -> Reply | None:
        reply = await handle(self, message, busy=busy)
        await answers.noted(message, busy, reply)  # before the backend queues the reply's send
        return reply

    async def counting(self: ChatService, reply: Reply, platform_message_ids: list[str]) -> None:
        await mark_delivered(self, reply, platform_message_ids)
        await answers.was_delivered()

    monkeypatch.setattr(ChatService, "handle", noting)
    monkeypatch.setattr(ChatService, "mark_delivered", counting)
    async with FakeTelegram() as telegram:
        group = telegram.group(-100700, "Crowded group")
        people = [telegram.user(7000 + n, f"Person {n}") for n in range(GROUP_BUDGET + QUEUED + 1)]
        async with serving(telegram, db, tiny_model_dir, send_queue_limit=2, typing_after_ms=60_000):
            for n, person in enumerate(people[:GROUP_BUDGET]):
                telegram.user_says(group, person, f"@MagpieTestBot hello {n}")
            await answers.wait_for(GROUP_BUDGET, delivered=GROUP_BUDGET)  # sent, and Telegram's answers read
            for n, person in enumerate(people[GROUP_BUDGET:-1]):
                telegram.user_says(group, person, f"@MagpieTestBot are you there {n}?")
            await answers.wait_for(GROUP_BUDGET + QUEUED)  # the model answers made, their sends held by the limiter
            telegram.user_says(group, people[-1], "@MagpieTestBot anyone?")
            await answers.wait_for(GROUP_BUDGET + QUEUED + 1)
        statuses = {call.status for call in telegram.calls_to("sendMessage")}
    assert answers.by_text["anyone?"] == (True, BUSY), "the message after the queue gets the busy note"
    queued = [answers.by_text[f"are you there {n}?"] for n in range(QUEUED)]
    assert all(not busy and text != BUSY for busy, text in queued), "the queue built up from model answers"
    assert statuses == {200}, "PTB kept to the flood limit: Telegram refused nothing"
    assert telegram.flood.refused == 0
