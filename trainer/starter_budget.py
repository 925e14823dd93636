"""Fitting the offline starter's training into a time budget (STARTER_BUDGET_MINUTES, `magpie bootstrap --minutes`).

The starter's recipe (10 epochs, one evaluation per epoch, `trainer.bootstrap.starter_arguments`) takes ~2 minutes
on a quiet 2-core machine and ~16 on a slow or busy one. Rather than guess, the build measures this machine: once the
data is packed it times a few optimizer steps, one held-out evaluation and one checkpoint save on a copy of the model,
then chooses how many steps to train and how often to evaluate so that the whole build ends within the budget. The
Trainer keeps the checkpoint with the best held-out loss, so a short schedule still ships its best model.

The choice itself (`plan_schedule`) is a pure function of the measured speed, so it is tested without timing anything.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model as save_weights
from transformers import PreTrainedModel

from trainer.packing import Encoded, Features, PadCollator
from trainer.train import TrainArguments, mean_loss
from trainer.training_logs import false_alarms_hidden

log = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Seconds from an arbitrary origin (`time.monotonic`; tests pass their own)."""

EVAL_SHARE = 0.2
"""At most this share of the time left goes to evaluations during the run when the recipe does not fit; when not
even one fits in it, the run has none (the kept model, the last, is still scored once at the end)."""

EVAL_PROBE_SAMPLES = 32
"""Held-out samples timed to estimate an evaluation (spread over the set, scaled up by tokens): a full evaluation
can cost as much as several steps on a slow machine."""

MIN_STEPS = 10
"""Even on a machine too slow for the budget, train this many steps (or the whole recipe, if shorter): fewer leave
a model that cannot say anything. The schedule then records that it expects to run over."""

RESERVE_SHARE = 0.05
"""Kept back from the budget for what follows training: scoring the kept model once more and saving it."""


@dataclass(frozen=True)
class Speed:
    """What this machine measured: seconds per optimizer step, and per evaluation (including its checkpoint save)."""

    step_s: float
    eval_s: float


@dataclass(frozen=True)
class Schedule:
    """How long to train and how often to evaluate (None: not during the run); `expected_s` is the planned
    training time."""

    max_steps: int
    eval_steps: int | None
    recipe_steps: int
    expected_s: float
    available_s: float

    @property
    def evaluations(self) -> int:
        return math.ceil(self.max_steps / self.eval_steps) if self.eval_steps else 0

    @property
    def fits_recipe(self) -> bool:
        return self.max_steps == self.recipe_steps


def plan_schedule(speed: Speed, *, available_s: float, steps_per_epoch: int, epochs: float) -> Schedule:
    """The longest schedule that fits `available_s`, never longer than the recipe (`epochs`, evaluated per epoch).

    When the recipe does not fit, evaluations get up to `EVAL_SHARE` of the time (one per epoch at most, the last
    at the final step; none when not even one fits) and the steps the rest; a budget too small even for
    `MIN_STEPS` still trains those, and `expected_s` then exceeds `available_s`.
    """
    recipe_steps = max(1, math.ceil(epochs * steps_per_epoch))
    recipe_evals = math.ceil(recipe_steps / steps_per_epoch)
    step_s, eval_s = max(speed.step_s, 1e-9), max(speed.eval_s, 1e-9)

    def cost(steps: int, evals: int) -> float:
        return steps * speed.step_s + evals * speed.eval_s

    if cost(recipe_steps, recipe_evals) <= available_s:
        return Schedule(recipe_steps, steps_per_epoch, recipe_steps, cost(recipe_steps, recipe_evals), available_s)
    evals = min(recipe_evals, max(0, math.floor(EVAL_SHARE * available_s / eval_s)))
    steps = math.floor((available_s - evals * eval_s) / step_s)
    steps = min(recipe_steps, max(steps, MIN_STEPS))
    if evals == 0:
        return Schedule(steps, None, recipe_steps, cost(steps, 0), available_s)
    eval_steps = math.ceil(steps / min(evals, steps))
    return Schedule(steps, eval_steps, recipe_steps, cost(steps, math.ceil(steps / eval_steps)), available_s)


