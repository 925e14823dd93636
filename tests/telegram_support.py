"""Running Magpie's Telegram adapter in tests, shared by every test file that does: settings aimed at the fake
Telegram (`tests/fake_telegram.py`), a started backend, and the whole service as `magpie run` assembles it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bot.telegram import TelegramBackend
from core.chat.service import ChatService
from core.outcomes import RunStarted, VoicesQueued
from core.serving.engine import Engine, ModelRef
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import Chat, Message
from tests.fake_telegram import FakeTelegram


def settings_for(fake: FakeTelegram, **overrides: Any) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        telegram_bot_token=overrides.pop("token", fake.token),
        telegram_base_url=fake.base_url,
        telegram_base_file_url=fake.base_file_url,
        **overrides,
    )


@contextlib.asynccontextmanager
async def running(settings: Settings, handler: Any, **kwargs: Any) -> AsyncIterator[TelegramBackend]:
    backend = TelegramBackend(settings=settings, handler=handler, **kwargs)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


class RecordingRetrainer:
    """The `Retrainer` seam (training itself is the trainer's business): records who asked."""

    def __init__(self) -> None:
        self.requests: list[str] = []

    async def request(
        self,
        *,
        triggered_by: str,
        notify_platform: str | None,
        notify_chat_id: str | None,
        community: str | None = None,
    ) -> RunStarted:
        self.requests.append(triggered_by)
        return RunStarted(len(self.requests), reports_here=notify_chat_id is not None)

    async def retrain_voices(
        self, communities: Sequence[str | None], *, triggered_by: str, notify: tuple[str, str] | None = None
    ) -> VoicesQueued:
        self.requests.append(triggered_by)
        return VoicesQueued(tuple(community or "shared" for community in communities))


@dataclass
class Served:
    telegram: FakeTelegram
    db: Database
    retrainer: RecordingRetrainer
    settings: Settings


@contextlib.asynccontextmanager
async def serving(telegram: FakeTelegram, db: Database, model_dir: Path, **overrides: Any) -> AsyncIterator[Served]:
    """Engine + ChatService + TelegramBackend as `magpie run` assembles them; everything is stopped on exit, so
    assertions after the block see every reply delivered and its delivery recorded."""
    settings = settings_for(
        telegram,
        base_model=str(model_dir),
        device="cpu",
        temperature=0.0,
        max_new_tokens=8,
        admin_ids="telegram:42",
        **overrides,
    )
    engine = Engine.from_settings(settings)
    await engine.start(ModelRef(source=str(model_dir), name="tiny"))
    retrainer = RecordingRetrainer()
    service = ChatService(settings=settings, db=db, engine=engine, retrainer=retrainer)
    try:
        async with running(settings, service):
            yield Served(telegram, db, retrainer, settings)
    finally:
        await engine.close()


async def logged(db: Database, chat_id: int | str | None = None) -> list[Message]:
    """Every logged message (optionally of one Telegram chat, or "<chat>:<topic>"), oldest first."""
    query = select(Message).join(Chat, Chat.id == Message.chat_id).order_by(Message.id)
    if chat_id is not None:
        query = query.where(Chat.platform == "telegram", Chat.platform_chat_id == str(chat_id))
    async with db.sessions() as session:
        return list((await session.scalars(query)).all())
