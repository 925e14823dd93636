"""The offline starter: a from-scratch GPT-2 on a slice of chatterbot-corpus, registered as the active version."""

from __future__ import annotations

import logging
import math
import re
import sys
from dataclasses import replace
from pathlib import Path

import huggingface_hub
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from core.perplexity import perplexity_text
from core.serving.dialogue import Turn
from core.serving.engine import Engine
from core.serving.model_serving import ModelServing, quiet_model_progress_bars
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import VersionStatus
from core.storage.versions import get_active_version, list_versions
from trainer.bootstrap import (
    STARTER_FINE_TUNE_MIN_STEPS,
    STARTER_FINE_TUNE_RATE,
    StarterVersion,
    bootstrap,
    starter_arguments,
)
from trainer.corpus import load_dialogues
from trainer.rehearsal import named_corpus
from trainer.starter_model import ModelShape
from trainer.train import TrainArguments, fine_tune_min_steps, fine_tune_rate

TINY_SHAPE = ModelShape(n_layer=1, n_embd=32, n_head=2, n_positions=128, vocab_size=600)


def quick(settings: Settings) -> TrainArguments:
    """The starter's recipe cut to one epoch on one thread (the settings pin TRAIN_PRECISION=fp32)."""
    assert settings.train_precision == "fp32", "a run with fixed expected outcomes must not depend on the CPU"
    return replace(starter_arguments(settings), epochs=1, warmup_steps=0, threads=1)


def test_corpus_has_english_and_korean_dialogues() -> None:
    dialogues = load_dialogues()
    assert len(dialogues) > 2000
    assert any(d.key.startswith("korean/") for d in dialogues)
    assert all(len(d.lines) >= 1 and all(line.strip() for line in d.lines) for d in dialogues)
    assert len({d.key for d in dialogues}) == len(dialogues)


async def test_bootstrap_registers_an_active_starter(db: Database, tmp_path: Path) -> None:
    settings = Settings(_env_file=None, models_dir=tmp_path / "models", train_precision="fp32")  # type: ignore[call-arg]
    fractions: list[float] = []

    starter = await bootstrap(
        settings,
        db,
        progress=fractions.append,
        shape=TINY_SHAPE,
        max_dialogues=80,
        arguments=quick(settings),
        name="starter-t",
    )

    assert starter.activated and starter.path == (tmp_path / "models" / "starter-t").resolve()
    assert math.isfinite(starter.metrics["perplexity"]) and starter.metrics["eval_samples"] > 0
    assert fractions[-1] == 1.0
    assert starter.metrics["schedule"]["budget_s"] == 300  # STARTER_BUDGET_MINUTES=5, which this tiny run fits
    assert starter.metrics["schedule"]["max_steps"] == starter.metrics["schedule"]["recipe_steps"]
    assert starter.metrics["arguments"]["precision"] == "fp32" and starter.metrics["bf16"] is False
    async with db.sessions() as session:
        active = await get_active_version(session)
        assert active is not None and active.id == starter.version_id
        assert active.name == "starter-t" and active.metrics["perplexity"] == starter.metrics["perplexity"]
        assert "not OpenAI" in (active.note or "")

    model = AutoModelForCausalLM.from_pretrained(starter.path)
    tokenizer = AutoTokenizer.from_pretrained(starter.path)
    assert model.config.n_layer == 1 and len(tokenizer) <= 600
    assert fine_tune_rate(model.config) == STARTER_FINE_TUNE_RATE  # what a /retrain trains it at (issue #19)
    assert fine_tune_min_steps(model.config) == STARTER_FINE_TUNE_MIN_STEPS  # and for how long at least
    assert named_corpus(str(starter.path)) == ("english", "korean")  # and what it rehearses then
    assert tokenizer.decode(tokenizer("안녕하세요 hello")["input_ids"]) == "안녕하세요 hello"

    # a second starter is registered but does not displace the active version
    again = await bootstrap(
        settings, db, shape=TINY_SHAPE, max_dialogues=40, arguments=quick(settings), name="starter-u"
    )
    assert not again.activated
    async with db.sessions() as session:
        statuses = {v.name: v.status for v in await list_versions(session)}
    assert statuses == {"starter-t": VersionStatus.ACTIVE, "starter-u": VersionStatus.CANDIDATE}


