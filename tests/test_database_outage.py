"""The database goes away while people write (issue #21, item 10): a PostgreSQL cluster of the test's own is shut
down (a fast shutdown cuts every connection, as a restart or a failover does) for 15 seconds while twelve people
write to the bot through the real python-telegram-bot client against the fake Telegram. No message is lost, each
is answered once and logged once when the database is back, and nobody is told anything about the outage.

The mechanism (`core.storage.db_retry`, `bot.telegram_requests.UpdateGate`): a message whose logging fails waits for the
database; meanwhile the bot asks Telegram for no new updates, so it confirms none that is not logged, and what is
written during the outage waits at Telegram (the fake, like Telegram, delivers unconfirmed updates again).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from bot.telegram import TelegramBackend
from core.chat.service import ChatService
from core.serving.engine import Engine, ModelRef
from core.settings import Settings
from core.storage.db import Database, upgrade
from core.storage.models import Delivery, Role
from core.storage.models import Message as DbMessage
from core.texts import GENERIC_FAILURE, NOT_LOGGED
from tests.fake_telegram import FakeTelegram
from tests.throwaway_services import ThrowawayPostgres

PEOPLE = 12
OUTAGE_S = 15.0
ANSWER_WITHIN_S = 240.0
"""Generous on a loaded 2-core machine: twelve tiny-model answers and PostgreSQL's own start."""


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake


async def _count(db: Database, role: Role) -> int:
    async with db.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(DbMessage).where(DbMessage.role == role)) or 0)


@pytest.mark.slow
async def test_a_15_second_postgresql_outage_loses_no_message_and_answers_each_once(
    telegram: FakeTelegram, throwaway_postgres: ThrowawayPostgres, tiny_model_dir: Path
) -> None:
    await upgrade(throwaway_postgres.url)
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        telegram_bot_token=telegram.token, telegram_base_url=telegram.base_url,
        telegram_base_file_url=telegram.base_file_url, database_url=throwaway_postgres.url,
        base_model=str(tiny_model_dir), device="cpu", temperature=0.0, max_new_tokens=6, rate_limit_per_minute=100,
    )  # fmt: skip
    people = [telegram.user(7000 + n, f"Person{n}") for n in range(PEOPLE)]
    chats = [telegram.private_chat(person) for person in people]
    db = Database.connect(settings.database_url)
    engine = Engine.from_settings(settings)
    await engine.start(ModelRef(source=str(tiny_model_dir), name="tiny"))
    service = ChatService(settings=settings, db=db, engine=engine)
    backend = TelegramBackend(settings=settings, handler=service)
    await backend.start()
    try:
        for phase, (when, text) in enumerate((("before", "hello there"), ("during", "how are you today?"))):
            for person, chat in zip(people, chats, strict=True):
                telegram.user_says(chat, person, f"{text} ({when}, {person.first_name})")
            if when == "during":
                continue
            for person in people:
                await telegram.wait_for_messages(person.id, phase + 1, within=ANSWER_WITHIN_S)
            await throwaway_postgres.stop()  # the outage starts, right after the first round was answered
        await asyncio.sleep(OUTAGE_S)  # the outage itself: people wrote at its start, nobody is answered during it
        assert all(len(telegram.sent_messages(person.id)) == 1 for person in people), "no answer without a log"
        await throwaway_postgres.start()
        for person in people:
            await telegram.wait_for_messages(person.id, 2, within=ANSWER_WITHIN_S)
        for person, chat in zip(people, chats, strict=True):
            telegram.user_says(chat, person, f"what is your favourite colour? (after, {person.first_name})")
        for person in people:
            await telegram.wait_for_messages(person.id, 3, within=ANSWER_WITHIN_S)
    finally:
        await backend.stop()
        await engine.close()
    try:
        for person in people:
            answers = [message["text"] for message in telegram.sent_messages(person.id)]
            assert len(answers) == 3, f"{person.first_name} got {answers}"
            assert not {_s for _s in answers} & {NOT_LOGGED, GENERIC_FAILURE}, "nobody heard about the outage"
        assert await _count(db, Role.USER) == 3 * PEOPLE, "every message logged once"
        assert await _count(db, Role.BOT) == 3 * PEOPLE, "and answered once"
        async with db.sessions() as session:
            sent = await session.scalar(
                select(func.count()).select_from(DbMessage).where(DbMessage.delivery == Delivery.SENT)
            )
        assert sent == 3 * PEOPLE
    finally:
        await db.close()
