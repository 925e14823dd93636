"""Community voices: a full fine-tune against LoRA adapters of a few ranks, on the same data, side by side in one run.

    python bench/training.py --method full,lora [--ranks 4,8,16,32] [--epochs 3] [--threads 1] [--base-minutes 5]
    python bench/training.py --method full,lora --quick      # a smaller starter shape, 2 communities, ~2 minutes

The base is the offline starter (`trainer.bootstrap.train_starter`, its shape and recipe, fitted into
`--base-minutes`) trained on every chatterbot-corpus dialogue except the communities' categories. Each community is
one English category (coding, trivia, emotion, ai: from the largest down), its dialogues split by conversation
(TRAIN_EVAL_FRACTION held out). Every run goes through the retraining path itself (`trainer.train.train` with
`TrainArguments.from_settings`: packing, batch size and epochs as configured, `method` full or lora) from the same
base on the same samples; only the method, its learning rate (TRAIN_LEARNING_RATE for full, LORA_LEARNING_RATE
for lora, as the settings pair them) and the rank change. Alpha is 2 x rank for every rank (LORA_ALPHA's default
16 at rank 8), so the update's scale stays the same across ranks.

Reported per community and run: the held-out loss the gate would see (`mean_loss`, per sample) and its ratio to the
full fine-tune's (the best of `--full-lrs` when several are tried), the training speed and its ratio to the full
fine-tune's, and the size of what a version stores. Speed is tokens trained (epochs counted) per second of the HF
Trainer's `train()`, both per second of wall time and per CPU-second of this process (`time.process_time`, read
around `Trainer.train`): on a machine shared with other work the CPU figure moves far less, and with the default
one thread (TRAIN_THREADS) it is what a quiet core would give. Targets (issue #20): an adapter within 5% of
the full fine-tune's held-out loss, trained at >= 1.5x its tokens/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from core.settings import Settings
from trainer.bootstrap import starter_arguments, train_starter
from trainer.corpus import Dialogue, load_dialogues
from trainer.dataset import samples_from_dialogues, split_by_conversation
from trainer.starter_budget import TimeBudget
from trainer.starter_model import ModelShape
from trainer.train import TrainArguments, evaluate_loss, train

COMMUNITIES = ("english/coding", "english/trivia", "english/emotion", "english/ai")
QUICK_SHAPE = ModelShape(n_layer=2, n_embd=128, n_head=2, n_positions=256, vocab_size=4000)


@dataclass(frozen=True)
class Variant:
    """One way of training a voice: `full`, or `lora` at `rank`; at `learning_rate` (None: TRAIN_LEARNING_RATE for
    full, LORA_LEARNING_RATE for lora)."""

    method: str
    rank: int = 0
    learning_rate: float | None = None

    @property
    def name(self) -> str:
        name = f"lora r={self.rank}" if self.method == "lora" else "full"
        return name if self.learning_rate is None else f"{name} lr={self.learning_rate:g}"


@dataclass(frozen=True)
class Result:
    community: str
    variant: Variant
    eval_loss: float
    tokens_per_s: float
    tokens_per_cpu_s: float
    stored_mb: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the method comparison (`bench/training.py --method ...`)."""
    parser.add_argument("--ranks", default="4,8,16,32", help="LoRA ranks to try (default 4,8,16,32)")
    parser.add_argument("--full-lrs", default="", help="full fine-tune learning rates (default TRAIN_LEARNING_RATE)")
    parser.add_argument("--lora-lrs", default="", help="adapter learning rates (default LORA_LEARNING_RATE)")
    parser.add_argument("--epochs", type=float, default=None, help="epochs per voice run (default TRAIN_EPOCHS)")
    parser.add_argument("--base-minutes", type=float, default=5.0, help="the starter base's time budget (5)")
    parser.add_argument("--base-steps", type=int, default=None, help="train the base this many steps instead")
    parser.add_argument("--communities", default=",".join(COMMUNITIES), help="corpus categories as communities")
    parser.add_argument("--quick", action="store_true", help="smaller starter shape, 2 communities, ranks 8,16")


def run(options: argparse.Namespace) -> int:
    """Builds the base, trains every community with every variant, prints the table."""
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    communities = options.communities.split(",")[: 2 if options.quick else None]
    ranks = [8, 16] if options.quick else [int(r) for r in options.ranks.split(",")]
    methods = options.method.split(",")
    full = [Variant("full", learning_rate=float(lr)) for lr in options.full_lrs.split(",") if lr] or [Variant("full")]
    lora_lrs = [float(lr) for lr in options.lora_lrs.split(",") if lr] or [None]
    lora = [Variant("lora", rank, lr) for rank in ranks for lr in lora_lrs]
    variants = full * ("full" in methods) + lora * ("lora" in methods)
    dialogues = load_dialogues()
    print(f"{torch.get_num_threads()} torch threads for the base; {options.threads} for each voice run")
    with tempfile.TemporaryDirectory(prefix="magpie-voice-methods-") as name:
        tmp = Path(name)
        base = build_base([d for d in dialogues if category(d) not in communities], tmp / "base", options)
        results = []
        for community in communities:
            chosen = [d for d in dialogues if category(d) == community]
            results += train_community(settings, base, chosen, options, variants=variants, community=community, tmp=tmp)
    report(results, variants)
    return 0


def category(dialogue: Dialogue) -> str:
    return dialogue.key.split("#", 1)[0]


