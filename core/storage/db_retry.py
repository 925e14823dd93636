"""Riding out a database that goes away for a moment: a PostgreSQL restart or failover, a network blip, SQLite's
"database is locked" under a long write.

`patiently(call)` repeats `call` while it fails with an error that says the database is away (`is_transient`),
with capped, jittered exponential backoff, for up to DATABASE_RETRY_SECONDS; anything else, or a database still
away at the end, is raised to the caller as before. The chat service logs each incoming message this way, so a
message that arrives during an outage waits for the database instead of being dropped, and is answered once it is
logged (the Telegram backend meanwhile confirms no update that is not logged: `bot.telegram_requests`).
`/healthz` says 503 meanwhile: its database part runs its own `SELECT 1`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, InternalError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY_S = 0.25
MAX_DELAY_S = 5.0
"""Backoff from a quarter second, doubling, to at most 5 s between tries: a restart is noticed within seconds."""


_SCHEMA_ERROR = re.compile(r"no such (table|column)|has no column|syntax error|no such function", re.IGNORECASE)


_CONNECTION_LOST = re.compile(
    r"connection (was|is) closed|connection does not exist|terminating connection|server closed the connection"
    r"|the database system is (shutting down|starting up|in recovery mode)",
    re.IGNORECASE,
)


def _connection_lost(orig: BaseException | None) -> bool:
    """A driver error that says the connection or the server went away: SQLSTATE class 08 (connection exception)
    or 57P (a server shutting down, starting up, crashed), or the drivers' words for it."""
    for error in (orig, getattr(orig, "__cause__", None)):
        state = str(getattr(error, "sqlstate", "") or "")
        if state.startswith(("08", "57P")):
            return True
    return bool(_CONNECTION_LOST.search(str(orig)))


def is_transient(error: BaseException) -> bool:
    """Whether `error` says the database is away (and may come back), rather than that the statement is wrong:
    lost or refused connections, a server shutting down or starting up, a busy SQLite file, a pool timeout."""
    if isinstance(error, OperationalError) and _SCHEMA_ERROR.search(str(error.orig)):
        return False  # SQLite says "OperationalError" for a missing table or column too: no wait mends that
    if isinstance(error, OperationalError | InterfaceError | PoolTimeoutError | ConnectionError | TimeoutError):
        return True
    if isinstance(error, InternalError):  # asyncpg, on a connection cut in the middle of an operation
        return True
    if isinstance(error, DBAPIError):  # asyncpg's "connection was closed in the middle of operation", and the like
        return error.connection_invalidated or _connection_lost(error.orig)
    return isinstance(error, socket.gaierror)  # the database's host name does not resolve, for now


async def patiently(
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    budget_s: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`call()`, repeated while the database is away, for up to `budget_s` seconds (0: once). `what` names the
    work in the log: one warning when the database first fails it, one line when it succeeds after all."""
    deadline = clock() + budget_s
    delay = FIRST_DELAY_S
    failures = 0
    while True:
        try:
            result = await call()
        except Exception as exc:
            if not is_transient(exc) or clock() + delay > deadline:
                raise
            failures += 1
            if failures == 1:
                log.warning(
                    "%s: the database is not answering (%s); trying again for up to %.0f s",
                    what, type(exc).__name__, budget_s,
                )  # fmt: skip
            await sleep(delay * random.uniform(0.75, 1.0))
            delay = min(delay * 2, MAX_DELAY_S)
            continue
        if failures:
            log.warning("%s: done after %d tries, the database answers again", what, failures + 1)
        return result
