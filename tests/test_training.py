"""A tiny model fine-tuned for a few steps: the version directory, its metrics and manifest, and evaluate_loss."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.settings import Settings
from trainer.dataset import DatasetReport, Line, Sample, export_jsonl
from trainer.train import TrainArguments, evaluate_loss, read_manifest, train

ROOT = Path(__file__).resolve().parent.parent

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
        asked = Line("user:1", question, message_id=first_id + 2 * index, user_id=1)
        answered = Line("user:2", answer, message_id=first_id + 2 * index + 1, user_id=2)
        samples.append(Sample((asked,), answered, f"{chat_prefix}-{index}"))
    return samples


TINY = TrainArguments(
    epochs=2, batch_size=2, learning_rate=3e-3, warmup_steps=0, logging_steps=1, max_length=64, threads=1, seed=0
)


def test_a_few_steps_write_a_loadable_version(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train_samples, eval_samples = corpus("train", 100) * 2, corpus("eval", 500)
    before = evaluate_loss(tiny_model_dir, eval_samples, threads=1)
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
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)

    assert read_manifest(version) == {100 + i: 1 + i % 2 for i in range(12)}

    model = AutoModelForCausalLM.from_pretrained(version)
    tokenizer = AutoTokenizer.from_pretrained(version)
    assert model.config.n_layer == 2 and tokenizer.eos_token == "<|endoftext|>"
    assert evaluate_loss(version, eval_samples, threads=1) == pytest.approx(metrics["eval_loss"], rel=1e-4)


def test_a_version_is_never_overwritten(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "v1").mkdir()
    with pytest.raises(FileExistsError):
        train(TINY, corpus("t", 1), [], model_source=str(tiny_model_dir), output_dir=tmp_path / "v1")


def test_arguments_come_from_settings_and_are_validated() -> None:
    settings = Settings(_env_file=None, train_epochs=4, train_threads=2, train_loss_on_response_only=True)  # type: ignore[call-arg]
    args = TrainArguments.from_settings(settings, batch_size=8)
    assert (args.epochs, args.threads, args.loss_on_response_only, args.batch_size) == (4, 2, True, 8)
    assert (args.warmup_steps, args.weight_decay, args.logging_steps, args.max_length) == (100, 0.01, 10, 512)
    with pytest.raises(ValueError, match="batch_size"):
        replace(args, batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        replace(args, max_length=8)


def test_training_runs_as_its_own_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`python -m trainer.train` reads an exported dataset and reports progress and the result as JSON lines."""
    dataset = tmp_path / "dataset.jsonl"
    export_jsonl(DatasetReport(train=corpus("train", 1), eval=corpus("eval", 50)), dataset)
    command = [
        sys.executable, "-m", "trainer.train",
        "--dataset", str(dataset), "--model_source", str(tiny_model_dir), "--output_dir", str(tmp_path / "v2"),
        "--epochs", "1", "--max_length", "64", "--warmup_steps", "0", "--threads", "1",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Writing model shards" not in done.stderr and "loss_type" not in done.stderr  # no noise in the bot's log
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert records[-1]["result"]["output_dir"] == str(tmp_path / "v2")
    assert records[-1]["result"]["metrics"]["train_samples"] == 6
    assert [r["progress"] for r in records[:-1]][-1] == 1.0
    assert (tmp_path / "v2" / "model.safetensors").is_file()
