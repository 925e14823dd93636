"""`magpie run` as a user runs it: one process serving Telegram and Discord at once (one engine, one database),
against the fake platform servers, stopped cleanly by SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from sqlalchemy import select

from core.storage.db import Database
from core.storage.models import Chat, Delivery, Message, Role
from tests.fake_discord import FakeDiscord
from tests.fake_telegram import FakeTelegram

ROOT = Path(__file__).resolve().parent.parent
STARTUP_S = 90.0


def _env(telegram: FakeTelegram, discord: FakeDiscord, database_url: str, model_dir: Path) -> dict[str, str]:
    return _telegram_env(
        telegram, database_url, model_dir, DISCORD_BOT_TOKEN=discord.token,
        DISCORD_API_BASE_URL=discord.api_base_url, DISCORD_GATEWAY_URL=discord.gateway_url,
    )  # fmt: skip


async def test_one_process_serves_both_platforms_and_stops_on_sigterm(
    db: Database, database_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with FakeTelegram() as telegram:
        discord = FakeDiscord()
        await discord.start()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            "run",
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
            env=_env(telegram, discord, database_url, tiny_model_dir),
        )
        try:
            async with asyncio.timeout(STARTUP_S):
                # getMe completes at start-up (a long-polling getUpdates only notifies when it returns); updates
                # injected before polling begins wait in the fake's queue
                await telegram.wait_until(lambda: bool(telegram.calls_to("getMe")), within=STARTUP_S)
                await discord.wait_until(lambda: discord.session is not None)
            person = telegram.user(501, "Ana")
            telegram.user_says(telegram.private_chat(person), person, "hello from telegram")
            user = discord.add_user("ben")
            await discord.send_message(user, "hello from discord")
            await telegram.wait_for_messages(501, 1, within=60)
            await discord.wait_for_posts(discord.dm_channel(user), 1)
        finally:
            process.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(process.communicate(), timeout=60)
            await discord.close()
        stderr = err.decode()
        assert process.returncode == 0, stderr
        assert "Traceback" not in stderr
        assert telegram.token not in stderr and discord.token not in stderr

    async with db.sessions() as session:
        rows = (await session.execute(select(Message, Chat.platform).join(Chat))).all()
    by_platform = {(platform, message.role, message.delivery) for message, platform in rows}
    assert by_platform == {
        ("telegram", Role.USER, None),
        ("telegram", Role.BOT, Delivery.SENT),
        ("discord", Role.USER, None),
        ("discord", Role.BOT, Delivery.SENT),
    }


# --- no message lost: killed or stopped mid-answer, then started again (issue #10, item 8) -------------------------


def _telegram_env(telegram: FakeTelegram, database_url: str, model_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DISCORD_BOT_TOKEN", None)
    env.update(
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        DATABASE_URL=database_url,
        BASE_MODEL=str(model_dir),
        MAX_NEW_TOKENS="8",
        TEMPERATURE="0",
        TELEGRAM_BOT_TOKEN=telegram.token,
        TELEGRAM_BASE_URL=telegram.base_url,
        TELEGRAM_BASE_FILE_URL=telegram.base_file_url,
        **extra,
    )
    return env


async def _magpie_run(env: dict[str, str], cwd: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "run", stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        cwd=cwd, env=env,
    )  # fmt: skip


async def _terminated(process: asyncio.subprocess.Process) -> str:
    """Sends SIGTERM, waits for a clean exit and returns stderr."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    stderr = err.decode()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    return stderr


async def _conversations(db: Database) -> dict[str, list[Message]]:
    """Every logged message by Telegram chat id, oldest first."""
    async with db.sessions() as session:
        rows = (await session.execute(select(Message, Chat).join(Chat).order_by(Message.id))).all()
    by_chat: dict[str, list[Message]] = {}
    for message, chat in rows:
        by_chat.setdefault(chat.platform_chat_id, []).append(message)
    return by_chat


