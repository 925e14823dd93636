"""Which model version serves, and swapping it: the serving side of the version registry.

`core.versions` records versions (rows, manifests, the one query for the active version) and knows no model; this
module puts the registry's active version into the engine and is the only code that does:

- at start, `start_engine` serves the active version, or (should it not load) the versions that served before it,
  most recent first, then BASE_MODEL, then the offline starter; a broken active version never keeps the bot from
  starting;
- `switch_version` / `rollback` activate a version atomically in the database, then hot-swap;
- the watcher (`start`/`stop`) polls the active version every MODEL_WATCH_INTERVAL_S and hot-swaps when another
  process changed it (`magpie models activate`, a training run that promoted a version, another replica's
  `/rollback`), so shell commands never need the bot to stop and every replica follows within that interval;
- `follow_active` is what the training orchestrator calls after a promotion (`core.retraining.ServingFollower`).

A `ModelServing` without an engine (the shell commands) switches the registry only; a running bot's watcher
follows. Results are typed (`core.outcomes`); `core.texts` words them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

from core.db import Database
from core.engine import Engine, ModelRef
from core.errors import EngineError, HubUnreachableError, ModelLoadError
from core.models import ModelVersion, VersionStatus
from core.outcomes import (
    DiskUse,
    SwapOutcome,
    SwapState,
    Switch,
    Switched,
    SwitchRefusal,
    SwitchRefused,
    VersionList,
    VersionSummary,
)
from core.settings import Settings
from core.versions import (
    activate_version,
    directory_bytes,
    fallback_versions,
    get_active_version,
    get_version,
    list_versions,
    rollback_target,
    version_files_problem,
)

log = logging.getLogger(__name__)

LIST_LIMIT = 15
"""How many versions `/models` shows (newest first): enough to choose a rollback, short enough for a chat."""

OfflineStarter = Callable[[], Awaitable[int]]
"""Builds and registers the offline starter model; returns its version id (the composition root supplies it)."""


def model_ref(version: ModelVersion) -> ModelRef:
    """What the engine loads for a registered version: the one place a version row becomes a `ModelRef`."""
    return ModelRef(source=version.path, name=version.name, version_id=version.id)


def base_model_ref(settings: Settings) -> ModelRef:
    """BASE_MODEL, served while no trained version is active (no version id: its replies name no version)."""
    return ModelRef(source=settings.base_model, name=settings.base_model)


def quiet_model_progress_bars() -> None:
    """transformers draws its own bars for every save and load ("Writing model shards", "Loading weights"); they
    would break up Magpie's one progress bar and fill service logs with carriage returns. Called by the entry
    point, which configures logging."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


