"""Several serving replicas on one PostgreSQL (issue #14, item 2): two real `magpie run` processes in webhook mode
behind the fake Bot API's load balancer, sharing a throwaway database and the local Redis.

One test pays the two start-ups once and checks, in order: an update delivered to both replicas at once is logged
and answered once (the database's uniqueness claim decides, not memory); one user's messages spread over both
replicas meet one rate limit (Redis); a version another process makes active is served by both within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import select

from core.serving.model_serving import ModelServing
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import Chat, Delivery, Message, Role
from core.storage.versions import register_version
from core.texts import rate_limited
from tests.conftest import _empty_tables
from tests.fake_telegram import FakeTelegram
from tests.redis_support import redis_settings

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_URL = "https://bot.example.org"
WEBHOOK_URL = f"{PUBLIC_URL}/telegram"
SECRET = "replica-test-Secret_1"
STARTUP_S = 120.0
SWAP_S = 30.0
"""MODEL_WATCH_INTERVAL_S is 1 s here; the rest is loading the new version on a busy 2-core machine."""
LIMIT = 3


class Replica:
    """One `magpie run` process and the lines of its log, awaited as they come (no polling, no sleeps)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, env: dict[str, str], cwd: Path) -> Replica:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            cwd=cwd, env=env,
        )  # fmt: skip
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            async with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip())
                self._changed.notify_all()
        async with self._changed:
            self.lines.append("<exited>")
            self._changed.notify_all()

    async def wait_for_line(self, text: str, within: float) -> None:
        def seen() -> bool:
            return any(text in line for line in self.lines) or "<exited>" in self.lines

        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(seen)
        assert any(text in line for line in self.lines), "\n".join(self.lines[-40:])

    async def stop(self) -> str:
        """SIGTERM, a clean exit within a minute, and the whole log."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout=60)
        finally:
            if self.process.returncode is None:
                self.process.kill()
            await self._reader
        return "\n".join(self.lines)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _env(telegram: FakeTelegram, redis: Settings, database_url: str, model_dir: Path, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DISCORD_BOT_TOKEN", None)
    assert redis.redis_url is not None
    env.update(
        PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", DATABASE_URL=database_url, BASE_MODEL=str(model_dir),
        MAX_NEW_TOKENS="8", TEMPERATURE="0", TORCH_THREADS="1", RATE_LIMIT_PER_MINUTE=str(LIMIT),
        TELEGRAM_BOT_TOKEN=telegram.token, TELEGRAM_BASE_URL=telegram.base_url,
        TELEGRAM_BASE_FILE_URL=telegram.base_file_url, TELEGRAM_WEBHOOK_URL=WEBHOOK_URL,
        TELEGRAM_WEBHOOK_LISTEN="127.0.0.1", TELEGRAM_WEBHOOK_PORT=str(port), TELEGRAM_WEBHOOK_SECRET=SECRET,
        REDIS_URL=redis.redis_url, REDIS_KEY_PREFIX=redis.redis_key_prefix, MODEL_WATCH_INTERVAL_S="1",
    )  # fmt: skip
    return env


@pytest.fixture
async def pg(postgresql_url: str) -> AsyncIterator[Database]:
    """The session's throwaway PostgreSQL database, emptied after the test."""
    database = Database.connect(postgresql_url)
    try:
        yield database
    finally:
        await _empty_tables(database)
        await database.close()


@contextlib.asynccontextmanager
async def two_replicas(env: list[dict[str, str]], cwd: Path) -> AsyncIterator[list[Replica]]:
    replicas = [await Replica.start(each, cwd) for each in env]
    try:
        for replica in replicas:
            await replica.wait_for_line("is up (webhook on port", STARTUP_S)
        yield replicas
    finally:
        logs = await asyncio.gather(*(replica.stop() for replica in replicas))
        for replica, log in zip(replicas, logs, strict=True):
            assert replica.process.returncode == 0, log[-4000:]
            assert "Traceback" not in log, log[-4000:]


async def _any_logs(replicas: list[Replica], text: str, within: float) -> None:
    """Waits until one of the replicas logs `text`."""
    waits = [asyncio.ensure_future(replica.wait_for_line(text, within)) for replica in replicas]
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in pending:
        wait.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    done.pop().result()


async def _bot_rows(db: Database, chat_id: int) -> list[Message]:
    async with db.sessions() as session:
        query = select(Message).join(Chat).where(Chat.platform_chat_id == str(chat_id)).order_by(Message.id)
        return list((await session.execute(query)).scalars())


