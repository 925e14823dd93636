"""Model version retention (MODELS_KEEP): delete the files of old versions, keep their rows.

A GPT-2 small version is ~500 MB and one is written per promotion, so a bot that retrains daily for months would
fill its disk. After each promotion (`trainer.retrain`) and on `magpie models prune`, every version's directory is
deleted except those of:

- the MODELS_KEEP newest versions (whatever their status: a recent rejected run is still worth inspecting);
- the active version, and the rollback target (the version `/rollback` returns to:
`core.storage.versions.rollback_target`),   however old: switching back must always work, and a replica that has not yet
swapped still serves it;
- the start point of a run in progress, which scores it again at the end.

The rows stay, marked `pruned_at`: the history, each version's metrics, the training manifest and `/forget`'s
"these versions learned from your messages" remain true after the files are gone, and a pruned version is never
served, chosen as a fallback or switched to. Marking comes first, in one transaction, then the directories go: a
crash in between leaves marked rows with files, which the next prune deletes (it finishes every marked row).
Only directories inside MODELS_DIR are ever deleted.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from core.settings import Settings
from core.storage.db import Database
from core.storage.models import ModelVersion, VersionStatus
from core.storage.versions import active_versions, directory_bytes, list_versions, rollback_target, runs_in_progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrunedVersion:
    name: str
    path: str
    freed_bytes: int


@dataclass
class PruneReport:
    """What a prune did (or, dry, would do)."""

    pruned: list[PrunedVersion] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    """The versions whose files stay, newest first."""
    outside: list[str] = field(default_factory=list)
    """Old versions whose directory is not inside MODELS_DIR: not Magpie's to delete."""

    @property
    def freed_bytes(self) -> int:
        return sum(version.freed_bytes for version in self.pruned)


def choose_prunable(versions: Sequence[ModelVersion], *, keep: int, protected: Collection[int]) -> list[ModelVersion]:
    """The versions (newest first in, same order out) whose files may go: not among the `keep` newest, not
    protected, not active, not pruned already. `keep` 0 keeps everything."""
    if keep <= 0:
        return []
    newest = {version.id for version in sorted(versions, key=lambda v: v.id, reverse=True)[:keep]}
    return [
        version
        for version in versions
        if version.id not in newest
        and version.id not in protected
        and version.status is not VersionStatus.ACTIVE
        and version.pruned_at is None
    ]


async def prune_versions(
    db: Database, settings: Settings, *, keep: int | None = None, dry_run: bool = False, now: datetime | None = None
) -> PruneReport:
    """Applies MODELS_KEEP (or `keep`): marks the old versions pruned in one transaction, then deletes their
    directories, and finishes any marked earlier whose files are still there (see the module docstring)."""
    keep = settings.models_keep if keep is None else keep
    models_dir = settings.models_dir.resolve()
    report = PruneReport()
    async with db.sessions.begin() as session:
        versions = await list_versions(session)
        victims = choose_prunable(versions, keep=keep, protected=await _protected(session))
        report.outside = [version.name for version in victims if not _inside(version.path, models_dir)]
        victims = [version for version in victims if _inside(version.path, models_dir)]
        report.kept = [version.name for version in versions if version not in victims and version.pruned_at is None]
        if dry_run:
            report.pruned = await asyncio.to_thread(_sizes, victims)
            return report
        await _mark_pruned(session, [version.id for version in victims], now or datetime.now(UTC))
        marked = [version for version in await list_versions(session) if version.pruned_at is not None]
    report.pruned = await asyncio.to_thread(_delete, [v for v in marked if _inside(v.path, models_dir)])
    for version in report.pruned:
        log.info("MODELS_KEEP: deleted the files of model version %s (%d bytes)", version.name, version.freed_bytes)
    return report


async def prune_after_promotion(settings: Settings, db: Database) -> None:
    """The automatic prune after a promotion: never fails the run (the version is already live), only logs."""
    if settings.models_keep <= 0:
        return
    try:
        report = await prune_versions(db, settings)
    except Exception:
        log.exception("MODELS_KEEP: pruning old model versions failed; `magpie models prune` retries it")
        return
    if report.pruned:
        names = ", ".join(version.name for version in report.pruned)
        log.info("MODELS_KEEP=%d: deleted the files of %s", settings.models_keep, names)


async def _protected(session: AsyncSession) -> set[int]:
    """Every voice's active version and rollback target, and the start points of runs in progress."""
    protected: set[int] = set()
    for active in await active_versions(session):
        target = await rollback_target(session, active=active)
        protected.update(version.id for version in (active, target) if version is not None)
    runs = await runs_in_progress(session)
    protected.update(run.parent_version_id for run in runs if run.parent_version_id is not None)
    return protected


async def _mark_pruned(session: AsyncSession, ids: Collection[int], now: datetime) -> None:
    """Never marks a version that became active meanwhile (the WHERE re-checks it inside the transaction)."""
    if not ids:
        return
    await session.execute(
        update(ModelVersion)
        .where(ModelVersion.id.in_(ids), ModelVersion.status != VersionStatus.ACTIVE, ModelVersion.pruned_at.is_(None))
        .values(pruned_at=now)
        .execution_options(synchronize_session="fetch")
    )


def _inside(path: str, models_dir: Path) -> bool:
    resolved = Path(path).resolve()
    return resolved != models_dir and resolved.is_relative_to(models_dir)


def _sizes(versions: Sequence[ModelVersion]) -> list[PrunedVersion]:
    return [PrunedVersion(v.name, v.path, directory_bytes(v.path) or 0) for v in versions if Path(v.path).is_dir()]


def _delete(versions: Sequence[ModelVersion]) -> list[PrunedVersion]:
    """Deletes the directories still there; returns what was freed (a directory already gone frees nothing)."""
    deleted = _sizes(versions)
    for version in deleted:
        shutil.rmtree(version.path, ignore_errors=True)
    return deleted
