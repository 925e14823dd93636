"""`core.db_retry.patiently`: what counts as the database being away, the backoff, the budget, and what the log
says (an injected clock and sleep: nothing waits)."""

from __future__ import annotations

import logging
import sqlite3

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from core.db_retry import FIRST_DELAY_S, MAX_DELAY_S, is_transient, patiently


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
    with caplog.at_level(logging.WARNING, logger="core.db_retry"):
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
        (ValueError("a bug"), False),
        (FileNotFoundError("an export's folder"), False),
    ],
)
def test_what_counts_as_the_database_being_away(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient
