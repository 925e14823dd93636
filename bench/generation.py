"""Generation throughput: one `model.generate` after another (the seed notebook's way) vs the Engine's batching,
in every serving precision asked for (SERVE_PRECISION), side by side in one run.

Serves the same chat requests both ways in one process, on a GPT-2-small-shaped model (124M parameters, random
weights, 50257-token vocabulary) saved with `save_pretrained` and loaded through `core.engine.load_pretrained`.
Every request arrives at t=0 and gets exactly `--new-tokens` tokens (min_new_tokens = max_new_tokens), so both
ways do the same work; latency is the time from arrival to the finished reply.

The tokenizer is a byte-level BPE trained on the fly on the chatterbot English corpus (a few thousand tokens);
the model keeps GPT-2's 50257-row embedding so every step costs what real GPT-2 small costs. Ids the model samples
beyond the tokenizer's vocabulary decode to nothing, which does not matter for timing.

A second table serves one chat alone per precision (per-token time, what a lone user feels); the CPU's model and
its AVX2/AVX-512/AMX/bf16 flags are printed, since the ratios depend on them.

    python bench/generation.py [--requests 16] [--new-tokens 32] [--threads N] [--precisions fp32,int8]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import cast

import chatterbot_corpus
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from core.dialogue import BOT_SPEAKER, Turn, encode_dialogue, speaker_key
from core.engine import Engine, EngineConfig, GenerationParams, ModelRef, Precision, load_pretrained
from core.settings import Settings
from trainer.starter_model import save_model, train_tokenizer

PROMPT_TOKENS = 30
TICK_S = 0.005


@dataclass(frozen=True)
class Run:
    """What one way of serving measured."""

    name: str
    wall_s: float
    latencies_s: list[float]
    new_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s

    def percentile(self, q: int) -> float:
        return statistics.quantiles(self.latencies_s, n=100, method="inclusive")[q - 1]


def corpus_lines() -> list[list[str]]:
    """The chatterbot English conversations, one list of lines per conversation."""
    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    conversations: list[list[str]] = []
    for path in sorted(root.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        conversations += [[str(line) for line in talk] for talk in data.get("conversations", []) if len(talk) > 1]
    return conversations


def build_model(directory: Path) -> None:
    """GPT-2 small's shape with random weights, saved like a trained version (runs in a child process so the
    building's memory does not count towards the serving process's peak RSS)."""
    hf_logging.disable_progress_bar()
    conversations = corpus_lines()
    tokenizer = train_tokenizer([line for talk in conversations for line in talk], vocab_size=8000)
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
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


def serve_serially(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: list[list[Turn]], params: GenerationParams
) -> Run:
    """The seed notebook's way: one `generate` per message, in arrival order."""
    kwargs = sampling_kwargs(params)
    with torch.inference_mode():
        model.generate(torch.tensor([prompt_ids(requests[0], tokenizer)]), **kwargs)  # warm-up, not timed
        torch.manual_seed(0)
        latencies = []
        start = time.perf_counter()
        for turns in requests:
            input_ids = torch.tensor([prompt_ids(turns, tokenizer)])
            output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
            tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
            latencies.append(time.perf_counter() - start)
    wall = time.perf_counter() - start
    return Run("serial generate", wall, latencies, len(requests) * params.max_new_tokens)


async def serve_with_engine(
    directory: Path, requests: list[list[Turn]], params: GenerationParams, precision: Precision = "fp32"
) -> tuple[Run, float]:
    """All requests at once through the Engine; also returns the event loop's worst lateness in seconds."""
    config = EngineConfig.from_settings(
        Settings(_env_file=None, device="cpu"),  # type: ignore[call-arg]
        max_batch_size=len(requests),
        queue_size=len(requests),
        seed=0,
        params=params,
        precision=precision,
    )
    engine = Engine(config)
    await engine.start(ModelRef(str(directory), "gpt2-shape"))
    served = engine.precision
    worst_lag = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst_lag
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(TICK_S)
            worst_lag = max(worst_lag, time.perf_counter() - before - TICK_S)

    async def one(turns: list[Turn]) -> float:
        await engine.generate_response(turns)
        return time.perf_counter() - start

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(TICK_S)
    start = time.perf_counter()
    latencies = await asyncio.gather(*(one(turns) for turns in requests))
    wall = time.perf_counter() - start
    done.set()
    await ticking
    await engine.close()
    name = f"Engine {served}" if served == precision else f"Engine {precision}->{served}"
    return Run(name, wall, list(latencies), len(requests) * params.max_new_tokens), worst_lag


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


def report(serial: Run, engines: list[Run], alone: list[Run], lag_s: float, requests: int) -> None:
    print(
        f"\n{requests} concurrent chats, {serial.new_tokens // requests} new tokens each, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs\n{cpu_description()}"
    )
    print(f"{'':16} {serial.name:>16}" + "".join(f" {run.name:>16} {'vs serial':>9}" for run in engines))
    metrics: list[tuple[str, Callable[[Run], float], bool]] = [  # (label, value, higher is better)
        ("tokens/s", attrgetter("tokens_per_s"), True),
        ("p50 latency (s)", partial(Run.percentile, q=50), False),
        ("p95 latency (s)", partial(Run.percentile, q=95), False),
    ]
    for label, value, higher_is_better in metrics:
        cells = ""
        for run in engines:
            ratio = value(run) / value(serial) if higher_is_better else value(serial) / value(run)
            cells += f" {value(run):>16.2f} {ratio:>8.1f}x"
        print(f"{label:16} {value(serial):>16.2f}{cells}")
    print("\none chat alone through the engine:")
    for run in alone:
        per_token = run.wall_s / run.new_tokens * 1000
        print(f"{run.name:16} {per_token:>7.1f} ms/token {alone[0].wall_s / run.wall_s:>6.2f}x vs {alone[0].name}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nevent loop worst lag during the engine runs: {lag_s * 1000:.1f} ms (target < 20 ms)")
    print(f"peak RSS of this process: {peak_mb:.0f} MB (target <= 1300 MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16, help="concurrent chats (default 16)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per reply (default 32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--precisions", default="fp32,int8", help="SERVE_PRECISION values to compare, first = reference (fp32,int8)"
    )
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = GenerationParams.from_settings(
        Settings(_env_file=None),  # type: ignore[call-arg]
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
    )
    with tempfile.TemporaryDirectory(prefix="magpie-bench-") as tmp:
        directory = Path(tmp)
        builder = multiprocessing.get_context("spawn").Process(target=build_model, args=(directory,))
        builder.start()
        builder.join()
        if builder.exitcode != 0:
            raise SystemExit("building the benchmark model failed")
        model, tokenizer = load_pretrained(str(directory), "cpu")
        requests = chats(args.requests, tokenizer)
        lengths = [len(prompt_ids(turns, tokenizer)) for turns in requests]
        print(f"model: GPT2Config() (124M, random weights), prompts of {min(lengths)}-{max(lengths)} tokens")
        serial = serve_serially(model, tokenizer, requests, params)
        del model
        gc.collect()
        engines, alone, lag = [], [], 0.0
        for precision in cast("list[Precision]", args.precisions.split(",")):
            batched, worst = asyncio.run(serve_with_engine(directory, requests, params, precision))
            single, _ = asyncio.run(serve_with_engine(directory, requests[:1], params, precision))
            engines.append(batched)
            alone.append(single)
            lag = max(lag, worst)
    report(serial, engines, alone, lag, args.requests)


if __name__ == "__main__":
    main()
