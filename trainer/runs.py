"""The life of a training run's row: the contract between whoever starts a run and the process that trains it.

A `training_runs` row is all the two processes share (the launcher is the bot's orchestrator or `magpie retrain`;
the trainer is `python -m trainer.retrain`, which could as well be a worker on another machine):

    create (launcher: `running`, who asked, whom to tell)
      └─ record_process (launcher) / claim (trainer: must still be `running`; its pid and start token)
           └─ set_parent, set_progress (trainer)
                └─ one ending, only while `running`: record_outcome (trainer: promoted or rejected, in the
                   promotion transaction), or end / fail (trainer or launcher; `fail` is the only way a run fails)
    conclude (launcher: reads the outcome; a row still `running` after its process exited is failed)
    settle_running (launcher, at start and before a new run): a `running` row of another process whose process
    is gone, or that ran past RETRAIN_TIMEOUT_MINUTES, is failed (and its process killed), and the directories
    the ended runs left are removed (clean_up).

With RETRAIN_BACKEND=celery the launcher queues the run instead (`heartbeat_at` set: a queued run) and a
`magpie worker`, possibly on another machine, takes it (`take`: its host), renews `heartbeat_at` while its trainer
runs (`beat`) and concludes it like a launcher. A queued run waits for a worker until RETRAIN_TIMEOUT_MINUTES; a
taken run whose heartbeat is older than HEARTBEAT_STALE, or whose process on this machine is gone, was interrupted.

At most one row is `running` (a partial unique index): `create` refuses a second one, so only one run happens at a
time across every bot, shell and worker sharing the database.

A run's process is identified by its pid and start token (`trainer.process`), never by the pid alone. Why a run
ended unpromoted is a `core.outcomes.RunEndReason` (interrupted, timed out, stopped, killed…), recorded as its value
in the row's `error` column and worded per reader by `core.texts`; the details that vary (which signal, who
stopped it) go to the log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import MagpieError
from core.outcomes import AlreadyRunning, RunEndReason, RunOutcome, recorded_reason
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import RunStatus, TrainingRun
from core.storage.versions import get_version, runs_in_progress
from trainer.model_dirs import leftovers_of_run, remove_dirs
from trainer.process import kill_trainer, process_start_token, this_host, trainer_process_alive

log = logging.getLogger(__name__)

SPAWN_GRACE = timedelta(minutes=2)
"""A `running` row without a pid younger than this belongs to a process that is still starting its child."""
HEARTBEAT_INTERVAL_S = 10.0
"""How often a worker renews the heartbeat of the run it carries out."""
HEARTBEAT_STALE = timedelta(minutes=2)
"""A taken run whose heartbeat is older than this lost its worker (twelve missed beats: a slow database or a few
seconds of clock skew between machines are not mistaken for a death)."""


class RunNotClaimableError(MagpieError):
    """The run row does not exist or is not `running` (another process finished or failed it)."""


# --- the launcher starts a run, the trainer claims it ---------------------------------------------------------


async def create(
    db: Database,
    *,
    triggered_by: str,
    notify: tuple[str, str] | None,
    now: datetime,
    queued: bool = False,
    community: str | None = None,
) -> int | AlreadyRunning:
    """A new `running` row: who asked (the audit trail), which chat hears the outcome and which voice it trains
    (`community`; None: the shared voice); `queued` for a run a worker will take. Another `running` row (a run
    another process started meanwhile) is returned instead."""
    try:
        async with db.sessions.begin() as session:
            run = TrainingRun(
                status=RunStatus.RUNNING,
                triggered_by=triggered_by[:128],
                notify_platform=notify[0] if notify else None,
                notify_chat_id=notify[1] if notify else None,
                progress=0.0,
                started_at=now,
                heartbeat_at=now if queued else None,
                community=community,
            )
            session.add(run)
            await session.flush()
            return run.id
    except IntegrityError:  # the partial unique index: one running row, whoever wrote it
        async with db.sessions() as session:
            other = next(iter(await runs_in_progress(session)), None)
        if other is None:  # it ended in between: a refusal all the same, the next request goes through
            raise
        log.info("training run #%d is already running (started by another process)", other.id)
        return AlreadyRunning(other.id, other.progress)


async def record_process(db: Database, run_id: int, pid: int) -> None:
    """The launcher's record of the child it started (unless the child already claimed the row itself)."""
    async with db.sessions.begin() as session:
        row = await session.get(TrainingRun, run_id)
        if row is not None and row.pid is None:
            row.pid = pid
            row.process_start = process_start_token(pid)


