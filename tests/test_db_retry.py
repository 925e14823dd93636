"""`core.storage.db_retry.patiently`: what counts as the database being away, the backoff, the budget, and what the log
says (an injected clock and sleep: nothing waits)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from core.chat.service import ChatService
from core.i18n import _
from core.settings import Settings
from core.storage.db import Database, upgrade
from core.storage.db_retry import FIRST_DELAY_S, MAX_DELAY_S, is_transient, patiently
from core.storage.models import Message, Role
from core.texts import NOT_LOGGED
from tests.loop_support import greedy_engine, msg


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def locked() -> OperationalError:
    return OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))


class Flaky:
    """Fails `failures` times with `error`, then answers."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "logged"


async def test_a_database_away_for_a_while_is_waited_for_with_growing_capped_delays(
    caplog: pytest.LogCaptureFixture,
) -> None:
    time, call = FakeTime(), Flaky(8, locked())
    with caplog.at_level(logging.WARNING, logger="core.storage.db_retry"):
        assert await patiently(call, what="telegram message 7", budget_s=120, sleep=time.sleep, clock=time.clock) == (
            "logged"
        )
    assert call.calls == 9
    bounds = [min(FIRST_DELAY_S * 2**n, MAX_DELAY_S) for n in range(8)]
    assert all(0.75 * bound <= slept <= bound for slept, bound in zip(time.sleeps, bounds, strict=True))
    assert max(time.sleeps) <= MAX_DELAY_S
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2, "one line when it starts waiting, one when it is over"
    assert "telegram message 7: the database is not answering (OperationalError)" in lines[0]
    assert "after 9 tries" in lines[1]


async def test_the_budget_ends_the_wait_and_the_error_reaches_the_caller() -> None:
    time, call = FakeTime(), Flaky(1000, locked())
    with pytest.raises(OperationalError):
        await patiently(call, what="x", budget_s=15, sleep=time.sleep, clock=time.clock)
    assert time.now <= 15 and call.calls > 3


async def test_an_error_that_is_not_an_outage_is_raised_at_once() -> None:
    time = FakeTime()
    call = Flaky(1, IntegrityError("INSERT ...", {}, sqlite3.IntegrityError("UNIQUE constraint failed")))
    with pytest.raises(IntegrityError):
        await patiently(call, what="x", budget_s=120, sleep=time.sleep, clock=time.clock)
    assert call.calls == 1 and time.sleeps == []


async def test_no_budget_means_one_try() -> None:
    time, call = FakeTime(), Flaky(1, locked())
    with pytest.raises(OperationalError):
        await patiently(call, what="x", budget_s=0, sleep=time.sleep, clock=time.clock)
    assert call.calls == 1


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (locked(), True),
        (ConnectionRefusedError(111, "Connection refused"), True),
        (TimeoutError(), True),
        (IntegrityError("x", {}, Exception()), False),
        (OperationalError("SELECT", {}, sqlite3.OperationalError("no such column: chats.community")), False),
        (DBAPIError("INSERT", {}, Exception("connection was closed in the middle of operation")), True),
        (DBAPIError("UPDATE", {}, Exception("the database system is shutting down")), True),
        (ValueError("a bug"), False),
        (FileNotFoundError("an export's folder"), False),
    ],
)
def test_what_counts_as_the_database_being_away(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient


@pytest.mark.slow
async def test_a_sqlite_file_locked_by_a_long_write_makes_a_message_wait_not_fail(tmp_path: Path) -> None:
    """Another process holds the SQLite file's write lock for longer than SQLite's own busy timeout (10 s): the
    message waits for it and is answered and logged once, instead of its author being told to send it again."""
    path = tmp_path / "magpie.db"
    url = f"sqlite+aiosqlite:///{path}"
    await upgrade(url)
    settings = Settings(_env_file=None, database_url=url, models_dir=tmp_path / "models")  # type: ignore[call-arg]
    db = Database.connect(url)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")  # a long write elsewhere (a `magpie dataset export`, a migration, a backup)
    asyncio.get_running_loop().call_later(12.0, writer.execute, "ROLLBACK")
    try:
        service = ChatService(settings=settings, db=db, engine=greedy_engine())
        reply = await service.handle(msg("/help"))
    finally:
        writer.close()
    try:
        assert reply is not None and reply.text != _(NOT_LOGGED) and "/forget" in reply.text
        async with db.sessions() as session:
            rows = (await session.scalars(select(Message.role))).all()
        assert sorted(rows) == sorted([Role.USER, Role.BOT]), "logged once, answered once"
    finally:
        await db.close()
