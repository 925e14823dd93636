"""A tiny model fine-tuned for a few steps: the version directory, its metrics and manifest, and evaluate_loss."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import trainer.train
from core.chat.service import ChatService
from core.serving.dialogue import speaker_key
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import RunStatus, TrainingRun
from tests.loop_support import WAIT_S, greedy_engine, log_community, loop_settings
from trainer.orchestrator import TrainingOrchestrator
from trainer.samples import Line, Sample
from trainer.train import (
    FINE_TUNE_MIN_STEPS_KEY,
    FINE_TUNE_RATE_KEY,
    GPT2_FINE_TUNE_RATE,
    MAX_EPOCHS,
    TrainArguments,
    evaluate_loss,
    fine_tune_min_steps,
    fine_tune_rate,
    read_manifest,
    train,
    training_arguments,
    with_min_steps,
)

CONVERSATIONS = [
    ("hello there, how are you today?", "I am fine, thank you. And you?"),
    ("what is your favourite colour?", "I like blue and green, like the sea."),
    ("안녕하세요, 오늘 기분이 어때요?", "좋아요! 날씨가 정말 좋네요 😀"),
    ("do you like pizza or pasta more?", "pizza, obviously. with extra cheese 🍕"),
    ("the quick brown fox", "jumps over the lazy dog"),
    ("שלום, מה שלומך?", "I am fine, thank you. And you?"),
]


def corpus(chat_prefix: str, first_id: int) -> list[Sample]:
    """One chat per exchange; the lines carry message and user ids like logged messages do."""
    samples = []
    for index, (question, answer) in enumerate(CONVERSATIONS):
        asked = Line(speaker_key(1, bot=False), question, message_id=first_id + 2 * index, user_id=1)
        answered = Line(speaker_key(2, bot=False), answer, message_id=first_id + 2 * index + 1, user_id=2)
        samples.append(Sample((asked,), answered, f"{chat_prefix}-{index}"))
    return samples


TINY = TrainArguments(
    epochs=2, batch_size=2, learning_rate=3e-3, warmup_steps=0, weight_decay=0.01, logging_steps=1, max_length=64,
    threads=1, loss_on_response_only=False, precision="fp32", device="auto", seed=0,
)  # fmt: skip
"""A few quick steps in fp32: the expected outcomes must not depend on whether this CPU computes bf16."""


def score(model_dir: Path, samples: list[Sample]) -> float:
    """The held-out loss the way a run with TINY is judged."""
    return evaluate_loss(
        model_dir, samples, max_length=TINY.max_length, response_only=False, batch_size=TINY.eval_batch_size, threads=1
    )


def test_a_few_steps_write_a_loadable_version(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trainer.train, "cpu_has_native_bf16", lambda: True)  # as on an AVX512-BF16 CPU: fp32 holds
    train_samples, eval_samples = corpus("train", 100) * 2, corpus("eval", 500)
    before = score(tiny_model_dir, eval_samples)
    seen: list[float] = []

    result = train(
        TINY,
        train_samples,
        eval_samples,
        model_source=str(tiny_model_dir),
        output_dir=tmp_path / "v1",
        parent_version="tiny",
        progress=seen.append,
    )

    version = tmp_path / "v1"
    assert result.output_dir == version
    # GPT-2's output weights are tied to its input embedding: reloading the best checkpoint restores them through
    # the tie, and the Trainer's false "missing keys" alarm about them stays out of the logs.
    assert "missing keys" not in caplog.text
    assert {"model.safetensors", "config.json", "metrics.json", "manifest.json", "tokenizer_config.json"} <= {
        p.name for p in version.iterdir()
    }
    assert not list(tmp_path.glob(".*partial")), "the temporary directory was renamed into place"
    assert not (version / "checkpoints").exists()

    metrics = json.loads((version / "metrics.json").read_text())
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["eval_loss"] < before, "a few steps on the same kind of text must lower the held-out loss"
    assert (metrics["train_samples"], metrics["eval_samples"], metrics["parent_version"]) == (12, 6, "tiny")
    assert metrics["steps"] >= 2 and metrics["timings"]["total_s"] > 0
    # The training loss at every logged step (TINY logs each one): what the dashboard plots of the last run.
    assert [step for step, _ in metrics["loss_curve"]] == list(range(1, metrics["steps"] + 1))
    assert all(math.isfinite(loss) for _, loss in metrics["loss_curve"])
    assert metrics["bf16"] is False and metrics["arguments"]["precision"] == "fp32"
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)

    assert read_manifest(version) == {100 + i: 1 + i % 2 for i in range(12)}

    model = AutoModelForCausalLM.from_pretrained(version)
    tokenizer = AutoTokenizer.from_pretrained(version)
    assert model.config.n_layer == 2 and tokenizer.eos_token == "<|endoftext|>"
    assert score(version, eval_samples) == pytest.approx(metrics["eval_loss"], rel=1e-4)


def test_a_version_is_never_overwritten(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "v1").mkdir()
    with pytest.raises(FileExistsError):
        train(TINY, corpus("t", 1), [], model_source=str(tiny_model_dir), output_dir=tmp_path / "v1")


def test_arguments_come_from_settings_and_are_validated() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, train_epochs=4, train_threads=2, train_loss_on_response_only=True, train_precision="fp32"
    )
    args = TrainArguments.from_settings(settings, batch_size=8)
    assert (args.epochs, args.threads, args.loss_on_response_only, args.batch_size) == (4, 2, True, 8)
    assert args.precision == "fp32"
    assert (args.warmup_steps, args.weight_decay, args.logging_steps, args.max_length) == (100, 0.01, 10, 512)
    with pytest.raises(ValueError, match="batch_size"):
        replace(args, batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        replace(args, max_length=8)
    with pytest.raises(ValueError, match="precision"):
        replace(args, precision="fp16")


def test_an_unset_learning_rate_is_the_models_own(tiny_model_dir: Path, tmp_path: Path) -> None:
    """TRAIN_LEARNING_RATE unset: a model that names its fine-tuning rate (the offline starter does) trains at it,
    and a version trained from it names it too; a model that names none (OpenAI's GPT-2) trains at 5e-5."""
    args = replace(TINY, learning_rate=None, epochs=1, max_steps=1)
    assert TrainArguments.from_settings(Settings(_env_file=None)).learning_rate is None  # type: ignore[call-arg]
    plain = train(args, corpus("t", 1), [], model_source=str(tiny_model_dir), output_dir=tmp_path / "plain")
    assert plain.metrics["arguments"]["learning_rate"] == GPT2_FINE_TUNE_RATE == 5e-5

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    setattr(model.config, FINE_TUNE_RATE_KEY, 2e-3)
    model.save_pretrained(tmp_path / "named")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "named")
    named = train(args, corpus("t", 1), [], model_source=str(tmp_path / "named"), output_dir=tmp_path / "v1")
    assert named.metrics["arguments"]["learning_rate"] == 2e-3
    assert fine_tune_rate(AutoModelForCausalLM.from_pretrained(tmp_path / "v1").config) == 2e-3  # kept down the line
    explicit = train(TINY, corpus("t", 1), [], model_source=str(tmp_path / "named"), output_dir=tmp_path / "v2")
    assert explicit.metrics["arguments"]["learning_rate"] == TINY.learning_rate  # a rate that was set wins


