"""Messages answered per second by one `magpie run` and by two replicas behind a load balancer, in one run.

    python bench/replicas.py [--users 24] [--messages 4] [--replicas 1,2] [--torch-threads 1] [--new-tokens 16]

Every row serves the same traffic the same way, only the number of replicas changes: real `magpie run` processes
in Telegram webhook mode, on one fresh PostgreSQL database (created on the local server, dropped afterwards) and
sharing the per-user limits through the local Redis (REDIS_URL, as replicas must), with the project's fake Bot API
(`tests/fake_telegram.py`) on 127.0.0.1 posting each update to the next replica in turn (its load balancer). The
model is the tests' tiny one (a 2-layer, 64-wide GPT-2 with a byte-level BPE trained on the chatterbot English
corpus), greedy, at most `--new-tokens` tokens an answer. Nothing leaves 127.0.0.1 and the traffic is bounded:

1. start the replicas and wait until each says it is up (start-up is not timed);
2. warm up: one message per replica, answered;
3. `--users` people each send `--messages` messages at once (a burst); the clock runs from the first update to
   the last answer sent, and messages/s = answers / that time.

Each replica gets `--torch-threads` threads (default 1, so two replicas use two cores where one uses one; give 2 to
let a lone replica use both cores too). The CPU model, its flags, the core count and the load average at the start
are printed: the figure depends on all of them, and on a machine shared with other work it varies between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generation import corpus_lines, cpu_description  # noqa: E402  (bench/generation.py, beside this script)
from sqlalchemy.engine import make_url  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from core.storage.db import upgrade  # noqa: E402
from tests.fake_telegram import FakeTelegram  # noqa: E402
from trainer.starter_model import ModelShape, build_model, save_model, train_tokenizer  # noqa: E402

POSTGRES_ADMIN_URL = os.environ.get("MAGPIE_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MAGPIE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PUBLIC_URL = "https://bot.example.org"
SECRET = "bench-webhook-Secret_1"
STARTUP_S = 300.0
ANSWER_S = 600.0


@dataclass(frozen=True)
class Row:
    replicas: int
    answered: int
    seconds: float
    per_replica: list[int]

    @property
    def per_second(self) -> float:
        return self.answered / self.seconds


class Replica:
    """A `magpie run` process whose log is read as it comes, so that "is up" can be awaited."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.up = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if "is up (webhook on port" in line:
                self.up.set()
        self.up.set()  # exited: the waiter looks at the return code

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout=120)
        finally:
            if self.process.returncode is None:
                self.process.kill()
            await self._reader


def build_tiny_model(directory: Path) -> Path:
    """The tests' tiny shape (2 layers, 64 wide), seeded, with a tokenizer trained on the chatterbot corpus."""
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    lines = [line for talk in corpus_lines() for line in talk]
    tokenizer = train_tokenizer(lines, vocab_size=2000)
    model = build_model(tokenizer, ModelShape(n_layer=2, n_embd=64, n_head=2, n_positions=256), seed=0)
    return save_model(model, tokenizer, directory)


async def _pg_admin(sql: str) -> None:
    import asyncpg

    parsed = make_url(POSTGRES_ADMIN_URL)
    conn = await asyncpg.connect(host=parsed.host, port=parsed.port, user=parsed.username, database=parsed.database)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _env(telegram: FakeTelegram, database_url: str, model: Path, port: int, args: argparse.Namespace) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "DISCORD_BOT_TOKEN"}
    env.update(
        PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", DATABASE_URL=database_url, BASE_MODEL=str(model),
        MAX_NEW_TOKENS=str(args.new_tokens), TEMPERATURE="0", TORCH_THREADS=str(args.torch_threads),
        RATE_LIMIT_PER_MINUTE="1000000", LOG_LEVEL="WARNING", RECOVERY_WINDOW_MINUTES="0",
        TELEGRAM_BOT_TOKEN=telegram.token, TELEGRAM_BASE_URL=telegram.base_url,
        TELEGRAM_BASE_FILE_URL=telegram.base_file_url, TELEGRAM_WEBHOOK_URL=f"{PUBLIC_URL}/telegram",
        TELEGRAM_WEBHOOK_LISTEN="127.0.0.1", TELEGRAM_WEBHOOK_PORT=str(port), TELEGRAM_WEBHOOK_SECRET=SECRET,
        REDIS_URL=REDIS_URL, REDIS_KEY_PREFIX=f"magpie-bench-{uuid.uuid4().hex[:12]}",
    )  # fmt: skip
    return env