async def claim(db: Database, run_id: int) -> None:
    """The trainer takes the run: it must still be `running`; its own pid and start token are recorded."""
    async with db.sessions.begin() as session:
        run = await session.get(TrainingRun, run_id)
        if run is None or run.status != RunStatus.RUNNING:
            state = "does not exist" if run is None else f"is already {run.status.value}"
            raise RunNotClaimableError(f"training run #{run_id} {state}")
        run.pid = os.getpid()
        run.process_start = process_start_token(run.pid)


@dataclass(frozen=True)
class Taken:
    """What a worker found when it went to take a queued run: `taken` (it is this worker's now), or why not."""

    taken: bool
    why_not: str = ""
    started_at: datetime | None = None
    ended: Ended | None = None
    """The run's earlier worker died (a redelivered task): the run was failed here; its leftovers to remove."""


async def take(db: Database, run_id: int, *, host: str, now: datetime) -> Taken:
    """A worker takes a queued run: it must be `running` and not taken by a worker that is still alive (brokers
    deliver a task again when a worker dies or holds it too long). One whose worker died is failed here."""
    async with db.sessions.begin() as session:
        row = await session.get(TrainingRun, run_id, with_for_update=True)
        if row is None or row.status is not RunStatus.RUNNING:
            state = "does not exist" if row is None else f"is already {row.status.value}"
            return Taken(False, f"training run #{run_id} {state}")
        if row.worker_host is None:
            row.worker_host, row.heartbeat_at = host[:255], now
            return Taken(True, started_at=row.started_at)
        if not _worker_gone(row, now):
            return Taken(False, f"training run #{run_id} is being carried out by the worker on {row.worker_host}")
        end(row, RunStatus.FAILED, RunEndReason.INTERRUPTED, now=now)
        ended = Ended(row.id, row.started_at, row.pid, row.process_start, kill=row.worker_host == this_host())
    return Taken(False, f"training run #{run_id} lost its worker: it is marked failed (interrupted)", ended=ended)


async def queued_run(db: Database) -> tuple[int, tuple[str, str] | None, datetime] | None:
    """The queued run that is `running` now, if any: its id, the chat to tell, when it was asked for."""
    async with db.sessions() as session:
        row = next((run for run in await runs_in_progress(session) if run.heartbeat_at is not None), None)
    if row is None:
        return None
    notify = (row.notify_platform, row.notify_chat_id) if row.notify_platform and row.notify_chat_id else None
    return row.id, notify, row.started_at


async def beat(db: Database, run_id: int, *, now: datetime) -> bool:
    """The worker's heartbeat for its run; returns whether the run is still `running` (else: stop training)."""
    async with db.sessions.begin() as session:
        row = await session.get(TrainingRun, run_id, populate_existing=True)
        if row is None or row.status is not RunStatus.RUNNING:
            return False
        row.heartbeat_at = now
        return True


async def follow_queued(db: Database, settings: Settings, run_id: int, *, now: datetime) -> float | None:
    """The progress of a queued run that goes on; None once it ended (failed here when its worker is gone)."""
    ended: list[Ended] = []
    async with db.sessions.begin() as session:
        row = await session.get(TrainingRun, run_id, with_for_update=True, populate_existing=True)
        if row is None or row.status is not RunStatus.RUNNING:
            return None
        going = _settle(row, settings, now, ended, StartPolicy())
        progress = row.progress if going is not None else None
    await clean_up(db, settings.models_dir, ended)
    return progress


async def set_progress(db: Database, run_id: int, fraction: float) -> None:
    async with db.sessions.begin() as session:
        run = await session.get(TrainingRun, run_id)
        if run is not None and run.status == RunStatus.RUNNING:
            run.progress = fraction


async def community_of(session: AsyncSession, run_id: int) -> str | None:
    """The voice a run trains (None: the shared voice)."""
    run = await session.get(TrainingRun, run_id)
    assert run is not None
    return run.community


async def set_parent(session: AsyncSession, run_id: int, version_id: int | None) -> None:
    """The version the run starts from (None: BASE_MODEL), set in the transaction that read the active version."""
    run = await session.get(TrainingRun, run_id)
    assert run is not None
    run.parent_version_id = version_id


# --- endings --------------------------------------------------------------------------------------------------


def end(
    row: TrainingRun,
    status: RunStatus,
    reason: RunEndReason | None,
    *,
    now: datetime,
    metrics: Mapping[str, Any] | None = None,
) -> None:
    """The one way a row ends (the caller's transaction commits it); `reason` is stored as its value."""
    row.status = status
    row.error = None if reason is None else reason.value
    row.finished_at = now
    if metrics is not None:
        row.metrics = dict(metrics)