async def test_two_replicas_answer_each_update_once_share_one_rate_limit_and_follow_a_promotion(
    pg: Database, postgresql_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    redis = redis_settings()
    async with FakeTelegram() as telegram:
        ports = [_free_port(), _free_port()]
        telegram.public_host(PUBLIC_URL, [f"http://127.0.0.1:{port}" for port in ports])
        envs = [_env(telegram, redis, postgresql_url, tiny_model_dir, port) for port in ports]
        async with two_replicas(envs, tmp_path) as replicas:
            await _same_update_to_both_is_answered_once(telegram, replicas, pg)
            await _one_rate_limit_across_replicas(telegram, pg)
            await _both_follow_a_version_activated_elsewhere(telegram, replicas, pg, postgresql_url, tiny_model_dir)
        assert telegram.webhook_deliveries == [200] * len(telegram.webhook_deliveries)
        assert len(telegram.calls_to("setWebhook")) == 2  # each replica registers the one public URL


async def _same_update_to_both_is_answered_once(telegram: FakeTelegram, replicas: list[Replica], db: Database) -> None:
    ana = telegram.user(8101, "Ana")
    telegram.deliver_next_to_every_upstream()
    telegram.user_says(telegram.private_chat(ana), ana, "hello, both of you")
    await telegram.wait_until(lambda: len(telegram.webhook_deliveries) == 2)
    assert sorted(telegram.delivered_to) == sorted({*telegram.delivered_to}) and len(telegram.delivered_to) == 2
    await telegram.wait_for_messages(ana.id, 1)
    await _any_logs(replicas, "Ignoring re-delivered telegram message", STARTUP_S)
    rows = await _bot_rows(db, ana.id)
    assert [(row.role, row.delivery) for row in rows] == [(Role.USER, None), (Role.BOT, Delivery.SENT)]
    assert len(telegram.sent_messages(ana.id)) == 1


async def _one_rate_limit_across_replicas(telegram: FakeTelegram, db: Database) -> None:
    bob = telegram.user(8102, "Bob")
    chat = telegram.private_chat(bob)
    first = len(telegram.delivered_to)
    for n in range(LIMIT + 2):
        telegram.user_says(chat, bob, f"message {n}")
    answers = await telegram.wait_for_messages(bob.id, LIMIT + 2)
    assert len(set(telegram.delivered_to[first:])) == 2  # the load balancer spread Bob over both replicas
    refusals = [m for m in answers if m["text"].startswith(rate_limited(LIMIT, 1).split(" — ")[0])]
    assert len(refusals) == 2, [m["text"] for m in answers]
    rows = await _bot_rows(db, bob.id)
    assert sum(row.role is Role.BOT and not row.is_command for row in rows) == LIMIT  # model answers


async def _both_follow_a_version_activated_elsewhere(
    telegram: FakeTelegram, replicas: list[Replica], db: Database, database_url: str, model_dir: Path
) -> None:
    """This test process plays `magpie models activate` on another machine: both replicas swap within seconds."""
    copy = shutil.copytree(model_dir, model_dir.parent / f"replica-v2-{uuid.uuid4().hex[:6]}")
    async with db.sessions.begin() as session:
        version = await register_version(session, name="v2", path=str(copy))
    settings = Settings(_env_file=None, database_url=database_url)  # type: ignore[call-arg]
    await ModelServing(settings=settings, db=db).switch_version(version="v2", rolled_back=False, triggered_by="test")
    for replica in replicas:
        await replica.wait_for_line("now serving model version v2", SWAP_S)
    people = [telegram.user(8103 + n, f"Person {n}") for n in range(2)]
    first = len(telegram.delivered_to)
    for person in people:
        telegram.user_says(telegram.private_chat(person), person, "which model are you?")
    for person in people:
        await telegram.wait_for_messages(person.id, 1)
    assert len(set(telegram.delivered_to[first:])) == 2
    for person in people:
        *_, answer = await _bot_rows(db, person.id)
        assert (answer.role, answer.model_version_id) == (Role.BOT, version.id)


async def test_the_fake_refuses_webhooks_telegram_would_refuse() -> None:
    async with FakeTelegram() as telegram, aiohttp.ClientSession() as client:
        telegram.public_host(PUBLIC_URL, ["http://127.0.0.1:9"])
        cases = {
            "http://bot.example.org/hook": "An HTTPS URL must be provided",
            "https://bot.example.org:8080/hook": "only on ports 80, 88, 443 or 8443",
            "https://elsewhere.example.org/hook": "Failed to resolve host",
        }
        for url, problem in cases.items():
            async with client.post(f"{telegram.base_url}{telegram.token}/setWebhook", json={"url": url}) as answer:
                assert answer.status == 400 and problem in (await answer.json())["description"]
        bad_secret = {"url": WEBHOOK_URL, "secret_token": "not allowed!"}
        async with client.post(f"{telegram.base_url}{telegram.token}/setWebhook", json=bad_secret) as answer:
            assert answer.status == 400
        assert telegram.webhook_url == ""
        good = {"url": f"{PUBLIC_URL}:8443/hook", "secret_token": SECRET}
        async with client.post(f"{telegram.base_url}{telegram.token}/setWebhook", json=good) as answer:
            assert answer.status == 200
        assert telegram.webhook_url == f"{PUBLIC_URL}:8443/hook"
