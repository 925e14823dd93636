"""Generation speed: the seed notebook's way, one `generate` at a time with Magpie's prompts, and the Engine in every
serving precision asked for (SERVE_PRECISION), side by side in one run, under the same arrivals.

    python bench/generation.py [--arrivals burst|poisson] [--rate 8] [--requests 16] [--new-tokens 32]
        [--length-spread 0.5] [--precisions fp32,int8] [--threads N] [--shape gpt2|tiny] [--seed 0]

    python bench/generation.py --arrivals poisson --rate 8 --requests 16     # the issue's "16 chats over ~2 s"
    python bench/generation.py --shape tiny --requests 4 --new-tokens 8     # a smoke run, seconds
    python bench/generation.py --capacity [--quick]    # each way's highest rate with p95 <= 3 s (bench/capacity.py)

The rows of the table, every one serving the same chats at the same arrival times:

- **seed notebook** (the baseline, every ratio is against it): the prompt is the chat rendered as plain text
  (`format_dialogue`) and tokenized whole with `GPT2Tokenizer.encode` (special-token strings in the text are read
  as tokens, as the notebook did), then greedy `model.generate(input_ids, max_length=50)` (50 counts the prompt, so
  a 30-token prompt gets about 20 new tokens, fewer if it stops at EOS), and the whole output, prompt included, is
  decoded. One request at a time, in arrival order. It ignores the drawn reply lengths: that is what it did.
- **Magpie serial**: Magpie's prompt ids (`encode_dialogue`) and sampling settings, the drawn reply length, one
  `generate` at a time in arrival order (what the Engine would cost without batching).
- **Engine <precision>**: `core.serving.engine.Engine` (up to `--requests` rows, the default ENGINE_BATCH_WAIT_MS) with
one   asyncio caller per chat, each submitting at its arrival time with its drawn reply length (`min_new_tokens =
  max_new_tokens`, so every way does the work it was asked). The engine batches at every decoding step: a chat
  that arrives joins the running rows at the next step and a finished reply leaves at once.

Arrivals (`--arrivals`): `burst` = every chat at t=0; `poisson` = exponential gaps at `--rate` chats per second,
the first at t=0. Reply lengths: uniform integers in `new_tokens * (1 +- length_spread)`. Arrivals and lengths are
drawn once from `random.Random(--seed)` and used by every row. Latency is arrival to finished reply; throughput is
chats (and new tokens) per second of wall time from the first arrival to the last reply. Time to first token is
"n/a": every way here delivers the reply whole (the Engine exposes no tokens before the reply), so a user sees
the first token when the latency is over.

The model is GPT-2 small's shape (`--shape gpt2`: 124M parameters, random weights, 50257-token vocabulary) or a
2-layer, 64-wide one (`--shape tiny`, for checking the script in seconds), saved with `save_pretrained` and loaded
through `core.serving.engine.load_pretrained`. The tokenizer is a byte-level BPE trained on the fly on the chatterbot
English corpus (8000 tokens); ids the model picks beyond it decode to nothing, which does not matter for timing.

A second table serves one chat alone (per-token time, what a lone user feels): fp32 `model.generate` first, the
reference of the ratios, then the engine in each precision; the CPU's model and its AVX2/AVX-512/AMX/bf16 flags
are printed, since the ratios depend on them.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from itertools import accumulate
from pathlib import Path
from typing import Any, cast

import chatterbot_corpus
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from core.compute_threads import run_in_own_thread
from core.serving.dialogue import BOT_SPEAKER, Turn, encode_dialogue, format_dialogue, speaker_key
from core.serving.engine import Engine, EngineConfig, GenerationParams, ModelRef, Precision, load_pretrained
from core.settings import Settings
from trainer.starter_model import save_model, train_tokenizer

PROMPT_TOKENS = 30
SEED_MAX_LENGTH = 50  # the notebook's generate(max_length=50), prompt included
TICK_S = 0.005
SHAPES: dict[str, dict[str, Any]] = {"gpt2": {}, "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2}}


@dataclass(frozen=True)
class Workload:
    """What every way serves: the chats, when each arrives (seconds after the first) and how long its reply is."""

    requests: list[list[Turn]]
    arrivals_s: list[float]
    new_tokens: list[int]


@dataclass(frozen=True)
class Run:
    """What one way of serving measured."""

    name: str
    wall_s: float
    latencies_s: list[float]
    new_tokens: int

    @property
    def chats_per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s

    @property
    def tokens_per_reply(self) -> float:
        return self.new_tokens / len(self.latencies_s)

    def percentile(self, q: int) -> float:
        if len(self.latencies_s) < 2:
            return self.latencies_s[0]
        return statistics.quantiles(self.latencies_s, n=100, method="inclusive")[q - 1]


def draw_workload(
    requests: list[list[Turn]], *, arrivals: str, rate: float, mean: int, spread: float, seed: int
) -> Workload:
    """Arrival times and reply lengths, drawn once (seeded) so every way of serving gets the same ones."""
    rng = random.Random(seed)
    gaps = [0.0] + [rng.expovariate(rate) for _ in requests[1:]] if arrivals == "poisson" else [0.0] * len(requests)
    low, high = max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))
    return Workload(requests, list(accumulate(gaps)), [rng.randint(low, high) for _ in requests])


def corpus_lines() -> list[list[str]]:
    """The chatterbot English conversations, one list of lines per conversation."""
    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    conversations: list[list[str]] = []
    for path in sorted(root.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        conversations += [[str(line) for line in talk] for talk in data.get("conversations", []) if len(talk) > 1]
    return conversations


def build_model(directory: Path, shape: str) -> None:
    """A GPT-2-shaped model with random weights, saved like a trained version (runs in a child process so the
    building's memory does not count towards the serving process's peak RSS)."""
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    conversations = corpus_lines()
    tokenizer = train_tokenizer([line for talk in conversations for line in talk], vocab_size=8000)
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **SHAPES[shape]))
    save_model(model, tokenizer, directory)


def chats(count: int, tokenizer: PreTrainedTokenizerBase) -> list[list[Turn]]:
    """`count` chats from the corpus that end with a user's line, each with about PROMPT_TOKENS prompt tokens."""
    result: list[list[Turn]] = []
    for talk in corpus_lines():
        turns = [Turn(speaker_key(1, bot=i % 2 == 1), line) for i, line in enumerate(talk)]
        for end in range(1, len(turns) + 1, 2):
            if abs(len(prompt_ids(turns[:end], tokenizer)) - PROMPT_TOKENS) <= 5:
                result.append(turns[:end])
                break
        if len(result) == count:
            return result
    raise RuntimeError("the corpus ran out of chats")


