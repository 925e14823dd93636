"""Capacity, the figure operators need: for each way of serving, the highest Poisson arrival rate at which the
95th-percentile latency stays within a bound (default 3 s) for replies of a fixed length (default 32 tokens).

    python bench/generation.py --capacity [--quick] [--precisions fp32,int8] [--p95-limit 3] [--new-tokens 32]

Run through `bench/generation.py --capacity` (same model, chats and CPU report). The ways, side by side in one
run on the same chats:
- **seed notebook**: one greedy `generate` at a time in arrival order (the seed bot's way) with the same reply
  length as the others (`min_new_tokens = max_new_tokens`), so capacity compares like for like;
- **Engine <precision>**: one engine per precision, started once, every chat submitted at its arrival time.

Search (bounded): a trial serves `--capacity-requests` chats, or more, so that their arrivals span
`--capacity-seconds` (Poisson arrivals at the trial's rate, seeded, so each rate's arrivals are the same for every
way) and passes when p95 <= the limit. From `--capacity-start` chats/s the
rate doubles while trials pass (at most `--capacity-max` chats/s), or halves while they fail (down to 1/16 of the
start, and not at all once even the quickest reply took longer than the limit: then the capacity is 0 whatever the
rate); then `--capacity-steps` geometric bisections between the last pass and the first fail. The result is the
highest passing rate (0 when none passed). `--quick` uses fewer chats and bisections (a rough figure in minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from generation import Run, Workload, draw_workload, exact_length, one_at_a_time, prompt_ids, with_lag_watch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.compute_threads import run_in_own_thread
from core.serving.dialogue import Turn
from core.serving.engine import Engine, EngineConfig, GenerationParams, ModelRef, Precision
from core.settings import Settings

Trial = Callable[[float], Run]


@dataclass(frozen=True)
class Capacity:
    """One way's result: the highest passing rate and every trial made on the way (rate, p95)."""

    name: str
    rate: float
    trials: list[tuple[float, float]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--capacity", action="store_true", help="search each way's capacity (see bench/capacity.py)")
    parser.add_argument("--quick", action="store_true", help="with --capacity: fewer chats and bisections")
    parser.add_argument("--p95-limit", type=float, default=3.0, help="capacity: p95 latency bound in s (3)")
    parser.add_argument("--capacity-requests", type=int, default=24, help="capacity: chats per trial (24; quick 10)")
    parser.add_argument("--capacity-start", type=float, default=0.5, help="capacity: first rate, chats/s (0.5)")
    parser.add_argument("--capacity-max", type=float, default=32.0, help="capacity: highest rate tried (32)")
    parser.add_argument("--capacity-steps", type=int, default=3, help="capacity: bisections (3; quick 1)")
    parser.add_argument(
        "--capacity-seconds", type=float, default=30.0, help="capacity: arrivals span at least this long (30; quick 10)"
    )


def search(name: str, trial: Trial, args: argparse.Namespace) -> Capacity:
    """The bounded doubling-then-bisection search of the highest rate whose p95 passes."""
    limit, trials = args.p95_limit, []
    fastest = [math.inf]  # the quickest reply seen: if even it is over the limit, no lower rate can pass

    def passes(rate: float) -> bool:
        run = trial(rate)
        p95, fastest[0] = run.percentile(95), min(fastest[0], *run.latencies_s)
        trials.append((rate, p95))
        print(f"  {name}: {rate:6.2f} chats/s -> p95 {p95:6.2f} s {'pass' if p95 <= limit else 'FAIL'}", flush=True)
        return p95 <= limit

    rate = args.capacity_start
    good, bad = (rate, math.inf) if passes(rate) else (0.0, rate)
    while good and bad == math.inf and good * 2 <= args.capacity_max:
        good, bad = (good * 2, bad) if passes(good * 2) else (good, good * 2)
    while not good and bad > args.capacity_start / 16 and fastest[0] <= limit:
        good, bad = (bad / 2, bad) if passes(bad / 2) else (0.0, bad / 2)
    for _ in range(args.capacity_steps if good and bad != math.inf else 0):
        middle = math.sqrt(good * bad)
        good, bad = (middle, bad) if passes(middle) else (good, middle)
    return Capacity(name, good, trials)


def workload_at(requests: list[list[Turn]], rate: float, args: argparse.Namespace) -> Workload:
    """The trial's chats: at least `--capacity-requests`, and enough for arrivals spanning `--capacity-seconds` (the
    chats repeat), so that a high rate is served in its steady state rather than as one short burst: 24 chats at
    32 chats/s all arrive within 0.75 s, and the engine answered them in 2.2 s, a burst it could not sustain."""
    count = max(len(requests), math.ceil(rate * args.capacity_seconds))
    chats = [requests[i % len(requests)] for i in range(count)]
    return draw_workload(chats, arrivals="poisson", rate=rate, mean=args.new_tokens, spread=0.0, seed=args.seed)


def seed_trial(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: list[list[Turn]], args: argparse.Namespace
) -> Trial:
    """The seed's way: greedy `generate`, one chat at a time in arrival order, the same reply length."""

    def serve_at(rate: float) -> Run:
        work = workload_at(requests, rate, args)

        def serve(i: int) -> int:
            input_ids = torch.tensor([prompt_ids(work.requests[i], tokenizer)])
            n = work.new_tokens[i]
            output = model.generate(  # type: ignore[operator]
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, min_new_tokens=n
            )
            tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
            return int(output.shape[1] - input_ids.shape[1])

        return one_at_a_time("seed notebook", serve, work)

    return serve_at


async def engine_capacity(
    directory: Path,
    precision: Precision,
    requests: list[list[Turn]],
    *,
    params: GenerationParams,
    args: argparse.Namespace,
) -> Capacity:
    """One engine in `precision`, started once, through every trial of the search."""
    config = EngineConfig.from_settings(  # the default batch size (ENGINE_MAX_BATCH_SIZE); no chat turned away
        Settings(_env_file=None, device="cpu"),  # type: ignore[call-arg]
        queue_size=100_000,
        timeout_s=3600.0,
        seed=0,
        params=params,
        precision=precision,
    )
    engine = Engine(config)
    await engine.start(ModelRef(str(directory), "gpt2-shape", 1))  # a version: auto's verdict and int8 are kept
    await engine.generate_response(requests[0], params=exact_length(params, 1))
    loop = asyncio.get_running_loop()
    name = f"Engine {engine.precision}" if engine.precision == precision else f"Engine {precision}->{engine.precision}"

    def serve_at(rate: float) -> Run:
        work = workload_at(requests, rate, args)
        return asyncio.run_coroutine_threadsafe(_serve(engine, work, params), loop).result()

    try:
        return await asyncio.to_thread(search, name, serve_at, args)
    finally:
        await engine.close()


async def _serve(engine: Engine, work: Workload, params: GenerationParams) -> Run:
    async def one(i: int) -> float:
        await asyncio.sleep(max(0.0, start + work.arrivals_s[i] - time.perf_counter()))
        await engine.generate_response(work.requests[i], params=exact_length(params, work.new_tokens[i]))
        return time.perf_counter() - start - work.arrivals_s[i]

    start = time.perf_counter()
    latencies, _ = await with_lag_watch(lambda: asyncio.gather(*(one(i) for i in range(len(work.requests)))))
    return Run("engine", time.perf_counter() - start, list(latencies), sum(work.new_tokens))


def report(results: list[Capacity], args: argparse.Namespace) -> None:
    seed = results[0].rate
    print(
        f"\ncapacity: highest Poisson arrival rate with p95 <= {args.p95_limit:g} s, {args.new_tokens}-token "
        f"replies, {args.capacity_requests} chats or {args.capacity_seconds:g} s of arrivals per trial, whichever is "
        f"more{' (quick)' if args.quick else ''}"
    )
    print(f"{'way':16} {'chats/s':>8} {'x seed':>7} {'chats/min':>10} trials (rate: p95 s)")
    for result in results:
        ratio = f"{result.rate / seed:6.1f}x" if seed else "    n/a"
        trials = ", ".join(f"{rate:.2f}: {p95:.1f}" for rate, p95 in result.trials)
        print(f"{result.name:16} {result.rate:>8.2f} {ratio} {result.rate * 60:>10.0f} {trials}")


def run(
    directory: Path,
    *,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[list[Turn]],
    params: GenerationParams,
    args: argparse.Namespace,
) -> list[Capacity]:
    """Every way's capacity, the seed's first (the float model is dropped by the caller before the engines)."""
    if args.quick:
        quick = {"capacity_steps": min(args.capacity_steps, 1), "capacity_seconds": min(args.capacity_seconds, 10)}
        args = argparse.Namespace(**{**vars(args), **quick})
        requests = requests[: min(len(requests), 10)]
    args = argparse.Namespace(**{**vars(args), "capacity_requests": len(requests)})
    params = replace(params, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    # in a thread that ends with it, so that no OpenMP team of the baseline outlives it (core/compute_threads.py)
    results = [run_in_own_thread(search, "seed notebook", seed_trial(model, tokenizer, requests, args), args)]
    for precision in args.precisions.split(","):
        results.append(asyncio.run(engine_capacity(directory, precision, requests, params=params, args=args)))  # type: ignore[arg-type]
    report(results, args)
    return results