class ModelServing:
    """Keeps `engine` serving the registry's active version; `engine` is None in shell commands."""

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        engine: Engine | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        poll_interval_s: float | None = None,
    ) -> None:
        """`poll_interval_s`: how often the watcher asks the database (default MODEL_WATCH_INTERVAL_S)."""
        self._settings = settings
        self._db = db
        self._engine = engine
        self._clock = clock
        self._poll_interval_s = settings.model_watch_interval_s if poll_interval_s is None else poll_interval_s
        self._swap_lock = asyncio.Lock()  # one read-the-database-then-swap at a time
        self._switch_lock = asyncio.Lock()  # one rollback/activate at a time
        self._unloadable: set[int] = set()  # versions whose load failed: not retried by the watcher
        self._watcher: asyncio.Task[None] | None = None

    # --- at start ---------------------------------------------------------------------------------------------

    async def serving_choices(self) -> list[ModelRef]:
        """What to serve, in order of preference: the active version, then (should it not load) the versions that
        served before it, most recent first, and last BASE_MODEL. Versions whose files are missing or incomplete
        are left out, with a log line: a broken active version must not keep the bot from starting."""
        base = base_model_ref(self._settings)
        async with self._db.sessions() as session:
            active = await get_active_version(session)
            if active is None:
                return [base]
            earlier = await fallback_versions(session, besides=active.id)
        choices = []
        for version in (active, *earlier):
            problem = version_files_problem(version.path)
            if problem is None:
                choices.append(model_ref(version))
            elif version is active:
                log.error("The active model version %s cannot be loaded: %s (%s).", active.name, problem, active.path)
        if choices and choices[0].version_id != active.id:
            log.warning("Serving %s, the version that served before %s, instead.", choices[0].name, active.name)
        elif not choices:
            log.warning("No earlier version can serve instead of %s: serving BASE_MODEL (%s).", active.name, base.name)
        return [*choices, base]

    async def start_engine(self, *, offline_starter: OfflineStarter) -> None:
        """Serves the active version, else the first earlier one that loads, else BASE_MODEL; offline with no
        model at all, builds the starter once (`offline_starter`) and serves it."""
        engine = self._require_engine()
        *versions, base = await self.serving_choices()
        for version in versions:
            log.info("Loading model %s", version.name)
            try:
                await engine.start(version)
            except ModelLoadError:
                log.exception("Model version %s could not be loaded; trying the next one.", version.name)
                continue
            return
        log.info("Loading model %s", base.name)
        try:
            await engine.start(base)
        except HubUnreachableError:
            log.warning(
                'Model "%s" is not available offline (the Hugging Face Hub is unreachable and it is not cached): '
                "using the offline starter model instead.",
                base.name,
            )
            starter_id = await offline_starter()
            async with self._db.sessions() as session:
                starter = await get_version(session, version_id=starter_id)
            assert starter is not None
            await engine.start(model_ref(starter))

    def _require_engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("this ModelServing has no engine to start")
        return self._engine

    # --- following the registry -------------------------------------------------------------------------------

    async def sync_engine(self) -> ModelRef | None:
        """Hot-swaps the engine to the active version if it serves another; returns the new ref (None: no change).

        Raises `ModelLoadError` when the active version cannot be loaded (the engine keeps the old model).
        """
        if self._engine is None:
            return None
        async with self._swap_lock:
            async with self._db.sessions() as session:
                active = await get_active_version(session)
            current = self._engine.model_ref
            if active is None or (current is not None and current.version_id == active.id):
                return None
            problem = version_files_problem(active.path)
            if problem is not None:
                self._unloadable.add(active.id)
                raise ModelLoadError(f"model version {active.name} cannot be loaded: {problem} ({active.path})")
            ref = model_ref(active)
            try:
                await self._engine.swap(ref)
            except ModelLoadError:
                self._unloadable.add(active.id)
                raise
            log.info("now serving model version %s", active.name)
            return ref

    async def follow_active(self) -> SwapOutcome:
        """Brings the engine to the registry's active version (after a switch or a promotion) and says how it went."""
        if self._engine is None:
            return SwapOutcome(SwapState.ELSEWHERE)
        try:
            await self.sync_engine()
        except ModelLoadError as exc:
            serving = self._engine.model_ref
            return SwapOutcome(SwapState.LOAD_FAILED, str(exc), serving.name if serving is not None else None)
        except EngineError:
            return SwapOutcome(SwapState.ENGINE_DOWN)
        return SwapOutcome(SwapState.SERVING)

    async def start(self) -> None:
        """Starts the watcher (with an engine to keep in step; shell commands have none)."""
        if self._engine is not None and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="magpie-model-watcher")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    async def _watch(self) -> None:
        """Follows the database's active version (another process may change it) into the engine."""
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                async with self._db.sessions() as session:
                    active = await get_active_version(session)
                if active is not None and active.id not in self._unloadable:
                    await self.sync_engine()
            except ModelLoadError as exc:
                log.error("the active model version cannot be loaded; still serving the old one: %s", exc)
            except EngineError:
                log.debug("engine not running; model watcher idle")
            except Exception:
                log.exception("model watcher: checking the active version failed")

    # --- switching --------------------------------------------------------------------------------------------

    async def rollback(self, *, version: str | None, triggered_by: str) -> Switch:
        """Activates `version`, or the previously active one; the one it replaces is marked `rolled_back`."""
        return await self.switch_version(version=version, rolled_back=True, triggered_by=triggered_by)

    async def switch_version(self, *, version: str | None, rolled_back: bool, triggered_by: str) -> Switch:
        """Activates `version` by name (or, with None, the one that served before) atomically, then hot-swaps.

        `rolled_back` marks the replaced version `rolled_back` (its replies leave the training data when
        TRAIN_EXCLUDE_ROLLED_BACK) instead of `retired`: `/rollback` and `magpie models rollback` say "that one
        was bad", `magpie models activate` only switches.
        """
        previous_becomes = VersionStatus.ROLLED_BACK if rolled_back else VersionStatus.RETIRED
        async with self._switch_lock:
            async with self._db.sessions.begin() as session:
                current = await get_active_version(session)
                target = await _switch_target(session, version, current)
                refusal = _switch_refusal(version, target, current)
                if refusal is not None:
                    return refusal
                assert target is not None
                await activate_version(
                    session, version_id=target.id, previous_becomes=previous_becomes, now=self._clock()
                )
            replaced = current.name if current is not None else "BASE_MODEL"
            log.info("%s switched the active model from %s to %s", triggered_by, replaced, target.name)
            marked = current.name if current is not None and rolled_back else None
            excluded = marked is not None and self._settings.train_exclude_rolled_back
            return Switched(target.name, marked, excluded, await self.follow_active())

    async def list_versions(self) -> VersionList:
        """The newest LIST_LIMIT versions, newest first, with what each (and all of MODELS_DIR) takes on disk, and
        how many older ones there are. Sizes are summed in a thread: walking directories is file I/O."""
        async with self._db.sessions() as session:
            versions = await list_versions(session)
        shown = versions[:LIST_LIMIT]
        sizes, total = await asyncio.to_thread(_disk_sizes, shown, self._settings.models_dir)
        summaries = tuple(_summary(version, size) for version, size in zip(shown, sizes, strict=True))
        disk = DiskUse(total, self._settings.models_keep)
        return VersionList(summaries, max(0, len(versions) - LIST_LIMIT), self._settings.base_model, disk)