def prompt_ids(turns: list[Turn], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return encode_dialogue(turns, tokenizer, responder=BOT_SPEAKER).ids


def sampling_kwargs(params: GenerationParams) -> dict[str, object]:
    return {
        "max_new_tokens": params.max_new_tokens,
        "min_new_tokens": params.min_new_tokens,
        "do_sample": True,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "repetition_penalty": params.repetition_penalty,
    }


def exact_length(params: GenerationParams, new_tokens: int) -> GenerationParams:
    return replace(params, max_new_tokens=new_tokens, min_new_tokens=new_tokens)


def one_at_a_time(name: str, serve: Callable[[int], int], work: Workload) -> Run:
    """Serves request i with `serve(i)` (which returns the new tokens it made) in arrival order, one at a time,
    waiting for a request that has not arrived yet; request 0 is served once first as an untimed warm-up."""
    with torch.inference_mode():
        serve(0)
        torch.manual_seed(0)
        latencies, tokens = [], 0
        start = time.perf_counter()
        for i, arrival in enumerate(work.arrivals_s):
            if (wait := arrival - (time.perf_counter() - start)) > 0:
                time.sleep(wait)
            tokens += serve(i)
            latencies.append(time.perf_counter() - start - arrival)
    return Run(name, time.perf_counter() - start, latencies, tokens)


def serve_like_seed(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, work: Workload) -> Run:
    """The seed notebook's way: plain text tokenized whole, greedy `generate(max_length=50)`, decode everything."""
    if model.generation_config.do_sample:
        raise RuntimeError("the seed's generate() was greedy; this model's generation config samples")
    texts = [format_dialogue(turns, eos=tokenizer.eos_token) for turns in work.requests]

    def serve(i: int) -> int:
        input_ids = tokenizer.encode(texts[i], return_tensors="pt")
        output = model.generate(input_ids, max_length=SEED_MAX_LENGTH)  # type: ignore[operator]
        tokenizer.decode(output[0], skip_special_tokens=True)
        return int(output.shape[1] - input_ids.shape[1])

    return one_at_a_time("seed notebook", serve, work)


def serve_serially(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, work: Workload, params: GenerationParams
) -> Run:
    """Magpie's prompts and sampling with the drawn reply lengths, but one `generate` per message."""

    def serve(i: int) -> int:
        input_ids = torch.tensor([prompt_ids(work.requests[i], tokenizer)])
        kwargs = sampling_kwargs(exact_length(params, work.new_tokens[i]))
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)  # type: ignore[operator]
        tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
        return int(output.shape[1] - input_ids.shape[1])

    return one_at_a_time("Magpie serial", serve, work)


