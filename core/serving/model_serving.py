"""Which model version serves, and swapping it: the serving side of the version registry.

`core.storage.versions` records versions (rows, manifests, the one query for the active version) and knows no model;
this module puts the registry's active version into the engine and is the only code that does:

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

Voices. A version that is a LoRA adapter (a community's voice, or the shared voice with TRAIN_METHOD=lora) is not
the engine's model: it is loaded into the engine as a voice (`Engine.load_voice`) named after its community
(`SHARED_VOICE` for the shared one), and `voice_for` tells the chat service which voice answers a chat. The engine's
model itself is then the pristine base (BASE_MODEL, else the offline starter), which every adapter was trained on.
With VOICE_SCOPE=community the shared voice, which answers private chats, is that bare base: a full fine-tune of
the shared voice would hold every community's words, so it does not serve in that scope.

Erasure (`withdraw`): a /forget or /optout marks every version trained on that person as holding withdrawn data;
a voice whose active version is one of them is served at once by its newest version that holds none (else the bare
base), and the marked versions' files are deleted. They can never be rolled back to (`HOLDS_WITHDRAWN`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shutil
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import EngineError, HubUnreachableError, ModelLoadError
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
    VoiceReplaced,
    Withdrawal,
)
from core.serving.engine import Engine, ModelRef
from core.settings import Settings
from core.storage.chat_log import communities
from core.storage.db import Database
from core.storage.models import ModelVersion, VersionStatus
from core.storage.versions import (
    SHARED_VOICE,
    activate_version,
    active_versions,
    directory_bytes,
    fallback_versions,
    get_active_version,
    get_version,
    list_versions,
    mark_holding_withdrawn,
    newest_clean_version,
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


def is_adapter(path: str | Path) -> bool:
    """Whether a version directory is a LoRA adapter (peft's `adapter_config.json`) rather than a whole model."""
    return (Path(path) / "adapter_config.json").is_file()


def voice_name(version: ModelVersion) -> str:
    """The engine's name for the voice a version is."""
    return version.community or SHARED_VOICE


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
        self._voices: dict[str, ModelVersion] = {}  # the voices loaded into the engine, by name
        self._voice_sources: dict[str, int] = {}  # adapter directory -> version id, for the replies' log

    # --- at start ---------------------------------------------------------------------------------------------

    async def serving_choices(self) -> list[ModelRef]:
        """What to serve, in order of preference: the active version, then (should it not load) the versions that
        served before it, most recent first, and last BASE_MODEL. Versions whose files are missing or incomplete
        are left out, with a log line: a broken active version must not keep the bot from starting."""
        base = base_model_ref(self._settings)
        async with self._db.sessions() as session:
            active = await self._model_version(session)
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
        model at all, builds the starter once (`offline_starter`) and serves it. Then loads the voices."""
        await self._start_model(offline_starter)
        await self.sync_voices()
        await self._warn_if_shared_over_communities()

    async def _warn_if_shared_over_communities(self) -> None:
        """One line at start when one voice learns from several communities: their words cross between them."""
        if self._settings.community_voices:
            return
        async with self._db.sessions() as session:
            found = await communities(session)
        if len(found) > 1:
            log.warning(
                "VOICE_SCOPE=shared over a log of %d communities: what one teaches, the others hear; "
                "VOICE_SCOPE=community gives each its own voice (README, Voices).",
                len(found),
            )

    async def _start_model(self, offline_starter: OfflineStarter) -> None:
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

    async def _model_version(self, session: AsyncSession) -> ModelVersion | None:
        """The version that is the engine's model itself: the shared voice's active version when it is a whole
        model and VOICE_SCOPE=shared; else None (the pristine base, which adapters fit)."""
        if self._settings.community_voices:
            return None
        active = await get_active_version(session)
        if active is None or active.holds_withdrawn_at is not None or is_adapter(active.path):
            return None
        return active

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
                active = await self._model_version(session)
            current = self._engine.model_ref
            if active is None and current is not None and await self._withdrawn(current.version_id):
                return await self._swap_to_base()
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

    async def _withdrawn(self, version_id: int | None) -> bool:
        """Whether a version holds withdrawn data (the engine must stop serving it)."""
        if version_id is None:
            return False
        async with self._db.sessions() as session:
            version = await get_version(session, version_id=version_id)
        return version is not None and version.holds_withdrawn_at is not None

    async def _swap_to_base(self) -> ModelRef:
        """The version the engine's model is holds withdrawn data and no clean one is active: back to BASE_MODEL.
        Called under the swap lock."""
        assert self._engine is not None
        ref = base_model_ref(self._settings)
        await self._engine.swap(ref)
        log.info("now serving the base model %s", ref.name)
        return ref

    async def sync_voices(self) -> None:
        """Loads into the engine the active adapter of every voice that speaks in this scope (replacing an older
        one), and unloads the voices that have none any more. A voice whose adapter fails to load is logged and
        left out (its chats hear the base model), and not retried until another version is active."""
        if self._engine is None:
            return
        async with self._swap_lock:
            async with self._db.sessions() as session:
                wanted = {voice_name(v): v for v in await active_versions(session) if self._speaks(v)}
            for name in [name for name in self._voices if name not in wanted]:
                await self._engine.unload_voice(name)
                self._voice_sources.pop(self._voices.pop(name).path, None)
                log.info("voice %s no longer has an active version: its chats hear the base model", name)
            for name, version in wanted.items():
                loaded = self._voices.get(name)
                if (loaded is not None and loaded.id == version.id) or version.id in self._unloadable:
                    continue
                try:
                    await self._engine.load_voice(name, version.path)
                except ModelLoadError:
                    self._unloadable.add(version.id)
                    log.exception("voice %s: version %s could not be loaded", name, version.name)
                    continue
                self._voices[name] = version
                self._voice_sources[version.path] = version.id
                log.info("voice %s now speaks with version %s", name, version.name)

    def _speaks(self, version: ModelVersion) -> bool:
        """Whether an active version is loaded as a voice: an adapter that holds no withdrawn data, of a voice
        this scope serves (VOICE_SCOPE=community: communities'; shared: the shared voice's)."""
        if version.holds_withdrawn_at is not None or not is_adapter(version.path):
            return False
        return (version.community is not None) == self._settings.community_voices

    def voice_for(self, community: str | None) -> str | None:
        """Which loaded voice answers a chat of `community` (None: the engine's model alone)."""
        if self._settings.community_voices:
            return community if community is not None and community in self._voices else None
        return SHARED_VOICE if SHARED_VOICE in self._voices else None

    def serving_name(self, community: str | None) -> str:
        """The name of the model that answers a chat of `community` now: its voice's version, else the engine's
        model (what `/status` in that chat reports)."""
        voice = self.voice_for(community)
        if voice is not None:
            return self._voices[voice].name
        ref = self._engine.model_ref if self._engine is not None else None
        return ref.name if ref is not None else "none loaded"

    def version_of_voice(self, source: str) -> int | None:
        """The version id of the adapter loaded from `source` (what a reply spoken with it is logged with)."""
        return self._voice_sources.get(source)

    async def follow_active(self) -> SwapOutcome:
        """Brings the engine to the registry's active versions (after a switch or a promotion) and says how it
        went."""
        if self._engine is None:
            return SwapOutcome(SwapState.ELSEWHERE)
        try:
            await self.sync_voices()
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
                    active = await self._model_version(session)
                if active is None or active.id not in self._unloadable:
                    await self.sync_engine()
                await self.sync_voices()
            except ModelLoadError as exc:
                log.error("the active model version cannot be loaded; still serving the old one: %s", exc)
            except EngineError:
                log.debug("engine not running; model watcher idle")
            except Exception:
                log.exception("model watcher: checking the active version failed")

    # --- switching --------------------------------------------------------------------------------------------

    async def rollback(self, *, version: str | None, triggered_by: str, community: str | None = None) -> Switch:
        """Activates `version`, or the previously active one of the voice `community`; the one it replaces is
        marked `rolled_back`."""
        return await self.switch_version(
            version=version, rolled_back=True, triggered_by=triggered_by, community=community
        )

    async def switch_version(
        self, *, version: str | None, rolled_back: bool, triggered_by: str, community: str | None = None
    ) -> Switch:
        """Activates `version` by name (or, with None, the one that served before in the voice `community`)
        atomically, then hot-swaps. A named version switches its own voice.

        `rolled_back` marks the replaced version `rolled_back` (its replies leave the training data when
        TRAIN_EXCLUDE_ROLLED_BACK) instead of `retired`: `/rollback` and `magpie models rollback` say "that one
        was bad", `magpie models activate` only switches.
        """
        previous_becomes = VersionStatus.ROLLED_BACK if rolled_back else VersionStatus.RETIRED
        async with self._switch_lock:
            async with self._db.sessions.begin() as session:
                named = await _named_version(session, version) if version else None
                voice = named.community if named is not None else community
                current = await get_active_version(session, community=voice)
                target = named if version else await rollback_target(session, active=current)
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

    # --- erasure ----------------------------------------------------------------------------------------------

    async def withdraw(self, *, user_id: int) -> Withdrawal:
        """After a /forget or /optout: marks every version trained on the user as holding withdrawn data; a voice
        whose active version is one of them is served by its newest clean version (else the bare base) from now
        on, and the marked versions' files are deleted once this process no longer serves them (a replica's engine
        holds its weights in memory, and its watcher follows within MODEL_WATCH_INTERVAL_S)."""
        now = self._clock()
        async with self._switch_lock, self._db.sessions.begin() as session:
            marked = await mark_holding_withdrawn(session, user_id=user_id, now=now)
            replaced = [await _replace(session, v, now) for v in marked if v.status is VersionStatus.ACTIVE]
        if not marked:
            return Withdrawal()
        log.info("versions %s hold withdrawn data now", ", ".join(v.name for v in marked))
        await self.follow_active()
        await self._delete_files([v for v in marked if v.pruned_at is None], now)
        return Withdrawal(tuple(v.name for v in marked), tuple(replaced))

    async def _delete_files(self, versions: Sequence[ModelVersion], now: datetime) -> None:
        """Deletes the directories of versions that hold withdrawn data; their rows stay, marked pruned. Only
        directories inside MODELS_DIR: a version registered from elsewhere (a directory of the operator's, or
        BASE_MODEL's) is never Magpie's to delete; it is logged instead (it can never serve again anyway)."""
        models_dir = self._settings.models_dir.resolve()
        inside = [version for version in versions if _inside(version.path, models_dir)]
        for version in versions:
            if version not in inside:
                log.warning(
                    "%s holds withdrawn data; its files outside MODELS_DIR are left: %s", version.name, version.path
                )
        versions = inside
        for version in versions:
            await asyncio.to_thread(shutil.rmtree, version.path, True)
        async with self._db.sessions.begin() as session:
            for version in versions:
                row = await get_version(session, version_id=version.id)
                if row is not None and row.status is not VersionStatus.ACTIVE:
                    row.pruned_at = now

    async def list_versions(self, *, community: str | None = None) -> VersionList:
        """The newest LIST_LIMIT versions (with `community`, of that community's voice), newest first, with what
        each (and all of MODELS_DIR) takes on disk, and how many older ones there are. Sizes are summed in a
        thread: walking directories is file I/O."""
        async with self._db.sessions() as session:
            versions = await list_versions(session, community=community)
        shown = versions[:LIST_LIMIT]
        sizes, total = await asyncio.to_thread(_disk_sizes, shown, self._settings.models_dir)
        summaries = tuple(_summary(version, size) for version, size in zip(shown, sizes, strict=True))
        disk = DiskUse(total, self._settings.models_keep)
        return VersionList(summaries, max(0, len(versions) - LIST_LIMIT), self._settings.base_model, disk)


async def _named_version(session: AsyncSession, name: str) -> ModelVersion | None:
    """The version named (a bare number also finds `v<number>`)."""
    version = await get_version(session, name=name)
    if version is None and name.isdigit():
        version = await get_version(session, name=f"v{name}")
    return version


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
    if target.holds_withdrawn_at is not None:
        return SwitchRefused(SwitchRefusal.HOLDS_WITHDRAWN, target.name)
    if target.pruned_at is not None:
        return SwitchRefused(SwitchRefusal.PRUNED, target.name, target.path)
    if version_files_problem(target.path) is not None:
        return SwitchRefused(SwitchRefusal.FILES_MISSING, target.name, target.path)
    return None


async def _replace(session: AsyncSession, withdrawn: ModelVersion, now: datetime) -> VoiceReplaced:
    """Takes an active version that holds withdrawn data out of service: its voice's newest clean version serves
    instead, or (none) nothing is active and the bare base serves."""
    clean = await newest_clean_version(session, community=withdrawn.community)
    if clean is not None:
        await activate_version(session, version_id=clean.id, now=now)
    else:
        withdrawn.status = VersionStatus.RETIRED
        await session.flush()
    return VoiceReplaced(withdrawn.community, withdrawn.name, clean.name if clean is not None else None)


def _inside(path: str, models_dir: Path) -> bool:
    """Whether a version directory lies inside MODELS_DIR (and is not MODELS_DIR itself)."""
    resolved = Path(path).resolve()
    return resolved != models_dir and resolved.is_relative_to(models_dir)


def _disk_sizes(versions: Sequence[ModelVersion], models_dir: Path) -> tuple[list[int | None], int]:
    """Each version's directory size (None when pruned or missing) and the size of all of MODELS_DIR."""
    sizes = [None if version.pruned_at is not None else directory_bytes(version.path) for version in versions]
    return sizes, directory_bytes(models_dir) or 0


def _summary(version: ModelVersion, disk_bytes: int | None) -> VersionSummary:
    loss = (version.metrics or {}).get("eval_loss")
    eval_loss = float(loss) if isinstance(loss, int | float) and math.isfinite(loss) else None
    pruned = version.pruned_at is not None
    return VersionSummary(
        version.name, version.status, eval_loss, version.created_at, version.note, disk_bytes, pruned,
        community=version.community, holds_withdrawn=version.holds_withdrawn_at is not None,
    )  # fmt: skip