async def test_a_bot_killed_while_its_sends_hang_answers_everyone_exactly_once_after_a_restart(
    db: Database, database_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with FakeTelegram() as telegram:
        env = _telegram_env(telegram, database_url, tiny_model_dir)
        people = [telegram.user(7000 + n, f"User {n}") for n in range(8)]
        telegram.hold("sendMessage")
        first = await _magpie_run(env, tmp_path)
        try:
            for person in people:  # queued until the bot polls
                telegram.user_says(telegram.private_chat(person), person, f"hello, I am {person.first_name}")
            await telegram.wait_until(lambda: len(telegram.held_calls("sendMessage")) == len(people), STARTUP_S)
        finally:
            first.kill()
            await first.wait()
        # Killed with every answer in flight: one had reached Telegram (its response never came back), the other
        # seven were lost on the way.
        repeated = telegram.held_calls("sendMessage")[0].params["chat_id"]
        telegram.release(arrived=1)
        second = await _magpie_run(env, tmp_path)
        try:
            for person in people:
                expected = 2 if person.id == repeated else 1
                await telegram.wait_for_messages(person.id, expected, within=STARTUP_S)
        finally:
            stderr = await _terminated(second)
        assert "Recovery: 8 messages were left without a delivered answer" in stderr
        counts = {person.id: len(telegram.sent_messages(person.id)) for person in people}
    # Everyone has exactly one answer; the send in flight at the kill that did arrive was repeated, once.
    assert counts == {person.id: 2 if person.id == repeated else 1 for person in people}
    conversations = await _conversations(db)
    for person in people:
        asked, answer = conversations[str(person.id)]
        assert (asked.role, asked.awaits_reply) == (Role.USER, True)
        assert (answer.role, answer.reply_to_id, answer.delivery) == (Role.BOT, asked.id, Delivery.SENT)


async def test_sigterm_takes_no_new_updates_finishes_within_the_grace_and_leaves_the_rest_to_the_next_start(
    db: Database, database_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with FakeTelegram() as telegram:
        env = _telegram_env(telegram, database_url, tiny_model_dir, SHUTDOWN_GRACE_SECONDS="3")
        people = [telegram.user(7100 + n, f"User {n}") for n in range(3)]
        latecomer = telegram.user(7199, "Late")
        telegram.hold("sendMessage")
        first = await _magpie_run(env, tmp_path)
        try:
            for person in people:
                telegram.user_says(telegram.private_chat(person), person, f"hello, I am {person.first_name}")
            await telegram.wait_until(lambda: len(telegram.held_calls("sendMessage")) == len(people), STARTUP_S)
            finished = telegram.held_calls("sendMessage")[0].params["chat_id"]
            polls = len(telegram.calls_to("getUpdates"))
            first.send_signal(signal.SIGTERM)
            # The updater's last getUpdates (no long poll) only confirms what was fetched: it takes nothing new.
            await telegram.wait_until(
                lambda: any(call.params.get("timeout") == 0 for call in telegram.calls_to("getUpdates")[polls:])
            )
            telegram.user_says(telegram.private_chat(latecomer), latecomer, "anyone home?")
            telegram.release(count=1)  # one answer gets through within the grace
            stderr = await _terminated(first)
        finally:
            if first.returncode is None:
                first.kill()
                await first.wait()
        telegram.release(arrived=0)  # the sends still hanging when the grace ran out never arrived
        assert "cancelling 2 replies" in stderr
        at_exit = await _conversations(db)
        assert str(latecomer.id) not in at_exit
        for person in people:
            asked, answer = at_exit[str(person.id)]
            assert answer.delivery is (Delivery.SENT if person.id == finished else Delivery.PENDING)

        second = await _magpie_run(env, tmp_path)
        try:
            for person in [*people, latecomer]:
                await telegram.wait_for_messages(person.id, 1, within=STARTUP_S)
        finally:
            stderr = await _terminated(second)
        assert "Recovery: 2 messages were left without a delivered answer" in stderr
        counts = {person.id: len(telegram.sent_messages(person.id)) for person in [*people, latecomer]}
    assert set(counts.values()) == {1}
    conversations = await _conversations(db)
    for person in [*people, latecomer]:
        asked, answer = conversations[str(person.id)]
        assert (answer.reply_to_id, answer.delivery) == (asked.id, Delivery.SENT)
