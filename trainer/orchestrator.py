"""The learning loop's conductor in the serving process: start runs, follow them, swap models, keep the schedule.

`TrainingOrchestrator` implements `core.retraining.Retrainer` (what `/retrain`, `/models` and `/rollback` call).
It never trains itself: each run is a child process (`python -m trainer.retrain --run-id N`, see
`trainer/retrain.py`) started with `asyncio.create_subprocess_exec`, so the event loop keeps serving chats while
torch works in another process with TRAIN_THREADS threads. The two processes talk only through the database (the
`training_runs` row: progress, outcome, reason) and the child's JSON progress lines on stdout.

What happens to a run:
    request() ── refuse if one is running or cooling down ── insert the row (who asked: the audit trail)
      └─ spawn the child ── reply at once
           monitor task: read progress lines ── notify the requester every 25 %
             └─ child exits ── read the outcome from the row (still `running` = killed or crashed → `failed`)
                  └─ promoted: engine.swap(new version) ── notify the outcome with old vs new eval loss

Besides runs it keeps the engine in step with the database: a watcher polls the active version and hot-swaps when
another process changed it (`magpie models activate`, `magpie retrain`), and `start()` marks runs whose process
is gone (the bot or the machine stopped mid-run) as failed and removes the directories they left. The periodic
schedule is a loop around `retrain_due`, a pure function of the clock, so it is tested without waiting hours.

A run's process is identified by its pid and start token (`trainer.process`), never by the pid alone. A run past
RETRAIN_TIMEOUT_MINUTES is stopped and failed: the one this process follows by its watchdog, one of another
process when a new run is asked for or at start. A run rejected because its training data was deleted or
withdrawn while it trained (`/forget`, `/optout`) is followed by one new run, whatever the cooldown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from core.db import Database
from core.engine import Engine, ModelRef
from core.errors import EngineError, ModelLoadError
from core.messages import Notifier
from core.metrics import perplexity_text
from core.models import ModelVersion, RunStatus, TrainingRun, VersionStatus
from core.settings import Settings
from core.storage import collect_stats
from core.versions import activate_version, get_active_version, get_version, list_versions, version_files_problem
from trainer.model_dirs import leftovers_of_run, remove_dirs
from trainer.process import kill_trainer, process_start_token, trainer_process_alive
from trainer.retrain import DATA_WITHDRAWN

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROGRESS_STEP = 0.25
"""The requester hears about progress every quarter: often enough to trust it, rarely enough not to spam."""
SPAWN_GRACE = timedelta(minutes=2)
"""A `running` row without a pid younger than this belongs to a process that is still starting its child."""
STOP_TIMEOUT_S = 15.0
LIST_LIMIT = 15

Clock = Callable[[], datetime]
ProgressCallback = Callable[[float], Awaitable[None]]


def _utcnow() -> datetime:
    return datetime.now(UTC)


# --- pure decisions -------------------------------------------------------------------------------------------


def retrain_due(
    *,
    now: datetime,
    last_run_started_at: datetime | None,
    new_messages: int,
    interval_hours: float,
    min_new_messages: int,
) -> bool:
    """The periodic schedule: every `interval_hours` (0 = never), and only when enough new conversation arrived."""
    if interval_hours <= 0:
        return False
    if last_run_started_at is not None and now - last_run_started_at < timedelta(hours=interval_hours):
        return False
    return new_messages >= min_new_messages


def cooldown_left(*, now: datetime, last_finished_at: datetime | None, cooldown_minutes: float) -> timedelta | None:
    """How long until another run may start, or None when it may start now."""
    if last_finished_at is None or cooldown_minutes <= 0:
        return None
    left = last_finished_at + timedelta(minutes=cooldown_minutes) - now
    return left if left > timedelta(0) else None


def child_environment(settings: Settings, inherited: Mapping[str, str]) -> dict[str, str]:
    """The training process's environment: this process's settings as variables, so the child sees exactly what
    the parent was configured with (tests build Settings in code); secrets are left out (the trainer needs no
    platform token), the thread settings bound every math library, not only torch, and library progress bars
    stay out of the child's log."""
    fields = type(settings).model_fields
    env = {key: value for key, value in inherited.items() if key.lower() not in fields}
    for name in fields:
        value = getattr(settings, name)
        if value is not None and not isinstance(value, SecretStr):
            env[name.upper()] = _env_value(value)
    threads = str(settings.train_threads)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # the child's stderr is a log; progress comes back as JSON lines
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), inherited.get("PYTHONPATH")]))
    return env


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, frozenset | set):
        return ",".join(sorted(str(item) for item in value))
    if isinstance(value, tuple | list):
        return ",".join(str(item) for item in value)
    return str(value)


