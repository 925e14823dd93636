"""The engine's time per token while it is the process's only OpenMP user, and after another thread that lives on has
run torch work (what `asyncio.to_thread(prepare)` for a hot swap, or the starter built before serving, used to do),
side by side in one run. core/compute_threads.py says why the two differ.

    python bench/omp_teams.py [--precision int8] [--chats 6] [--new-tokens 32] [--shape gpt2|tiny]

One engine (GPT-2 small's shape, random weights, one chat at a time, exactly `--new-tokens` per reply) is timed:
1. fresh;
2. after a hot swap through `Engine.swap` (the load runs in a thread that ends with it);
3. after one `asyncio.to_thread` call that loads the same model beside it (the executor's thread lives on, idle, with
   its OpenMP team) — the way swaps loaded before;
4. after that executor is shut down (its thread has ended).
Per-token time is the engine's own (`EngineStats.generate_seconds` over the tokens it made), the best of two
rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from generation import build_in_child, cpu_description, exact_length  # noqa: E402

from core.serving.dialogue import Turn  # noqa: E402
from core.serving.engine import Engine, EngineConfig, GenerationParams, ModelRef, Precision  # noqa: E402
from core.serving.engine._loading import prepare  # noqa: E402
from core.settings import Settings  # noqa: E402

CHAT = [Turn("alice", "hello there, how are you doing today? tell me about the weather where you are")]


async def ms_per_token(engine: Engine, params: GenerationParams, chats: int) -> float:
    """The engine's own time per generated token over `chats` lone chats, best of two rounds."""
    best = float("inf")
    await engine.generate_response(CHAT, params=exact_length(params, 1))
    for _ in range(2):
        before = engine.stats()
        for _ in range(chats):
            await engine.generate_response(CHAT, params=params)
        after = engine.stats()
        seconds = after.generate_seconds - before.generate_seconds
        best = min(best, seconds / (after.tokens_generated - before.tokens_generated) * 1000)
    return best


async def measure(directory: Path, precision: Precision, chats: int, new_tokens: int) -> list[tuple[str, float]]:
    base = GenerationParams.from_settings(Settings(_env_file=None))  # type: ignore[call-arg]
    params = exact_length(base, new_tokens)
    config = EngineConfig.from_settings(
        Settings(_env_file=None, device="cpu"),  # type: ignore[call-arg]
        max_batch_size=1,
        seed=0,
        params=params,
        precision=precision,
        timeout_s=3600.0,
    )
    engine = Engine(config)
    await engine.start(ModelRef(str(directory), "v1"))
    rows = [("fresh", await ms_per_token(engine, params, chats))]
    await engine.swap(ModelRef(str(directory), "v2"))
    rows.append(("after Engine.swap (own thread)", await ms_per_token(engine, params, chats)))
    executor = ThreadPoolExecutor()  # what asyncio.to_thread runs on: its threads live on, idle, after a call
    loop = asyncio.get_running_loop()
    loaded = await loop.run_in_executor(executor, prepare, ModelRef(str(directory), "v3"), "cpu", precision)
    rows.append(("after a to_thread load (old way)", await ms_per_token(engine, params, chats)))
    del loaded
    executor.shutdown(wait=True)
    rows.append(("once that thread has ended", await ms_per_token(engine, params, chats)))
    await engine.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="int8", choices=("fp32", "int8", "bf16"))
    parser.add_argument("--chats", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--shape", choices=("gpt2", "tiny"), default="gpt2")
    args = parser.parse_args()
    print(f"{cpu_description()}\n{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="magpie-omp-") as name:
        build_in_child(Path(name), args.shape)
        rows = asyncio.run(measure(Path(name), args.precision, args.chats, args.new_tokens))
    fresh = rows[0][1]
    print(f"one chat at a time, {args.new_tokens} tokens per reply, {args.precision}:")
    for label, ms in rows:
        print(f"  {label:34} {ms:6.2f} ms/token  {ms / fresh:5.2f}x fresh")


if __name__ == "__main__":
    main()
