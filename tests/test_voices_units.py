"""The pieces of voices that need no training: which community a chat's log belongs to, the split of a community
that is one long conversation, one active version per voice, what erasure marks, and an adapter's size."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from sqlalchemy import update
from transformers import GPT2Config, GPT2LMHeadModel

from core.outcomes import SwitchRefusal, SwitchRefused, VersionList, VersionSummary
from core.serving.engine import Engine
from core.serving.model_serving import ModelServing
from core.settings import Settings
from core.storage.chat_log import communities, communities_with_new_data, migrate_chat, upsert_chat
from core.storage.db import Database
from core.storage.models import Chat, ModelVersion, VersionStatus
from core.storage.versions import (
    activate_version,
    get_active_version,
    mark_holding_withdrawn,
    register_version,
)
from core.texts import version_list
from tests.conftest import engine_config, generation_params
from tests.dataset_support import ChatLog, make_settings
from trainer.dataset import build_dataset
from trainer.train import TrainArguments, with_fresh_adapter


async def _set_community(db: Database, chat: str, community: str) -> None:
    async with db.sessions.begin() as session:
        await session.execute(update(Chat).where(Chat.platform_chat_id == chat).values(community=community))


async def test_a_community_trains_on_its_own_chats_and_holds_out_its_latest_messages(db: Database) -> None:
    log = ChatLog(db)
    start = datetime(2026, 12, 1, 12, 0)
    for minute in range(10):  # one long conversation: no pause, no /reset
        await log.say("-1", f"ann{minute % 5}", f"zebra line {minute}", at=start + timedelta(minutes=minute))
    await log.say("-2", "cid", "otter line", at=start)
    await log.say("55", "dee", "a private word", kind="private", at=start)
    await _set_community(db, "-1", "telegram:-1")
    await _set_community(db, "-2", "telegram:-2")

    report = await build_dataset(
        make_settings(train_eval_fraction=0.2, train_on_private_chats=True), db, community="telegram:-1"
    )

    said = [s.target.text for s in (*report.train, *report.eval)]
    assert "otter line" not in said and "a private word" not in said
    held_out = [s.target.text for s in report.eval if not s.exchange]  # (with their short exchange samples)
    assert held_out == ["zebra line 8", "zebra line 9"]  # the most recent part
    assert len([s for s in report.train if not s.exchange]) == 8
    await log.say("-1:7", "bob", "a forum topic of the same group", at=start + timedelta(minutes=11))
    await _set_community(db, "-1:7", "telegram:-1")
    report = await build_dataset(make_settings(), db, community="telegram:-1")
    assert "a forum topic of the same group" in [s.target.text for s in (*report.train, *report.eval)]
    async with db.sessions() as session:
        assert await communities(session) == ["telegram:-1", "telegram:-2"]
        due = dict(await communities_with_new_data(session, min_new_messages=5))
    assert due == {"telegram:-1": 11}


async def test_a_chat_keeps_its_community_when_the_group_moves_to_a_new_id(db: Database) -> None:
    async with db.sessions.begin() as session:
        await upsert_chat(session, platform="telegram", platform_chat_id="-5", kind="group", community="telegram:-5")
    async with db.sessions.begin() as session:
        await migrate_chat(session, platform="telegram", old_chat_id="-5", new_chat_id="-1005")
        moved = await upsert_chat(
            session, platform="telegram", platform_chat_id="-1005", kind="group", community="telegram:-1005"
        )
        assert moved.community == "telegram:-5"
    # The supergroup's first message may arrive before the migration notice: the merged chat keeps the old voice.
    async with db.sessions.begin() as session:
        await upsert_chat(session, platform="telegram", platform_chat_id="-6", kind="group", community="telegram:-6")
        await upsert_chat(
            session, platform="telegram", platform_chat_id="-1006", kind="group", community="telegram:-1006"
        )
    async with db.sessions.begin() as session:
        await migrate_chat(session, platform="telegram", old_chat_id="-6", new_chat_id="-1006")
        merged = await upsert_chat(session, platform="telegram", platform_chat_id="-1006", kind="group")
        assert merged.community == "telegram:-6"


async def _version(
    db: Database,
    name: str,
    *,
    community: str | None = None,
    parent: int | None = None,
    method: str = "full",
    manifest: dict[int, int | None] | None = None,
    active: bool = True,
) -> int:
    async with db.sessions.begin() as session:
        version = await register_version(
            session, name=name, path=f"/nowhere/{name}", community=community, parent_id=parent,
            metrics={"method": method}, manifest=(manifest or {}).items(),
        )  # fmt: skip
        if active:
            await activate_version(session, version_id=version.id)
        return version.id


async def test_each_voice_has_its_own_active_version_and_erasure_follows_inherited_weights(db: Database) -> None:
    shared_1 = await _version(db, "s1", manifest={1: 7})
    shared_2 = await _version(db, "s2", parent=shared_1)  # a full fine-tune on top of s1: inherits what it learned
    await _version(db, "a1", community="telegram:-1", manifest={2: 7}, active=False)
    adapter = await _version(db, "a2", community="telegram:-1", parent=shared_1, method="lora")
    other = await _version(db, "b1", community="telegram:-2", manifest={3: 8})
    async with db.sessions.begin() as session:
        assert (await get_active_version(session)).id == shared_2  # type: ignore[union-attr]
        assert (await get_active_version(session, community="telegram:-1")).id == adapter  # type: ignore[union-attr]
        assert (await get_active_version(session, community="telegram:-2")).id == other  # type: ignore[union-attr]
        marked = await mark_holding_withdrawn(session, user_id=7, now=datetime.now(UTC))
    assert [v.name for v in marked] == ["s1", "s2", "a1"]  # not a2: an adapter starts fresh from the base


async def test_rollback_to_a_version_that_holds_withdrawn_data_is_refused(db: Database, tmp_path: Path) -> None:
    await _version(db, "v1", community="telegram:-1", manifest={1: 7})
    await _version(db, "v2", community="telegram:-1")
    async with db.sessions.begin() as session:
        await mark_holding_withdrawn(session, user_id=7, now=datetime.now(UTC))
    settings = Settings(_env_file=None, models_dir=tmp_path, voice_scope="community")  # type: ignore[call-arg]
    serving = ModelServing(settings=settings, db=db)
    result = await serving.rollback(version="v1", triggered_by="test")
    assert result == SwitchRefused(SwitchRefusal.HOLDS_WITHDRAWN, "v1")
    async with db.sessions() as session:
        active = await get_active_version(session, community="telegram:-1")
        assert active is not None and active.name == "v2" and active.status is VersionStatus.ACTIVE
        assert isinstance(active, ModelVersion)


def test_a_default_adapter_for_gpt2_small_is_under_five_megabytes() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    args = TrainArguments.from_settings(settings, method="lora")
    with torch.device("meta"):  # GPT-2 small's shape, without its 500 MB
        model = GPT2LMHeadModel(GPT2Config())
    adapted = with_fresh_adapter(model, args)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert args.learning_rate == settings.lora_learning_rate and args.lora_rank == 8
    assert trainable * 4 < 5_000_000, f"{trainable} float32 weights"


def test_the_version_list_groups_versions_by_voice_and_marks_withdrawn_ones() -> None:
    at = datetime(2026, 12, 1, tzinfo=UTC)
    listing = VersionList(
        (
            VersionSummary("v3", VersionStatus.ACTIVE, 1.5, at, community="telegram:-1"),
            VersionSummary("v2", VersionStatus.ACTIVE, 2.0, at, community="discord:9"),
            VersionSummary("v1", VersionStatus.RETIRED, 2.5, at, community="telegram:-1", holds_withdrawn=True),
        ),
        0,
        "gpt2",
    )
    text = version_list(listing)
    first, second = text.index("The voice of telegram:-1:"), text.index("The voice of discord:9:")
    assert first < text.index("* v3") < text.index("  v1") < second < text.index("* v2")
    assert "v1: retired" in text and "learned from withdrawn messages: never serves again" in text


async def test_shared_scope_over_several_communities_warns_once_at_start(
    db: Database, tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with db.sessions.begin() as session:
        for chat in ("-1", "-2"):
            await upsert_chat(session, platform="telegram", platform_chat_id=chat, kind="group", community=f"t:{chat}")
    engine = Engine(engine_config(params=generation_params(max_new_tokens=4), torch_threads=1))
    settings = Settings(_env_file=None, models_dir=tmp_path, base_model=str(tiny_model_dir))  # type: ignore[call-arg]
    serving = ModelServing(settings=settings, db=db, engine=engine)

    async def no_starter() -> int:
        raise AssertionError("the base model is local")

    try:
        with caplog.at_level(logging.WARNING, logger="core.serving.model_serving"):
            await serving.start_engine(offline_starter=no_starter)
    finally:
        await engine.close()
    warned = [r for r in caplog.records if "VOICE_SCOPE=shared over a log of 2 communities" in r.getMessage()]
    assert len(warned) == 1


async def test_erasure_deletes_only_files_inside_models_dir(db: Database, tmp_path: Path) -> None:
    models_dir, elsewhere = tmp_path / "models", tmp_path / "operator-model"
    for directory in (models_dir / "v1", elsewhere):
        directory.mkdir(parents=True)
        (directory / "config.json").write_text("{}")
    async with db.sessions.begin() as session:
        for name, path in (("v1", models_dir / "v1"), ("mine", elsewhere)):
            await register_version(session, name=name, path=str(path), manifest=[(1, 7)])
    settings = Settings(_env_file=None, models_dir=models_dir)  # type: ignore[call-arg]
    withdrawal = await ModelServing(settings=settings, db=db).withdraw(user_id=7)
    assert withdrawal.marked == ("v1", "mine") and withdrawal.replaced == ()
    assert not (models_dir / "v1").exists() and (elsewhere / "config.json").is_file()
