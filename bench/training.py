"""Training throughput: the seed notebook's way (pad every sample to 512) against Magpie's way, in one run.

Same chat samples (10-60 tokens, from chatterbot-corpus in the shared dialogue format), same GPT-2 small shape
(`GPT2Config()`, random init), same HF Trainer and optimizer settings, a fixed number of optimizer steps each:

- seed:     every sample padded to 512 tokens, batch 2, `DataCollatorForLanguageModeling(mlm=False)` (which also
            masks the real EOS, because pad = EOS);
- dynamic:  one sample per row, padded to the longest in its batch (labels -100 on padding only);
- packed:   samples packed into 512-token blocks (run_clm's group_texts), batch 2;
- packed+bf16: the same with bf16 autocast (only where the CPU/GPU has native bf16).

It prints useful (non-pad) tokens per second, the projected time of one epoch over 10,000 samples, and the ratio
to the seed's way; then the held-out loss of the seed run and of a packed run over the very same samples (equal
useful tokens), both scored the same way (`trainer.train.mean_loss`: per sample, EOS included).

    python bench/training.py [--steps 20] [--threads 2] [--ways seed,dynamic,packed,packed+bf16]

With `--method full,lora` (or one of them) it compares instead how a community's voice trains: a full fine-tune
against LoRA adapters of a few ranks, on the starter model (see bench/training_methods.py).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers
from transformers import DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.serving.dialogue import GPT2_EOS
from core.settings import Settings
from trainer.corpus import load_dialogues
from trainer.dataset import samples_from_dialogues, split_by_conversation
from trainer.packing import Encoded, encode_samples, pack, unpacked
from trainer.samples import Sample
from trainer.starter_model import train_tokenizer
from trainer.train import TrainArguments, build_trainer, mean_loss, training_arguments

EPOCH_SAMPLES = 10_000
BLOCK = 512


@dataclass
class Outcome:
    way: str
    useful_tokens: int
    seconds: float
    samples: int

    @property
    def tokens_per_s(self) -> float:
        return self.useful_tokens / self.seconds


def chat_samples(tokenizer: transformers.PreTrainedTokenizerBase) -> tuple[list[Encoded], list[Encoded]]:
    """Corpus samples whose rendered text is 10-60 tokens, split into train and held-out by dialogue."""
    samples = samples_from_dialogues(load_dialogues(), history_turns=4)
    train, held_out = split_by_conversation(samples, 0.1)

    def encode(chosen: list[Sample]) -> list[Encoded]:
        encoded = encode_samples(chosen, tokenizer, max_length=BLOCK, response_only=False)
        return [e for e in encoded if 10 <= len(e.input_ids) <= 60]

    return encode(train), encode(held_out)


def fresh_model(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(bos_token_id=0, eos_token_id=0, pad_token_id=0))


def run_seed(
    tokenizer: transformers.PreTrainedTokenizerBase, train: list[Encoded], args: TrainArguments, steps: int
) -> tuple[Outcome, GPT2LMHeadModel]:
    """The notebook: tokenizer(padding="max_length", max_length=512) and the masked-LM collator with mlm=False."""
    used = train[: steps * args.batch_size]
    texts = [e.sample.text(GPT2_EOS) for e in used]
    features = [dict(tokenizer(t, padding="max_length", max_length=BLOCK, truncation=True)) for t in texts]
    useful = sum(sum(f["attention_mask"]) for f in features)
    model = fresh_model(args.seed)
    hf_args = training_arguments(
        replace(args, precision="fp32"), Path("bench/out/seed"), train_rows=len(features), with_eval=False
    )
    trainer = Trainer(
        model=model,
        args=replace_steps(hf_args, steps),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        train_dataset=features,  # type: ignore[arg-type]
    )
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    return Outcome("seed (pad to 512)", useful, time.perf_counter() - started, len(used)), model


def replace_steps(hf_args: transformers.TrainingArguments, steps: int) -> transformers.TrainingArguments:
    hf_args.max_steps = steps
    hf_args.warmup_steps = 0
    return hf_args


def run_magpie(
    tokenizer: transformers.PreTrainedTokenizerBase,
    train: list[Encoded],
    args: TrainArguments,
    steps: int,
    *,
    way: str,
) -> tuple[Outcome, GPT2LMHeadModel]:
    """Magpie's pipeline (pack or dynamic padding, PadCollator, build_trainer) for `steps` optimizer steps."""
    packing = way.startswith("packed")
    precision = "bf16" if way.endswith("bf16") else "fp32"
    args = replace(args, packing=packing, precision=precision, max_steps=steps, warmup_steps=0)
    if packing:
        needed = steps * args.batch_size * BLOCK
        used, total = [], 0
        for e in train:
            if total >= needed:
                break
            used.append(e)
            total += len(e.input_ids)
        features = pack(used, block_size=BLOCK, seed=args.seed)[: steps * args.batch_size]
    else:
        used = train[: steps * args.batch_size]
        features = unpacked(used)
    useful = sum(len(f["input_ids"]) for f in features)
    model = fresh_model(args.seed)
    trainer = build_trainer(
        model, tokenizer, args, train_features=features, eval_features=[], checkpoints=Path(f"bench/out/{way}")
    )
    started = time.perf_counter()
    trainer.train()
    return Outcome(way, useful, time.perf_counter() - started, len(used)), model