async def serve_with_engine(
    directory: Path, work: Workload, params: GenerationParams, precision: Precision = "fp32"
) -> tuple[Run, float]:
    """Each request submitted at its arrival time through the Engine; also returns the event loop's worst lateness
    in seconds."""
    config = EngineConfig.from_settings(
        Settings(_env_file=None, device="cpu"),  # type: ignore[call-arg]
        max_batch_size=len(work.requests),
        queue_size=len(work.requests),
        timeout_s=3600.0,
        seed=0,
        params=params,
        precision=precision,
    )
    engine = Engine(config)
    await engine.start(ModelRef(str(directory), "gpt2-shape"))
    served = engine.precision
    await engine.generate_response(work.requests[0], params=exact_length(params, 1))  # warm-up, as the others have

    async def one(i: int) -> float:
        await asyncio.sleep(max(0.0, start + work.arrivals_s[i] - time.perf_counter()))
        await engine.generate_response(work.requests[i], params=exact_length(params, work.new_tokens[i]))
        return time.perf_counter() - start - work.arrivals_s[i]

    start = time.perf_counter()
    latencies, worst_lag = await with_lag_watch(lambda: asyncio.gather(*(one(i) for i in range(len(work.requests)))))
    wall = time.perf_counter() - start
    await engine.close()
    name = f"Engine {served}" if served == precision else f"Engine {precision}->{served}"
    return Run(name, wall, list(latencies), sum(work.new_tokens)), worst_lag


async def with_lag_watch(work: Callable[[], Awaitable[list[float]]]) -> tuple[list[float], float]:
    """Runs `work` while a coroutine sleeping TICK_S in a loop records how late it wakes (the event loop's lag)."""
    worst_lag = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst_lag
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(TICK_S)
            worst_lag = max(worst_lag, time.perf_counter() - before - TICK_S)

    ticking = asyncio.create_task(ticker())
    try:
        result = await work()
    finally:
        done.set()
        await ticking
    return result, worst_lag


