"""LOG_RETENTION_DAYS: old messages leave the database, in the running bot and with `magpie db prune`."""

from __future__ import annotations

import asyncio
import os
import sys
from asyncio.subprocess import PIPE
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from core.db import Database
from core.models import Chat, Message, Role, User
from core.retention import RetentionJob, prune_old_messages

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


async def log_exchanges(db: Database, now: datetime = NOW) -> None:
    """A question and the bot's answer 40 days before `now`, and another pair 2 days before."""
    async with db.sessions.begin() as session:
        chat, user = (
            Chat(platform="telegram", platform_chat_id="-1", kind="group"),
            User(platform="telegram", platform_user_id="7", display_name="ann"),
        )
        session.add_all([chat, user])
        await session.flush()
        for age, text in ((40, "old"), (2, "recent")):
            asked = Message(chat_id=chat.id, author_id=user.id, role=Role.USER, text=f"{text} question")
            asked.created_at = now - timedelta(days=age)
            session.add(asked)
            await session.flush()
            answer = Message(chat_id=chat.id, role=Role.BOT, text=f"{text} answer", reply_to_id=asked.id)
            answer.created_at = now - timedelta(days=age, seconds=-5)
            session.add(answer)


async def texts(db: Database) -> list[str]:
    async with db.sessions() as session:
        return list((await session.scalars(select(Message.text).order_by(Message.id))).all())


async def test_messages_older_than_the_limit_go_with_the_answers_to_them(db: Database) -> None:
    await log_exchanges(db)
    assert await prune_old_messages(db, days=0, now=NOW) == 0  # 0 keeps everything
    assert await prune_old_messages(db, days=30, now=NOW) == 2
    assert await texts(db) == ["recent question", "recent answer"]
    assert await prune_old_messages(db, days=30, now=NOW) == 0


async def test_the_running_bot_prunes_at_start(db: Database) -> None:
    await log_exchanges(db)
    job = RetentionJob(db, days=7, clock=lambda: NOW)
    job.start()
    try:
        await asyncio.wait_for(job.first_round_done.wait(), timeout=20)
    finally:
        await job.stop()
    assert await texts(db) == ["recent question", "recent answer"]


async def run_magpie(database_url: str, cwd: Path, *args: str) -> tuple[int, str, str]:
    env = {key: value for key, value in os.environ.items() if not key.endswith("_TOKEN")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", DATABASE_URL=database_url, LOG_RETENTION_DAYS="0")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *args, stdout=PIPE, stderr=PIPE, env=env, cwd=cwd
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_magpie_db_prune(db: Database, database_url: str, tmp_path: Path) -> None:
    await log_exchanges(db, now=datetime.now(UTC))  # the command prunes against the real clock
    code, _, err = await run_magpie(database_url, tmp_path, "db", "prune")
    assert code == 2 and "LOG_RETENTION_DAYS" in err and "Traceback" not in err
    code, out, err = await run_magpie(database_url, tmp_path, "db", "prune", "--days", "30")
    assert code == 0, err
    assert out.strip() == "Deleted 2 messages logged more than 30 days ago."
    assert await texts(db) == ["recent question", "recent answer"]
