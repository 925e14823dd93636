"""MODELS_KEEP: old versions' files are deleted after a promotion and by `magpie models prune`; their rows stay.

Real version directories (copies of a tiny GPT-2) under a real MODELS_DIR, on SQLite and PostgreSQL; the automatic
prune is checked through a real (short) training run that promotes.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from bot.cli import build_parser
from bot.cli_training import run_command
from core.chat.service import ChatService
from core.outcomes import SwitchRefusal, SwitchRefused
from core.serving.model_serving import ModelServing
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import ModelVersion, RunStatus, VersionStatus
from core.storage.versions import activate_version, register_version, set_version_status, versions_trained_on_user
from core.texts import disk_size_text, version_list
from tests.loop_support import build_loop_model, greedy_engine, log_community, loop_settings
from tests.run_rows import new_run
from trainer.model_dirs import check_models
from trainer.retrain import retrain
from trainer.version_retention import prune_versions

NOW = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def loop_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_loop_model(tmp_path_factory.mktemp("loop-model"))


@pytest.fixture
def settings(tmp_path: Path, database_url: str, loop_model_dir: Path) -> Settings:
    return loop_settings(tmp_path, database_url, loop_model_dir, models_keep=3)


async def _add(db: Database, settings: Settings, source: Path, name: str, *, manifest_user: int | None = None) -> int:
    """A registered version with a real model directory under MODELS_DIR."""
    path = settings.models_dir / name
    shutil.copytree(source, path)
    manifest = [(1, manifest_user)] if manifest_user is not None else []
    async with db.sessions.begin() as session:
        version = await register_version(session, name=name, path=str(path), manifest=manifest)
        return version.id


async def _activate(db: Database, version_id: int) -> None:
    async with db.sessions.begin() as session:
        await activate_version(session, version_id=version_id)


async def _reject(db: Database, version_id: int) -> None:
    async with db.sessions.begin() as session:
        await set_version_status(session, version_id=version_id, status=VersionStatus.REJECTED, note="worse")


async def _rows(db: Database) -> dict[str, tuple[VersionStatus, bool]]:
    async with db.sessions() as session:
        versions = (await session.scalars(select(ModelVersion).order_by(ModelVersion.id))).all()
    return {version.name: (version.status, version.pruned_at is not None) for version in versions}


async def _history(db: Database, settings: Settings, source: Path) -> dict[str, int]:
    """v1..v8: v1, v2, v3 served in turn (v3 active, v2 the rollback target), v4..v8 were rejected; v4 learned
    from user 77."""
    ids = {}
    for n in range(1, 9):
        ids[f"v{n}"] = await _add(db, settings, source, f"v{n}", manifest_user=77 if n == 4 else None)
    for name in ("v1", "v2", "v3"):
        await _activate(db, ids[name])
    for n in range(4, 9):
        await _reject(db, ids[f"v{n}"])
    return ids


async def test_prune_keeps_the_newest_the_active_and_the_rollback_target(
    db: Database, settings: Settings, loop_model_dir: Path
) -> None:
    ids = await _history(db, settings, loop_model_dir)
    async with db.sessions.begin() as session:  # a run in progress started from v1: it scores v1 again at the end
        session.add(new_run(parent_version_id=ids["v1"]))
    size = sum(file.stat().st_size for file in (settings.models_dir / "v4").rglob("*") if file.is_file())

    report = await prune_versions(db, settings, now=NOW)

    assert [version.name for version in report.pruned] == ["v5", "v4"]
    assert report.freed_bytes == 2 * size
    assert sorted(path.name for path in settings.models_dir.iterdir()) == ["v1", "v2", "v3", "v6", "v7", "v8"]
    rows = await _rows(db)
    assert rows["v4"] == (VersionStatus.REJECTED, True) and rows["v5"] == (VersionStatus.REJECTED, True)
    assert rows["v3"] == (VersionStatus.ACTIVE, False) and rows["v2"] == (VersionStatus.RETIRED, False)
    assert rows["v1"] == (VersionStatus.RETIRED, False), "a running run's start point keeps its files"
    async with db.sessions() as session:
        trained_on = await versions_trained_on_user(session, user_id=77)
        check = await check_models(session, settings.models_dir)
    assert [version.name for version in trained_on] == ["v4"], "/forget still names a pruned version"
    assert check.ok, "`magpie models check` does not report pruned versions as broken"

    again = await prune_versions(db, settings, now=NOW)
    assert again.pruned == [], "nothing more to do"


async def test_pruned_versions_are_listed_with_disk_use_and_never_switched_to(
    db: Database, settings: Settings, loop_model_dir: Path
) -> None:
    await _history(db, settings, loop_model_dir)
    await prune_versions(db, settings, keep=1, now=NOW)  # keeps v8 (newest), v3 (active), v2 (rollback target)
    serving = ModelServing(settings=settings, db=db)

    listing = await serving.list_versions()
    text = version_list(listing)

    by_name = {version.name: version for version in listing.versions}
    assert by_name["v1"].pruned and by_name["v1"].disk_bytes is None
    assert by_name["v3"].disk_bytes is not None and by_name["v3"].disk_bytes > 0
    assert listing.disk is not None and listing.disk.models_dir_bytes == 3 * by_name["v3"].disk_bytes
    assert "v1: retired" in text and "files deleted (MODELS_KEEP)" in text
    assert "v3: active" in text and disk_size_text(by_name["v3"].disk_bytes) in text
    assert f"Model files take {disk_size_text(listing.disk.models_dir_bytes)} on disk (MODELS_KEEP=3" in text
    refused = await serving.switch_version(version="v1", rolled_back=False, triggered_by="test")
    assert refused == SwitchRefused(SwitchRefusal.PRUNED, "v1", str(settings.models_dir / "v1"))
    rollback = await serving.rollback(version=None, triggered_by="test")
    assert getattr(rollback, "version", None) == "v2", "the rollback target kept its files"


async def test_a_prune_interrupted_after_marking_finishes_next_time(
    db: Database, settings: Settings, loop_model_dir: Path
) -> None:
    outside = settings.models_dir.parent / "elsewhere"
    shutil.copytree(loop_model_dir, outside)
    async with db.sessions.begin() as session:  # registered from outside MODELS_DIR: not Magpie's to delete
        await register_version(session, name="v0-outside", path=str(outside))
    ids = await _history(db, settings, loop_model_dir)
    async with db.sessions.begin() as session:  # marked by a prune that died before deleting the directory
        version = await session.get(ModelVersion, ids["v6"])
        assert version is not None
        version.pruned_at = NOW

    report = await prune_versions(db, settings, keep=7, now=NOW)

    assert [version.name for version in report.pruned] == ["v6", "v1"]
    assert report.outside == ["v0-outside"] and outside.is_dir()
    assert not (settings.models_dir / "v6").exists()


async def test_magpie_models_prune(
    db: Database, settings: Settings, loop_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await _history(db, settings, loop_model_dir)

    async def magpie(*argv: str) -> int | None:
        return await run_command(build_parser().parse_args(list(argv)), settings)

    assert await magpie("models", "prune", "--dry-run") == 0
    dry = capsys.readouterr().out
    assert "would delete v5" in dry and "would delete v4" in dry and "would delete v1" in dry
    assert (settings.models_dir / "v1").is_dir(), "a dry run deletes nothing"
    assert await magpie("models", "prune", "--keep", "4") == 0
    out = capsys.readouterr().out
    assert "deleted v4" in out and "deleted v1" in out and "deleted v5" not in out
    assert "versions with files: v8, v7, v6, v5, v3, v2." in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["models", "prune", "--keep", "-1"])


async def test_magpie_models_speaks_the_terminals_language(
    db: Database, settings: Settings, loop_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await _history(db, settings, loop_model_dir)
    korean = settings.model_copy(update={"lang": "ko_KR.UTF-8"})

    async def magpie(*argv: str) -> int | None:
        return await run_command(build_parser().parse_args(list(argv)), korean)

    assert await magpie("models", "prune", "--dry-run") == 0
    dry = capsys.readouterr().out
    assert "v5 삭제 예정(" in dry and "를 확보할 수 있어요. 파일이 남는 버전: v8, v7, v6, v3, v2." in dry
    assert await magpie("models", "list") == 0
    assert "모델 파일이 디스크에서 " in capsys.readouterr().out
    assert await magpie("models", "check") == 0
    assert f"버전 기록과 {settings.models_dir}의 내용이 일치해요." in capsys.readouterr().out


@pytest.mark.slow
async def test_a_promotion_deletes_the_versions_beyond_models_keep(
    db: Database, tmp_path: Path, database_url: str, loop_model_dir: Path
) -> None:
    settings = loop_settings(tmp_path, database_url, loop_model_dir, models_keep=1, train_epochs=1)
    settings = settings.model_copy(update={"promotion_margin": 100.0})  # any new version is promoted
    ids = {name: await _add(db, settings, loop_model_dir, name) for name in ("old-1", "old-2", "old-3")}
    for version_id in ids.values():
        await _activate(db, version_id)
    await log_community(ChatService(settings=settings, db=db, engine=greedy_engine()), chats=6)
    async with db.sessions.begin() as session:
        run = new_run()
        session.add(run)
        await session.flush()
        run_id = run.id

    assert await retrain(settings, run_id, emit=lambda event: None) is RunStatus.PROMOTED

    new = f"v{run_id}"
    rows = await _rows(db)
    assert rows[new] == (VersionStatus.ACTIVE, False), "the newest version"
    assert rows["old-3"] == (VersionStatus.RETIRED, False), "the rollback target"
    assert rows["old-1"] == rows["old-2"] == (VersionStatus.RETIRED, True)
    assert sorted(path.name for path in settings.models_dir.iterdir()) == ["old-3", new]