def cpu_description() -> str:
    """The CPU's model name and the flags that decide which precision is fast (Linux; elsewhere 'unknown')."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in info.splitlines()[:40] if ":" in line)
    model = fields.get("model name\t", "unknown").strip()
    flags = set(fields.get("flags\t\t", "").split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    return f"{model}; flags: {' '.join(f for f in wanted if f in flags) or 'none of ' + ', '.join(wanted)}"


def report(runs: list[Run], alone: list[Run], lag_s: float, work: Workload, arrivals: str) -> None:
    """One table, a row per way of serving, each ratio against the first row (the seed notebook's way)."""
    seed = runs[0]
    span = f"over {work.arrivals_s[-1]:.1f} s (Poisson)" if arrivals == "poisson" else "all at t=0"
    print(
        f"\n{len(work.requests)} chats arriving {span}, drawn reply lengths {min(work.new_tokens)}-"
        f"{max(work.new_tokens)} tokens (mean {statistics.mean(work.new_tokens):.1f}), "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs\n{cpu_description()}"
    )
    print(
        f"{'way':16} {'tok/reply':>9} {'chats/s':>8} {'x seed':>7} {'tokens/s':>9} {'x seed':>7}"
        + "".join(f" {f'p{q} lat s':>10} {'x lower':>7}" for q in (50, 95, 99))
        + f" {'TTFT':>5}"
    )
    for run in runs:
        cells = "".join(
            f" {run.percentile(q):>10.2f} {seed.percentile(q) / run.percentile(q):>6.1f}x" for q in (50, 95, 99)
        )
        print(
            f"{run.name:16} {run.tokens_per_reply:>9.1f} {run.chats_per_s:>8.2f}"
            f" {run.chats_per_s / seed.chats_per_s:>6.1f}x {run.tokens_per_s:>9.1f}"
            f" {run.tokens_per_s / seed.tokens_per_s:>6.1f}x{cells} {'n/a':>5}"
        )
    print(
        "TTFT (time to first token) n/a: every way delivers the reply whole, so the first token reaches the user "
        "with the last.\nseed notebook: generate(max_length=50) counts the prompt, so its replies are 50 minus the "
        "prompt's tokens\n(fewer at EOS), whatever was drawn; the other rows make exactly the drawn lengths."
    )
    print("\none chat alone: transformers' fp32 `generate`, then the engine in each precision:")
    for run in alone:
        per_token = run.wall_s / run.new_tokens * 1000
        print(f"{run.name:16} {per_token:>7.1f} ms/token {alone[0].wall_s / run.wall_s:>6.2f}x vs {alone[0].name}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nevent loop worst lag during the engine runs: {lag_s * 1000:.1f} ms (target < 20 ms)")
    print(
        f"peak RSS of this process: {peak_mb:.0f} MB (it holds every way's model in turn; what one serving process"
        " holds, per precision: bench/serving_memory.py)"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16, help="chats (default 16)")
    parser.add_argument("--arrivals", choices=("burst", "poisson"), default="burst", help="default burst (t=0)")
    parser.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals per second (default 8)")
    parser.add_argument("--new-tokens", type=int, default=32, help="mean new tokens per reply (default 32)")
    parser.add_argument("--length-spread", type=float, default=0.5, help="lengths in mean*(1+-spread) (0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival and length draws (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="gpt2", help="gpt2 (124M) or tiny (a smoke run)")
    parser.add_argument(
        "--precisions", default="fp32,int8", help="SERVE_PRECISION values to compare, first = reference (fp32,int8)"
    )
    import capacity  # here, not at the top: bench/capacity.py imports this module

    capacity.add_arguments(parser)
    args = parser.parse_args()
    if args.requests < 1 or args.new_tokens < 1 or args.rate <= 0 or not 0 <= args.length_spread < 1:
        parser.error("need --requests, --new-tokens >= 1, --rate > 0 and 0 <= --length-spread < 1")
    return args


def build_in_child(directory: Path, shape: str) -> None:
    builder = multiprocessing.get_context("spawn").Process(target=build_model, args=(directory, shape))
    builder.start()
    builder.join()
    if builder.exitcode != 0:
        raise SystemExit("building the benchmark model failed")


def main() -> None:
    args = parse_args()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if args.threads:
        torch.set_num_threads(args.threads)
    params = GenerationParams.from_settings(Settings(_env_file=None))  # type: ignore[call-arg]
    with tempfile.TemporaryDirectory(prefix="magpie-bench-") as tmp:
        directory = Path(tmp)
        build_in_child(directory, args.shape)
        # Every torch call of this (main) thread goes through a thread that ends with it: a thread that lives on keeps
        # its OpenMP team, and a second team slows the engine's steps (core/compute_threads.py).
        model, tokenizer = run_in_own_thread(load_pretrained, str(directory), "cpu")
        if args.capacity:
            print(f"{cpu_description()}\n{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")
            import capacity  # here, not at the top: bench/capacity.py imports this module

            requests = chats(args.capacity_requests, tokenizer)
            capacity.run(directory, model=model, tokenizer=tokenizer, requests=requests, params=params, args=args)
            return
        requests = chats(args.requests, tokenizer)
        work = draw_workload(
            requests,
            arrivals=args.arrivals,
            rate=args.rate,
            mean=args.new_tokens,
            spread=args.length_spread,
            seed=args.seed,
        )
        lengths = [len(prompt_ids(turns, tokenizer)) for turns in requests]
        print(f"model: {args.shape} shape, random weights, prompts of {min(lengths)}-{max(lengths)} tokens")
        runs = [run_in_own_thread(serve_like_seed, model, GPT2Tokenizer.from_pretrained(str(directory)), work)]
        runs.append(run_in_own_thread(serve_serially, model, tokenizer, work, params))
        lone = Workload(requests[:1], [0.0], [args.new_tokens])
        alone = [replace(run_in_own_thread(serve_serially, model, tokenizer, lone, params), name="fp32 generate")]
        del model
        gc.collect()
        lag = 0.0
        for precision in cast("list[Precision]", args.precisions.split(",")):
            batched, worst = asyncio.run(serve_with_engine(directory, work, params, precision))
            runs.append(batched)
            alone.append(asyncio.run(serve_with_engine(directory, lone, params, precision))[0])
            lag = max(lag, worst)
    report(runs, alone, lag, work, args.arrivals)


if __name__ == "__main__":
    main()
