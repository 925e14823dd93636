"""Community voices in one batch: 16 chats from 4 communities (4 LoRA adapters) against 16 chats on one voice,
side by side in one run, and the memory each loaded adapter adds.

    python bench/voices.py [--chats 16] [--voices 4] [--rank 8] [--targets c_attn,c_proj] [--new-tokens 32]
        [--precisions fp32,int8] [--repeats 3] [--threads N] [--shape gpt2|tiny]
    python bench/voices.py --quick        # the tiny shape, 8 chats, one repeat: checks the script in seconds

Every row serves the same chats (all submitted at t=0, drawn reply lengths forced with `min_new_tokens`) through
`core.serving.engine.Engine` with `max_batch_size = --chats`, so every chat decodes in one batch:

- **base**: no voice (the model alone), the reference of what the adapters cost at all;
- **one voice**: every chat speaks with the same adapter;
- **N voices**: chat i speaks with adapter i mod N (rows of N communities share every decoding step).

The issue's target: N voices reach >= 80% of one voice's throughput (new tokens per second of wall time). Each row
is run `--repeats` times, interleaved (base, one, N, base, one, N, ...) so that load from other work on the machine
falls on every row alike, and the median is reported; the first run of all is an untimed warm-up. Besides tokens
per second of wall time, tokens per CPU-second of this process (`time.process_time`) are reported: on a machine
shared with other work that figure moves far less, and with `--threads 1` it is what a quiet core would give.

Memory: the resident set (VmRSS) before and after loading the adapters, divided by their number, next to the bytes
of their matrices (A and scaled B in fp32, what `load_voice` keeps), and after serving the mixed batch (which adds
the joined matrices of the voices in the batch and the KV cache).

The model is GPT-2 small's shape with random weights (as in bench/generation.py); the adapters are peft LoRA
adapters on it (LORA_RANK / LORA_TARGETS defaults: rank 8 on c_attn and c_proj) with random non-zero B, saved with
`save_pretrained`: their values do not matter for speed, their shapes do.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from generation import build_in_child, chats, cpu_description, draw_workload, exact_length  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from serving_memory import current_mb  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from core.serving.dialogue import Turn  # noqa: E402
from core.serving.engine import Engine, EngineConfig, GenerationParams, ModelRef  # noqa: E402
from core.settings import Settings  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One way of assigning voices to the chats: `voices[i]` is chat i's voice (None: the model alone)."""

    name: str
    voices: list[str | None]


def build_adapters(directory: Path, count: int, rank: int, targets: list[str]) -> list[Path]:
    """`count` peft LoRA adapters on the model in `directory`, random (B non-zero), saved with save_pretrained."""
    paths = []
    for index in range(count):
        torch.manual_seed(100 + index)
        model = AutoModelForCausalLM.from_pretrained(directory)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, fan_in_fan_out=True)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.02)
        path = directory.parent / f"adapter-{index}"
        peft_model.save_pretrained(str(path))
        paths.append(path)
    return paths


async def serve_rows(
    directory: Path, adapters: list[Path], rows: list[Row], args: argparse.Namespace, precision: str
) -> tuple[str, dict[str, list[tuple[float, float]]], dict[str, float]]:
    """Tokens per second (wall, CPU) of every row, `--repeats` times interleaved, and the memory figures (MiB)."""
    settings = Settings(_env_file=None, device="cpu")  # type: ignore[call-arg]
    params = GenerationParams.from_settings(settings)
    count = len(rows[0].voices)
    config = EngineConfig.from_settings(
        settings, precision=precision, params=params, max_batch_size=count, queue_size=count, timeout_s=3600.0
    )
    engine = Engine(config)
    await engine.start(ModelRef(str(directory), "gpt2-shape"))
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    requests = chats(count, tokenizer)
    work = draw_workload(requests, arrivals="burst", rate=1.0, mean=args.new_tokens, spread=0.5, seed=0)
    gc.collect()
    memory = {"before": current_mb()}
    for index, path in enumerate(adapters):
        await engine.load_voice(f"community-{index}", path)
    gc.collect()
    memory["loaded"] = current_mb()
    memory["matrices"] = engine.stats().voice_bytes / 2**20
    await run_once(engine, requests, work.new_tokens, rows[-1].voices, params)  # warm-up
    rates: dict[str, list[tuple[float, float]]] = {row.name: [] for row in rows}
    for _ in range(args.repeats):
        for row in rows:
            rates[row.name].append(await run_once(engine, requests, work.new_tokens, row.voices, params))
    memory["served"] = current_mb()
    served = engine.precision or "?"
    await engine.close()
    return served, rates, memory