async def end_if_running(
    db: Database,
    run_id: int,
    status: RunStatus,
    reason: RunEndReason,
    *,
    now: datetime,
    metrics: Mapping[str, Any] | None = None,
) -> None:
    """Ends the run unless it already ended (locked: an outcome recorded meanwhile is never overwritten)."""
    async with db.sessions.begin() as session:
        row = await session.get(TrainingRun, run_id, with_for_update=True)
        if row is not None and row.status == RunStatus.RUNNING:
            end(row, status, reason, now=now, metrics=metrics)


BEFORE_TRAINING = "before_training"
"""The run metric that marks a run failed before it trained (too little data, no process could start): it spent
nothing worth a rest, so it does not start the RETRAIN_COOLDOWN_MINUTES cooldown (`settle_running`)."""


async def fail(
    db: Database,
    run_id: int,
    reason: RunEndReason,
    *,
    now: datetime,
    before_training: bool = False,
    metrics: Mapping[str, Any] | None = None,
) -> None:
    """Ends a running run as failed; `metrics` say what the run found (e.g. what its data held)."""
    recorded = {**(metrics or {}), **({BEFORE_TRAINING: True} if before_training else {})}
    await end_if_running(db, run_id, RunStatus.FAILED, reason, now=now, metrics=recorded or None)


async def lock_for_outcome(session: AsyncSession, run_id: int) -> TrainingRun:
    """The row, locked for the promotion transaction. Raises `RunNotClaimableError` when the run was ended
    meanwhile (timed out, `--force`): its version must then be discarded."""
    run = await session.get(TrainingRun, run_id, with_for_update=True, populate_existing=True)
    if run is None or run.status != RunStatus.RUNNING:
        raise RunNotClaimableError(f"training run #{run_id} was ended while it trained; its version is discarded")
    return run


def record_outcome(
    run: TrainingRun,
    *,
    promoted: bool,
    version_id: int,
    metrics: Mapping[str, Any],
    reason: RunEndReason | None,
    now: datetime,
) -> None:
    """A scored run's outcome, inside the transaction that promoted or rejected its version."""
    end(run, RunStatus.PROMOTED if promoted else RunStatus.REJECTED, None if promoted else reason, now=now)
    run.model_version_id = version_id
    run.metrics = dict(metrics)
    run.progress = 1.0


async def conclude(db: Database, run_id: int, *, reason_if_running: RunEndReason, now: datetime) -> RunOutcome:
    """The outcome the trainer recorded, once its process exited; a row still `running` was killed or crashed and
    is failed here with `reason_if_running`."""
    async with db.sessions.begin() as session:
        row = await session.get(TrainingRun, run_id, with_for_update=True)
        if row is None:
            return RunOutcome(run_id, RunStatus.FAILED, reason=RunEndReason.RECORD_GONE)
        if row.status is RunStatus.RUNNING:
            end(row, RunStatus.FAILED, reason_if_running, now=now)
        version = await get_version(session, version_id=row.model_version_id) if row.model_version_id else None
        metrics, reason = dict(row.metrics or {}), recorded_reason(row.error)
        return RunOutcome(run_id, row.status, version.name if version else None, metrics, reason)


def exit_reason(returncode: int) -> RunEndReason:
    """Why a trainer that exited without recording an outcome failed (what ended it: `exit_description`)."""
    return RunEndReason.KILLED if returncode < 0 else RunEndReason.EXITED


