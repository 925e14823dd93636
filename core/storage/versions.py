"""The model version registry: which trained models exist, which one serves, and what each was trained on.

Every function takes the session explicitly and does not commit: the caller owns the transaction
(`async with db.sessions.begin() as session: ...`), so that "retire the old, activate the new" is one unit of
work. That, plus the partial unique index on `status = 'active'`, is what makes activation atomic: a crash at any
moment leaves either the old or the new version active, and two concurrent activations cannot both win (the
second fails on the index and rolls back).

This module knows no model: putting the active version into the engine is `core.serving.model_serving`'s job.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from core.storage.models import Message as LoggedMessage
from core.storage.models import ModelVersion, ModelVersionMessage, RunStatus, TrainingRun, User, VersionStatus

SHARED_VOICE = "shared"
"""The name of the shared voice where a voice needs a name (the engine's voices, summaries). Communities are named
`<platform>:<id>` or `console`, so it cannot collide with one."""

RETIRING_STATUSES = frozenset({VersionStatus.RETIRED, VersionStatus.ROLLED_BACK})
"""What an active version may become when another takes its place (rolled back = it served badly)."""


async def register_version(
    session: AsyncSession,
    *,
    name: str,
    path: str,
    parent_id: int | None = None,
    metrics: dict[str, Any] | None = None,
    note: str | None = None,
    manifest: Iterable[tuple[int, int | None]] = (),
    community: str | None = None,
) -> ModelVersion:
    """Adds a trained model as a `candidate` of the voice `community` (None: the shared voice), with its manifest
    of (message id, user id) pairs.

    New versions never start active: activation goes through `activate_version` so it is always atomic.
    """
    version = ModelVersion(
        name=name,
        path=path,
        status=VersionStatus.CANDIDATE,
        parent_id=parent_id,
        metrics=dict(metrics or {}),
        note=note,
        community=community,
    )
    session.add(version)
    await session.flush()
    rows = [
        {"model_version_id": version.id, "message_id": message_id, "user_id": user_id}
        for message_id, user_id in dict(manifest).items()
    ]
    if rows:
        await session.execute(insert(ModelVersionMessage), rows)
    return version


async def list_versions(session: AsyncSession, *, community: str | None = None) -> Sequence[ModelVersion]:
    """All versions (with `community`, that community's voice's), newest first."""
    query = select(ModelVersion).order_by(ModelVersion.id.desc())
    if community is not None:
        query = query.where(ModelVersion.community == community)
    result = await session.scalars(query)
    return result.all()


async def get_version(
    session: AsyncSession, *, version_id: int | None = None, name: str | None = None
) -> ModelVersion | None:
    """One version by id or by name (exactly one of the two)."""
    if (version_id is None) == (name is None):
        raise ValueError("give exactly one of version_id and name")
    column = ModelVersion.id if version_id is not None else ModelVersion.name
    value = version_id if version_id is not None else name
    result: ModelVersion | None = await session.scalar(select(ModelVersion).where(column == value))
    return result


def _of_voice(community: str | None) -> ColumnElement[bool]:
    """The rows of one voice: a community's, or (None) the shared voice's."""
    return ModelVersion.community.is_(None) if community is None else ModelVersion.community == community


async def get_active_version(session: AsyncSession, *, community: str | None = None) -> ModelVersion | None:
    """The version of a voice that should be serving, if any (None: the shared voice): the one query for it
    (serving, `/status`, the trainer)."""
    result: ModelVersion | None = await session.scalar(
        select(ModelVersion).where(ModelVersion.status == VersionStatus.ACTIVE, _of_voice(community))
    )
    return result


async def active_versions(session: AsyncSession) -> Sequence[ModelVersion]:
    """The active version of every voice (the shared one and each community's)."""
    result = await session.scalars(select(ModelVersion).where(ModelVersion.status == VersionStatus.ACTIVE))
    return result.all()


async def activate_version(
    session: AsyncSession,
    *,
    version_id: int,
    previous_becomes: VersionStatus = VersionStatus.RETIRED,
    now: datetime | None = None,
) -> ModelVersion:
    """Makes `version_id` the active version of its voice, retiring (or marking rolled back) the one it replaces.

    The old row is demoted before the new one is promoted, inside the caller's transaction, so the one-active
    index is never violated mid-way and nobody ever observes zero or two active versions.
    """
    if previous_becomes not in RETIRING_STATUSES:
        raise ValueError(f"an active version can become {sorted(RETIRING_STATUSES)}, not {previous_becomes}")
    version = await session.get(ModelVersion, version_id, with_for_update=True)
    if version is None:
        raise LookupError(f"no model version with id {version_id}")
    if version.status == VersionStatus.ACTIVE:
        return version
    await session.execute(
        update(ModelVersion)
        .where(ModelVersion.status == VersionStatus.ACTIVE, ModelVersion.id != version_id, _of_voice(version.community))
        .values(status=previous_becomes)
        .execution_options(synchronize_session="fetch")
    )
    await session.flush()
    version.status = VersionStatus.ACTIVE
    version.activated_at = now or datetime.now(UTC)
    await session.flush()
    return version


async def set_version_status(
    session: AsyncSession, *, version_id: int, status: VersionStatus, note: str | None = None
) -> ModelVersion:
    """Marks a version e.g. `rejected` (with the reason in `note`); activation has its own function."""
    if status == VersionStatus.ACTIVE:
        raise ValueError("use activate_version to make a version active")
    version = await session.get(ModelVersion, version_id)
    if version is None:
        raise LookupError(f"no model version with id {version_id}")
    version.status = status
    if note is not None:
        version.note = note
    await session.flush()
    return version


async def versions_trained_on_user(session: AsyncSession, *, user_id: int) -> Sequence[ModelVersion]:
    """The versions whose training data contained any message of this user (what `/forget` reports)."""
    contained = select(ModelVersionMessage.model_version_id).where(ModelVersionMessage.user_id == user_id)
    result = await session.scalars(select(ModelVersion).where(ModelVersion.id.in_(contained)).order_by(ModelVersion.id))
    return result.all()


async def mark_holding_withdrawn(session: AsyncSession, *, user_id: int, now: datetime) -> list[ModelVersion]:
    """Marks every version trained on this user's messages as holding withdrawn data (/forget, /optout), and every
    full fine-tune trained on top of one (it inherited its weights); returns the ones newly marked. Such a
    version is never served, trained on or rolled back to again. (An adapter starts fresh from the base: it
    inherits nothing.)"""
    holding = {v.id: v for v in await versions_trained_on_user(session, user_id=user_id)}
    while True:
        children = await session.scalars(
            select(ModelVersion).where(ModelVersion.parent_id.in_(holding), ModelVersion.id.not_in(holding))
        )
        inherited = [child for child in children.all() if child.metrics.get("method", "full") == "full"]
        if not inherited:
            break
        holding.update((child.id, child) for child in inherited)
    marked = [version for version in holding.values() if version.holds_withdrawn_at is None]
    for version in marked:
        version.holds_withdrawn_at = now
    await session.flush()
    return sorted(marked, key=lambda version: version.id)


async def newest_clean_version(session: AsyncSession, *, community: str | None) -> ModelVersion | None:
    """What serves a voice whose active version holds withdrawn data: its most recently active version that holds
    none and still has its files (None: the bare base model)."""
    result: ModelVersion | None = await session.scalar(
        select(ModelVersion)
        .where(
            _of_voice(community),
            ModelVersion.activated_at.is_not(None),
            ModelVersion.holds_withdrawn_at.is_(None),
            ModelVersion.pruned_at.is_(None),
            ModelVersion.status.in_(RETIRING_STATUSES),
        )
        .order_by(ModelVersion.activated_at.desc(), ModelVersion.id.desc())
        .limit(1)
    )
    return result


async def manifest_message_ids(session: AsyncSession, *, version_id: int) -> set[int]:
    """The ids of the messages a version was trained on."""
    result = await session.scalars(
        select(ModelVersionMessage.message_id).where(ModelVersionMessage.model_version_id == version_id)
    )
    return set(result.all())


@dataclass(frozen=True)
class Withdrawn:
    """Messages in a version's manifest that may no longer be trained on."""

    deleted: frozenset[int]
    """No longer in the log: `/forget`, a message deleted on the platform, or retention pruning."""
    opted_out: frozenset[int]
    """Still logged, but their author has sent `/optout`."""


async def withdrawn_training_data(session: AsyncSession, *, version_id: int) -> Withdrawn:
    """Which of the messages in `version_id`'s manifest were deleted or withdrawn (the author opted out).

    The promotion transaction calls this after registering the version and right before activating it. On
    PostgreSQL it first locks `messages` and `users` against writes (SHARE mode, until the transaction ends), so a
    concurrent `/forget` or `/optout` either committed before the check (and is seen) or waits until the version
    is recorded (and then names it among the versions that trained on the user). SQLite needs no lock: the
    transaction already holds the database's only write lock since it registered the version.
    """
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(text("LOCK TABLE messages, users IN SHARE MODE"))
    manifest = select(ModelVersionMessage.message_id).where(ModelVersionMessage.model_version_id == version_id)
    logged = LoggedMessage.id == ModelVersionMessage.message_id
    deleted = await session.scalars(manifest.outerjoin(LoggedMessage, logged).where(LoggedMessage.id.is_(None)))
    opted_out = await session.scalars(
        manifest.join(LoggedMessage, logged)
        .join(User, User.id == LoggedMessage.author_id)
        .where(User.opted_out.is_(True))
    )
    return Withdrawn(frozenset(deleted.all()), frozenset(opted_out.all()))


async def runs_in_progress(session: AsyncSession, *, lock: bool = False) -> Sequence[TrainingRun]:
    """The training runs recorded as `running` (at most one: a partial unique index), the one answer to "is a run
    going?": for `/forget`'s reply, the run rows' life (`trainer.runs`), and the files and versions a run in
    progress still needs (`trainer.model_dirs`, `trainer.version_retention`). `lock` takes them FOR UPDATE (on
    PostgreSQL), so that a trainer recording its outcome meanwhile is waited for, not overwritten."""
    query = select(TrainingRun).where(TrainingRun.status == RunStatus.RUNNING).order_by(TrainingRun.id)
    return (await session.scalars(query.with_for_update() if lock else query)).all()


WEIGHT_FILES = (
    "adapter_model.safetensors",  # a community's voice: a LoRA adapter (with adapter_config.json, no config.json)
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def version_files_problem(path: str | Path) -> str | None:
    """Why a version's directory cannot serve (None when its files are all there): a cheap check, no loading.

    A directory that passes can still fail to load (corrupt weights); the engine's load is the final word.
    A hub id (not a local path) is not checked here.
    """
    directory = Path(path)
    if not directory.exists():
        return "files missing"
    if not directory.is_dir():
        return "not a directory"
    config = "adapter_config.json" if (directory / "adapter_config.json").is_file() else "config.json"
    try:
        json.loads((directory / config).read_text())
    except FileNotFoundError:
        return "config.json missing"
    except (OSError, ValueError):
        return f"{config} unreadable"
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        return "weights missing"
    return None


async def fallback_versions(
    session: AsyncSession, *, besides: int | None, community: str | None = None
) -> Sequence[ModelVersion]:
    """A voice's versions that served well before (retired, not rolled back or rejected), still have their files
    (not pruned) and hold no withdrawn data, most recently active first: what to serve when the active version
    cannot be loaded."""
    query = (
        select(ModelVersion)
        .where(
            ModelVersion.status == VersionStatus.RETIRED,
            ModelVersion.activated_at.is_not(None),
            ModelVersion.pruned_at.is_(None),
            ModelVersion.holds_withdrawn_at.is_(None),
            _of_voice(community),
        )
        .order_by(ModelVersion.activated_at.desc(), ModelVersion.id.desc())
    )
    if besides is not None:
        query = query.where(ModelVersion.id != besides)
    result = await session.scalars(query)
    return result.all()


async def rollback_target(session: AsyncSession, *, active: ModelVersion | None) -> ModelVersion | None:
    """Where `/rollback` without a name goes from `active`: the version that served last before it. One
    definition for the switch and for MODELS_KEEP, which must never delete its files."""
    if active is None:
        return None
    earlier = await fallback_versions(session, besides=active.id, community=active.community)
    return earlier[0] if earlier else None


def directory_bytes(path: str | Path) -> int | None:
    """How much disk a version's directory takes (None: not a directory). Walks the files: call it off the event
    loop (`asyncio.to_thread`)."""
    directory = Path(path)
    if not directory.is_dir():
        return None
    total = 0
    for file in directory.rglob("*"):
        try:
            if file.is_file() and not file.is_symlink():
                total += file.stat().st_size
        except OSError:
            continue
    return total
