"""The console backend driven the way a script would: piped stdin into `magpie run`, in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import torch
from sqlalchemy import select

from core.serving.dialogue import BOT_SPEAKER, Turn, encode_dialogue
from core.settings import Settings
from core.storage.db import Database, upgrade
from core.storage.models import Message, Role
from tests.conftest import TINY_CORPUS
from trainer.starter_model import ModelShape, build_model, save_model, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
STARTUP_S = 120.0
STOP_S = 5.0
"""Ctrl-C must end the console in a second or two (0.6 s measured with a load average of 13 on 2 cores); the bound
is wider for a busier test machine. It used to hang until another line was typed."""


def _env(database_url: str, model_dir: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.endswith("_TOKEN")}
    env.update(
        DATABASE_URL=database_url,
        BASE_MODEL=str(model_dir),
        MODELS_DIR=str(tmp_path / "models"),
        MAX_NEW_TOKENS="8",
        TEMPERATURE="0",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT),
    )
    return {**env, **extra}


@pytest.fixture
async def fresh_sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite database of this test's own: what a run leaves in it cannot reach another test."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'own.db'}"
    await upgrade(url)
    return url


async def pipe_into_magpie_run(
    stdin: bytes, database_url: str, model_dir: Path, tmp_path: Path, **extra: str
) -> tuple[int | None, str, str]:
    """`printf … | magpie run` in a subprocess: its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "run",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
        env=_env(database_url, model_dir, tmp_path, **extra),
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), timeout=180)
    return process.returncode, out.decode(), err.decode()


