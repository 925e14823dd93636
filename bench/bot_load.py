"""The platform's call budget under load: many people writing to the bot through Telegram at once, measured through
the real python-telegram-bot client against the fake Bot API (which refuses floods as Telegram does), before and
after the call-budget changes, side by side in one run.

    python bench/bot_load.py                 # 100 people, 2000 messages over ~40 s (issue #12, item 4)
    python bench/bot_load.py --quick         # 60 people, 300 messages over ~10 s: a smoke run, a few minutes
    python bench/bot_load.py --people 50 --messages 1000 --seconds 20 --drain 60 --seed 1

Each mode serves the same load from scratch (a fresh fake, database and engine):

- **before**: TYPING_AFTER_MS=0 (every answer costs a "typing…" call first) and SEND_QUEUE_LIMIT huge (an answer
  is always generated, however long the platform's queue): the behaviour the issue measured;
- **after**: the defaults (TYPING_AFTER_MS=1000: "typing…" only for slow answers, once per chat;
  SEND_QUEUE_LIMIT=200: past that many calls waiting to go out, new messages get the short busy note).

The load: `--people` private chats (each person pressed Start), `--messages` text messages arriving as a Poisson
process over `--seconds`, each from a person drawn at random; arrivals and people are drawn once from
`random.Random(--seed)` and every mode gets the same. The bot is `magpie run`'s assembly (Engine + ChatService +
TelegramBackend with PTB's AIORateLimiter) over a 2-layer, 64-wide GPT-2 with random weights (`generation.py
--shape tiny`), SQLite, and RATE_LIMIT_PER_MINUTE raised out of the way (the per-person limit is not what is
measured). The fake runs on a thread and event loop of its own, so the bot's loop serves only the bot.

Latency is from the moment a person's message is posted to the moment the bot's send of its reply is confirmed;
replies/s is replies sent over the time from the first message to the last reply. A mode is bounded: whatever is
not answered `--drain` seconds after the last message is counted as unanswered and cut off. "429s seen" counts the
fake's refusals (Telegram's flood limits; PTB waits each out, pausing every request meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from pydantic import SecretStr
from sqlalchemy.engine import make_url
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the fake Bot API lives in tests/, next to what it fakes for

from generation import build_in_child, cpu_description  # noqa: E402  (bench/, beside this script)

from bot.telegram import TelegramBackend  # noqa: E402
from core.chat.messages import ChatHandler, IncomingMessage, Reply  # noqa: E402
from core.chat.service import ChatService  # noqa: E402
from core.serving.engine import Engine, ModelRef  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.storage.db import Database, upgrade  # noqa: E402
from core.texts import BUSY  # noqa: E402
from tests.fake_telegram import ChatRef, FakeTelegram  # noqa: E402

T = TypeVar("T")
MODES: dict[str, dict[str, Any]] = {"before": {"typing_after_ms": 0, "send_queue_limit": 1_000_000}, "after": {}}
LINES = [
    "hello there, how are you today?",
    "what is your favourite colour?",
    "do you like pizza or pasta more?",
    "tell me something funny",
    "what are you doing right now?",
]


@dataclass(frozen=True)
class Load:
    """Who writes when: (seconds after the start, index of the person, text), in time order."""

    people: int
    messages: list[tuple[float, int, str]]


@dataclass
class Outcome:
    """What one mode measured."""

    name: str
    latencies_s: list[float] = field(default_factory=list)
    busy: int = 0
    undelivered: int = 0
    unanswered: int = 0
    span_s: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    log: list[tuple[str, int]] = field(default_factory=list)
    """The most frequent warnings and errors logged, with their counts."""

    def percentile(self, q: int) -> float:
        if len(self.latencies_s) < 2:
            return self.latencies_s[0] if self.latencies_s else float("nan")
        return statistics.quantiles(self.latencies_s, n=100, method="inclusive")[q - 1]


def draw_load(people: int, messages: int, seconds: float, seed: int) -> Load:
    """A Poisson process of `messages` arrivals at `messages / seconds` a second, each from a random person."""
    rng = random.Random(seed)
    at, plan = 0.0, []
    for _ in range(messages):
        plan.append((at, rng.randrange(people), rng.choice(LINES)))
        at += rng.expovariate(messages / seconds)
    return Load(people, plan)


class Timed:
    """The core as the backend sees it, noting when each reply's send was confirmed (and which were busy notes)."""

    def __init__(self, service: ChatService, expected: int) -> None:
        self._service = service
        self._expected = expected
        self._sources: dict[int, tuple[str, str]] = {}
        self.sent_at: dict[tuple[str, str], float] = {}
        self.busy = 0
        self.undelivered = 0
        self.changed = asyncio.Condition()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._service, name)

    async def handle(self, message: IncomingMessage, *, busy: bool = False) -> Reply | None:
        reply = await self._service.handle(message, busy=busy)
        if reply is not None:
            self._sources[id(reply)] = (message.chat_id, message.message_id)
        return reply

    async def mark_delivered(self, reply: Reply, platform_message_ids: list[str]) -> None:
        self.sent_at[self._sources.pop(id(reply))] = time.monotonic()
        self.busy += reply.text == BUSY
        await self._service.mark_delivered(reply, platform_message_ids)
        await self._settled()

    async def mark_undelivered(self, reply: Reply, reason: str, *, parts_sent: int = 0) -> None:
        self._sources.pop(id(reply), None)
        self.undelivered += 1
        await self._service.mark_undelivered(reply, reason, parts_sent=parts_sent)
        await self._settled()

    async def all_settled(self, within: float) -> None:
        """Returns once every message got its reply's outcome, or after `within` seconds."""
        try:
            async with asyncio.timeout(within), self.changed:
                await self.changed.wait_for(lambda: len(self.sent_at) + self.undelivered >= self._expected)
        except TimeoutError:
            pass

    async def _settled(self) -> None:
        async with self.changed:
            self.changed.notify_all()


