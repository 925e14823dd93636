"""Log retention: messages older than LOG_RETENTION_DAYS leave the database.

Self-hosters often must (or want to) keep chat logs only for a while. Pruning runs hourly inside `magpie run` and
on demand with `magpie db prune`; 0 days (the default) keeps everything, since the log is what the bot learns from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from core.storage.chat_log import prune_messages
from core.storage.db import Database
from core.storage.models import utcnow

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 3600.0
PRUNE_BATCH = 200
"""Messages deleted per transaction: small enough that SQLite's write lock is held for milliseconds, so messages
arriving meanwhile still log (measured: 500 rows ~ 10 ms with the reply_to index)."""


async def prune_old_messages(
    db: Database, *, days: float, now: datetime | None = None, batch: int = PRUNE_BATCH
) -> int:
    """Deletes what was logged more than `days` ago, in batches; how many messages went (0 when `days` is 0).

    Each batch is its own transaction, and the event loop gets a turn between batches, so the bot keeps logging
    and answering while a large backlog is pruned.
    """
    if days <= 0:
        return 0
    cutoff = (now or utcnow()) - timedelta(days=days)
    removed = 0
    while True:
        async with db.sessions.begin() as session:
            deleted = await prune_messages(session, before=cutoff, limit=batch)
        removed += deleted
        if deleted == 0:
            break
        await asyncio.sleep(0)
    if removed:
        log.info("Retention: deleted %d messages logged before %s", removed, cutoff.isoformat(timespec="seconds"))
    return removed


class RetentionJob:
    """Prunes at start and every `every_s` seconds until stopped; a failed round is logged and retried later."""

    def __init__(
        self, db: Database, *, days: float, every_s: float = PRUNE_EVERY_S, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self._db = db
        self._days = days
        self._every_s = every_s
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.first_round_done = asyncio.Event()
        """Set once the start-up round has run (whether or not it deleted anything)."""

    def start(self) -> None:
        if self._days > 0:
            self._task = asyncio.create_task(self._loop(), name="magpie-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                await prune_old_messages(self._db, days=self._days, now=self._clock())
            except Exception:
                log.exception("Retention: pruning failed; trying again in %.0f s", self._every_s)
            self.first_round_done.set()
            await asyncio.sleep(self._every_s)
