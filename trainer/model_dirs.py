"""Keeping MODELS_DIR and the version registry in agreement.

A run writes its version under a hidden `.v<id>.partial` name, renames it to `v<id>` when complete, scores it,
and only then registers it. A kill or a crash between the rename and the registration leaves a complete,
unregistered directory: no row points at it, so nothing would ever serve or delete it. Failed runs clean up after
themselves (`trainer.retrain`), the orchestrator cleans up after runs that died (`leftovers_of_run`), and
`magpie models check` finds whatever is left (`check_models`): directories no row knows, and rows whose files are
missing or broken.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

from core.storage.models import ModelVersion
from core.storage.versions import list_versions, runs_in_progress, version_files_problem

log = logging.getLogger(__name__)

CLOCK_SLACK = timedelta(minutes=1)
"""How much earlier than its run's start a directory may look (file times and the database clock can differ)."""


def version_name(run_id: int) -> str:
    """A run's version is named after it (`v7` comes from run #7), which keeps names unique and auditable."""
    return f"v{run_id}"


def partial_dirs(models_dir: Path, run_id: int) -> Iterator[Path]:
    """Half-written version directories a killed run may leave (`trainer.train` writes into `.<name>.partial`)."""
    name = version_name(run_id)
    yield from models_dir.glob(f".{name}.partial")
    yield from models_dir.glob(f".{name}-*.partial")


def run_dirs(models_dir: Path, run_id: int) -> Iterator[Path]:
    """Every directory run `run_id` may have written: its partial ones and `v<id>` (or `v<id>-<time>`)."""
    name = version_name(run_id)
    yield from partial_dirs(models_dir, run_id)
    yield from models_dir.glob(name)
    yield from models_dir.glob(f"{name}-*")


def _registered_paths(versions: Collection[ModelVersion]) -> set[Path]:
    return {Path(version.path).resolve() for version in versions}


async def leftovers_of_run(session: AsyncSession, models_dir: Path, run_id: int, started_at: datetime) -> list[Path]:
    """Directories run `run_id` left that no version row points at. Only those written since the run started: an
    older `v<id>` (from a database that was reset) is another story, for `magpie models check` to report."""
    registered = _registered_paths(await list_versions(session))
    return _unregistered_since(models_dir, run_id, registered, (started_at - CLOCK_SLACK).timestamp())


def _unregistered_since(models_dir: Path, run_id: int, registered: set[Path], since: float) -> list[Path]:
    leftovers = []
    for path in run_dirs(models_dir, run_id):
        if path.resolve() in registered:
            continue
        try:
            written = path.stat().st_mtime
        except OSError:
            continue
        if path.name.endswith(".partial") or written >= since:
            leftovers.append(path)
    return leftovers


def remove_dirs(paths: Collection[Path]) -> None:
    for path in paths:
        log.info("removing unregistered model directory %s", path)
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class ModelsCheck:
    """Where the registry and MODELS_DIR disagree."""

    strays: list[Path] = field(default_factory=list)
    """Directories under MODELS_DIR that no version row points at (not counting those of a running run)."""
    broken: list[tuple[str, str, str]] = field(default_factory=list)
    """(version name, path, problem) for rows whose directory is missing or incomplete."""

    @property
    def ok(self) -> bool:
        return not self.strays and not self.broken


async def check_models(session: AsyncSession, models_dir: Path) -> ModelsCheck:
    """Compares the registry with MODELS_DIR (see the module docstring)."""
    versions = await list_versions(session)
    running = [run.id for run in await runs_in_progress(session)]
    return _compare(models_dir, versions, running)


def _compare(models_dir: Path, versions: Collection[ModelVersion], running: Collection[int]) -> ModelsCheck:
    in_use = _registered_paths(versions)
    for run_id in running:
        in_use.update(path.resolve() for path in run_dirs(models_dir, run_id))
    check = ModelsCheck()
    if models_dir.is_dir():
        for path in sorted(models_dir.iterdir()):
            hidden_other = path.name.startswith(".") and not path.name.endswith(".partial")
            if path.is_dir() and not hidden_other and path.resolve() not in in_use:
                check.strays.append(path)
    for version in versions:
        if version.pruned_at is not None:
            continue  # MODELS_KEEP deleted its files on purpose (trainer.version_retention)
        problem = version_files_problem(version.path)
        if problem is not None:
            check.broken.append((version.name, version.path, problem))
    return check
