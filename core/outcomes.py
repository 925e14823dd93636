"""What the learning side's operations return: typed results, never chat text.

Starting a run (`core.retraining.Retrainer.request`), a run's end (`RunOutcome`), switching versions and listing
them (`core.serving.model_serving.ModelServing`) each return one of these values; `core.texts` turns them into the words
a person reads, in one place. Callers tell the cases apart by type (`RunStarted` or one of the `RunRefused`), not by
looking at text.

This module imports neither the engine nor the trainer, so both sides of the seam can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from core.storage.models import RunStatus, VersionStatus

DATA_WITHDRAWN = "data_withdrawn"
"""The run metric (a count) that marks a run rejected because its training data changed while it trained."""
NOT_ENOUGH_DATA = "not_enough_data"
"""The run metric of a run that failed for lack of data: what the data held (`core.texts.not_enough_data`)."""
RECALL_PROBE = "recall_probe"
"""The run metric `{"prompts", "active", "new"}`: held-out recurring exchanges answered as the community does."""


# --- starting a run -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunStarted:
    """A run started in the background."""

    run_id: int
    reports_here: bool = False
    """Progress and the outcome go to the chat that asked."""


@dataclass(frozen=True)
class AlreadyRunning:
    """Another run is in progress (of this process or another one)."""

    run_id: int
    progress: float
    live_pid: int | None = None
    """The run's live process, when the asker could stop it (`magpie retrain --stop-running`)."""


@dataclass(frozen=True)
class CoolingDown:
    """The last run finished less than RETRAIN_COOLDOWN_MINUTES ago."""

    cooldown_minutes: float
    minutes_left: int


@dataclass(frozen=True)
class CouldNotStart:
    """The training process could not be started (the log says why); `queue_unreachable`: the run was to go to
    the training queue (RETRAIN_BACKEND=celery) and its broker did not take it, something the admin can check."""

    queue_unreachable: bool = False


@dataclass(frozen=True)
class VoicesQueued:
    """VOICE_SCOPE=community, a retrain of every community: the communities with enough new data, trained one
    after another (empty: none has); progress and one closing summary go to the chat that asked."""

    communities: tuple[str, ...]
    reports_here: bool = False


RunRefused = AlreadyRunning | CoolingDown | CouldNotStart
RunRequest = RunStarted | RunRefused | VoicesQueued


# --- the engine after a switch --------------------------------------------------------------------------------


class SwapState(StrEnum):
    """Where the engine stands after the registry's active version changed."""

    SERVING = "serving"
    """It serves the active version (swapped now, or it already did)."""
    ELSEWHERE = "elsewhere"
    """No engine in this process (a shell command): a running bot follows within seconds."""
    ENGINE_DOWN = "engine_down"
    """The engine is not running; it loads the active version at its next start."""
    LOAD_FAILED = "load_failed"
    """The active version could not be loaded; the engine keeps serving what it served."""


@dataclass(frozen=True)
class SwapOutcome:
    state: SwapState
    problem: str = ""
    """Why the version could not be loaded (LOAD_FAILED)."""
    still_serving: str | None = None
    """What the engine still serves after a failed load (None: nothing)."""


# --- how a run ended ------------------------------------------------------------------------------------------


class RunEndReason(StrEnum):
    """Why a run ended without a promotion: recorded on its row (`training_runs.error` holds the value) and worded
    once, per language, by `core.texts.run_end_reason`. Details that vary (which signal, whose `--stop-running`,
    the exception) go to the log; the numbers a report shows come from the run's metrics."""

    # scored, not promoted (`rejected`)
    WORSE_THAN_ACTIVE = "worse_than_active"
    DIVERGED = "diverged"
    ACTIVE_CHANGED = "active_changed"
    TRAINING_DATA_WITHDRAWN = "training_data_withdrawn"
    """People deleted or withdrew data it trained on while it trained (the count: metric `DATA_WITHDRAWN`)."""
    # failed in the trainer
    NOT_ENOUGH_DATA = "not_enough_data"
    MODEL_LOAD_FAILED = "model_load_failed"
    TRAINING_ERROR = "training_error"
    SEVERAL_PROCESSES = "several_processes"
    # failed by whoever launched or followed it
    COULD_NOT_START = "could_not_start"
    QUEUE_UNREACHABLE = "queue_unreachable"
    KILLED = "killed"
    EXITED = "exited"
    INTERRUPTED = "interrupted"
    TIMED_OUT = "timed_out"
    NO_WORKER = "no_worker"
    CLEARED = "cleared"
    STOPPED = "stopped"
    STOPPED_WITH_BOT = "stopped_with_bot"
    INTERRUPTED_FROM_SHELL = "interrupted_from_shell"
    ENDED_ELSEWHERE = "ended_elsewhere"
    LOST_TRACK = "lost_track"
    RECORD_GONE = "record_gone"


