"""How a launcher follows the process that carries out a run: its own child, or a run queued for a worker.

The orchestrator (`trainer.orchestrator`) starts, follows and stops runs the same way whatever carries them out;
this module hides the difference behind one small interface, `RunHandle`:

- `ChildTrainer`: RETRAIN_BACKEND=local (and `magpie worker` itself): a child process of this one, followed by
  its JSON progress lines on stdout; stopping it is a signal.
- `QueuedRun`: RETRAIN_BACKEND=celery: a `magpie worker`, maybe on another machine, carries the run out; it is
  followed through its row (progress, outcome, heartbeat), and stopping it is failing the row, which the worker
  notices at its next heartbeat and stops its trainer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Protocol

from core.outcomes import RunEndReason
from core.settings import Settings
from core.storage.db import Database
from trainer import runs
from trainer.process import progress_lines, signal_trainer

log = logging.getLogger(__name__)


class RunHandle(Protocol):
    """A run being carried out, as its launcher sees it."""

    @property
    def pid(self) -> int | None:
        """The trainer's process on this machine, if it is one."""
        ...

    def progress(self) -> AsyncIterator[float]:
        """Progress fractions until the run's process is done."""
        ...

    async def exit_reason(self) -> RunEndReason:
        """Waits for the end; why the run failed if its row is still `running` then."""
        ...

    async def terminate(self, reason: RunEndReason) -> None:
        """Asks the run to stop (it is recorded failed with `reason`)."""
        ...

    def kill(self) -> None:
        """Stops it at once, when `terminate` was not enough."""
        ...


class ChildTrainer:
    """A trainer process this process started (`trainer.process.spawn_trainer`)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def progress(self) -> AsyncIterator[float]:
        return progress_lines(self.process)

    async def exit_reason(self) -> RunEndReason:
        returncode = await self.process.wait()
        log.info("trainer process %d ended (%s)", self.process.pid, runs.exit_description(returncode))
        return runs.exit_reason(returncode)

    async def terminate(self, reason: RunEndReason) -> None:
        """SIGTERM; the launcher records `reason` once the child has exited."""
        if self.process.returncode is None:
            signal_trainer(self.process, signal.SIGTERM)

    def kill(self) -> None:
        if self.process.returncode is None:
            signal_trainer(self.process, signal.SIGKILL)


class QueuedRun:
    """A run sent to the queue: followed by polling its row every `poll_s` seconds."""

    def __init__(
        self, db: Database, settings: Settings, run_id: int, *, clock: Callable[[], datetime], poll_s: float
    ) -> None:
        self._db = db
        self._settings = settings
        self._run_id = run_id
        self._clock = clock
        self._poll_s = poll_s
        self._wake = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return None

    async def progress(self) -> AsyncIterator[float]:
        """The row's progress while it changes; ends once the row ended (failed here if its worker is gone)."""
        last = -1.0
        while True:
            fraction = await runs.follow_queued(self._db, self._settings, self._run_id, now=self._clock())
            if fraction is None:
                return
            if fraction != last:
                last = fraction
                yield fraction
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)

    async def exit_reason(self) -> RunEndReason:
        return RunEndReason.INTERRUPTED

    async def terminate(self, reason: RunEndReason) -> None:
        """Fails the row now: its worker sees that at its next heartbeat and stops the trainer."""
        await runs.fail(self._db, self._run_id, reason, now=self._clock())
        self._wake.set()

    def kill(self) -> None:
        self._wake.set()