class TimeBudget:
    """A `trainer.train.FitSchedule` that fits a run into what is left of `seconds`, counted from `started`.

    The build's earlier stages (the corpus, the tokenizer) and the measurement itself spend the same budget.
    """

    def __init__(self, seconds: float, *, clock: Clock = time.monotonic, started: float | None = None) -> None:
        if seconds <= 0:
            raise ValueError(f"a time budget must be positive, got {seconds} s")
        self.seconds = seconds
        self.clock = clock
        self.started = clock() if started is None else started

    def remaining(self) -> float:
        return self.seconds - (self.clock() - self.started)

    def __call__(
        self,
        model: PreTrainedModel,
        train_features: list[Features],
        eval_encoded: list[Encoded],
        pad_token_id: int,
        args: TrainArguments,
    ) -> tuple[TrainArguments, dict[str, Any]]:
        """Measures this machine, plans, and returns the arguments to train with and the plan's record."""
        with false_alarms_hidden(model):  # the Trainer's run hides the same false alarm (GPT-2's loss_type)
            speed = measure_speed(model, train_features, eval_encoded, pad_token_id, args, clock=self.clock)
        available = self.remaining() - RESERVE_SHARE * self.seconds - speed.eval_s  # the kept model is scored again
        steps_per_epoch = math.ceil(len(train_features) / args.batch_size)
        schedule = plan_schedule(speed, available_s=available, steps_per_epoch=steps_per_epoch, epochs=args.epochs)
        record = {"budget_s": self.seconds, **asdict(speed), **asdict(schedule), "evaluations": schedule.evaluations}
        log.info(
            "starter schedule for a %.0f s budget: %d of the recipe's %d steps, %d evaluations "
            "(%.2f s per step, %.1f s per evaluation measured here)",
            self.seconds, schedule.max_steps, schedule.recipe_steps, schedule.evaluations, speed.step_s, speed.eval_s,
        )  # fmt: skip
        if schedule.expected_s > max(available, 0.0):
            log.warning("this machine is too slow for the budget: the build will take longer than planned")
        if schedule.eval_steps is None:  # no evaluation fits: train, and let the final scoring judge the last model
            return replace(args, max_steps=schedule.max_steps, select_on_eval=False), record
        return replace(args, max_steps=schedule.max_steps, eval_steps=schedule.eval_steps), record


def measure_speed(
    model: PreTrainedModel,
    train_features: Sequence[Features],
    eval_encoded: Sequence[Encoded],
    pad_token_id: int,
    args: TrainArguments,
    *,
    clock: Clock = time.monotonic,
    steps: int = 3,
) -> Speed:
    """Times `steps` optimizer steps (after one untimed warm-up step), part of an evaluation and one checkpoint
    save, on a copy of `model` with the run's batch size, device, precision and threads; the model itself is left
    untouched."""
    probe: PreTrainedModel = copy.deepcopy(model)
    torch.nn.Module.to(probe, args.resolved_device())  # (transformers wraps `to` in a way mypy misreads)
    batches = _batches(train_features, args.batch_size, pad_token_id)
    train_step = _step_function(probe, args)
    train_step(batches[0])
    started = clock()
    for index in range(1, steps + 1):
        train_step(batches[index % len(batches)])
    _synchronize(args)
    step_s = (clock() - started) / steps
    subset = list(eval_encoded[:: max(1, math.ceil(len(eval_encoded) / EVAL_PROBE_SAMPLES))])
    scale = sum(len(e.input_ids) for e in eval_encoded) / max(1, sum(len(e.input_ids) for e in subset))
    started = clock()
    mean_loss(probe, subset, pad_token_id=pad_token_id, batch_size=args.eval_batch_size)
    eval_s = (clock() - started) * scale
    started = clock()
    with tempfile.TemporaryDirectory(prefix="magpie-probe-") as directory:
        save_weights(probe, str(Path(directory) / "model.safetensors"))  # what each checkpoint writes
    return Speed(step_s=step_s, eval_s=eval_s + clock() - started)


def _batches(features: Sequence[Features], batch_size: int, pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    collate = PadCollator(pad_token_id)
    return [collate(features[start : start + batch_size]) for start in range(0, len(features), batch_size)][:4]


def _step_function(model: PreTrainedModel, args: TrainArguments) -> Callable[[dict[str, torch.Tensor]], None]:
    """One training step as the Trainer takes it: forward (under bf16 autocast when the run uses it), backward,
    AdamW."""
    device = args.resolved_device()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.resolved_learning_rate(), weight_decay=args.weight_decay)
    model.train()

    def step(batch: dict[str, torch.Tensor]) -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.resolved_bf16()):
            loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _synchronize(args: TrainArguments) -> None:
    if args.resolved_device() == "cuda":
        torch.cuda.synchronize()
