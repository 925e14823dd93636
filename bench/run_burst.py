"""People writing at once through `magpie run`, against the same number writing one after another.

    python bench/run_burst.py [--people 8] [--new-tokens 32] [--rounds 2] [--shape gpt2|tiny]
        [--modes default] [--burst-only]
    python bench/run_burst.py --people 16 --modes seed,default --burst-only --rounds 1   # issue #22: 16 at once
    python bench/run_burst.py --people 8 --modes fp32,int8                               # batching itself

The whole product, not the engine alone: the real `magpie run` process (python-telegram-bot, the chat service,
SQLite, the engine) serves the project's fake Bot API (`tests/fake_telegram.py`, on 127.0.0.1) with a model of
GPT-2 small's shape (random weights, greedy, so every reply runs to `--new-tokens`). Each round times
- **one after another**: person i writes once person i-1 has had the answer;
- **at once**: `--people` other people write in the same instant;
each from the first message to the last reply. The ratio (one after another / at once) is what batching buys a
community; issue #12 asks >= 4x for 8 people. The CPU's model and flags are printed, since machines differ.

`--modes` serves the same rounds with several bot configurations, each a fresh `magpie run`, side by side:
`default` (the settings as shipped: SERVE_PRECISION=auto), `fp32`, `int8`, `auto` (SERVE_PRECISION), and `seed`:
the seed bot's way, one reply at a time in fp32 with the weights as loaded (ENGINE_MAX_BATCH_SIZE=1,
SERVE_PRECISION=fp32, SERVE_FP32_PACKED=false, no time limit),
the baseline of "16 users at once". The last table puts every mode's "at once" against the first mode's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from generation import build_in_child, cpu_description  # noqa: E402

from tests.fake_telegram import FakeTelegram, Person  # noqa: E402

STARTUP_S = 300.0
REPLY_S = 600.0


MODES: dict[str, dict[str, str]] = {
    "default": {},
    "fp32": {"SERVE_PRECISION": "fp32"},
    "int8": {"SERVE_PRECISION": "int8"},
    "auto": {"SERVE_PRECISION": "auto"},
    # The seed bot answered one message at a time, with the weights as transformers loads them, and had no time
    # limit: without one, the later replies would be the engine's timeout note instead of an answer.
    "seed": {
        "SERVE_PRECISION": "fp32",
        "SERVE_FP32_PACKED": "false",
        "ENGINE_MAX_BATCH_SIZE": "1",
        "ENGINE_TIMEOUT_S": "3600",
    },
}


def run_env(telegram: FakeTelegram, model_dir: Path, database: Path, new_tokens: int) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("DISCORD_BOT_TOKEN", "TELEGRAM_WEBHOOK_URL", "HTTP_LISTEN"):
        env.pop(name, None)
    env.update(
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        DATABASE_URL=f"sqlite+aiosqlite:///{database}",
        BASE_MODEL=str(model_dir),
        MAX_NEW_TOKENS=str(new_tokens),
        TEMPERATURE="0",
        RATE_LIMIT_PER_MINUTE="1000",
        TELEGRAM_BOT_TOKEN=telegram.token,
        TELEGRAM_BASE_URL=telegram.base_url,
        TELEGRAM_BASE_FILE_URL=telegram.base_file_url,
        LOG_LEVEL="WARNING",
    )
    return env


async def answered(telegram: FakeTelegram, person: Person, text: str) -> None:
    telegram.user_says(telegram.private_chat(person), person, text)
    await telegram.wait_for_messages(person.id, 1, within=REPLY_S)


async def one_after_another(telegram: FakeTelegram, people: list[Person]) -> float:
    start = time.perf_counter()
    for person in people:
        await answered(telegram, person, f"hello, I am {person.first_name}, how are you today?")
    return time.perf_counter() - start


async def at_once(telegram: FakeTelegram, people: list[Person]) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(answered(telegram, p, f"hello, I am {p.first_name}, how are you today?") for p in people))
    return time.perf_counter() - start


async def measure(args: argparse.Namespace, model_dir: Path, tmp: Path, mode: str) -> tuple[list[float], list[float]]:
    database = tmp / f"magpie-{mode}.db"
    async with FakeTelegram() as telegram:
        env = run_env(telegram, model_dir, database, args.new_tokens)
        # the mode decides these; TORCH_THREADS and ENGINE_TIMEOUT_S pass through
        for name in ("SERVE_PRECISION", "SERVE_FP32_PACKED", "ENGINE_MAX_BATCH_SIZE"):
            env.pop(name, None)
        env.update(MODES[mode])
        upgrade = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "db", "upgrade", env=env, cwd=tmp)
        if await upgrade.wait() != 0:
            raise SystemExit("magpie db upgrade failed")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", env=env, cwd=tmp, stdin=asyncio.subprocess.DEVNULL
        )
        try:
            await telegram.wait_until(lambda: bool(telegram.calls_to("getMe")), within=STARTUP_S)
            await answered(telegram, telegram.user(1, "Warm"), "warm up please")
            serial, burst = [], []
            for round_ in range(args.rounds):
                base = 1000 * (round_ + 1)
                if not args.burst_only:
                    serial.append(await one_after_another(telegram, people(telegram, base, args.people)))
                burst.append(await at_once(telegram, people(telegram, base + 500, args.people)))
                print(
                    f"{mode} round {round_ + 1}: one after another {serial[-1] if serial else float('nan'):.2f} s,"
                    f" at once {burst[-1]:.2f} s",
                    flush=True,
                )
        finally:
            process.terminate()
            await process.wait()
    return serial, burst


def people(telegram: FakeTelegram, first_id: int, count: int) -> list[Person]:
    return [telegram.user(first_id + n, f"Person{n}") for n in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shape", choices=("gpt2", "tiny"), default="gpt2")
    parser.add_argument("--modes", default="default", help=f"bot configurations, in order, of {', '.join(MODES)}")
    parser.add_argument("--burst-only", action="store_true", help="time only the people writing at once")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        parser.error(f"--modes takes {', '.join(MODES)}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="magpie-burst-") as name:
        tmp = Path(name)
        build_in_child(tmp / "model", args.shape)
        for mode in modes:
            results[mode] = asyncio.run(measure(args, tmp / "model", tmp, mode))
    report(args, results)


def report(args: argparse.Namespace, results: dict[str, tuple[list[float], list[float]]]) -> None:
    print(f"\n{args.people} people, {args.new_tokens}-token greedy replies, {args.shape} shape, {os.cpu_count()} CPUs")
    print(cpu_description())
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    first = statistics.median(next(iter(results.values()))[1])
    for mode, (serial, burst) in results.items():
        b = statistics.median(burst)
        line = f"{mode:8} at once: median {b:.2f} s ({first / b:.1f}x faster than {next(iter(results))})"
        if serial:
            s = statistics.median(serial)
            line += f"; one after another: median {s:.2f} s; at once is {s / b:.1f}x faster"
        print(line)


if __name__ == "__main__":
    main()