async def test_magpie_run_builds_the_starter_once_when_the_hub_is_unreachable(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`magpie run`'s model choice: BASE_MODEL is a hub id, the Hub is unreachable and nothing is cached, so the
    starter is built, registered and served; the next start serves it without building again."""
    from bot import cli

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:1")  # nothing listens there
    builds: list[str] = []

    async def quick_starter(settings: Settings, db: Database) -> StarterVersion:  # the real build, smaller
        builds.append(settings.base_model)
        return await bootstrap(settings, db, shape=TINY_SHAPE, max_dialogues=60, arguments=quick(settings))

    monkeypatch.setattr(cli.cli_training, "build_starter", quick_starter)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        base_model="some-org/never-cached-model",
        models_dir=tmp_path / "models",
        max_new_tokens=4,
        train_precision="fp32",
    )
    for _ in range(2):
        engine = Engine.from_settings(settings)
        try:
            await cli._start_engine(settings, db, ModelServing(settings=settings, db=db, engine=engine))
            assert engine.model_ref is not None and engine.model_ref.name.startswith("starter-")
            assert (await engine.generate_response([Turn("user:1", "hello")])).text.strip()
        finally:
            await engine.close()
    assert builds == ["some-org/never-cached-model"]  # once: the second start served the registered starter


def test_the_starter_recipe_takes_device_and_precision_from_the_settings() -> None:
    settings = Settings(_env_file=None, device="cpu", train_precision="bf16", train_learning_rate=5e-5)  # type: ignore[call-arg]
    args = starter_arguments(settings)
    assert (args.device, args.precision, args.resolved_bf16()) == ("cpu", "bf16", True)
    assert (args.learning_rate, args.epochs, args.batch_size) == (1e-3, 10, 4)  # its own recipe, not fine-tuning's


class TickingClock:
    """One second per reading: the budget's measurements, and so the schedule, are the same on any machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


async def test_the_builds_output_keeps_logs_above_the_bar_and_ends_with_one_plain_line(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What an operator sees in the terminal, captured from a real (tiny) build cut by a one-minute budget: the
    trainer's INFO lines each start a line of their own above the bar (never inside it), the bar shows percent
    and time without a rate whose unit flips, and the last line says what was built, how much of the recipe
    fitted, the held-out perplexity of the checkpoint kept (the best one the log showed) and how to do better."""
    from bot import cli_training
    from trainer import bootstrap as bootstrap_module

    settings = Settings(_env_file=None, models_dir=tmp_path / "models", train_precision="fp32")  # type: ignore[call-arg]
    overfitting = replace(quick(settings), epochs=40, learning_rate=1e-2)

    async def tiny(settings: Settings, db: Database, *, progress: object, minutes: float) -> StarterVersion:
        return await bootstrap(
            settings, db, progress=progress, minutes=minutes, shape=TINY_SHAPE, max_dialogues=80,  # type: ignore[arg-type]
            arguments=overfitting, name="starter-t", clock=TickingClock(),
        )  # fmt: skip

    monkeypatch.setattr(bootstrap_module, "bootstrap", tiny)
    terminal = logging.StreamHandler(sys.stderr)  # as `magpie` configures it (bot.cli.configure_logging)
    terminal.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.INFO)
    root.addHandler(terminal)
    quiet_model_progress_bars()  # as `magpie` does: transformers' own bars ("Loading weights") stay off
    try:
        starter = await cli_training.build_starter(settings, db, minutes=1, report=sys.stdout)
    finally:
        root.removeHandler(terminal)
        transformers_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    out, err = capsys.readouterr()

    shown = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]  # what each terminal line ends up showing
    logged = [line for line in shown if " INFO " in line]
    assert any("trainer.train: step" in line for line in logged), "the trainer logged while the bar showed"
    for line in logged:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO ", line), f"a log line broke into the bar: {line!r}"
    for line in shown:
        bar = line.startswith("Starter model:")
        assert (bar and line.endswith(" left")) or (not bar and "%|" not in line), f"bar and text mixed: {line!r}"
    assert "Starter model: 100%|" in err
    assert not re.search(r"it/s|s/it|%/s|s/%", err), "no rate, so no unit that flips"

    evaluated = dict(starter.metrics["eval_loss_by_step"])
    best = min(evaluated, key=evaluated.__getitem__)
    assert starter.metrics["eval_loss"] == pytest.approx(evaluated[best]), "the kept checkpoint is the best logged"
    schedule = starter.metrics["schedule"]
    assert schedule["max_steps"] < schedule["recipe_steps"]
    assert out.splitlines()[-1] == (
        f"Built starter-t in {starter.path} (now the active model). It trained {starter.metrics['steps']} of the "
        f"recipe's {schedule['recipe_steps']} steps in a 1-minute budget; held-out perplexity "
        f"{perplexity_text(evaluated[best])} (its best checkpoint, step {best}). "
        f"For a better one: magpie bootstrap --minutes "
        f"{math.ceil(schedule['recipe_steps'] / starter.metrics['steps'])}."
    )