async def start_replicas(
    telegram: FakeTelegram, database_url: str, model: Path, args: argparse.Namespace, *, count: int, cwd: Path
) -> list[Replica]:
    """`count` replicas behind the fake's load balancer, each up (its "is up" line logged)."""
    ports = [_free_port() for _ in range(count)]
    telegram.public_host(PUBLIC_URL, [f"http://127.0.0.1:{port}" for port in ports])
    replicas = []
    for port in ports:
        env = _env(telegram, database_url, model, port, args)
        env["LOG_LEVEL"] = "INFO"  # for the "is up" line; noisy libraries stay quiet
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            cwd=cwd, env=env,
        )  # fmt: skip
        replicas.append(Replica(process))
    async with asyncio.timeout(STARTUP_S):
        await asyncio.gather(*(replica.up.wait() for replica in replicas))
    for replica in replicas:
        if replica.process.returncode is not None:
            raise SystemExit("a replica failed to start:\n" + "\n".join(replica.lines[-30:]))
    return replicas


async def serve_burst(telegram: FakeTelegram, args: argparse.Namespace, count: int) -> Row:
    """Warm-up (one message per replica), then the timed burst; returns the row."""
    warm = [telegram.user(900_000 + n, f"Warm {n}") for n in range(count)]
    for person in warm:
        telegram.user_says(telegram.private_chat(person), person, "hello there")
    for person in warm:
        await telegram.wait_for_messages(person.id, 1, within=ANSWER_S)
    people = [telegram.user(100_000 + n, f"User {n}") for n in range(args.users)]
    chats = [telegram.private_chat(person) for person in people]
    already = len(telegram.delivered_to)
    started = time.perf_counter()
    for round_ in range(args.messages):
        for person, chat in zip(people, chats, strict=True):
            telegram.user_says(chat, person, f"how are you today? ({round_})")
    total = args.users * args.messages
    await telegram.wait_until(lambda: sum(len(telegram.sent_messages(p.id)) for p in people) >= total, ANSWER_S)
    seconds = time.perf_counter() - started
    targets = telegram.delivered_to[already:]
    return Row(count, total, seconds, [targets.count(target) for target in sorted(set(targets))])


async def measure(model: Path, args: argparse.Namespace, count: int, cwd: Path) -> Row:
    """One row: a fresh database, `count` replicas, the burst, a clean stop."""
    name = f"magpie_bench_{uuid.uuid4().hex[:12]}"
    await _pg_admin(f'CREATE DATABASE "{name}"')
    database_url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        await upgrade(database_url)
        async with FakeTelegram() as telegram:
            replicas = await start_replicas(telegram, database_url, model, args, count=count, cwd=cwd)
            try:
                return await serve_burst(telegram, args, count)
            finally:
                await asyncio.gather(*(replica.stop() for replica in replicas))
    finally:
        await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def report(rows: list[Row], args: argparse.Namespace, load: tuple[float, float, float]) -> None:
    print(f"CPU: {cpu_description()}; {os.cpu_count()} cores; load average at start {load[0]:.1f}")
    print(
        f"traffic: {args.users} users x {args.messages} messages, all at once; tiny model (2 layers, 64 wide), "
        f"greedy, <= {args.new_tokens} new tokens; TORCH_THREADS={args.torch_threads} per replica; "
        "PostgreSQL + Redis on 127.0.0.1"
    )
    print(f"{'replicas':>8} | {'answered':>8} | {'seconds':>7} | {'msgs/s':>6} | {'vs 1':>5} | per replica")
    base = rows[0].per_second
    for row in rows:
        split = "/".join(str(n) for n in row.per_replica)
        ratio = row.per_second / base
        print(
            f"{row.replicas:>8} | {row.answered:>8} | {row.seconds:>7.1f} | {row.per_second:>6.2f} | {ratio:>4.2f}x"
            f" | {split}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=24, help="people sending at once")
    parser.add_argument("--messages", type=int, default=4, help="messages each person sends")
    parser.add_argument("--replicas", default="1,2", help="replica counts to compare, comma-separated")
    parser.add_argument("--torch-threads", type=int, default=1, help="TORCH_THREADS of each replica")
    parser.add_argument("--new-tokens", type=int, default=16, help="MAX_NEW_TOKENS")
    args = parser.parse_args()
    args.counts = [int(part) for part in args.replicas.split(",") if part.strip()]
    if args.users < 1 or args.messages < 1 or args.new_tokens < 1 or not args.counts or min(args.counts) < 1:
        parser.error("need --users, --messages, --new-tokens and every replica count >= 1")
    if args.users * args.messages > 2000:
        parser.error("keep the traffic bounded: at most 2000 messages a row")
    return args


async def main() -> None:
    args = parse_args()
    # A replica stopped by SIGTERM may drop a "typing…" call it no longer needs: not worth a traceback here.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="magpie-bench-replicas-") as tmp:
        model = build_tiny_model(Path(tmp) / "tiny")
        rows = [await measure(model, args, count, Path(tmp)) for count in args.counts]
    report(rows, args, load)


if __name__ == "__main__":
    asyncio.run(main())