def exit_description(returncode: int) -> str:
    """How a trainer process ended, for the log: the signal's name, or the exit status."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def timeout(settings: Settings) -> timedelta | None:
    """RETRAIN_TIMEOUT_MINUTES as a duration (None: no limit)."""
    minutes = settings.retrain_timeout_minutes
    return timedelta(minutes=minutes) if minutes > 0 else None


# --- runs of other processes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartPolicy:
    """How a new run treats a `running` row in its way (`magpie retrain --force / --stop-running`)."""

    clear_starting: bool = False
    """Also clear a row with no process yet, within its start-up grace (a bot that died while spawning)."""
    stop_running_by: str | None = None
    """Who stops a live run (then failed and killed), or None to leave live runs alone."""


@dataclass(frozen=True)
class Ended:
    """A row ended here (interrupted, timed out, stopped): what to kill and clean up once it is committed."""

    run_id: int
    started_at: datetime
    pid: int | None = None
    process_start: str | None = None
    kill: bool = False


@dataclass(frozen=True)
class Settled:
    """What `settle_running` found: the rows it ended, a live run that goes on, when the last run finished."""

    ended: list[Ended]
    running: AlreadyRunning | None
    last_finished_at: datetime | None


async def settle_running(
    db: Database, settings: Settings, *, now: datetime, policy: StartPolicy, besides: int | None = None
) -> Settled:
    """Decides about every `running` row but `besides` (the run this process follows): rows whose process is
    gone or that timed out (or that `policy` stops) are failed, their processes killed and their directories
    removed; the rest are runs that go on."""
    ended: list[Ended] = []
    running = None
    async with db.sessions.begin() as session:
        for row in await runs_in_progress(session, lock=True):
            if row.id != besides:
                running = _settle(row, settings, now, ended, policy) or running
        last_finished = await last_trained_finish(session)
    await clean_up(db, settings.models_dir, ended)
    return Settled(ended, running, last_finished)


async def last_trained_finish(session: AsyncSession) -> datetime | None:
    """When the last run that got as far as training ended: the cooldown counts from there (runs failed
    `before_training` are left out)."""
    untrained = TrainingRun.metrics[BEFORE_TRAINING].as_boolean()
    query = select(func.max(TrainingRun.finished_at)).where(untrained.is_not(True))
    return await session.scalar(query)


def _settle(
    row: TrainingRun, settings: Settings, now: datetime, ended: list[Ended], policy: StartPolicy
) -> AlreadyRunning | None:
    """Ends the row (appending to `ended`) when its process is gone, it timed out or the policy stops it; returns
    it as a run that goes on otherwise."""
    if row.heartbeat_at is not None:
        return _settle_queued(row, settings, now, ended, policy)
    limit = timeout(settings)
    if row.pid is None:
        if now - row.started_at < SPAWN_GRACE and not policy.clear_starting:
            return AlreadyRunning(row.id, row.progress)
        reason = RunEndReason.INTERRUPTED
    elif not trainer_process_alive(row.pid, row.process_start):
        reason = RunEndReason.INTERRUPTED
    elif limit is not None and now - row.started_at > limit:
        reason = RunEndReason.TIMED_OUT
    elif policy.stop_running_by is not None:
        reason = RunEndReason.STOPPED
    else:
        return AlreadyRunning(row.id, row.progress, row.pid if policy.clear_starting else None)
    log.warning("training run #%d (process %s) is marked failed: %s%s", row.id, row.pid, reason, _by(reason, policy))
    end(row, RunStatus.FAILED, reason, now=now)
    kill = reason is not RunEndReason.INTERRUPTED
    ended.append(Ended(row.id, row.started_at, row.pid, row.process_start, kill=kill))
    return None


def _by(reason: RunEndReason, policy: StartPolicy) -> str:
    """Who stopped a run, for the log line."""
    return f" by {policy.stop_running_by}" if reason is RunEndReason.STOPPED else ""


def _settle_queued(
    row: TrainingRun, settings: Settings, now: datetime, ended: list[Ended], policy: StartPolicy
) -> AlreadyRunning | None:
    """`_settle` for a run sent to the queue: one no worker took yet waits (until RETRAIN_TIMEOUT_MINUTES); a
    taken one is gone when its heartbeat is stale or, on this machine, its trainer process is gone."""
    limit = timeout(settings)
    local = row.worker_host == this_host()
    if row.worker_host is not None and _worker_gone(row, now):
        reason = RunEndReason.INTERRUPTED
    elif limit is not None and now - row.started_at > limit:
        reason = RunEndReason.TIMED_OUT if row.worker_host else RunEndReason.NO_WORKER
    elif row.worker_host is None and policy.clear_starting:
        reason = RunEndReason.CLEARED
    elif policy.stop_running_by is not None:
        reason = RunEndReason.STOPPED
    else:
        live_pid = row.pid if policy.clear_starting and local else None
        return AlreadyRunning(row.id, row.progress, live_pid)
    log.warning(
        "training run #%d (worker %s) is marked failed: %s%s", row.id, row.worker_host, reason, _by(reason, policy)
    )
    end(row, RunStatus.FAILED, reason, now=now)
    ended.append(Ended(row.id, row.started_at, row.pid, row.process_start, kill=local))
    return None


def _worker_gone(row: TrainingRun, now: datetime) -> bool:
    """A taken run's worker is gone: its heartbeat stopped, or (on this machine) its trainer process died."""
    assert row.heartbeat_at is not None
    if now - row.heartbeat_at > HEARTBEAT_STALE:
        return True
    local = row.worker_host == this_host()
    return local and row.pid is not None and not trainer_process_alive(row.pid, row.process_start)


async def clean_up(db: Database, models_dir: Path, ended: Sequence[Ended]) -> None:
    """After the rows are committed as ended: kill the processes that were stopped (verified as the runs' own),
    then remove the directories the runs left that no version row points at."""
    for run in ended:
        if run.kill:
            kill_trainer(run.pid, run.process_start)
        async with db.sessions() as session:
            leftovers = await leftovers_of_run(session, models_dir, run.run_id, run.started_at)
        await asyncio.to_thread(remove_dirs, leftovers)