async def _switch_target(session: AsyncSession, name: str | None, current: ModelVersion | None) -> ModelVersion | None:
    """The version named (a bare number also finds `v<number>`), or the one that served last before `current`."""
    if name:
        version = await get_version(session, name=name)
        if version is None and name.isdigit():
            version = await get_version(session, name=f"v{name}")
        return version
    return await rollback_target(session, active=current)


def _switch_refusal(
    name: str | None, target: ModelVersion | None, current: ModelVersion | None
) -> SwitchRefused | None:
    if target is None and name:
        return SwitchRefused(SwitchRefusal.UNKNOWN_VERSION, name)
    if target is None:
        if current is None:
            return SwitchRefused(SwitchRefusal.NOTHING_ACTIVE)
        return SwitchRefused(SwitchRefusal.NO_EARLIER_VERSION, current.name)
    if current is not None and target.id == current.id:
        return SwitchRefused(SwitchRefusal.ALREADY_ACTIVE, target.name)
    if target.pruned_at is not None:
        return SwitchRefused(SwitchRefusal.PRUNED, target.name, target.path)
    if not (Path(target.path) / "config.json").is_file():
        return SwitchRefused(SwitchRefusal.FILES_MISSING, target.name, target.path)
    return None


def _disk_sizes(versions: Sequence[ModelVersion], models_dir: Path) -> tuple[list[int | None], int]:
    """Each version's directory size (None when pruned or missing) and the size of all of MODELS_DIR."""
    sizes = [None if version.pruned_at is not None else directory_bytes(version.path) for version in versions]
    return sizes, directory_bytes(models_dir) or 0


def _summary(version: ModelVersion, disk_bytes: int | None) -> VersionSummary:
    loss = (version.metrics or {}).get("eval_loss")
    eval_loss = float(loss) if isinstance(loss, int | float) and math.isfinite(loss) else None
    pruned = version.pruned_at is not None
    return VersionSummary(version.name, version.status, eval_loss, version.created_at, version.note, disk_bytes, pruned)
