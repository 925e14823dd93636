"""The offline starter model: a small GPT-2 trained from scratch here, so Magpie chats with no Hub access.

It is not OpenAI's pretrained GPT-2: it is a few-layer model with its own 8k byte-level BPE, trained in minutes
on the English and Korean dialogues that ship with `chatterbot-corpus`. It goes through exactly the retraining
path (`trainer.dataset` samples in the shared dialogue format, `trainer.packing`, `trainer.train.train`), only
starting from a randomly initialised model instead of the active version, and with a from-scratch learning rate.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from core.compute_threads import in_own_thread
from core.serving.dialogue import GPT2_EOS
from core.settings import Settings
from core.storage.db import Database
from core.storage.versions import activate_version, get_active_version, register_version
from trainer.corpus import DEFAULT_LANGUAGES, load_dialogues
from trainer.dataset import samples_from_dialogues, split_by_conversation
from trainer.filters import stable_fraction
from trainer.rehearsal import REHEARSAL_KEY
from trainer.samples import Sample
from trainer.starter_budget import Clock, TimeBudget
from trainer.starter_model import ModelShape, build_model, save_model, train_tokenizer
from trainer.train import FINE_TUNE_MIN_STEPS_KEY, FINE_TUNE_RATE_KEY, TrainArguments, TrainResult, train
from trainer.training_logs import ProgressFn

log = logging.getLogger(__name__)


def starter_arguments(settings: Settings) -> TrainArguments:
    """The starter's recipe, with DEVICE and TRAIN_PRECISION from the settings and every core's thread.

    From scratch a small model needs a far higher learning rate than fine-tuning (1e-3 vs 5e-5). Ten epochs of the
    deduplicated corpus (~60k tokens, 30 steps of 4 blocks each) is where the held-out loss flattens (measured:
    held-out perplexity 111 after 10 epochs, 120 after an 8-epoch schedule, epochs 8 -> 10 of the 10-epoch schedule
    gain 0.01 nats); early stopping ends the run sooner if the held-out loss turns up. The other TRAIN_* settings
    are for fine-tuning and do not apply; all cores are used because the starter is built before the bot serves.
    """
    return TrainArguments(
        epochs=10,
        batch_size=4,
        learning_rate=1e-3,
        warmup_steps=30,
        weight_decay=0.01,
        logging_steps=20,
        max_length=512,
        threads=torch.get_num_threads(),
        loss_on_response_only=False,
        precision=settings.train_precision,
        device=settings.device,
        early_stopping_patience=2,
    )


STARTER_FINE_TUNE_RATE = 1e-3
"""The rate a /retrain fine-tunes the starter at when TRAIN_LEARNING_RATE is unset (recorded in its config.json).
Measured with `bench/learning.py` (docs/benchmarks.md, issue #19): at GPT-2's 5e-5 a retrain on a community's
767 messages recalled 0 of 10 taught answers; at 1e-3 (the starter's own training rate) 7 of 10 after 8 passes."""

STARTER_FINE_TUNE_MIN_STEPS = 800
"""The fewest steps a /retrain of the starter makes when TRAIN_MIN_STEPS is unset (recorded in its config.json).
Measured with `bench/learning.py` on a 767-message community (45 steps a pass; issue #19): taught answers recalled
after 135 steps (3 passes) 1/10, 360 steps 7/10, 720 steps 10/10 (9/10 paraphrased)."""

STARTER_SHAPE = ModelShape()
"""4 layers x 256 wide, 8k byte-level BPE, 512-token context."""

STARTER_NOTE = "Offline starter: a small GPT-2 trained locally on chatterbot-corpus (not OpenAI's gpt2)."


@dataclass(frozen=True)
class StarterVersion:
    """The registered starter: its row id, name, directory, metrics, and whether it became the active version."""

    version_id: int
    name: str
    path: Path
    metrics: dict[str, Any]
    activated: bool


async def bootstrap(
    settings: Settings,
    db: Database,
    *,
    progress: ProgressFn | None = None,
    shape: ModelShape = STARTER_SHAPE,
    languages: Sequence[str] = DEFAULT_LANGUAGES,
    max_dialogues: int | None = None,
    arguments: TrainArguments | None = None,
    name: str | None = None,
    minutes: float | None = None,
    clock: Clock = time.monotonic,
) -> StarterVersion:
    """Builds the starter under `MODELS_DIR/starter-<time>` and registers it (active when none is).

    `max_dialogues` trains on a hash-chosen slice of the corpus (quick runs, tests). Training runs in a worker
    thread with `arguments`, by default `starter_arguments(settings)`, cut to fit `minutes` (by default
    STARTER_BUDGET_MINUTES; 0 = the whole recipe however long it takes), counted from this call on `clock`.
    """
    minutes = settings.starter_budget_minutes if minutes is None else minutes
    budget = TimeBudget(minutes * 60, clock=clock) if minutes > 0 else None
    dialogues = load_dialogues(languages)
    if max_dialogues is not None:
        # salted: the split hashes the same keys, and an unsalted slice would be all held-out dialogues
        dialogues = sorted(dialogues, key=lambda d: stable_fraction(f"slice:{d.key}"))[:max_dialogues]
    samples = samples_from_dialogues(dialogues, history_turns=settings.history_turns)
    train_samples, eval_samples = split_by_conversation(samples, settings.train_eval_fraction)
    args = arguments or starter_arguments(settings)
    name = name or f"starter-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    output_dir = (settings.models_dir / name).resolve()
    log.info(
        "building the offline starter %s: %d train / %d held-out samples from %d dialogues",
        name,
        len(train_samples),
        len(eval_samples),
        len(dialogues),
    )
    result = await in_own_thread(  # not to_thread: `magpie run` serves from this process next
        train_starter, train_samples, eval_samples, output_dir, shape=shape, arguments=args, progress=progress,
        budget=budget, languages=languages,
    )  # fmt: skip
    async with db.sessions.begin() as session:
        active = await get_active_version(session)
        version = await register_version(
            session, name=name, path=str(output_dir), metrics=result.metrics, note=STARTER_NOTE
        )
        if active is None:
            await activate_version(session, version_id=version.id)
    return StarterVersion(version.id, name, output_dir, result.metrics, activated=active is None)


def train_starter(
    train_samples: Sequence[Sample],
    eval_samples: Sequence[Sample],
    output_dir: Path,
    *,
    shape: ModelShape,
    arguments: TrainArguments,
    progress: ProgressFn | None = None,
    budget: TimeBudget | None = None,
    languages: Sequence[str] = DEFAULT_LANGUAGES,
) -> TrainResult:
    """Trains the tokenizer on the training turns, initialises a GPT-2 of `shape` and trains it (no database),
    within `budget` when there is one. Its config names its fine-tuning rate and the corpus `languages` it learned
    from, for the retraining runs that start from it (`trainer.train.fine_tune_rate`, `trainer.rehearsal`)."""
    turns = [turn for sample in train_samples for turn in sample.text(GPT2_EOS).split(GPT2_EOS) if turn]
    tokenizer = train_tokenizer(turns, vocab_size=shape.vocab_size)
    model = build_model(tokenizer, shape, seed=arguments.seed)
    setattr(model.config, FINE_TUNE_RATE_KEY, STARTER_FINE_TUNE_RATE)
    setattr(model.config, FINE_TUNE_MIN_STEPS_KEY, STARTER_FINE_TUNE_MIN_STEPS)
    setattr(model.config, REHEARSAL_KEY, list(languages))
    arguments = replace(arguments, max_length=min(arguments.max_length, shape.n_positions))
    with tempfile.TemporaryDirectory(prefix="magpie-starter-init-") as initial:
        save_model(model, tokenizer, Path(initial))
        return train(
            arguments,
            train_samples,
            eval_samples,
            model_source=initial,
            output_dir=output_dir,
            progress=progress,
            metadata={"model_source": "from scratch (offline starter)", "shape": asdict(shape)},
            fit_schedule=budget,
        )
