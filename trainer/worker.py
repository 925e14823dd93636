"""`magpie worker`: the training machine's side of the queue (RETRAIN_BACKEND=celery).

A Celery worker with one process that takes one task at a time (`trainer.celery_queue`). For each run it is the
run's launcher, as the bot is for a local run:

    take the row (`trainer.runs.take`: still `running`, no live worker has it; its host and a first heartbeat)
      └─ start the same trainer as a local run (`python -m trainer.retrain --run-id N`, or under `accelerate
         launch` with TRAIN_LAUNCHER=accelerate): it claims the row, trains into MODELS_DIR (shared with the bot),
         gates and records the outcome in one transaction
           └─ every HEARTBEAT_INTERVAL_S renew the heartbeat; a row ended elsewhere (timed out, stopped by
              `magpie retrain --stop-running` or Ctrl-C) stops the trainer
                └─ the trainer exited: a row it left `running` is failed with how it exited, and the directories a
                   failed run left are removed

The bot follows the run through its row and reports to the admin as for a local run. A worker that dies mid-run
stops renewing the heartbeat (and on its own machine its trainer's pid is gone): the bot, or the worker that gets
the task again, fails the run `interrupted`; its version, never registered, is removed with the run's leftovers.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from core.outcomes import RunEndReason
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import RunStatus
from trainer import runs
from trainer.celery_queue import TASK_NAME, celery_app
from trainer.process import spawn_trainer, this_host
from trainer.run_handles import ChildTrainer

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 15.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


def run_worker(settings: Settings, *, trainer_module: str = "trainer.retrain") -> None:
    """Runs the Celery worker until it is stopped (SIGTERM or Ctrl-C: it finishes the run in progress first).

    `trainer_module` is the program each run starts (tests put a paused one there, like the orchestrator's)."""
    app = celery_app(settings)

    def train(run_id: int) -> str:
        return asyncio.run(carry_out(settings, run_id, trainer_module=trainer_module))

    app.task(name=TASK_NAME)(train)
    app.worker_main(
        [
            "worker",
            f"--loglevel={settings.log_level}",
            f"--queues={settings.celery_queue}",
            "--concurrency=1",
            "--prefetch-multiplier=1",
            f"--hostname=magpie@{this_host()}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


async def carry_out(settings: Settings, run_id: int, *, trainer_module: str = "trainer.retrain") -> str:
    """Carries out run `run_id` as its launcher; returns what became of it (for the worker's log)."""
    async with Database.opened(settings.database_url) as db:
        taken = await runs.take(db, run_id, host=this_host(), now=_utcnow())
        if not taken.taken:
            log.warning("not carrying out training run #%d: %s", run_id, taken.why_not)
            if taken.ended is not None:
                await runs.clean_up(db, settings.models_dir, [taken.ended])
            return taken.why_not
        assert taken.started_at is not None
        try:
            process = await spawn_trainer(trainer_module, run_id, settings, tied=True)
        except OSError as exc:
            log.exception("could not start the training process for run #%d", run_id)
            await runs.fail(db, run_id, RunEndReason.COULD_NOT_START, now=_utcnow())
            return f"the training process could not start on the worker ({type(exc).__name__})"
        await runs.record_process(db, run_id, process.pid)
        log.info("training run #%d: trainer process %d started", run_id, process.pid)
        reason = await _follow(db, run_id, ChildTrainer(process))
        outcome = await runs.conclude(db, run_id, reason_if_running=reason, now=_utcnow())
        if outcome.status is RunStatus.FAILED:
            await runs.clean_up(db, settings.models_dir, [runs.Ended(run_id, taken.started_at)])
        log.info("training run #%d: %s", run_id, outcome.status.value)
        return outcome.status.value


async def _follow(db: Database, run_id: int, child: ChildTrainer) -> RunEndReason:
    """Waits for the trainer, renewing the run's heartbeat; stops it when the row was ended elsewhere. Returns
    why the run failed if the trainer left it `running`."""
    drain = asyncio.create_task(_log_progress(run_id, child))  # a full stdout pipe would block the trainer
    exited = asyncio.ensure_future(child.exit_reason())
    try:
        while True:
            done, _ = await asyncio.wait({exited}, timeout=runs.HEARTBEAT_INTERVAL_S)
            if done:
                return exited.result()
            if not await _beat(db, run_id):
                log.warning("training run #%d was ended elsewhere; stopping its trainer", run_id)
                return await _stop(child, exited)
    finally:
        await asyncio.gather(drain, return_exceptions=True)


async def _beat(db: Database, run_id: int) -> bool:
    """The heartbeat; a database that does not answer for a moment is not a reason to stop training."""
    try:
        return await runs.beat(db, run_id, now=_utcnow())
    except Exception:
        log.warning("could not renew the heartbeat of training run #%d", run_id, exc_info=True)
        return True


async def _stop(child: ChildTrainer, exited: asyncio.Future[RunEndReason]) -> RunEndReason:
    await child.terminate(RunEndReason.ENDED_ELSEWHERE)
    try:
        return await asyncio.wait_for(asyncio.shield(exited), STOP_TIMEOUT_S)
    except TimeoutError:
        child.kill()
        return await exited


async def _log_progress(run_id: int, child: ChildTrainer) -> None:
    async for fraction in child.progress():
        log.debug("training run #%d: %.0f%% done", run_id, fraction * 100)