def recorded_reason(text: str | None) -> RunEndReason | str | None:
    """The reason a row or a version's note records: a `RunEndReason` value, or the free English that rows
    written before reasons were typed hold (shown as it is)."""
    if text is None:
        return None
    try:
        return RunEndReason(text)
    except ValueError:
        return text


@dataclass(frozen=True)
class TrainingAgain:
    """After a run was discarded because its data was withdrawn: whether another run trains without that data."""

    run_id: int | None = None
    """The run started to train again, if one did."""
    refused: RunRefused | None = None
    """Why no run started now, if one was tried; with neither set, the next run will train without them."""


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended: its row's outcome, and what happened next (the engine's swap, a run that trains again)."""

    run_id: int
    status: RunStatus
    version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: RunEndReason | str | None = None
    """Why it was not promoted; free text only for rows recorded before reasons were typed."""
    swap: SwapOutcome | None = None
    """The engine after a promotion."""
    again: TrainingAgain | None = None
    """Set when the run was discarded because its data was withdrawn."""
    earlier: tuple[RunOutcome, ...] = ()
    """Runs that came before this one in the same request (a run discarded because its data was withdrawn)."""

    @property
    def data_withdrawn(self) -> bool:
        return bool(self.metrics.get(DATA_WITHDRAWN))


# --- model versions -------------------------------------------------------------------------------------------


class SwitchRefusal(StrEnum):
    UNKNOWN_VERSION = "unknown_version"
    NOTHING_ACTIVE = "nothing_active"
    """Rollback asked while BASE_MODEL serves (no version is active)."""
    NO_EARLIER_VERSION = "no_earlier_version"
    ALREADY_ACTIVE = "already_active"
    FILES_MISSING = "files_missing"
    PRUNED = "pruned"
    """Its files were deleted by MODELS_KEEP (the row stays, for the history)."""
    HOLDS_WITHDRAWN = "holds_withdrawn"
    """Someone whose messages it learned sent /forget or /optout: it never serves again."""


@dataclass(frozen=True)
class SwitchRefused:
    why: SwitchRefusal
    version: str | None = None
    """The version asked for (or, for NO_EARLIER_VERSION, the active one)."""
    path: str | None = None
    """Where its files should be (FILES_MISSING)."""


@dataclass(frozen=True)
class Switched:
    version: str
    rolled_back: str | None = None
    """The version that was replaced and marked rolled back (a rollback), if any."""
    replies_excluded: bool = False
    """Whether that version's replies leave the training data (TRAIN_EXCLUDE_ROLLED_BACK)."""
    swap: SwapOutcome = field(default_factory=lambda: SwapOutcome(SwapState.SERVING))


Switch = Switched | SwitchRefused


@dataclass(frozen=True)
class VersionSummary:
    name: str
    status: VersionStatus
    eval_loss: float | None
    created_at: datetime
    note: str | None = None
    disk_bytes: int | None = None
    """What its directory takes on disk (None: no directory, e.g. its files were pruned)."""
    pruned: bool = False
    """MODELS_KEEP deleted its files."""
    community: str | None = None
    """The voice it is (None: the shared voice)."""
    holds_withdrawn: bool = False
    """Someone it learned from sent /forget or /optout: it never serves again (and its files are deleted)."""


@dataclass(frozen=True)
class DiskUse:
    """What model versions take on disk: everything under MODELS_DIR, and the retention rule."""

    models_dir_bytes: int
    keep: int
    """MODELS_KEEP (0: every version's files are kept)."""


@dataclass(frozen=True)
class VersionList:
    """The newest versions (newest first), how many older ones were left out, and what serves without any."""

    versions: tuple[VersionSummary, ...]
    older: int
    base_model: str
    disk: DiskUse | None = None


@dataclass(frozen=True)
class VoiceReplaced:
    """A voice whose active version held withdrawn data, and what serves it now."""

    community: str | None
    """None: the shared voice."""
    withdrawn: str
    """The version taken out of service."""
    now_serving: str | None
    """Its newest version that holds no withdrawn data; None: the bare base model."""


@dataclass(frozen=True)
class Withdrawal:
    """What a /forget or /optout did to the models: the versions marked as holding withdrawn data (their files
    are deleted), the voices that stopped serving one, and the retrains asked for those voices."""

    marked: tuple[str, ...] = ()
    replaced: tuple[VoiceReplaced, ...] = ()
    retrain_queued: bool = False
    """Whether the replaced voices' retrains are queued (no retrainer in this process: the admin retrains)."""
