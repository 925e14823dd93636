"""The offline starter's time budget: measure this machine, fit the schedule, keep the best held-out checkpoint."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.cli import build_parser
from core.settings import Settings
from core.texts import starter_built
from trainer.bootstrap import starter_arguments, train_starter
from trainer.corpus import load_dialogues
from trainer.dataset import samples_from_dialogues, split_by_conversation
from trainer.filters import stable_fraction
from trainer.starter_budget import MIN_STEPS, Speed, TimeBudget, plan_schedule
from trainer.starter_model import ModelShape

TINY_SHAPE = ModelShape(n_layer=1, n_embd=32, n_head=2, n_positions=128, vocab_size=600)


class TickingClock:
    """A clock that moves one second each time it is read: every measurement and every check of the time left
    reads a fixed value, so the schedule chosen (and so the run) is the same on any machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_a_fast_machine_trains_the_whole_recipe_evaluating_once_per_epoch() -> None:
    schedule = plan_schedule(Speed(step_s=0.4, eval_s=2.0), available_s=280, steps_per_epoch=30, epochs=10)

    assert (schedule.max_steps, schedule.eval_steps, schedule.evaluations) == (300, 30, 10)
    assert schedule.fits_recipe and schedule.expected_s == pytest.approx(140)


def test_a_slow_machine_trains_what_fits_and_evaluates_less_often() -> None:
    """The issue's 2-core machine: ~3 s a step, where the recipe needs ~16 minutes."""
    schedule = plan_schedule(Speed(step_s=3.0, eval_s=6.0), available_s=270, steps_per_epoch=30, epochs=10)

    assert not schedule.fits_recipe and schedule.recipe_steps == 300
    assert schedule.evaluations == 9 and schedule.max_steps % schedule.eval_steps == 0
    assert 60 <= schedule.max_steps <= 72
    assert schedule.expected_s <= 270


def test_where_no_evaluation_fits_the_run_has_none() -> None:
    schedule = plan_schedule(Speed(step_s=1.0, eval_s=40.0), available_s=150, steps_per_epoch=30, epochs=10)

    assert (schedule.max_steps, schedule.eval_steps, schedule.evaluations) == (150, None, 0)


def test_a_machine_too_slow_for_the_budget_still_trains_a_minimum_and_says_it_will_overrun() -> None:
    schedule = plan_schedule(Speed(step_s=60.0, eval_s=30.0), available_s=100, steps_per_epoch=30, epochs=10)

    assert (schedule.max_steps, schedule.evaluations) == (MIN_STEPS, 0)
    assert schedule.expected_s > schedule.available_s