# --- what a run reports ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended, in the words the requester reads."""

    run_id: int
    status: RunStatus
    version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    note: str = ""
    earlier: tuple[RunOutcome, ...] = ()
    """Runs that came before this one in the same request (a run discarded because its data was withdrawn)."""

    def message(self) -> str:
        reason = (self.reason or "no reason recorded").rstrip(". ")
        if self.status is RunStatus.PROMOTED:
            text = f"Training run #{self.run_id} finished: {self.version} is now the active model."
        elif self.status is RunStatus.REJECTED:
            version = self.version or "the new version"
            text = f"Training run #{self.run_id} finished, but {version} was not promoted: {reason}."
            text += " The active model stays."
        else:
            return f"Training run #{self.run_id} failed: {reason}. The active model stays."
        return f"{text}{self._numbers()}{self.note}"

    def _numbers(self) -> str:
        metrics = self.metrics
        if metrics.get(DATA_WITHDRAWN):
            return ""  # the version was discarded: its scores mean nothing to anyone now
        before, after = metrics.get("active_eval_loss"), metrics.get("eval_loss")
        if not isinstance(before, float) or not isinstance(after, float):
            return ""
        held_out = metrics.get("eval_samples", "?")
        return (
            f" Eval loss {before:.3f} → {after:.3f} (perplexity {perplexity_text(before)} → "
            f"{perplexity_text(after)}) on "
            f"{held_out} held-out sample{'' if held_out == 1 else 's'}; trained on {metrics.get('train_samples', '?')}."
        )


@dataclass(frozen=True)
class Switch:
    """The outcome of a version switch: whether it happened, and what to tell whoever asked."""

    done: bool
    text: str


@dataclass(frozen=True)
class RunningRun:
    """A snapshot of the run this process is following."""

    run_id: int
    pid: int
    progress: float


@dataclass(eq=False)
class _Run:
    run_id: int
    process: asyncio.subprocess.Process
    notify: tuple[str, str] | None
    on_progress: ProgressCallback | None
    started_at: datetime
    rerun_of: int | None = None
    progress: float = 0.0
    stop_reason: str | None = None
    timed_out: bool = False
    task: asyncio.Task[RunOutcome] | None = None
    watchdog: asyncio.Task[None] | None = None
    rerun: _Run | None = None
    """The run started because this one's data was withdrawn (set before this one's task finishes)."""


@dataclass(frozen=True)
class _Ended:
    """A run row this process ended (interrupted, timed out, stopped): what to kill and clean up after commit."""

    run_id: int
    started_at: datetime
    pid: int | None = None
    process_start: str | None = None
    kill: bool = False


# --- the orchestrator -----------------------------------------------------------------------------------------