def build_base(dialogues: list[Dialogue], directory: Path, options: argparse.Namespace) -> Path:
    """The offline starter's recipe on the shared dialogues, within `--base-minutes`."""
    settings = Settings(_env_file=None, device="cpu")  # type: ignore[call-arg]
    samples = samples_from_dialogues(dialogues, history_turns=settings.history_turns)
    train_samples, eval_samples = split_by_conversation(samples, settings.train_eval_fraction)
    shape = QUICK_SHAPE if options.quick else ModelShape()
    minutes = 1.0 if options.quick else options.base_minutes
    arguments = starter_arguments(settings)
    if options.base_steps:  # a base that does not depend on how busy the machine is
        arguments = replace(arguments, max_steps=options.base_steps, select_on_eval=False)
    budget = None if options.base_steps else TimeBudget(minutes * 60)
    result = train_starter(
        train_samples, eval_samples, directory, shape=shape, arguments=arguments, budget=budget
    )  # fmt: skip
    print(
        f"base: starter shape {shape.n_layer}x{shape.n_embd}, {len(dialogues)} shared dialogues, "
        f"{result.metrics['steps']} steps in {result.metrics['timings']['train_s']:.0f} s, "
        f"held-out loss {result.metrics['eval_loss']:.3f}"
    )
    return directory


def train_community(
    settings: Settings,
    base: Path,
    dialogues: list[Dialogue],
    options: argparse.Namespace,
    *,
    variants: list[Variant],
    community: str,
    tmp: Path,
) -> list[Result]:
    """Every variant on the community's samples, from the same base; prints the base's own held-out loss first."""
    samples = samples_from_dialogues(dialogues, history_turns=settings.history_turns)
    train_samples, held_out = split_by_conversation(samples, settings.train_eval_fraction)
    before = evaluate_loss(base, held_out, max_length=512, response_only=False, batch_size=8)
    print(f"{community}: {len(train_samples)} train / {len(held_out)} held-out samples, base loss {before:.3f}")
    results = []
    for variant in variants:
        args = TrainArguments.from_settings(settings, **overrides(variant, options))
        output = tmp / f"{community.replace('/', '-')}-{variant.name.replace(' ', '')}"
        with trainer_cpu_seconds() as cpu:
            metrics = train(args, train_samples, held_out, model_source=str(base), output_dir=output).metrics
        trained = metrics["train_tokens"] * metrics["epochs_run"]
        stored = sum(p.stat().st_size for p in output.rglob("*.safetensors")) / 2**20
        result = Result(
            community, variant, metrics["eval_loss"], trained / metrics["timings"]["train_s"], trained / cpu[0], stored
        )
        print(
            f"  {variant.name:18} loss {result.eval_loss:.3f} {result.tokens_per_s:7.0f} tok/s "
            f"{result.tokens_per_cpu_s:7.0f} tok/CPU-s {stored:6.1f} MiB  "
            f"lr {metrics['arguments']['learning_rate']:g}, {metrics['steps']} steps",
            flush=True,
        )
        results.append(result)
    return results


def overrides(variant: Variant, options: argparse.Namespace) -> dict[str, Any]:
    """What a variant changes in `TrainArguments.from_settings` (the rest is the settings' retraining recipe)."""
    values: dict[str, Any] = {"method": variant.method, "threads": options.threads, "device": "cpu", "seed": 0}
    values["select_on_eval"] = False  # as retraining: no per-epoch evaluation inside the timed training
    if options.epochs is not None:
        values["epochs"] = options.epochs
    if variant.learning_rate is not None:
        values["learning_rate"] = variant.learning_rate
    if variant.method == "lora":
        values |= {"lora_rank": variant.rank, "lora_alpha": 2.0 * variant.rank}
    return values


@contextlib.contextmanager
def trainer_cpu_seconds() -> Iterator[list[float]]:
    """Measures the CPU time of `Trainer.train` calls inside the block (the list's one item, once it ends)."""
    spent = [0.0]
    original = Trainer.train

    def timed(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        started = time.process_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent[0] += time.process_time() - started

    Trainer.train = timed  # type: ignore[method-assign]
    try:
        yield spent
    finally:
        Trainer.train = original  # type: ignore[method-assign]


def report(results: list[Result], variants: list[Variant]) -> None:
    """Per variant, the mean over communities of its loss and speed relative to the full fine-tune's."""
    fulls = [r for r in results if r.variant.method == "full"]
    best = {r.community: r.eval_loss for r in sorted(fulls, key=lambda r: -r.eval_loss)}  # the lowest wins
    speed = {c: statistics.mean(r.tokens_per_s for r in fulls if r.community == c) for c in best}
    cpu_speed = {c: statistics.mean(r.tokens_per_cpu_s for r in fulls if r.community == c) for c in best}
    print("\nagainst the best full fine-tune's loss and the full runs' mean speed, mean over communities (worst):")
    print(f"{'variant':18} {'loss vs full':>16} {'tok/s vs full':>14} {'tok/CPU-s vs full':>18} {'stored MiB':>11}")
    for variant in variants:
        mine = [r for r in results if r.variant == variant]
        if not best or not mine:
            continue
        loss = [r.eval_loss / best[r.community] - 1 for r in mine]
        wall = [r.tokens_per_s / speed[r.community] for r in mine]
        cpu = [r.tokens_per_cpu_s / cpu_speed[r.community] for r in mine]
        print(
            f"{variant.name:18} {statistics.mean(loss):>+8.1%} ({max(loss):+.1%}) {statistics.mean(wall):>13.2f}x "
            f"{statistics.mean(cpu):>17.2f}x {statistics.mean(r.stored_mb for r in mine):>11.1f}"
        )
    print("targets: loss within +5% of full, tokens/s >= 1.5x full")
    print(json.dumps([{**r.__dict__, "variant": r.variant.name} for r in results]))