def main() -> int:
    import training_methods  # in bench/, which the path above holds

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per way")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--ways", default="seed,dynamic,packed,packed+bf16", help="comma-separated ways to run")
    parser.add_argument("--eval-samples", type=int, default=200, help="held-out samples scored for the loss")
    parser.add_argument("--method", default=None, help="full,lora: compare how a community's voice trains instead")
    training_methods.add_arguments(parser)
    options = parser.parse_args()
    transformers.logging.set_verbosity_error()
    if options.method:
        return training_methods.run(options)
    torch.set_num_threads(options.threads)

    corpus_lines = [line for d in load_dialogues() for line in d.lines]
    tokenizer = train_tokenizer(corpus_lines, vocab_size=8000)
    tokenizer.pad_token = tokenizer.eos_token
    train, held_out = chat_samples(tokenizer)
    held_out = held_out[: options.eval_samples]
    mean_tokens = statistics.mean(len(e.input_ids) for e in train)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    args = TrainArguments.from_settings(
        settings, batch_size=2, learning_rate=5e-5, threads=options.threads, device="cpu", precision="auto", seed=0
    )
    ways = [w.strip() for w in options.ways.split(",") if w.strip()]
    if "packed+bf16" in ways and not args.resolved_bf16():
        print("(packed+bf16 skipped: this hardware has no native bf16)")
        ways.remove("packed+bf16")

    print(f"GPT-2 small (GPT2Config(), random init), {options.threads} CPU threads, {options.steps} steps per way,")
    print(f"{len(train)} chat samples of 10-60 tokens (mean {mean_tokens:.1f}), batch size 2, lr 5e-5.\n")
    run_seed(tokenizer, train, args, 1)  # warm-up (thread pools, kernels), so the first way timed pays no extra
    outcomes: dict[str, tuple[Outcome, GPT2LMHeadModel]] = {}
    for way in ways:
        run = run_seed if way == "seed" else None
        outcomes[way] = (
            run(tokenizer, train, args, options.steps)
            if run
            else run_magpie(tokenizer, train, args, options.steps, way=way)
        )
        print_row(outcomes[way][0], mean_tokens, outcomes.get("seed", (None,))[0])

    if "seed" in outcomes:
        compare_losses(tokenizer, train, held_out, args, outcomes)
    return 0


def print_row(outcome: Outcome, mean_tokens: float, seed: Outcome | None) -> None:
    epoch_h = EPOCH_SAMPLES * mean_tokens / outcome.tokens_per_s / 3600
    ratio = f"{outcome.tokens_per_s / seed.tokens_per_s:6.1f}x" if seed else "     -"
    print(
        f"{outcome.way:<20} {outcome.tokens_per_s:8.1f} useful tok/s   "
        f"epoch of {EPOCH_SAMPLES:,} samples: {epoch_h:6.2f} h   vs seed: {ratio}",
        flush=True,
    )


def compare_losses(
    tokenizer: transformers.PreTrainedTokenizerBase,
    train: list[Encoded],
    held_out: list[Encoded],
    args: TrainArguments,
    outcomes: dict[str, tuple[Outcome, GPT2LMHeadModel]],
) -> None:
    """Held-out loss of every run, plus a packed run over exactly the seed run's samples (equal useful tokens)."""
    seed_outcome = outcomes["seed"][0]
    pad = int(tokenizer.pad_token_id)
    print(
        f"\nheld-out loss on {len(held_out)} samples (per sample, EOS included; random init = {math.log(50257):.2f}):"
    )
    for way, (outcome, model) in outcomes.items():
        loss = mean_loss(model, held_out, pad_token_id=pad)
        print(f"  {way:<20} after {outcome.useful_tokens:6d} useful tokens in {outcome.seconds:6.1f} s: {loss:.3f}")
    way = "packed+bf16" if "packed+bf16" in outcomes else "packed"
    same = train[: seed_outcome.samples]
    steps = max(1, math.ceil(len(pack(same, block_size=BLOCK, seed=args.seed)) / args.batch_size))
    outcome, model = run_magpie(tokenizer, same, args, steps, way=way)
    loss = mean_loss(model, held_out, pad_token_id=pad)
    print(
        f"  {way:<20} on the seed run's {seed_outcome.samples} samples ({outcome.useful_tokens} useful tokens, "
        f"{steps} steps, {outcome.seconds:.1f} s): {loss:.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())