@given(
    step_s=st.floats(1e-4, 100),
    eval_s=st.floats(1e-4, 300),
    available_s=st.floats(-100, 10_000),
    steps_per_epoch=st.integers(1, 500),
    epochs=st.floats(0.5, 20),
)
def test_every_schedule_fits_or_is_the_minimum(
    step_s: float, eval_s: float, available_s: float, steps_per_epoch: int, epochs: float
) -> None:
    schedule = plan_schedule(
        Speed(step_s, eval_s), available_s=available_s, steps_per_epoch=steps_per_epoch, epochs=epochs
    )

    assert 1 <= schedule.max_steps <= schedule.recipe_steps
    assert schedule.eval_steps is None or 1 <= schedule.eval_steps <= max(schedule.max_steps, steps_per_epoch)
    assert schedule.evaluations <= max(1, -(-schedule.recipe_steps // steps_per_epoch))
    assert schedule.expected_s <= available_s + 1e-6 or schedule.max_steps == min(MIN_STEPS, schedule.recipe_steps)


def test_a_budgeted_run_trains_the_planned_schedule_and_keeps_its_best_checkpoint(tmp_path: Path) -> None:
    """A real short run, on a schedule cut from 280 steps to 120 by the budget (one simulated second per clock
    reading: 1/3 s per step, 2 s per evaluation and its checkpoint, 7 s gone before planning; 48 s left for training
    once the reserve is kept: 4 evaluations and 120 steps). A high learning rate overfits the tiny corpus, so the
    held-out loss turns up after a while; the model saved is the one from the best evaluation, not the last."""
    settings = Settings(_env_file=None, train_precision="fp32")  # type: ignore[call-arg]
    dialogues = sorted(load_dialogues(), key=lambda d: stable_fraction(f"slice:{d.key}"))[:80]
    train_samples, eval_samples = split_by_conversation(samples_from_dialogues(dialogues, history_turns=10), 0.1)
    arguments = replace(starter_arguments(settings), threads=1, warmup_steps=0, learning_rate=1e-2, epochs=40)

    result = train_starter(
        train_samples,
        eval_samples,
        tmp_path / "starter",
        shape=TINY_SHAPE,
        arguments=arguments,
        budget=TimeBudget(60, clock=TickingClock()),
    )

    metrics = result.metrics
    schedule = metrics["schedule"]
    assert (schedule["step_s"], schedule["eval_s"], schedule["budget_s"]) == (pytest.approx(1 / 3), 2.0, 60)
    assert (schedule["recipe_steps"], schedule["max_steps"], schedule["eval_steps"]) == (280, 120, 30)
    assert (metrics["arguments"]["max_steps"], metrics["arguments"]["eval_steps"]) == (120, 30)
    evaluated = dict(metrics["eval_loss_by_step"])
    assert sorted(evaluated) == [30, 60, 90, 120]
    best = min(evaluated, key=evaluated.__getitem__)
    assert metrics["best_step"] == best
    assert max(evaluated) > best and evaluated[max(evaluated)] > evaluated[best], "the last evaluation was no worse"
    assert (result.output_dir / "model.safetensors").is_file()


def test_a_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        TimeBudget(0)


@pytest.mark.parametrize(("given", "minutes"), [(["bootstrap"], None), (["bootstrap", "--minutes", "12.5"], 12.5)])
def test_magpie_bootstrap_takes_a_budget_in_minutes(given: list[str], minutes: float | None) -> None:
    assert build_parser().parse_args(given).minutes == minutes


@pytest.mark.parametrize("bad", ["-1", "soon", "nan", "inf"])
def test_magpie_bootstrap_refuses_a_budget_that_is_not_minutes(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bootstrap", "--minutes", bad])
    assert "--minutes" in capsys.readouterr().err


def test_the_report_is_one_line_saying_what_fitted_how_good_and_how_to_do_better() -> None:
    cut = starter_built(
        "starter-1", "/m/starter-1", eval_loss=5.0, steps=38, recipe_steps=300, budget_minutes=5, best_step=35,
        activated=True,
    )  # fmt: skip
    assert cut == (
        "Built starter-1 in /m/starter-1 (now the active model). It trained 38 of the recipe's 300 steps in a "
        "5-minute budget; held-out perplexity 148.4 (its best checkpoint, step 35). "
        "For a better one: magpie bootstrap --minutes 40."
    )
    whole = starter_built(
        "starter-2", "/m/starter-2", eval_loss=4.7, steps=300, recipe_steps=300, budget_minutes=5, best_step=300,
        activated=False,
    )  # fmt: skip
    assert "--minutes" not in whole and "not active: magpie models activate starter-2" in whole
    assert "the whole recipe (300 steps)" in whole and "/retrain" in whole
    unscored = starter_built(
        "starter-3", "/m/starter-3", eval_loss=7.3, steps=10, recipe_steps=300, budget_minutes=5, best_step=None,
        activated=True,
    )  # fmt: skip
    assert "held-out perplexity 1480.3. For a better one: magpie bootstrap --minutes 150." in unscored
    for line in (cut, whole, unscored):
        assert "\n" not in line and "`" not in line, "one plain line"


def test_the_budget_setting_defaults_to_five_minutes() -> None:
    assert Settings(_env_file=None).starter_budget_minutes == 5  # type: ignore[call-arg]
    with pytest.raises(Exception, match="starter_budget_minutes"):
        Settings(_env_file=None, starter_budget_minutes=-1)  # type: ignore[call-arg]