async def run_once(
    engine: Engine, requests: list[list[Turn]], lengths: list[int], voices: list[str | None], params: GenerationParams
) -> tuple[float, float]:
    """New tokens per second of wall time and per CPU-second, for all chats submitted at once, each in its voice."""
    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(
        *(
            engine.generate_response(turns, params=exact_length(params, length), voice=voice)
            for turns, length, voice in zip(requests, lengths, voices, strict=True)
        )
    )
    return sum(lengths) / (time.perf_counter() - start), sum(lengths) / (time.process_time() - cpu)


def report(
    precision: str, rates: dict[str, list[tuple[float, float]]], memory: dict[str, float], args: argparse.Namespace
) -> None:
    wall = {name: statistics.median(w for w, _ in values) for name, values in rates.items()}
    cpu = {name: statistics.median(c for _, c in values) for name, values in rates.items()}
    print(f"\n{precision}: {args.chats} chats at once, ~{args.new_tokens} new tokens each, median of {args.repeats}")
    print(f"{'row':12} {'tokens/s':>9} {'x one':>6} {'tok/CPU-s':>10} {'x one':>6}   runs (wall tokens/s)")
    for name, value in wall.items():
        runs = " ".join(f"{w:.1f}" for w, _ in rates[name])
        print(
            f"{name:12} {value:>9.1f} {value / wall['one voice']:>5.2f}x {cpu[name]:>10.1f} "
            f"{cpu[name] / cpu['one voice']:>5.2f}x   {runs}"
        )
    mixed = f"{args.voices} voices"
    for label, table in (("wall", wall), ("CPU", cpu)):
        ratio = table[mixed] / table["one voice"]
        verdict = "meets" if ratio >= 0.8 else "misses"
        print(f"{mixed} reach {ratio:.0%} of one voice's throughput by {label} time ({verdict} the >= 80% target)")
    per = (memory["loaded"] - memory["before"]) / args.voices
    print(
        f"memory: RSS {memory['before']:.0f} MiB -> {memory['loaded']:.0f} MiB with {args.voices} adapters loaded "
        f"({per:.1f} MiB each; their matrices {memory['matrices'] / args.voices:.1f} MiB each) -> "
        f"{memory['served']:.0f} MiB after serving"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chats", type=int, default=16)
    parser.add_argument("--voices", type=int, default=4, help="communities in the mixed batch (default 4)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (LORA_RANK's default: 8)")
    parser.add_argument("--targets", default="c_attn,c_proj", help="LORA_TARGETS (default c_attn,c_proj)")
    parser.add_argument("--new-tokens", type=int, default=32, help="mean new tokens per reply (default 32)")
    parser.add_argument("--precisions", default="fp32,int8", help="SERVE_PRECISION values (default fp32,int8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--shape", choices=("gpt2", "tiny"), default="gpt2")
    parser.add_argument("--quick", action="store_true", help="tiny shape, 8 chats, 1 repeat, fp32 (seconds)")
    args = parser.parse_args()
    if args.quick:
        args.shape, args.chats, args.repeats, args.precisions, args.new_tokens = "tiny", 8, 1, "fp32", 8
    if args.chats < args.voices or args.voices < 1 or args.repeats < 1:
        parser.error("need 1 <= --voices <= --chats and --repeats >= 1")
    return args


def main() -> None:
    args = parse_args()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{cpu_description()}\n{torch.get_num_threads()} torch threads; model: {args.shape} shape, random weights")
    print(f"adapters: rank {args.rank} on {args.targets}")
    rows = [
        Row("base", [None] * args.chats),
        Row("one voice", ["community-0"] * args.chats),
        Row(f"{args.voices} voices", [f"community-{i % args.voices}" for i in range(args.chats)]),
    ]
    with tempfile.TemporaryDirectory(prefix="magpie-voices-") as tmp:
        directory = Path(tmp) / "model"
        build_in_child(directory, args.shape)
        adapters = build_adapters(directory, args.voices, args.rank, args.targets.split(","))
        for precision in args.precisions.split(","):
            served, rates, memory = asyncio.run(serve_rows(directory, adapters, rows, args, precision))
            report(served, rates, memory, args)


if __name__ == "__main__":
    main()