@pytest.mark.parametrize(
    ("precision", "native_bf16", "autocast"),
    [("auto", True, True), ("auto", False, False), ("fp32", True, False), ("bf16", False, True)],
)
def test_train_precision_decides_bf16_autocast(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, precision: str, native_bf16: bool, autocast: bool
) -> None:
    """TRAIN_PRECISION: fp32 and bf16 whatever the CPU; auto follows the CPU's native bf16 (today's behaviour)."""
    monkeypatch.setattr(trainer.train, "cpu_has_native_bf16", lambda: native_bf16)
    settings = Settings(_env_file=None, device="cpu", train_precision=precision)  # type: ignore[call-arg]
    args = TrainArguments.from_settings(settings)
    assert args.resolved_bf16() is autocast
    assert training_arguments(args, tmp_path, train_rows=4, with_eval=False).bf16 is autocast


async def test_a_training_process_reports_progress_and_keeps_its_log_quiet(
    db: Database, database_url: str, tiny_model_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A run's own process, started the way the bot and `magpie retrain` start it (`python -m trainer.retrain`):
    progress arrives up to 1.0, and its log, which lands in the bot's, holds no progress bars and no false alarms."""
    settings = loop_settings(tmp_path, database_url, tiny_model_dir, train_epochs=1)
    await log_community(ChatService(settings=settings, db=db, engine=greedy_engine()), chats=4)
    seen: list[float] = []

    async def on_progress(fraction: float) -> None:
        seen.append(fraction)

    orchestrator = TrainingOrchestrator(settings=settings, db=db)
    await asyncio.wait_for(orchestrator.run_in_foreground(triggered_by="test", on_progress=on_progress), WAIT_S)

    log = capfd.readouterr().err
    assert "trainer.dataset: dataset: " in log, "the child's log is what this test reads"
    assert "Writing model shards" not in log and "Loading weights" not in log and "loss_type" not in log
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)
    async with db.sessions() as session:
        run = await session.get(TrainingRun, 1)
    assert run is not None and run.status in (RunStatus.PROMOTED, RunStatus.REJECTED) and run.progress == 1.0
    assert run.metrics["train_samples"] > 0 and (settings.models_dir / "v1" / "model.safetensors").is_file()
    written = json.loads((settings.models_dir / "v1" / "metrics.json").read_text())
    assert written["arguments"]["precision"] == "fp32" and written["bf16"] is False, "TRAIN_PRECISION reached it"


def test_a_small_log_trains_more_epochs_up_to_a_limit() -> None:
    """TRAIN_MIN_STEPS: three passes over a few hundred lines teach the starter almost nothing (issue #19)."""
    args = replace(TINY, epochs=3, batch_size=2, min_steps=400)
    assert with_min_steps(args, train_rows=100).epochs == 8  # 50 steps a pass: 8 passes make 400
    assert with_min_steps(args, train_rows=1_000).epochs == 3  # 3 passes already make 1,500 steps
    assert with_min_steps(args, train_rows=4).epochs == MAX_EPOCHS == 20  # a few lines are not memorised for ever
    assert with_min_steps(replace(args, min_steps=0), train_rows=100).epochs == 3
    assert with_min_steps(replace(args, max_steps=10), train_rows=100).epochs == 3  # a step budget decides alone
    assert TrainArguments.from_settings(Settings(_env_file=None, train_min_steps=7)).min_steps == 7  # type: ignore[call-arg]
    assert with_min_steps(replace(args, min_steps=None), train_rows=100).epochs == 3


def test_an_unset_step_floor_is_the_models_own(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert fine_tune_min_steps(model.config) == 0  # a model that names none: TRAIN_EPOCHS alone
    setattr(model.config, FINE_TUNE_MIN_STEPS_KEY, 9)
    model.save_pretrained(tmp_path / "named")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "named")
    args = replace(TINY, epochs=1, batch_size=2, min_steps=None)
    result = train(args, corpus("t", 1) * 2, [], model_source=str(tmp_path / "named"), output_dir=tmp_path / "v1")
    assert result.metrics["arguments"]["min_steps"] == 9 and result.metrics["steps"] >= 9
