"""The learning loop's launcher in the serving process: start runs, follow them, keep the schedule.

`TrainingOrchestrator` implements `core.retraining.Retrainer` (what `/retrain` calls) and `magpie retrain`. It
never trains itself: each run is a child process (`python -m trainer.retrain --run-id N`, see `trainer/retrain.py`,
started by `trainer.process.spawn_trainer`), so the event loop keeps serving chats while torch works in another
process with TRAIN_THREADS threads. The two processes talk only through the run's row (`trainer.runs` owns it:
progress, outcome, reason) and the child's JSON progress lines on stdout. With RETRAIN_BACKEND=celery the run is
sent to the queue instead (`trainer.celery_queue`) and a `magpie worker` carries it out, maybe on another machine;
the orchestrator then follows it through the row alone (`trainer.run_handles.QueuedRun`), and a bot that stops
leaves such a run going: the next start follows it again and reports it to whoever asked.

What happens to a run:
    request() ── refuse if one is running or cooling down ── create the row (who asked: the audit trail)
      └─ spawn the child ── answer at once (`RunStarted`)
           monitor task: read progress lines ── notify the requester every 25 %
             └─ child exits ── conclude from the row (still `running` = killed or crashed → `failed`)
                  └─ promoted: the serving side follows (`ServingFollower`) ── notify the outcome

`start()` fails runs whose process is gone (the bot or the machine stopped mid-run) and removes the directories
they left (`trainer.runs.settle_running`). A run past RETRAIN_TIMEOUT_MINUTES is stopped and failed: the one this
process follows by its watchdog, one of another process when a new run is asked for or at start. A run rejected
because its training data was deleted or withdrawn while it trained (`/forget`, `/optout`) is followed by one new
run, whatever the cooldown; a run that failed before it trained (too little data, no process) starts none
(`trainer.runs.BEFORE_TRAINING`). The periodic schedule is a loop around `trainer.schedule.retrain_due`. Results are
typed (`core.outcomes`); `core.texts` words them, and the orchestrator sends those words to the requester's chat
(`core.chat.messages.Notifier`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from core.chat.messages import Notifier
from core.ops.telemetry import Telemetry
from core.outcomes import (
    AlreadyRunning,
    CoolingDown,
    CouldNotStart,
    RunEndReason,
    RunOutcome,
    RunRefused,
    RunRequest,
    RunStarted,
    SwapOutcome,
    SwapState,
    TrainingAgain,
    VoicesQueued,
)
from core.retraining import ServingFollower
from core.settings import Settings
from core.storage.chat_log import communities_with_new_data
from core.storage.db import Database
from core.storage.models import RunStatus
from core.storage.versions import SHARED_VOICE
from core.texts import run_outcome, run_progress, run_request, voices_progress, voices_summary
from trainer import runs
from trainer.celery_queue import QueueUnreachableError, RunQueue
from trainer.process import spawn_trainer
from trainer.run_handles import ChildTrainer, QueuedRun, RunHandle
from trainer.runs import StartPolicy
from trainer.schedule import cooldown_left, scheduled_run_due

log = logging.getLogger(__name__)

PROGRESS_STEP = 0.25
"""The requester hears about progress every quarter: often enough to trust it, rarely enough not to spam."""
STOP_TIMEOUT_S = 15.0

_LEAVE_RUNS_ALONE = StartPolicy()
Clock = Callable[[], datetime]
ProgressCallback = Callable[[float], Awaitable[None]]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class RunningRun:
    """A snapshot of the run this process is following."""

    run_id: int
    pid: int | None
    """The trainer process on this machine (None: a run queued for a worker)."""
    progress: float


@dataclass(eq=False)
class _Run:
    run_id: int
    handle: RunHandle
    notify: tuple[str, str] | None
    on_progress: ProgressCallback | None
    started_at: datetime
    rerun_of: int | None = None
    progress: float = 0.0
    stop_reason: RunEndReason | None = None
    timed_out: bool = False
    task: asyncio.Task[RunOutcome] | None = None
    watchdog: asyncio.Task[None] | None = None
    rerun: _Run | None = None
    """The run started because this one's data was withdrawn (set before this one's task finishes)."""
    community: str | None = None
    """The voice it trains (None: the shared voice)."""


@dataclass(frozen=True)
class _QueuedVoice:
    """A voice waiting for its run in a retrain of several voices (`retrain_voices`)."""

    community: str | None
    triggered_by: str
    notify: tuple[str, str] | None
    position: int
    total: int


class TrainingOrchestrator:
    """Implements `core.retraining.Retrainer`. `serving` follows a promoted version into the engine and `notifier`
    tells requesters; both are None in the shell (`magpie retrain`: a running bot's watcher follows). `telemetry`
    counts the runs it follows to their end, by outcome and duration."""

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        serving: ServingFollower | None = None,
        notifier: Notifier | None = None,
        clock: Clock = _utcnow,
        poll_interval_s: float = 5.0,
        schedule_check_s: float = 300.0,
        trainer_module: str = "trainer.retrain",
        telemetry: Telemetry | None = None,
    ) -> None:
        """`trainer_module` is the program each run starts (`python -m <it> --run-id N`): tests put one there that
        wraps `trainer.retrain.main` to act at a given moment of the run."""
        self._settings = settings
        self._trainer_module = trainer_module
        self._telemetry = telemetry or Telemetry()
        self._db = db
        self._serving = serving
        self._notifier = notifier
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self._schedule_check_s = schedule_check_s
        self._current: _Run | None = None
        self._start_lock = asyncio.Lock()  # one check-then-start at a time
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._queue: RunQueue | None = None
        self._voices: list[_QueuedVoice] = []  # voices waiting for their run, in order
        self._voice_outcomes: dict[tuple[str, str], list[tuple[str, RunOutcome | RunRequest]]] = {}
        self._draining: asyncio.Task[None] | None = None

    @property
    def running(self) -> RunningRun | None:
        run = self._current
        return RunningRun(run.run_id, run.handle.pid, run.progress) if run is not None else None

    @property
    def _queued(self) -> bool:
        return self._settings.retrain_backend == "celery"

    async def start(self) -> None:
        """Fails interrupted runs, follows a queued run that goes on, then starts the schedule (unless it is off)."""
        await self.recover_interrupted_runs()
        if self._queued:
            await self._follow_queued_run()
        if self._settings.retrain_interval_hours > 0:
            self._tasks.append(asyncio.create_task(self._keep_schedule(), name="magpie-retrain-schedule"))

    async def stop(self) -> None:
        """Stops the schedule and terminates a running child, whose run is failed "stopped with the bot". A run
        queued for a worker goes on: this process only stops following it."""
        self._stopping = True
        if self._draining is not None:
            self._draining.cancel()
            await asyncio.gather(self._draining, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        run = self._current
        if run is not None and isinstance(run.handle, QueuedRun):
            await self._stop_following(run)
        elif run is not None:
            await self._terminate(run, RunEndReason.STOPPED_WITH_BOT)
        if self._queue is not None:
            self._queue.close()
            self._queue = None

    async def idle(self) -> None:
        """Returns once no run is followed and no queued voice waits for one (`magpie retrain` of every
        community, and tests, await the queue this way)."""
        while True:
            if self._draining is not None and not self._draining.done():
                await asyncio.gather(asyncio.shield(self._draining), return_exceptions=True)
                continue
            current = self._current
            if current is None or current.task is None:
                return
            await asyncio.gather(asyncio.shield(current.task), return_exceptions=True)

    async def wait_for_run(self, *, notify: tuple[str, str]) -> RunOutcome | None:
        """The running run's outcome (after its rerun, if it has one), if that run reports to `notify` (platform,
        chat id); else None at once."""
        run = self._current
        if run is None or run.notify != notify or run.task is None:
            return None
        log.info("waiting for training run #%d to finish (Ctrl-C stops it)", run.run_id)
        return await self._final_outcome(run, stop_reason=None)

    async def _final_outcome(self, run: _Run, *, stop_reason: RunEndReason | None) -> RunOutcome:
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

    async def request(
        self,
        *,
        triggered_by: str,
        notify_platform: str | None,
        notify_chat_id: str | None,
        community: str | None = None,
    ) -> RunRequest:
        """Starts a run in the background (see `core.retraining.Retrainer`)."""
        notify = (notify_platform, notify_chat_id) if notify_platform and notify_chat_id else None
        if community is None and self._settings.community_voices:
            return await self.retrain_voices(await self.communities_due(), triggered_by=triggered_by, notify=notify)
        started = await self._begin(triggered_by, notify=notify, on_progress=None, community=community)
        if isinstance(started, _Run):
            return RunStarted(started.run_id, reports_here=notify is not None)
        return started

    async def retrain_voices(
        self, communities: Sequence[str | None], *, triggered_by: str, notify: tuple[str, str] | None = None
    ) -> VoicesQueued:
        """Queues a run of each voice, carried out one after another (see `core.retraining.Retrainer`); the
        requester hears each one's progress and, at the end, one summary of every outcome."""
        waiting = {queued.community for queued in self._voices}
        fresh = [community for community in dict.fromkeys(communities) if community not in waiting]
        for position, community in enumerate(fresh, start=1):
            self._voices.append(_QueuedVoice(community, triggered_by, notify, position, len(fresh)))
        if fresh and notify is not None:
            self._voice_outcomes.setdefault(notify, [])
        if fresh and (self._draining is None or self._draining.done()):
            self._draining = asyncio.create_task(self._drain_voices(), name="magpie-voice-runs")
        names = tuple(community or SHARED_VOICE for community in fresh)
        return VoicesQueued(names, reports_here=notify is not None and bool(fresh))

    async def _drain_voices(self) -> None:
        """Runs the queued voices one after another, each after the run in progress (whoever started it)."""
        while self._voices and not self._stopping:
            queued = self._voices[0]
            outcome = await self._run_voice(queued)
            self._voices.pop(0)
            log.info("voice %s: %s", queued.community or SHARED_VOICE, outcome)
            if queued.notify is None:
                continue
            outcomes = self._voice_outcomes.setdefault(queued.notify, [])
            outcomes.append((queued.community or SHARED_VOICE, outcome))
            if not any(later.notify == queued.notify for later in self._voices):
                await self._notify(queued.notify, voices_summary(self._voice_outcomes.pop(queued.notify)))

    async def _run_voice(self, queued: _QueuedVoice) -> RunOutcome | RunRequest:
        """One queued voice's run, awaited; a run in progress (or starting elsewhere) is waited out first."""
        while not self._stopping:
            current = self._current
            if current is not None and current.task is not None:
                await asyncio.gather(asyncio.shield(current.task), return_exceptions=True)
                continue
            on_progress = self._voice_progress(queued)
            started = await self._begin(
                queued.triggered_by, notify=None, on_progress=on_progress, ignore_cooldown=True,
                community=queued.community,
            )  # fmt: skip
            if isinstance(started, _Run):
                return await self._final_outcome(started, stop_reason=None)
            if not isinstance(started, AlreadyRunning):
                return started
            await asyncio.sleep(self._poll_interval_s)  # another process's run: wait for it to end
        return CouldNotStart()

    def _voice_progress(self, queued: _QueuedVoice) -> ProgressCallback | None:
        community = queued.community
        if queued.notify is None or community is None:
            return None
        return self._reporter(
            queued.notify, lambda fraction: voices_progress(community, queued.position, queued.total, fraction)
        )

    async def run_in_foreground(
        self,
        *,
        triggered_by: str,
        on_progress: ProgressCallback,
        force: bool = False,
        stop_running: bool = False,
        community: str | None = None,
    ) -> RunOutcome | RunRefused:
        """`magpie retrain`: the same checks and child as `request`, awaited.

        `force` (`--force`) ignores the cooldown and clears a run recorded as running whose process is gone or
        never started (even within its start-up grace). `stop_running` (`--stop-running`) also stops a run whose
        process is alive, verified by pid and start token, and marks it failed. Cancelling it (Ctrl-C)
        terminates the child and marks the run failed.
        """
        clear = force or stop_running
        policy = StartPolicy(clear_starting=clear, stop_running_by=triggered_by if stop_running else None)
        started = await self._begin(
            triggered_by, notify=None, on_progress=on_progress, policy=policy, ignore_cooldown=clear,
            community=community,
        )  # fmt: skip
        if not isinstance(started, _Run):
            return started
        return await self._final_outcome(started, stop_reason=RunEndReason.INTERRUPTED_FROM_SHELL)

    async def communities_due(self) -> list[str]:
        """VOICE_SCOPE=community: the communities with enough new data to train (what a retrain of every community
        trains, in this order)."""
        async with self._db.sessions() as session:
            due = await communities_with_new_data(session, min_new_messages=self._settings.retrain_min_new_messages)
        return [community for community, _ in due]

    async def _begin(
        self,
        triggered_by: str,
        *,
        notify: tuple[str, str] | None,
        on_progress: ProgressCallback | None,
        policy: StartPolicy = _LEAVE_RUNS_ALONE,
        ignore_cooldown: bool = False,
        rerun_of: int | None = None,
        community: str | None = None,
    ) -> _Run | RunRefused:
        async with self._start_lock:
            now = self._clock()
            refusal = await self._refusal(now, policy, ignore_cooldown=ignore_cooldown)
            if refusal is not None:
                return refusal
            created = await runs.create(
                self._db, triggered_by=triggered_by, notify=notify, now=now, queued=self._queued, community=community
            )
            if isinstance(created, AlreadyRunning):
                return created
            run_id = created
            log.info("training run #%d requested by %s", run_id, triggered_by)
            handle = await self._launch(run_id)
            if handle is None:
                return CouldNotStart(queue_unreachable=self._queued)
            progress = on_progress or self._progress_notifier(run_id, notify)
            run = _Run(run_id, handle, notify, progress, started_at=now, rerun_of=rerun_of, community=community)
            self._follow_run(run)
            return run

    async def _launch(self, run_id: int) -> RunHandle | None:
        """Starts the trainer child, or sends the run to the queue; None (the run failed) when that is impossible."""
        try:
            if self._queued:
                await self._run_queue().send(run_id)
                return QueuedRun(self._db, self._settings, run_id, clock=self._clock, poll_s=self._poll_interval_s)
            process = await spawn_trainer(self._trainer_module, run_id, self._settings)
        except (OSError, QueueUnreachableError) as exc:
            log.exception("could not start training run #%d", run_id)
            queue = isinstance(exc, QueueUnreachableError)
            reason = RunEndReason.QUEUE_UNREACHABLE if queue else RunEndReason.COULD_NOT_START
            await runs.fail(self._db, run_id, reason, now=self._clock(), before_training=True)
            return None
        await runs.record_process(self._db, run_id, process.pid)
        return ChildTrainer(process)

    def _run_queue(self) -> RunQueue:
        if self._queue is None:
            self._queue = RunQueue(self._settings)
        return self._queue

    def _follow_run(self, run: _Run) -> None:
        run.task = asyncio.create_task(self._monitor(run), name=f"magpie-training-run-{run.run_id}")
        if runs.timeout(self._settings) is not None:
            run.watchdog = asyncio.create_task(self._watchdog(run), name=f"magpie-training-watchdog-{run.run_id}")
        self._current = run

    async def _follow_queued_run(self) -> None:
        """At start: a run a worker is carrying out (a previous bot process queued it) is followed again, and its
        outcome goes to the chat that asked for it, as if this process had started it."""
        found = await runs.queued_run(self._db)
        if found is None or self._current is not None:
            return
        run_id, notify, started_at = found
        log.info("following training run #%d, queued before this start", run_id)
        handle = QueuedRun(self._db, self._settings, run_id, clock=self._clock, poll_s=self._poll_interval_s)
        self._follow_run(_Run(run_id, handle, notify, self._progress_notifier(run_id, notify), started_at))

    async def _stop_following(self, run: _Run) -> None:
        for task in (run.task, run.watchdog):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (run.task, run.watchdog) if t is not None), return_exceptions=True)
        if self._current is run:
            self._current = None

    async def _refusal(self, now: datetime, policy: StartPolicy, *, ignore_cooldown: bool) -> RunRefused | None:
        """Why a run cannot start now (one is running, or the cooldown), or None. Ends runs whose process died,
        that ran past RETRAIN_TIMEOUT_MINUTES, or (`policy.stop_running_by`) that the operator stops."""
        if self._current is not None:
            return AlreadyRunning(self._current.run_id, self._current.progress)
        settled = await runs.settle_running(self._db, self._settings, now=now, policy=policy)
        if settled.running is not None:
            return settled.running
        cooldown = self._settings.retrain_cooldown_minutes
        left = cooldown_left(now=now, last_finished_at=settled.last_finished_at, cooldown_minutes=cooldown)
        if left is None or ignore_cooldown:
            return None
        return CoolingDown(cooldown, math.ceil(left.total_seconds() / 60))

    # --- following runs ---------------------------------------------------------------------------------------

    async def _monitor(self, run: _Run) -> RunOutcome:
        """Follows the child to its end, concludes the run, has a promoted version served, tells the requester."""
        try:
            await self._follow(run)
            outcome = await self._conclude(run, await run.handle.exit_reason())
        except Exception:
            log.exception("lost track of training run #%d", run.run_id)
            outcome = RunOutcome(run.run_id, RunStatus.FAILED, reason=RunEndReason.LOST_TRACK)
        finally:
            if run.watchdog is not None and not run.timed_out:
                run.watchdog.cancel()
            if self._current is run:
                self._current = None
        duration = (self._clock() - run.started_at).total_seconds()
        self._telemetry.training_run_finished(outcome.status.value, duration_s=duration)
        if outcome.status is RunStatus.REJECTED and outcome.data_withdrawn:
            outcome = replace(outcome, again=await self._train_again(run))
        text = run_outcome(outcome)
        log.info("training run #%d: %s", run.run_id, text)
        if run.notify is not None:
            await self._notify(run.notify, text)
        return outcome

    async def _follow(self, run: _Run) -> None:
        async for fraction in run.handle.progress():
            run.progress = fraction
            if run.on_progress is not None:
                await run.on_progress(fraction)

    async def _train_again(self, run: _Run) -> TrainingAgain:
        """The run was discarded because people withdrew data it trained on: train once more on the data as it is
        now (the cooldown does not apply; a rerun that is discarded too is not repeated)."""
        if run.rerun_of is not None or run.stop_reason is not None or self._stopping:
            return TrainingAgain()
        on_progress = None if run.notify is not None else run.on_progress
        started = await self._begin(
            f"rerun of #{run.run_id}",
            notify=run.notify,
            on_progress=on_progress,
            ignore_cooldown=True,
            rerun_of=run.run_id,
            community=run.community,
        )
        if not isinstance(started, _Run):
            return TrainingAgain(refused=started)
        run.rerun = started
        log.info("training run #%d: its data changed; run #%d trains again", run.run_id, started.run_id)
        return TrainingAgain(run_id=started.run_id)

    async def _watchdog(self, run: _Run) -> None:
        """Stops the run once it has run longer than RETRAIN_TIMEOUT_MINUTES (checked every poll interval)."""
        limit = runs.timeout(self._settings)
        assert limit is not None
        while True:
            await asyncio.sleep(self._poll_interval_s)
            if self._clock() - run.started_at > limit:
                break
        log.warning("training run #%d ran past RETRAIN_TIMEOUT_MINUTES; stopping it", run.run_id)
        run.timed_out = True
        await self._terminate(run, RunEndReason.TIMED_OUT)

    async def _conclude(self, run: _Run, exit_reason: RunEndReason) -> RunOutcome:
        """The outcome the child recorded (a run it left `running` was killed or crashed: failed here); a failed
        run's directories are removed, a promoted version is served."""
        reason = run.stop_reason or exit_reason
        outcome = await runs.conclude(self._db, run.run_id, reason_if_running=reason, now=self._clock())
        if outcome.status is RunStatus.FAILED:
            await runs.clean_up(self._db, self._settings.models_dir, [runs.Ended(run.run_id, run.started_at)])
        if outcome.status is RunStatus.PROMOTED:
            swap = await self._serving.follow_active() if self._serving else SwapOutcome(SwapState.ELSEWHERE)
            outcome = replace(outcome, swap=swap)
        return outcome

    async def _terminate(self, run: _Run, reason: RunEndReason) -> None:
        """SIGTERM, then SIGKILL if the child does not go within STOP_TIMEOUT_S; the monitor records `reason`."""
        run.stop_reason = reason
        await run.handle.terminate(reason)
        assert run.task is not None
        try:
            await asyncio.wait_for(asyncio.shield(run.task), STOP_TIMEOUT_S)
        except TimeoutError:
            run.handle.kill()
            await run.task

    def _progress_notifier(self, run_id: int, notify: tuple[str, str] | None) -> ProgressCallback | None:
        if notify is None:
            return None
        return self._reporter(notify, lambda fraction: run_progress(run_id, fraction))

    def _reporter(self, notify: tuple[str, str], word: Callable[[float], str]) -> ProgressCallback:
        """Tells `notify` each time training passes another PROGRESS_STEP (never at the end: the outcome says that)."""
        next_mark = PROGRESS_STEP

        async def report(fraction: float) -> None:
            nonlocal next_mark
            if fraction < next_mark or fraction >= 1.0:
                return
            while next_mark <= fraction:
                next_mark += PROGRESS_STEP
            await self._notify(notify, word(fraction))

        return report

    async def _notify(self, notify: tuple[str, str], text: str) -> None:
        if self._notifier is None:
            return
        try:
            await self._notifier.notify(notify[0], notify[1], text)
        except Exception:
            log.exception("could not send a training notification to %s", notify[0])

    # --- recovery and the schedule ----------------------------------------------------------------------------

    async def recover_interrupted_runs(self) -> list[int]:
        """Fails `running` runs whose training process is gone or that ran past RETRAIN_TIMEOUT_MINUTES (their
        process is stopped), and removes the directories they left; returns their ids."""
        following = self._current.run_id if self._current is not None else None
        settled = await runs.settle_running(
            self._db, self._settings, now=self._clock(), policy=_LEAVE_RUNS_ALONE, besides=following
        )
        return [ended.run_id for ended in settled.ended]

    async def _keep_schedule(self) -> None:
        while True:
            await asyncio.sleep(self._schedule_check_s)
            try:
                await self.check_schedule()
            except Exception:
                log.exception("scheduled retraining check failed")

    async def check_schedule(self) -> RunRequest | None:
        """Starts a scheduled run when one is due; returns what `request` returned, or None if not due."""
        new_messages = await scheduled_run_due(self._db, self._settings, now=self._clock())
        if new_messages is None:
            return None
        # VOICE_SCOPE=community: every community with enough new data, one after another.
        result = await self.request(triggered_by="schedule", notify_platform=None, notify_chat_id=None)
        log.info("scheduled retraining (%d new messages): %s", new_messages, run_request(result))
        return result