class LogTally(logging.Handler):
    """Counts warnings and errors by logger and first line instead of printing thousands of them: under overload
    the same few repeat."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        first = record.getMessage().splitlines()[0] if record.getMessage() else ""
        key = f"{record.levelname} {record.name}: {re.sub(r'[0-9]+', 'N', first)[:110]}"
        self.counts[key] = self.counts.get(key, 0) + 1

    def most_common(self, count: int = 6) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda item: -item[1])[:count]


class TelegramSide:
    """The fake Bot API and the people writing to it, on a thread and an event loop of their own."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-telegram", daemon=True)
        self.fake = FakeTelegram()
        self.posted_at: dict[tuple[str, str], float] = {}

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Runs `work` on the fake's loop and awaits it from the caller's."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self._loop))

    async def start(self) -> None:
        self._thread.start()
        await self.run(self.fake.start())

    async def close(self) -> None:
        await self.run(self.fake.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def write(self, load: Load) -> None:
        """Posts every message at its time (runs on the fake's loop)."""
        people = [self.fake.user(10_000 + n, f"Person {n}") for n in range(load.people)]
        chats: list[ChatRef] = [self.fake.private_chat(person) for person in people]
        start = time.monotonic()
        for at, who, text in load.messages:
            if (delay := start + at - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            posted = self.fake.user_says(chats[who], people[who], text)
            self.posted_at[str(chats[who].id), str(posted["message_id"])] = time.monotonic()

    async def tally(self) -> tuple[dict[str, int], int]:
        """Calls by method and status ("sendMessage 200": n), and how many the flood limits refused."""
        counts: dict[str, int] = {}
        for call in self.fake.calls:
            if call.method != "getUpdates":
                key = f"{call.method} {call.status}"
                counts[key] = counts.get(key, 0) + 1
        return counts, self.fake.flood.refused


def settings_for(
    fake: FakeTelegram, model_dir: Path, database_url: str, mode: str, args: argparse.Namespace
) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        telegram_bot_token=SecretStr(fake.token),
        telegram_base_url=fake.base_url,
        telegram_base_file_url=fake.base_file_url,
        base_model=str(model_dir),
        database_url=database_url,
        device="cpu",
        rate_limit_per_minute=100_000,
        shutdown_grace_seconds=0,
        max_new_tokens=args.new_tokens,
        torch_threads=args.threads,
        **MODES[mode],
    )


async def fresh_database(postgres: str | None, workdir: Path, mode: str) -> str:
    """A migrated, empty database for one mode: an SQLite file, or a new database on the PostgreSQL server of the
    URL `postgres` (whose database is used only to create it; `magpie_bot_load_<mode>` is replaced at each run and
    left for inspection). Every mode needs its own: the same people send messages with the same ids, which a shared
    log would take for redeliveries."""
    if postgres is None:
        url = f"sqlite+aiosqlite:///{workdir / f'{mode}.db'}"
    else:
        import asyncpg  # type: ignore[import-untyped]

        server = make_url(postgres)
        name = f"magpie_bot_load_{mode}"
        connection = await asyncpg.connect(
            host=server.host, port=server.port, user=server.username, password=server.password,
            database=server.database,
        )  # fmt: skip
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()
        url = server.set(database=name).render_as_string(hide_password=False)
    await upgrade(url)
    return url


async def serve(mode: str, load: Load, model_dir: Path, workdir: Path, args: argparse.Namespace) -> Outcome:
    """One mode from scratch: fake, database, engine, service and backend; the load; the outcome."""
    database_url = await fresh_database(args.postgres, workdir, mode)
    side = TelegramSide()
    await side.start()
    settings = settings_for(side.fake, model_dir, database_url, mode, args)
    db = Database.connect(database_url)
    engine = Engine.from_settings(settings)
    await engine.start(ModelRef(source=str(model_dir), name="tiny"))
    timed = Timed(ChatService(settings=settings, db=db, engine=engine), len(load.messages))
    tally = LogTally()
    logging.getLogger().addHandler(tally)
    backend = TelegramBackend(settings=settings, handler=cast(ChatHandler, timed))
    try:
        await backend.start()
        started = time.monotonic()
        writing = asyncio.ensure_future(side.run(side.write(load)))
        await timed.all_settled(within=load.messages[-1][0] + args.drain)
        await writing
        last = max(timed.sent_at.values(), default=started)
    finally:
        await backend.stop()
        await engine.close()
        await db.close()
        logging.getLogger().removeHandler(tally)
    calls, refused = await side.run(side.tally())
    await side.close()
    result = outcome(mode, posted_at=side.posted_at, timed=timed, calls=calls, refused=refused, span=last - started)
    result.log = tally.most_common()
    return result


def outcome(
    mode: str,
    *,
    posted_at: dict[tuple[str, str], float],
    timed: Timed,
    calls: dict[str, int],
    refused: int,
    span: float,
) -> Outcome:
    """Latencies of the replies sent; what was neither sent nor given up on by the bound is unanswered."""
    latencies = [timed.sent_at[key] - posted for key, posted in posted_at.items() if key in timed.sent_at]
    unanswered = len(posted_at) - len(latencies) - timed.undelivered
    return Outcome(mode, latencies, timed.busy, timed.undelivered, unanswered, span, calls, refused)


def report(outcomes: list[Outcome], load: Load, args: argparse.Namespace) -> None:
    """One table, a column per mode."""
    print(
        f"\n{len(load.messages)} messages from {load.people} people over {load.messages[-1][0]:.1f} s "
        f"(Poisson, seed {args.seed}), bounded at {args.drain:g} s after the last; answers of {args.new_tokens} "
        f"tokens, {args.threads} torch threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n"
        f"{cpu_description()}"
    )
    rows: list[tuple[str, Any]] = [
        ("replies/s", lambda o: f"{len(o.latencies_s) / o.span_s:.1f}" if o.span_s else "n/a"),
        ("p50 latency s", lambda o: f"{o.percentile(50):.2f}"),
        ("p95 latency s", lambda o: f"{o.percentile(95):.2f}"),
        ("replies sent", lambda o: len(o.latencies_s)),
        ("  of which busy notes", lambda o: o.busy),
        ("undelivered", lambda o: o.undelivered),
        ("unanswered at the bound", lambda o: o.unanswered),
        ("429s seen", lambda o: o.refused),
        ('"typing" calls', lambda o: sum(n for key, n in o.calls.items() if key.startswith("sendChatAction"))),
        ("sendMessage calls", lambda o: sum(n for key, n in o.calls.items() if key.startswith("sendMessage"))),
    ]
    print(f"{'':26}" + "".join(f"{o.name:>12}" for o in outcomes))
    for label, cell in rows:
        print(f"{label:26}" + "".join(f"{cell(o)!s:>12}" for o in outcomes))
    for o in outcomes:
        print(f"\n{o.name} calls by method and status: " + ", ".join(f"{k}: {n}" for k, n in sorted(o.calls.items())))
        print("\n".join(f"  logged {n}x {line}" for line, n in o.log) or "  nothing logged at WARNING or above")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=100, help="private chats writing (default 100)")
    parser.add_argument("--messages", type=int, default=2000, help="messages in all (default 2000)")
    parser.add_argument("--seconds", type=float, default=40.0, help="over about this long (default 40)")
    parser.add_argument("--drain", type=float, default=120.0, help="wait this long after the last (default 120)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrivals (default 0)")
    parser.add_argument("--new-tokens", type=int, default=8, help="MAX_NEW_TOKENS of every answer (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="TORCH_THREADS (default 1)")
    parser.add_argument(
        "--postgres", metavar="URL", help="a PostgreSQL server to make each mode's database on (default: SQLite)"
    )
    parser.add_argument("--modes", default="before,after", help="which modes, in order (default before,after)")
    parser.add_argument(
        "--mode",
        action="append",
        default=[],
        metavar="NAME:SETTING=VALUE,...",
        help="one more mode, after the others: the defaults with these settings (lower-case names), e.g. "
        "'limit60:send_queue_limit=60'; repeatable",
    )
    parser.add_argument(
        "--quick", action="store_true", help="60 people, 300 messages over 10 s (0.5 a person a second), drain 60 s"
    )
    args = parser.parse_args()
    if args.quick:
        args.people, args.messages, args.seconds, args.drain = 60, 300, 10.0, 60.0
    if min(args.people, args.messages, args.new_tokens, args.threads) < 1 or args.seconds <= 0 or args.drain < 0:
        parser.error("need --people, --messages, --new-tokens, --threads >= 1, --seconds > 0 and --drain >= 0")
    for extra in args.mode:
        name, _, assignments = extra.partition(":")
        pairs = [item.partition("=") for item in assignments.split(",") if item]
        if not name or name in MODES or any(not key or not eq for key, eq, _ in pairs):
            parser.error(f"--mode {extra!r}: want a new NAME:setting=value,...")
        MODES[name] = {key.strip(): value.strip() for key, _, value in pairs}
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; choose from {sorted(MODES)}")
    args.modes = ",".join(modes + [extra.partition(":")[0] for extra in args.mode])
    return args


async def measure(args: argparse.Namespace, load: Load, model_dir: Path, workdir: Path) -> list[Outcome]:
    outcomes = []
    for mode in args.modes.split(","):
        print(f"serving {len(load.messages)} messages: {mode} ...", flush=True)
        outcomes.append(await serve(mode, load, model_dir, workdir, args))
    return outcomes


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, handlers=[logging.NullHandler()])  # counted per mode (LogTally)
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    load = draw_load(args.people, args.messages, args.seconds, args.seed)
    with tempfile.TemporaryDirectory(prefix="magpie-bot-load-") as tmp:
        workdir = Path(tmp)
        build_in_child(workdir / "model", "tiny")
        outcomes = asyncio.run(measure(args, load, workdir / "model", workdir))
    report(outcomes, load, args)


if __name__ == "__main__":
    main()
