"""Voices: each community's own (VOICE_SCOPE=community), and erasure that reaches the model in both scopes.

Everything is real: the chat service, the engine with a tiny GPT-2 on which LoRA adapters are loaded per row, the
database (SQLite and PostgreSQL), the orchestrator and the `python -m trainer.retrain` processes it spawns.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.storage.db import Database
from core.storage.models import ModelVersion, VersionStatus
from core.storage.versions import get_active_version, get_version
from tests.voice_support import (
    PHRASE_2,
    PHRASE_A,
    QUESTION,
    QUESTION_2,
    VoiceBot,
    build_voice_model,
    lesson,
    runs_done,
    said,
    start_voice_bot,
    voice_settings,
)

pytestmark = pytest.mark.slow

ADMIN = "42"
GROUP = "-700"


@pytest.fixture(scope="session")
def voice_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_voice_model(tmp_path_factory.mktemp("voice-model"))


async def ask(bot: VoiceBot, text: str, *, user: str, chat: str | None = None) -> str:
    """Asks the bot in a fresh context (a /reset first), as each lesson was taught."""
    if not text.startswith("/"):
        await bot.service.handle(said("/reset", user=user, chat=chat, addressed=False))
    reply = await bot.service.handle(said(text, user=user, chat=chat))
    assert reply is not None
    return reply.text


TEACHERS = range(2000, 2006)
"""The six people who teach PHRASE_A (and later all send /forget)."""


@pytest.fixture(params=["shared", "community"])
async def taught(
    request: pytest.FixtureRequest, db: Database, database_url: str, voice_model_dir: Path, tmp_path: Path
) -> AsyncIterator[VoiceBot]:
    """A bot in `request.param` scope whose group taught two lessons (six people each), retrained once."""
    scope = request.param
    settings = voice_settings(tmp_path, database_url, voice_model_dir, voice_scope=scope, train_method="full")
    bot = await start_voice_bot(settings, db)
    try:
        lines = lesson(QUESTION, PHRASE_A, askers=range(1000, 1003), answerers=TEACHERS, reset=True)
        lines += lesson(QUESTION_2, PHRASE_2, askers=range(1000, 1003), answerers=range(3000, 3006), reset=True)
        for user, text in lines:
            await bot.service.handle(said(text, user=user, chat=GROUP, addressed=False))
        assert "started" in await ask(bot, "/retrain", user=ADMIN, chat=GROUP)
        await runs_done(bot.orchestrator)
        yield bot
    finally:
        await bot.stop()


async def test_everyone_who_taught_a_phrase_forgets_it_and_the_model_no_longer_says_it(taught: VoiceBot) -> None:
    bot = taught
    community = f"telegram:{GROUP}" if bot.settings.community_voices else None
    async with bot.db.sessions() as session:
        first = await get_active_version(session, community=community)
    assert first is not None and first.name == "v1", "the lessons were learned and promoted"
    assert PHRASE_A in await ask(bot, QUESTION, user="900", chat=GROUP)
    assert PHRASE_2 in await ask(bot, QUESTION_2, user="900", chat=GROUP)

    replies = [await ask(bot, "/forget", user=str(teacher)) for teacher in TEACHERS]
    # The first /forget took v1 out of service at once: nothing clean came before it, so the bare base serves.
    assert "v1 will never answer anyone again" in replies[0] and "untrained base model" in replies[0]
    assert "A new version is being trained without your messages" in replies[0]
    assert PHRASE_A not in await ask(bot, QUESTION, user="901", chat=GROUP)
    assert not (bot.settings.models_dir / first.name).exists(), "its files are deleted once nothing serves it"

    await runs_done(bot.orchestrator)  # the one further run, queued by the erasure
    async with bot.db.sessions() as session:
        second = await get_active_version(session, community=community)
        old = await get_version(session, version_id=first.id)
    assert second is not None and second.id != first.id and second.holds_withdrawn_at is None
    assert old is not None and old.holds_withdrawn_at is not None and old.status is not VersionStatus.ACTIVE
    assert PHRASE_A not in await ask(bot, QUESTION, user="902", chat=GROUP)
    assert PHRASE_2 in await ask(bot, QUESTION_2, user="902", chat=GROUP), "what others taught is still said"

    refused = await ask(bot, "/rollback v1", user=ADMIN, chat=GROUP)
    assert "v1 learned from messages whose authors withdrew them" in refused
    refused = await ask(bot, "/rollback", user=ADMIN, chat=GROUP)
    assert "no earlier version" in refused.lower()
    async with bot.db.sessions() as session:
        still = await get_active_version(session, community=community)
    assert still is not None and still.id == second.id
    assert isinstance(still, ModelVersion)


async def test_an_admins_private_retrain_trains_every_community_one_after_another(
    db: Database, database_url: str, voice_model_dir: Path, tmp_path: Path
) -> None:
    settings = voice_settings(tmp_path, database_url, voice_model_dir, train_epochs=5, retrain_min_new_messages=4)
    bot = await start_voice_bot(settings, db)
    try:
        for chat, answer in (("-801", PHRASE_A), ("-802", PHRASE_2)):
            for user, text in lesson(QUESTION, answer, askers=range(1000, 1002), answerers=range(2000, 2004)):
                await bot.service.handle(said(text, user=user, chat=chat, addressed=False))
        await bot.service.handle(said("only one line", user="5", chat="-803", addressed=False))  # not enough new

        started = await ask(bot, "/retrain", user=ADMIN)
        assert "Training the voices of 2 communities, one after another: telegram:-801, telegram:-802" in started
        await runs_done(bot.orchestrator)
    finally:
        await bot.stop()
    [summary] = [text for text in bot.notifier.texts() if text.startswith("Retraining the communities' voices")]
    assert "- The voice of telegram:-801: Training run #1 finished" in summary
    assert "- The voice of telegram:-802: Training run #2 finished" in summary
    assert all(chat == ADMIN for _, chat, _ in bot.notifier.sent)
    async with db.sessions() as session:
        for community in ("telegram:-801", "telegram:-802"):
            active = await get_active_version(session, community=community)
            assert active is not None and active.community == community
        assert await get_active_version(session, community="telegram:-803") is None