class TrainingOrchestrator:
    """Implements `core.retraining.Retrainer`; `engine` and `notifier` are None in the CLI (no bot to swap or tell)."""

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        engine: Engine | None = None,
        notifier: Notifier | None = None,
        clock: Clock = _utcnow,
        poll_interval_s: float = 5.0,
        schedule_check_s: float = 300.0,
        trainer_module: str = "trainer.retrain",
    ) -> None:
        """`trainer_module` is the program each run starts (`python -m <it> --run-id N`): tests put one there that
        wraps `trainer.retrain.main` to act at a given moment of the run."""
        self._settings = settings
        self._trainer_module = trainer_module
        self._db = db
        self._engine = engine
        self._notifier = notifier
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self._schedule_check_s = schedule_check_s
        self._current: _Run | None = None
        self._start_lock = asyncio.Lock()  # one check-then-start at a time
        self._swap_lock = asyncio.Lock()  # one read-the-database-then-swap at a time
        self._switch_lock = asyncio.Lock()  # one rollback/activate at a time
        self._unloadable: set[int] = set()  # versions whose load failed: not retried by the watcher
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def running(self) -> RunningRun | None:
        run = self._current
        return RunningRun(run.run_id, run.process.pid, run.progress) if run is not None else None

    async def start(self) -> None:
        """Marks interrupted runs failed, then starts the active-version watcher and (unless off) the schedule."""
        await self.recover_interrupted_runs()
        self._tasks.append(asyncio.create_task(self._watch(), name="magpie-model-watcher"))
        if self._settings.retrain_interval_hours > 0:
            self._tasks.append(asyncio.create_task(self._keep_schedule(), name="magpie-retrain-schedule"))

    async def stop(self) -> None:
        """Stops the loops and terminates a running child, whose run is marked failed "stopped with the bot"."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._current is not None:
            await self._terminate(self._current, "stopped with the bot")

    async def wait_for_run(self, *, notify: tuple[str, str]) -> RunOutcome | None:
        """The running run's outcome (after its rerun, if it has one), if that run reports to `notify` (platform,
        chat id); else None at once."""
        run = self._current
        if run is None or run.notify != notify or run.task is None:
            return None
        log.info("waiting for training run #%d to finish (Ctrl-C stops it)", run.run_id)
        return await self._final_outcome(run, stop_reason=None)

    async def _final_outcome(self, run: _Run, *, stop_reason: str | None) -> RunOutcome:
        """Follows `run` and the rerun it may start; cancelled, it terminates the run it is following with
        `stop_reason` (None: leaves it running)."""
        earlier: list[RunOutcome] = []
        while True:
            assert run.task is not None
            try:
                outcome = await asyncio.shield(run.task)
            except asyncio.CancelledError:
                if stop_reason is not None:
                    await self._terminate(run, stop_reason)
                raise
            if run.rerun is None:
                return replace(outcome, earlier=tuple(earlier))
            earlier.append(outcome)
            run = run.rerun

    # --- starting runs ----------------------------------------------------------------------------------------

    async def request(self, *, triggered_by: str, notify_platform: str | None, notify_chat_id: str | None) -> str:
        """Starts a run in the background (see `core.retraining.Retrainer`); returns the immediate reply."""
        notify = (notify_platform, notify_chat_id) if notify_platform and notify_chat_id else None
        started = await self._begin(triggered_by, notify=notify, on_progress=None, start=_Start())
        if isinstance(started, str):
            return started
        where = " I'll report progress here." if notify else ""
        return f"Training run #{started.run_id} started. I keep answering while it trains.{where}"

    async def run_in_foreground(
        self, *, triggered_by: str, on_progress: ProgressCallback, force: bool = False, stop_running: bool = False
    ) -> RunOutcome | str:
        """`magpie retrain`: the same checks and child as `request`, awaited; a refusal comes back as text.

        `force` (`--force`) ignores the cooldown and clears a run recorded as running whose process is gone or
        never started (even within its start-up grace). `stop_running` (`--stop-running`) also stops a run whose
        process is alive, verified by pid and start token, and marks it failed. Cancelling it (Ctrl-C)
        terminates the child and marks the run failed.
        """
        start = _Start(ignore_cooldown=force or stop_running, clear_starting=force or stop_running)
        if stop_running:
            start = replace(start, stop_running_by=triggered_by)
        started = await self._begin(triggered_by, notify=None, on_progress=on_progress, start=start)
        if isinstance(started, str):
            return started
        return await self._final_outcome(started, stop_reason="interrupted from the shell")

    async def _begin(
        self,
        triggered_by: str,
        *,
        notify: tuple[str, str] | None,
        on_progress: ProgressCallback | None,
        start: _Start,
        rerun_of: int | None = None,
    ) -> _Run | str:
        async with self._start_lock:
            now = self._clock()
            refusal = await self._refusal(now, start)
            if refusal is not None:
                return refusal
            run_id = await self._create_run(triggered_by, notify, now)
            log.info("training run #%d requested by %s", run_id, triggered_by)
            try:
                process = await self._spawn(run_id)
            except OSError as exc:
                log.exception("could not start the training process for run #%d", run_id)
                await self._mark_failed(run_id, f"the training process could not start ({type(exc).__name__})")
                return "Sorry, I could not start the training process; the bot's log says why."
            progress = on_progress or self._progress_notifier(run_id, notify)
            run = _Run(run_id, process, notify, progress, started_at=now, rerun_of=rerun_of)
            run.task = asyncio.create_task(self._monitor(run), name=f"magpie-training-run-{run_id}")
            if self._timeout() is not None:
                run.watchdog = asyncio.create_task(self._watchdog(run), name=f"magpie-training-watchdog-{run_id}")
            self._current = run
            return run

    async def _refusal(self, now: datetime, start: _Start) -> str | None:
        """Why a run cannot start now (one is running, or the cooldown), or None. Ends runs whose process died,
        that ran past RETRAIN_TIMEOUT_MINUTES, or (`start.stop_running_by`) that the operator stops."""
        if self._current is not None:
            return _already_running(self._current.run_id, self._current.progress)
        ended: list[_Ended] = []
        refusal = None
        async with self._db.sessions.begin() as session:
            for row in await _running_rows(session):
                refusal = self._settle(row, now, ended, start) or refusal
            last_finished = await session.scalar(select(func.max(TrainingRun.finished_at)))
        await self._clean_up(ended)
        if refusal is not None:
            return refusal
        left = cooldown_left(
            now=now, last_finished_at=last_finished, cooldown_minutes=self._settings.retrain_cooldown_minutes
        )
        if left is None or start.ignore_cooldown:
            return None
        minutes = math.ceil(left.total_seconds() / 60)
        return (
            f"The last training run finished less than {self._settings.retrain_cooldown_minutes:g} minutes ago "
            f"(RETRAIN_COOLDOWN_MINUTES). Try again in {minutes} min."
        )

    async def _create_run(self, triggered_by: str, notify: tuple[str, str] | None, now: datetime) -> int:
        async with self._db.sessions.begin() as session:
            run = TrainingRun(
                status=RunStatus.RUNNING,
                triggered_by=triggered_by[:128],
                notify_platform=notify[0] if notify else None,
                notify_chat_id=notify[1] if notify else None,
                progress=0.0,
                started_at=now,
            )
            session.add(run)
            await session.flush()
            return run.id

    async def _spawn(self, run_id: int) -> asyncio.subprocess.Process:
        """The child gets the settings through its environment; its log goes to our stderr, its events to a pipe."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self._trainer_module,
            "--run-id",
            str(run_id),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=child_environment(self._settings, os.environ),
            limit=2**20,
        )
        async with self._db.sessions.begin() as session:
            row = await session.get(TrainingRun, run_id)
            if row is not None and row.pid is None:
                row.pid = process.pid
                row.process_start = process_start_token(process.pid)
        return process

    # --- following runs ---------------------------------------------------------------------------------------

    async def _monitor(self, run: _Run) -> RunOutcome:
        """Follows the child to its end, concludes the run, swaps to a promoted version and tells the requester."""
        try:
            await self._follow(run)
            returncode = await run.process.wait()
            outcome = await self._conclude(run, returncode)
        except Exception:
            log.exception("lost track of training run #%d", run.run_id)
            outcome = RunOutcome(run.run_id, RunStatus.FAILED, reason="the bot lost track of it (see the bot's log)")
        finally:
            if run.watchdog is not None and not run.timed_out:
                run.watchdog.cancel()
            if self._current is run:
                self._current = None
        if outcome.status is RunStatus.REJECTED and outcome.metrics.get(DATA_WITHDRAWN):
            outcome = await self._train_again(run, outcome)
        log.info("training run #%d: %s", run.run_id, outcome.message())
        if run.notify is not None:
            await self._notify(run.notify, outcome.message())
        return outcome

    async def _follow(self, run: _Run) -> None:
        stdout = run.process.stdout
        assert stdout is not None
        while True:
            try:
                raw = await stdout.readline()
            except ValueError:  # a line over the limit (not one of ours): skip it
                continue
            if not raw:
                return
            event = _parse_event(raw)
            if event is not None and event.get("event") == "progress":
                run.progress = float(event.get("progress", run.progress))
                if run.on_progress is not None:
                    await run.on_progress(run.progress)

    async def _train_again(self, run: _Run, outcome: RunOutcome) -> RunOutcome:
        """The run was discarded because people withdrew data it trained on: train once more on the data as it is
        now (the cooldown does not apply; a rerun that is discarded too is not repeated)."""
        if run.rerun_of is not None or run.stop_reason is not None or self._stopping:
            return replace(outcome, note=" The next training run will train without them.")
        on_progress = None if run.notify is not None else run.on_progress
        started = await self._begin(
            f"rerun of #{run.run_id}",
            notify=run.notify,
            on_progress=on_progress,
            start=_Start(ignore_cooldown=True),
            rerun_of=run.run_id,
        )
        if isinstance(started, str):
            return replace(outcome, note=f" Not training again now: {started}")
        run.rerun = started
        log.info("training run #%d: its data changed; run #%d trains again", run.run_id, started.run_id)
        return replace(outcome, note=f" Training again without them: run #{started.run_id} started.")

    async def _watchdog(self, run: _Run) -> None:
        """Stops the run once it has run longer than RETRAIN_TIMEOUT_MINUTES (checked every poll interval)."""
        limit = self._timeout()
        assert limit is not None
        while True:
            await asyncio.sleep(self._poll_interval_s)
            if self._clock() - run.started_at > limit:
                break
        log.warning("training run #%d ran past RETRAIN_TIMEOUT_MINUTES; stopping it", run.run_id)
        run.timed_out = True
        await self._terminate(run, self._timeout_reason())

    def _timeout(self) -> timedelta | None:
        minutes = self._settings.retrain_timeout_minutes
        return timedelta(minutes=minutes) if minutes > 0 else None

    def _timeout_reason(self) -> str:
        minutes = self._settings.retrain_timeout_minutes
        return f"it ran longer than RETRAIN_TIMEOUT_MINUTES ({minutes:g} min) and was stopped"

    async def _conclude(self, run: _Run, returncode: int) -> RunOutcome:
        """Reads the outcome the child recorded; a run still `running` was killed or crashed and is failed here."""
        now = self._clock()
        async with self._db.sessions.begin() as session:
            row = await session.get(TrainingRun, run.run_id, with_for_update=True)
            if row is None:
                return RunOutcome(run.run_id, RunStatus.FAILED, reason="its record disappeared")
            if row.status is RunStatus.RUNNING:
                row.status = RunStatus.FAILED
                row.error = run.stop_reason or _exit_reason(returncode)
                row.finished_at = now
            version = await session.get(ModelVersion, row.model_version_id) if row.model_version_id else None
            outcome = RunOutcome(
                run.run_id, row.status, version.name if version else None, dict(row.metrics or {}), row.error
            )
        if outcome.status is RunStatus.FAILED:
            await self._clean_up([_Ended(run.run_id, run.started_at)])
        if outcome.status is RunStatus.PROMOTED:
            outcome = replace(outcome, note=await self._swap_note())
        return outcome

    async def _terminate(self, run: _Run, reason: str) -> None:
        """SIGTERM, then SIGKILL if the child does not go within STOP_TIMEOUT_S; the monitor records `reason`."""
        run.stop_reason = reason
        with contextlib.suppress(ProcessLookupError):
            run.process.terminate()
        assert run.task is not None
        try:
            await asyncio.wait_for(asyncio.shield(run.task), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                run.process.kill()
            await run.task

    def _progress_notifier(self, run_id: int, notify: tuple[str, str] | None) -> ProgressCallback | None:
        if notify is None:
            return None
        next_mark = PROGRESS_STEP

        async def report(fraction: float) -> None:
            nonlocal next_mark
            if fraction < next_mark or fraction >= 1.0:
                return
            while next_mark <= fraction:
                next_mark += PROGRESS_STEP
            await self._notify(notify, f"Training run #{run_id}: {math.floor(fraction * 100)}% done.")

        return report

    async def _notify(self, notify: tuple[str, str], text: str) -> None:
        if self._notifier is None:
            return
        try:
            await self._notifier.notify(notify[0], notify[1], text)
        except Exception:
            log.exception("could not send a training notification to %s", notify[0])

    # --- recovery ---------------------------------------------------------------------------------------------

    async def recover_interrupted_runs(self) -> list[int]:
        """Fails `running` runs whose training process is gone or that ran past RETRAIN_TIMEOUT_MINUTES (their
        process is stopped), and removes the directories they left; returns their ids."""
        now = self._clock()
        ended: list[_Ended] = []
        async with self._db.sessions.begin() as session:
            for row in await _running_rows(session):
                if self._current is None or row.id != self._current.run_id:
                    self._settle(row, now, ended, _Start())
        await self._clean_up(ended)
        return [end.run_id for end in ended]

    def _settle(self, row: TrainingRun, now: datetime, ended: list[_Ended], start: _Start) -> str | None:
        """Decides about a `running` row of another process: ends it (appending to `ended`) when its process is
        gone, it timed out or the operator stops it; returns the refusal when it is a live run that goes on."""
        if row.pid is None:
            if now - row.started_at < SPAWN_GRACE and not start.clear_starting:
                return _already_running(row.id, row.progress)
            reason = _INTERRUPTED
        elif not trainer_process_alive(row.pid, row.process_start):
            reason = _INTERRUPTED
        elif (limit := self._timeout()) is not None and now - row.started_at > limit:
            reason = self._timeout_reason()
        elif start.stop_running_by is not None:
            reason = f"stopped by {start.stop_running_by} (magpie retrain --stop-running)"
        else:
            hint = _STOP_HINT.format(pid=row.pid) if start.clear_starting else ""
            return _already_running(row.id, row.progress) + hint
        log.warning("training run #%d (process %s) is marked failed: %s", row.id, row.pid, reason)
        row.status, row.error, row.finished_at = RunStatus.FAILED, reason, now
        ended.append(_Ended(row.id, row.started_at, row.pid, row.process_start, kill=reason != _INTERRUPTED))
        return None

    async def _clean_up(self, ended: list[_Ended]) -> None:
        """After the rows are committed as failed: kill the processes that were stopped (verified as the runs'
        own), then remove the directories the runs left that no version row points at."""
        for end in ended:
            if end.kill:
                kill_trainer(end.pid, end.process_start)
            async with self._db.sessions() as session:
                leftovers = await leftovers_of_run(session, self._settings.models_dir, end.run_id, end.started_at)
            await asyncio.to_thread(remove_dirs, leftovers)

    async def _mark_failed(self, run_id: int, reason: str) -> None:
        async with self._db.sessions.begin() as session:
            row = await session.get(TrainingRun, run_id)
            if row is not None:
                row.status, row.error, row.finished_at = RunStatus.FAILED, reason, self._clock()

    # --- model versions and the engine ------------------------------------------------------------------------

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
            ref = ModelRef(source=active.path, name=active.name, version_id=active.id)
            try:
                await self._engine.swap(ref)
            except ModelLoadError:
                self._unloadable.add(active.id)
                raise
            log.info("now serving model version %s", active.name)
            return ref

    async def rollback(self, *, version: str | None, triggered_by: str) -> str:
        """Activates `version`, or the previously active one; the one it replaces is marked `rolled_back`."""
        switch = await self.switch_version(version=version, rolled_back=True, triggered_by=triggered_by)
        return switch.text

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
                if version:
                    target = await _find_version(session, version)
                else:
                    target = await _previous_version(session, current)
                refusal = _switch_refusal(version, target, current)
                if refusal is not None:
                    return Switch(False, refusal)
                assert target is not None
                await activate_version(
                    session, version_id=target.id, previous_becomes=previous_becomes, now=self._clock()
                )
            log.info("%s switched the active model from %s to %s", triggered_by, _name(current), target.name)
            text = f"Switched to {target.name}."
            if current is not None and previous_becomes is VersionStatus.ROLLED_BACK:
                text += f" {current.name} is marked rolled back"
                text += (
                    "; its replies will not be used for training." if self._settings.train_exclude_rolled_back else "."
                )
            return Switch(True, text + await self._swap_note())

    async def _swap_note(self) -> str:
        """What the requester should know about the engine after the database switched versions."""
        if self._engine is None:
            return " A running bot switches to it within a few seconds."
        try:
            await self.sync_engine()
        except ModelLoadError as exc:
            serving = self._engine.model_ref
            return f" But it could not be loaded ({exc}); still serving {serving.name if serving else 'nothing'}."
        except EngineError:
            return " The model engine is not running; it will load it at the next start."
        return ""

    async def list_versions(self) -> str:
        """Newest first, with status, eval loss and perplexity; the active one is marked with `*`."""
        async with self._db.sessions() as session:
            versions = await list_versions(session)
        if not versions:
            return f"No trained model versions yet: serving BASE_MODEL ({self._settings.base_model})."
        lines = ["Model versions, newest first (* = active):"]
        for version in versions[:LIST_LIMIT]:
            lines.append(_version_line(version))
        if len(versions) > LIST_LIMIT:
            lines.append(f"  … and {len(versions) - LIST_LIMIT} older")
        return "\n".join(lines)

    # --- background loops -------------------------------------------------------------------------------------

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

    async def _keep_schedule(self) -> None:
        while True:
            await asyncio.sleep(self._schedule_check_s)
            try:
                await self.check_schedule()
            except Exception:
                log.exception("scheduled retraining check failed")

    async def check_schedule(self) -> str | None:
        """Starts a scheduled run when `retrain_due` says so; returns what `request` said, or None if not due."""
        async with self._db.sessions() as session:
            stats = await collect_stats(session)
        due = retrain_due(
            now=self._clock(),
            last_run_started_at=stats.last_run.started_at if stats.last_run else None,
            new_messages=stats.since_last_training,
            interval_hours=self._settings.retrain_interval_hours,
            min_new_messages=self._settings.retrain_min_new_messages,
        )
        if not due:
            return None
        reply = await self.request(triggered_by="schedule", notify_platform=None, notify_chat_id=None)
        log.info("scheduled retraining (%d new messages): %s", stats.since_last_training, reply)
        return reply


# --- helpers --------------------------------------------------------------------------------------------------


def _already_running(run_id: int, progress: float) -> str:
    return f"A training run (#{run_id}) is already running, {math.floor(progress * 100)}% done."


_INTERRUPTED = "interrupted: the training process stopped without recording an outcome (restart or crash)"
_STOP_HINT = " Its process ({pid}) is alive; `magpie retrain --stop-running` stops it and starts a new run."


@dataclass(frozen=True)
class _Start:
    """How a run request treats what stands in its way (`magpie retrain --force / --stop-running`)."""

    ignore_cooldown: bool = False
    clear_starting: bool = False
    """Also clear a row with no process yet, within its start-up grace (a bot that died while spawning)."""
    stop_running_by: str | None = None
    """Who stops a live run (then marked failed and killed), or None to leave live runs alone."""


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the training process was killed ({name})"
    return f"the training process exited unexpectedly (status {returncode})"


def _parse_event(raw: bytes) -> dict[str, Any] | None:
    """A progress line from the child, or None for anything else a library printed."""
    try:
        event = json.loads(raw)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


async def _running_rows(session: AsyncSession) -> list[TrainingRun]:
    """Locked (on PostgreSQL): a trainer recording its outcome meanwhile is waited for, not overwritten."""
    query = select(TrainingRun).where(TrainingRun.status == RunStatus.RUNNING).with_for_update()
    rows = await session.scalars(query)
    return list(rows.all())


async def _find_version(session: AsyncSession, name: str) -> ModelVersion | None:
    """By exact name; a bare number also finds `v<number>`."""
    version = await get_version(session, name=name)
    if version is None and name.isdigit():
        version = await get_version(session, name=f"v{name}")
    return version


async def _previous_version(session: AsyncSession, current: ModelVersion | None) -> ModelVersion | None:
    """The version that served last before the current one (retired, not rejected or rolled back)."""
    if current is None:
        return None
    query = (
        select(ModelVersion)
        .where(ModelVersion.status == VersionStatus.RETIRED, ModelVersion.activated_at.is_not(None))
        .order_by(ModelVersion.activated_at.desc(), ModelVersion.id.desc())
        .limit(1)
    )
    result: ModelVersion | None = await session.scalar(query)
    return result


def _switch_refusal(name: str | None, target: ModelVersion | None, current: ModelVersion | None) -> str | None:
    if target is None and name:
        return f'I don\'t know a model version called "{name}". /models lists them.'
    if target is None:
        if current is None:
            return "No trained version is active (serving BASE_MODEL), so there is nothing to roll back."
        return f"There is no earlier version to go back to from {current.name}. /models lists them."
    if current is not None and target.id == current.id:
        return f"{target.name} is already the active model."
    if not (Path(target.path) / "config.json").is_file():
        return f"{target.name}'s files are missing from {target.path}, so I can't switch to it."
    return None


def _name(version: ModelVersion | None) -> str:
    return version.name if version is not None else "BASE_MODEL"


def _version_line(version: ModelVersion) -> str:
    marker = "*" if version.status is VersionStatus.ACTIVE else " "
    line = f"{marker} {version.name}: {version.status.value}"
    loss = (version.metrics or {}).get("eval_loss")
    if isinstance(loss, int | float) and math.isfinite(loss):
        line += f", eval loss {loss:.3f} (perplexity {perplexity_text(float(loss))})"
    line += f", {version.created_at:%Y-%m-%d %H:%M}"
    if version.status is VersionStatus.REJECTED and version.note:
        line += f" ({version.note})"
    return line