async def test_piped_stdin_gets_one_reply_per_line_and_exits_zero(
    db: Database, database_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    script = b"Hello\nHow are you?\n/help\n"
    code, stdout, stderr = await pipe_into_magpie_run(script, database_url, tiny_model_dir, tmp_path)
    assert code == 0, stderr
    assert "/reset" in stdout and "/retrain" in stdout  # the console user is an admin
    assert "Traceback" not in stderr
    async with db.sessions() as session:
        rows = (await session.execute(select(Message).order_by(Message.id))).scalars().all()
    assert [row.text for row in rows if row.role is Role.USER] == ["Hello", "How are you?", "/help"]
    bot_replies = [row.text for row in rows if row.role is Role.BOT]
    assert len(bot_replies) == 3 and all(reply.strip() for reply in bot_replies)
    for reply in bot_replies[:2]:
        assert reply.splitlines()[0] in stdout
    # Each reply starts with the marker and its further lines (the help has several) are indented: three starts.
    starts = [line for line in stdout.splitlines() if line and not line.startswith(" ")]
    assert len(starts) == 3 and all(line.startswith("magpie> ") for line in starts), stdout
    assert len(stdout.splitlines()) > 3


async def test_a_retrain_asked_for_in_a_script_reports_its_outcome_before_exit(
    db: Database, database_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The end of input waits for the run the console started (here it fails fast: one chat is too little data)
    instead of stopping it with the bot."""
    code, stdout, stderr = await pipe_into_magpie_run(b"Hello\n/retrain\n", database_url, tiny_model_dir, tmp_path)
    assert code == 0, stderr
    assert "Training run #1 started" in stdout
    assert "Training run #1 failed: not enough conversation to train on yet" in stdout
    assert "stopped with the bot" not in stdout + stderr


def test_run_refuses_an_unmigrated_database_with_a_hint(tiny_model_dir: Path, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    result = subprocess.run(
        [sys.executable, "-m", "bot", "run"],
        input="",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=_env(url, tiny_model_dir, tmp_path),
        check=False,
    )
    assert result.returncode == 2
    assert "magpie db upgrade" in result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("magpie:")]
    assert len(errors) == 1 and "magpie db upgrade" in errors[0]


class Terminal:
    """A pseudo-terminal for `magpie run`: what a person at a keyboard gives it (the console is then interactive,
    with its `you> ` prompt saying it waits for input). Its screen is read as the event loop sees output arrive."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self.screen = b""
        self._changed = asyncio.Event()
        asyncio.get_running_loop().add_reader(self.master, self._read)

    def _read(self) -> None:
        try:
            self.screen += os.read(self.master, 4096)
        except OSError:  # EIO: the program closed the terminal
            asyncio.get_running_loop().remove_reader(self.master)
        self._changed.set()

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    async def shows(self, text: str, *, within: float = STARTUP_S) -> None:
        """Waits until `text` appears on the screen after what was already read, then forgets what came before."""
        async with asyncio.timeout(within):
            while text.encode() not in self.screen:
                self._changed.clear()
                await self._changed.wait()
        self.screen = self.screen.partition(text.encode())[2]

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
async def test_a_signal_while_the_console_waits_for_input_exits_promptly_with_status_0(
    fresh_sqlite_url: str, tiny_model_dir: Path, tmp_path: Path, signum: int
) -> None:
    """Issue #18, item 2: it printed "Console: stopped" and hung in a thread blocked on stdin until another line
    was typed."""
    terminal = Terminal()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "run", stdin=terminal.slave, stdout=terminal.slave,
        stderr=asyncio.subprocess.PIPE, cwd=tmp_path, env=_env(fresh_sqlite_url, tiny_model_dir, tmp_path),
    )  # fmt: skip
    os.close(terminal.slave)
    try:
        await terminal.shows("you> ")
        terminal.type("Hello\n")
        await terminal.shows("you> ")  # answered, and waiting for the next line
        started = time.monotonic()
        process.send_signal(signum)
        await asyncio.wait_for(process.wait(), timeout=STOP_S)
        took = time.monotonic() - started
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        terminal.close()
    assert process.stderr is not None
    stderr = (await process.stderr.read()).decode()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert took < STOP_S


# --- no speaker label reaches the console (issue #18, item 3) -------------------------------------------------------

LEAK = "저는 I aBot:: A. aUser 1: I aBot: IBot: Do"
"""An answer that runs on into other turns as the starter's did: labels glued to words, with no line break."""
LABEL = re.compile(r"(?:Bot|User(?:\s*\d+)?)\s*[:\uff1a]")


@pytest.fixture(scope="module")
def leaky_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 taught one exchange, "Hello" answered by `LEAK`: a model that writes speaker labels mid-line."""
    tokenizer = train_tokenizer([*TINY_CORPUS, "User 1: Hello", f"Bot: {LEAK}"] * 20, vocab_size=400)
    model = build_model(tokenizer, ModelShape(n_layer=2, n_embd=64, n_head=2, n_positions=128, dropout=0.0), seed=0)
    dialogue = encode_dialogue([Turn("user:1", "Hello"), Turn(BOT_SPEAKER, LEAK)], tokenizer, open_reply=False)
    ids = torch.tensor([dialogue.ids])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 28-token batch: more threads only fight over a busy machine's cores
    try:
        for _ in range(60):  # learned after ~25 steps
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        prompt = torch.tensor([encode_dialogue([Turn("user:1", "Hello")], tokenizer).ids])
        with torch.no_grad():
            said = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False, pad_token_id=0
            )
    finally:
        torch.set_num_threads(threads)
    written = str(tokenizer.decode(said[0, prompt.shape[1] :].tolist()))
    assert LABEL.search(written), f"the model did not learn to write labels: {written!r}"
    return save_model(model, tokenizer, tmp_path_factory.mktemp("leaky-model"))


async def test_the_console_shows_no_speaker_label_from_a_model_that_writes_them(
    leaky_model_dir: Path, fresh_sqlite_url: str, tmp_path: Path
) -> None:
    code, stdout, stderr = await pipe_into_magpie_run(
        b"Hello\n", fresh_sqlite_url, leaky_model_dir, tmp_path, MAX_NEW_TOKENS="40"
    )
    assert code == 0, stderr
    assert stdout.startswith("magpie> ") and stdout.strip() != "magpie>", stdout
    assert LABEL.search(stdout) is None, stdout
    async with Database.opened(fresh_sqlite_url) as db, db.sessions() as session:
        replies = (await session.scalars(select(Message.text).where(Message.role == Role.BOT))).all()
    assert len(replies) == 1 and LABEL.search(str(replies[0])) is None and LEAK.startswith(replies[0]), replies


# --- a new operator's first hour (issue #18, items 1 and 9) ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _get(url: str, *, token: str | None = None) -> tuple[int, str]:
    """A GET answered with its status and body (errors too); with `token`, as a script opens the dashboard."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.text()


async def _log_shows(stderr: asyncio.StreamReader, text: str) -> None:
    """Reads the log until a line holds `text` (the process has got that far)."""
    async with asyncio.timeout(STARTUP_S):
        while text not in (line := (await stderr.readline()).decode()):
            assert line, f"the log ended before {text!r}"


async def test_magpie_serves_from_an_unedited_copy_of_env_example(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The README's path: `cp .env.example .env`, `magpie db upgrade`, `magpie run`. Only the model (the Hub is
    out of reach here) and the HTTP port (tests run side by side) come from the environment."""
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if key.lower() not in Settings.model_fields}
    env.update(
        PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", BASE_MODEL=str(tiny_model_dir), HTTP_LISTEN=f"127.0.0.1:{port}"
    )
    upgrade_run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "db", "upgrade", cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(upgrade_run.communicate(), timeout=STARTUP_S)
    assert upgrade_run.returncode == 0, err.decode()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "run", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(b"Hello\n")
        await process.stdin.drain()
        answer = (await asyncio.wait_for(process.stdout.readline(), timeout=STARTUP_S)).decode()
        status, body = await _get(f"http://127.0.0.1:{port}/healthz")
        process.stdin.close()
        _, err = await asyncio.wait_for(process.communicate(), timeout=STARTUP_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    assert answer.startswith("magpie> ") and answer.strip() != "magpie>", err.decode()
    assert status == 200, body
    assert (tmp_path / "data" / "magpie.db").is_file()  # the copy's (commented) default, relative to the directory


async def test_console_off_serves_health_and_the_dashboard_with_no_platform_and_no_terminal(
    fresh_sqlite_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """CONSOLE=off: no token, stdin closed (a service under Docker or systemd), and Magpie stays up with its HTTP
    server until SIGTERM, instead of opening a console that stops at once at the end of its input."""
    port, token = _free_port(), "a-dashboard-token-of-24-chars"
    env = _env(
        fresh_sqlite_url, tiny_model_dir, tmp_path, CONSOLE="off", HTTP_LISTEN=f"127.0.0.1:{port}",
        DASHBOARD_TOKEN=token,
    )  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "run", stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        await _log_shows(process.stderr, "serving model")
        health, body = await _get(f"http://127.0.0.1:{port}/healthz")
        dashboard, _ = await _get(f"http://127.0.0.1:{port}/dashboard/", token=token)
        still_running = process.returncode is None
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), timeout=STARTUP_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert still_running and process.returncode == 0, err.decode()
    assert health == 200 and set(json.loads(body)["parts"]) == {"database", "engine"}, body
    assert dashboard == 200
