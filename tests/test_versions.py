"""The model version registry: one active version at a time, atomic switches, and the training manifest."""

from __future__ import annotations

import pytest
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError

from core.storage.chat_log import forget_user
from core.storage.db import Database
from core.storage.models import Chat, Message, ModelVersion, Role, RunStatus, TrainingRun, User, VersionStatus
from core.storage.versions import (
    Withdrawn,
    activate_version,
    get_active_version,
    get_version,
    list_versions,
    manifest_message_ids,
    register_version,
    runs_in_progress,
    set_version_status,
    versions_trained_on_user,
    withdrawn_training_data,
)


async def _register(db: Database, name: str, manifest: dict[int, int | None] | None = None) -> int:
    async with db.sessions.begin() as session:
        version = await register_version(
            session, name=name, path=f"/models/{name}", metrics={"eval_loss": 1.5}, manifest=(manifest or {}).items()
        )
        return version.id


async def _statuses(db: Database) -> dict[str, VersionStatus]:
    async with db.sessions() as session:
        return {v.name: v.status for v in await list_versions(session)}


async def test_versions_start_as_candidates_and_activation_retires_the_old(db: Database) -> None:
    first = await _register(db, "v1")
    second = await _register(db, "v2")
    assert await _statuses(db) == {"v1": VersionStatus.CANDIDATE, "v2": VersionStatus.CANDIDATE}

    async with db.sessions.begin() as session:
        assert await get_active_version(session) is None
        await activate_version(session, version_id=first)
    async with db.sessions.begin() as session:
        await activate_version(session, version_id=second)

    assert await _statuses(db) == {"v1": VersionStatus.RETIRED, "v2": VersionStatus.ACTIVE}
    async with db.sessions() as session:
        active = await get_active_version(session)
        assert active is not None and active.name == "v2" and active.activated_at is not None
        assert active.metrics == {"eval_loss": 1.5}
        assert [v.name for v in await list_versions(session)] == ["v2", "v1"]
        by_name = await get_version(session, name="v1")
        assert by_name is not None and by_name.id == first


async def test_rollback_marks_the_replaced_version(db: Database) -> None:
    first, second = await _register(db, "v1"), await _register(db, "v2")
    for version_id in (first, second):
        async with db.sessions.begin() as session:
            await activate_version(session, version_id=version_id)
    async with db.sessions.begin() as session:
        await activate_version(session, version_id=first, previous_becomes=VersionStatus.ROLLED_BACK)
    assert await _statuses(db) == {"v1": VersionStatus.ACTIVE, "v2": VersionStatus.ROLLED_BACK}


async def test_a_failed_transaction_leaves_the_old_version_active(db: Database) -> None:
    first, second = await _register(db, "v1"), await _register(db, "v2")
    async with db.sessions.begin() as session:
        await activate_version(session, version_id=first)
    with pytest.raises(RuntimeError, match="crash"):
        async with db.sessions.begin() as session:
            await activate_version(session, version_id=second)
            raise RuntimeError("crash between the two updates and the commit")
    assert await _statuses(db) == {"v1": VersionStatus.ACTIVE, "v2": VersionStatus.CANDIDATE}


async def test_the_database_refuses_two_active_versions(db: Database) -> None:
    first, second = await _register(db, "v1"), await _register(db, "v2")
    async with db.sessions.begin() as session:
        await activate_version(session, version_id=first)
    with pytest.raises(IntegrityError):
        async with db.sessions.begin() as session:
            row = await session.get(ModelVersion, second)
            assert row is not None
            row.status = VersionStatus.ACTIVE  # bypassing activate_version
    assert await _statuses(db) == {"v1": VersionStatus.ACTIVE, "v2": VersionStatus.CANDIDATE}


async def test_rejection_and_bad_calls(db: Database) -> None:
    version_id = await _register(db, "v1")
    async with db.sessions.begin() as session:
        rejected = await set_version_status(
            session, version_id=version_id, status=VersionStatus.REJECTED, note="eval loss 3.2 > 3.1"
        )
        assert rejected.note == "eval loss 3.2 > 3.1"
        with pytest.raises(ValueError, match="activate_version"):
            await set_version_status(session, version_id=version_id, status=VersionStatus.ACTIVE)
        with pytest.raises(LookupError):
            await activate_version(session, version_id=version_id + 100)
        with pytest.raises(ValueError):
            await activate_version(session, version_id=version_id, previous_becomes=VersionStatus.REJECTED)
        with pytest.raises(ValueError):
            await get_version(session)


async def test_the_manifest_outlives_forgotten_messages(db: Database) -> None:
    async with db.sessions.begin() as session:
        user = User(platform="telegram", platform_user_id="42", display_name="ann")
        chat = Chat(platform="telegram", platform_chat_id="7", kind="private")
        session.add_all([user, chat])
        await session.flush()
        message = Message(chat_id=chat.id, author_id=user.id, role=Role.USER, text="hi", platform_message_id="1")
        session.add(message)
        await session.flush()
        user_id, message_id = user.id, message.id
    trained = await _register(db, "v1", {message_id: user_id, 999: None})
    await _register(db, "v2", {1000: None})

    async with db.sessions.begin() as session:
        await session.execute(delete(Message).where(Message.author_id == user_id))  # what /forget does

    async with db.sessions() as session:
        assert [v.name for v in await versions_trained_on_user(session, user_id=user_id)] == ["v1"]
        assert await manifest_message_ids(session, version_id=trained) == {message_id, 999}


async def test_withdrawn_training_data_names_deleted_and_opted_out_messages(db: Database) -> None:
    async with db.sessions.begin() as session:
        ann = User(platform="telegram", platform_user_id="1", display_name="ann")
        bob = User(platform="telegram", platform_user_id="2", display_name="bob")
        cy = User(platform="telegram", platform_user_id="3", display_name="cy")
        chat = Chat(platform="telegram", platform_chat_id="-7", kind="group")
        session.add_all([ann, bob, cy, chat])
        await session.flush()
        rows = [
            Message(chat_id=chat.id, author_id=author.id, role=Role.USER, text=text, platform_message_id=text)
            for author, text in ((ann, "a1"), (ann, "a2"), (bob, "b1"), (cy, "c1"))
        ]
        session.add_all(rows)
        await session.flush()
        ids = {row.text: row.id for row in rows}
        authors = {row.id: row.author_id for row in rows}
    trained = await _register(db, "v1", authors)
    assert await _withdrawn(db, trained) == Withdrawn(frozenset(), frozenset())

    async with db.sessions.begin() as session:
        await forget_user(session, user_id=authors[ids["a1"]])  # ann: /forget
        bob_row = await session.get(User, authors[ids["b1"]])
        assert bob_row is not None
        bob_row.opted_out = True  # bob: /optout

    assert await _withdrawn(db, trained) == Withdrawn(frozenset({ids["a1"], ids["a2"]}), frozenset({ids["b1"]}))


async def _withdrawn(db: Database, version_id: int) -> Withdrawn:
    async with db.sessions.begin() as session:
        return await withdrawn_training_data(session, version_id=version_id)


async def test_runs_in_progress(db: Database) -> None:
    async with db.sessions.begin() as session:
        assert not await runs_in_progress(session)
        session.add(TrainingRun(status=RunStatus.PROMOTED, triggered_by="t"))
        await session.flush()
        assert not await runs_in_progress(session)
        running = TrainingRun(status=RunStatus.RUNNING, triggered_by="t")
        session.add(running)
        await session.flush()
        assert await runs_in_progress(session) == [running]
        assert await runs_in_progress(session, lock=True) == [running]
