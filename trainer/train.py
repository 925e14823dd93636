"""Fine-tune a causal LM on dialogue samples and write a new model version directory.

Reads top to bottom like transformers' `run_clm.py`: arguments -> seed -> model -> tokenize -> pack -> train
(optionally stopping on the eval loss) -> save -> evaluate. What it fixes relative to the seed notebook: no padding
to 512 (samples are packed into full blocks), the end-of-turn EOS stays a target although pad = EOS, optional
response-only loss, bounded CPU threads. Early stopping on the held-out loss (`select_on_eval`) serves the starter;
retraining leaves the held-out data to the promotion gate.

Who calls it: a retraining run's own process (`python -m trainer.retrain`, started by the bot or by `magpie
retrain`) calls `train()` in a worker thread, so the bot keeps serving meanwhile and that process's event loop keeps
recording progress; the offline starter (`magpie bootstrap`, or `magpie run` when the Hub is unreachable) calls it
in a worker thread too. This module has no command line of its own.

It is longer than most (about 500 lines) on purpose: like `run_clm.py`, one training program read in order, its
arguments dataclass beside the stages that use it. Its logging plumbing lives in `trainer.training_logs`.

A version directory holds: `model.safetensors`, `config.json`, the tokenizer files, `metrics.json` and
`manifest.json` (the ids of the logged messages it was trained on). It is written under a hidden `.partial`
name and renamed into place at the end, so a killed run never leaves a half-written version behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    EarlyStoppingCallback,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)

from core.errors import ModelLoadError
from core.hardware import cpu_has_native_bf16
from core.perplexity import perplexity
from core.settings import Settings
from trainer.packing import Encoded, EncodingStats, Features, PadCollator, encode_samples, pack, unpacked
from trainer.samples import Sample
from trainer.training_logs import LogToLogger, ProgressFn, ReportProgress, false_alarms_hidden

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]
"""TRAIN_PRECISION: `auto` is bf16 autocast where the hardware computes bf16 natively, else fp32."""


FINE_TUNE_RATE_KEY = "magpie_fine_tune_learning_rate"
"""A key of a model's `config.json`: the peak learning rate at which to fine-tune it. The offline starter writes it
(`trainer.bootstrap`), and every version trained from a model keeps its config, so it holds down the line."""

GPT2_FINE_TUNE_RATE = 5e-5
"""The usual rate for fine-tuning a pretrained GPT-2 (the seed notebook's): a model that names none gets it."""


def fine_tune_rate(config: PretrainedConfig | None) -> float:
    """The rate TRAIN_LEARNING_RATE means when unset: the model's own (`FINE_TUNE_RATE_KEY`), else GPT-2's.

    Why per model: one rate does not fit both bases Magpie trains. 5e-5 suits OpenAI's GPT-2, pretrained on
    billions of tokens; the offline starter, 5M parameters trained here from scratch at 1e-3, learns nothing at it
    (`bench/learning.py`: 0 of 10 taught answers recalled after a default run, training loss still 3.7)."""
    value = getattr(config, FINE_TUNE_RATE_KEY, None) if config is not None else None
    return float(value) if isinstance(value, int | float) and value > 0 else GPT2_FINE_TUNE_RATE


FINE_TUNE_MIN_STEPS_KEY = "magpie_fine_tune_min_steps"
"""A key of a model's `config.json`: the fewest optimizer steps a fine-tuning run of it should make
(`with_min_steps`), kept down the line like `FINE_TUNE_RATE_KEY`."""


def fine_tune_min_steps(config: PretrainedConfig) -> int:
    """The steps TRAIN_MIN_STEPS means when unset: the model's own (`FINE_TUNE_MIN_STEPS_KEY`), else none (the
    epochs alone size a run, as for OpenAI's GPT-2, which names none)."""
    value = getattr(config, FINE_TUNE_MIN_STEPS_KEY, None)
    return int(value) if isinstance(value, int) and value > 0 else 0


@dataclass
class TrainArguments:
    """Everything a training run needs besides data and model.

    A field that mirrors a TRAIN_* setting has no default here: its default lives in `Settings` only, and
    `from_settings` fills it. The fields after `device` shape one run (packing, evaluation, limits for quick runs)
    and have no setting.
    """

    epochs: float = field(metadata={"help": "Passes over the data (fewer if select_on_eval stops early)."})
    batch_size: int = field(metadata={"help": "Blocks (or samples, without packing) per step."})
    learning_rate: float | None = field(
        metadata={"help": "Peak AdamW learning rate (linear decay); None: the model's own (`fine_tune_rate`)."}
    )
    warmup_steps: int = field(metadata={"help": "Linear warm-up steps, capped at a tenth of the run's steps."})
    weight_decay: float = field(metadata={"help": "AdamW weight decay."})
    logging_steps: int = field(metadata={"help": "Log the training loss every this many steps."})
    max_length: int = field(
        metadata={"help": "Longest sample and block size, in tokens (capped by the model's context)."}
    )
    threads: int = field(metadata={"help": "CPU threads torch may use (keep chat responsive)."})
    loss_on_response_only: bool = field(metadata={"help": "Learn only the target line, not the context before it."})
    precision: Precision = field(
        metadata={"help": "auto (bf16 autocast where the hardware has native bf16, else fp32), fp32 or bf16."}
    )
    device: Literal["auto", "cpu", "cuda"] = field(metadata={"help": "auto, cpu or cuda."})
    packing: bool = field(
        default=True, metadata={"help": "Pack samples into full blocks (faster) instead of dynamic padding."}
    )
    select_on_eval: bool = field(
        default=True,
        metadata={
            "help": "Evaluate every epoch, stop early and keep the best epoch. Retraining turns it off: the "
            "promotion gate then judges a version that its held-out data never shaped."
        },
    )
    early_stopping_patience: int = field(
        default=2, metadata={"help": "Stop after this many evaluations (one per epoch) without improvement."}
    )
    eval_steps: int | None = field(
        default=None,
        metadata={"help": "Evaluate (and keep the best checkpoint) every this many steps instead of once per epoch."},
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Samples per evaluation batch."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1 = by epochs)."})
    min_steps: int | None = field(
        default=0,
        metadata={
            "help": "Train at least this many steps: more epochs for a small log, at most MAX_EPOCHS; None: the "
            "model's own (`fine_tune_min_steps`) (TRAIN_MIN_STEPS)."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training samples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many eval samples."})
    seed: int = field(default=42, metadata={"help": "Seed for initialisation, shuffling and dropout (SEED if set)."})
    method: Literal["full", "lora"] = field(
        default="full",
        metadata={"help": "full: every weight (a whole model per version); lora: a LoRA adapter on the frozen model."},
    )
    lora_rank: int = field(default=8, metadata={"help": "The adapter's rank (LORA_RANK)."})
    lora_alpha: int = field(default=16, metadata={"help": "The adapter's scaling numerator (LORA_ALPHA)."})
    lora_targets: tuple[str, ...] = field(
        default=("c_attn", "c_proj"), metadata={"help": "The modules the adapter changes (LORA_TARGETS)."}
    )

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "learning_rate", "logging_steps", "threads", "eval_batch_size")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_length < 16:
            raise ValueError(f"max_length must be at least 16 tokens, got {self.max_length}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.early_stopping_patience < 1:
            raise ValueError("warmup_steps and weight_decay must be >= 0, early_stopping_patience >= 1")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ValueError(f"eval_steps must be at least 1 when set, got {self.eval_steps}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be positive or -1, got {self.max_steps}")
        for name in ("max_train_samples", "max_eval_samples"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 when set, got {value}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.method not in ("full", "lora") or self.lora_rank < 1 or not self.lora_targets:
            raise ValueError(f"method must be full or lora with a rank >= 1 and targets, got {self.method!r}")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> TrainArguments:
        """The TRAIN_* settings, with keyword overrides on top."""
        values: dict[str, Any] = {
            "epochs": settings.train_epochs,
            "batch_size": settings.train_batch_size,
            "learning_rate": settings.train_learning_rate,
            "warmup_steps": settings.train_warmup_steps,
            "weight_decay": settings.train_weight_decay,
            "logging_steps": settings.train_logging_steps,
            "max_length": settings.train_max_length,
            "threads": settings.train_threads,
            "loss_on_response_only": settings.train_loss_on_response_only,
            "precision": settings.train_precision,
            "device": settings.device,
            "method": settings.train_method,
            "lora_rank": settings.lora_rank,
            "lora_alpha": settings.lora_alpha,
            "lora_targets": tuple(settings.lora_targets),
            "min_steps": settings.train_min_steps,
        }
        if settings.seed is not None:
            values["seed"] = settings.seed
        if overrides.get("method", settings.train_method) == "lora":
            values["learning_rate"] = settings.lora_learning_rate
        return cls(**{**values, **overrides})

    def resolved_learning_rate(self) -> float:
        """The peak rate: `learning_rate`, which a run sets from the model when it is None (`fine_tune_rate`)."""
        return fine_tune_rate(None) if self.learning_rate is None else self.learning_rate

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_bf16(self) -> bool:
        """Whether to train under bf16 autocast: as `precision` says, and with `auto` where the hardware computes
        bf16 natively (recent GPUs, CPUs with AVX512-BF16/AMX), where it helps."""
        if self.precision != "auto":
            return self.precision == "bf16"
        if self.resolved_device() == "cuda":
            return bool(torch.cuda.is_bf16_supported())
        return cpu_has_native_bf16()


class FitSchedule(Protocol):
    """Chooses a run's schedule once the data is packed, e.g. to fit a time budget (`trainer.starter_budget`).

    Called with the model about to be trained, the packed training rows, the encoded held-out samples, the pad id
    and the arguments; returns the arguments to train with and what to record about the choice in `metrics.json`.
    """

    def __call__(
        self,
        model: PreTrainedModel,
        train_features: list[Features],
        eval_encoded: list[Encoded],
        pad_token_id: int,
        args: TrainArguments,
    ) -> tuple[TrainArguments, dict[str, Any]]: ...


@dataclass(frozen=True)
class TrainResult:
    """Where the new version was written and what `metrics.json` says."""

    output_dir: Path
    metrics: dict[str, Any]


ADAPTER_CONFIG = "adapter_config.json"
"""What makes a version directory a LoRA adapter (peft's file) rather than a whole model."""


def adapter_base(source: str | Path) -> str | None:
    """The model a LoRA adapter directory was trained on (None: `source` is a whole model, or a hub id)."""
    config = Path(source) / ADAPTER_CONFIG
    if not config.is_file():
        return None
    return str(json.loads(config.read_text())["base_model_name_or_path"])


def load_for_training(source: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from a local directory (or a hub id, when online), with pad = EOS. A LoRA adapter
    directory loads its base model with the adapter on top (for scoring; a new adapter always starts fresh)."""
    base = adapter_base(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base or source)
        model = AutoModelForCausalLM.from_pretrained(base or source)
        if base is not None:
            from peft import PeftModel

            with peft_notes_hidden():
                model = PeftModel.from_pretrained(model, source)  # type: ignore[assignment]
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f'Model "{source}" could not be loaded for training ({type(exc).__name__}); '
            "check that the directory exists and was written by save_pretrained."
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def context_size(model: PreTrainedModel) -> int:
    """The model's context window in tokens (GPT-2: `n_positions`)."""
    config = model.config
    size = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(size or 1024)


@dataclass
class _Data:
    """The tokenized splits and what the length bound did to them."""

    train: list[Encoded]
    eval: list[Encoded]
    stats: EncodingStats
    max_length: int


def train(
    args: TrainArguments,
    train_samples: Sequence[Sample],
    eval_samples: Sequence[Sample],
    *,
    model_source: str,
    output_dir: Path,
    parent_version: str | None = None,
    progress: ProgressFn | None = None,
    metadata: Mapping[str, Any] | None = None,
    fit_schedule: FitSchedule | None = None,
) -> TrainResult:
    """Fine-tunes `model_source` on the samples and writes a new version directory at `output_dir`.

    `metadata` adds fields to `metrics.json` (e.g. who triggered the run); `fit_schedule` may change the arguments
    once the data is packed (the starter's time budget) and adds its record as `schedule`. A run that fails removes its
    half-written directory; one that is killed leaves only the hidden `.partial` one, which the next run of the
    same name clears.
    """
    output_dir = Path(output_dir)
    partial = _start_version_dir(output_dir)
    extra = {"model_source": model_source, "parent_version": parent_version, **(metadata or {})}
    try:
        metrics = _train_into(
            partial, args, train_samples, eval_samples, model_source=model_source, extra=extra, progress=progress,
            fit_schedule=fit_schedule,
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, output_dir)
    if progress is not None:
        progress(1.0)
    log.info("trained %s: eval loss %s, perplexity %s", output_dir.name, metrics["eval_loss"], metrics["perplexity"])
    return TrainResult(output_dir, metrics)


def _train_into(
    directory: Path,
    args: TrainArguments,
    train_samples: Sequence[Sample],
    eval_samples: Sequence[Sample],
    *,
    model_source: str,
    extra: dict[str, Any],
    progress: ProgressFn | None,
    fit_schedule: FitSchedule | None = None,
) -> dict[str, Any]:
    """The run itself, stage by stage; returns the metrics it wrote."""
    started = time.perf_counter()

    # Seed and threads: reproducible runs, and a bounded share of the CPU so the bot stays responsive.
    transformers.set_seed(args.seed)
    torch.set_num_threads(args.threads)

    # Model and tokenizer (and the model's own fine-tuning rate, unless one was set); with `lora`, a fresh adapter
    # on the frozen model (never one trained before).
    model, tokenizer = load_for_training(model_source)
    if args.learning_rate is None:
        args = replace(args, learning_rate=fine_tune_rate(model.config))
    if args.min_steps is None:
        args = replace(args, min_steps=fine_tune_min_steps(model.config))
    if args.method == "lora":
        model = with_fresh_adapter(model, args)

    # Tokenize: prompt and response separately (the response mask falls on a token boundary); bound the length.
    data = _tokenize(args, model, tokenizer, train_samples, eval_samples)

    # Pack into full blocks (or keep one row per sample for dynamic padding).
    features = pack(data.train, block_size=data.max_length, seed=args.seed) if args.packing else unpacked(data.train)
    timings = {"data_s": time.perf_counter() - started}

    # Enough steps: a small log is passed over more often, or a community's lessons are seen too few times.
    args = with_min_steps(args, train_rows=len(features))

    # Fit the schedule to a time budget, when there is one (the offline starter): steps timed on a copy of the model.
    if fit_schedule is not None:
        args, extra["schedule"] = fit_schedule(model, features, data.eval, _pad_id(tokenizer), args)

    # Train with the HF Trainer, keeping the checkpoint with the best eval loss.
    phase = time.perf_counter()
    checkpoints = directory / "checkpoints"
    trainer = build_trainer(
        model, tokenizer, args, train_features=features, eval_features=unpacked(data.eval), checkpoints=checkpoints,
        progress=progress,
    )  # fmt: skip
    with false_alarms_hidden(model):
        outcome = trainer.train()
    shutil.rmtree(checkpoints, ignore_errors=True)
    timings["train_s"] = time.perf_counter() - phase

    # Evaluate the kept model exactly as the promotion gate will: per sample, fp32, token-weighted.
    phase = time.perf_counter()
    eval_loss = mean_loss(model, data.eval, pad_token_id=_pad_id(tokenizer), batch_size=args.eval_batch_size)
    timings["eval_s"] = time.perf_counter() - phase

    # Save: weights (safetensors), config, tokenizer, metrics and manifest.
    metrics = {**_metrics(args, trainer.state, data, train_loss=outcome.training_loss, eval_loss=eval_loss), **extra}
    metrics["timings"] = {**timings, "total_s": time.perf_counter() - started}
    _save(model, tokenizer, directory, metrics=metrics, train=data.train)
    return metrics


@contextlib.contextmanager
def peft_notes_hidden() -> Iterator[None]:
    """peft asks transformers for a name transformers deprecated (`is_gradient_checkpointing`): a FutureWarning
    that is neither ours nor the operator's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def with_fresh_adapter(model: PreTrainedModel, args: TrainArguments) -> PreTrainedModel:
    """`model` frozen under a new LoRA adapter (`args.lora_*`). GPT-2's layers are `Conv1D`, whose weight is stored
    transposed: `fan_in_fan_out` tells peft so."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        target_modules=list(args.lora_targets),
        lora_dropout=0.0,
        fan_in_fan_out=model.config.model_type == "gpt2",
        task_type="CAUSAL_LM",
    )
    with peft_notes_hidden():
        adapted: PreTrainedModel = get_peft_model(model, config)  # type: ignore[assignment]
    return adapted


def _start_version_dir(output_dir: Path) -> Path:
    """A fresh hidden `.partial` sibling to write into; the final name appears only when everything is there."""
    if output_dir.exists():
        raise FileExistsError(f"{output_dir} already exists; a model version is never overwritten")
    partial = output_dir.with_name(f".{output_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ModelLoadError("the tokenizer has neither a pad nor an EOS token")
    return int(pad)


def _tokenize(
    args: TrainArguments,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_samples: Sequence[Sample],
    eval_samples: Sequence[Sample],
) -> _Data:
    max_length = min(args.max_length, context_size(model))
    stats = EncodingStats()

    def encode(samples: Sequence[Sample]) -> list[Encoded]:
        return encode_samples(
            samples, tokenizer, max_length=max_length, response_only=args.loss_on_response_only, stats=stats
        )

    data = _Data(
        encode(train_samples[: args.max_train_samples]),
        encode(eval_samples[: args.max_eval_samples]),
        stats,
        max_length,
    )
    if not data.train:
        raise ValueError("no training samples left after tokenization")
    return data


MAX_EPOCHS = 20
"""The most passes TRAIN_MIN_STEPS may ask for: a log of a few dozen lines is not worth 800 steps of memorising."""


def with_min_steps(args: TrainArguments, *, train_rows: int) -> TrainArguments:
    """`args` with as many epochs as `min_steps` needs (never fewer than `epochs`, at most `MAX_EPOCHS`).

    Why: TRAIN_EPOCHS alone sizes a run by passes, and three passes over a new community's few hundred lines are
    ~135 optimizer steps, after which the starter recalled 1 of 10 answers its community taught it (8 passes: 7 of
    10; `bench/learning.py`, issue #19). A large log makes the steps with TRAIN_EPOCHS and is left as it is."""
    if not args.min_steps or args.max_steps > 0 or train_rows <= 0:
        return args
    steps_per_epoch = math.ceil(train_rows / args.batch_size)
    needed = min(float(MAX_EPOCHS), math.ceil(args.min_steps / steps_per_epoch))
    return replace(args, epochs=needed) if needed > args.epochs else args


def training_arguments(
    args: TrainArguments, output_dir: Path, *, train_rows: int, with_eval: bool
) -> TrainingArguments:
    """The HF TrainingArguments for a run: no hub, no reporting, eval and best-checkpoint once per epoch (or every
    `eval_steps`, and at the last step)."""
    steps_per_epoch = math.ceil(train_rows / args.batch_size)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.epochs * steps_per_epoch)
    strategy = ("steps" if args.eval_steps else "epoch") if with_eval else "no"
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.resolved_learning_rate(),
        warmup_steps=min(args.warmup_steps, total_steps // 10),
        weight_decay=args.weight_decay,
        logging_steps=args.logging_steps,
        logging_first_step=True,  # the loss curve starts where training did
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=args.eval_steps,
        save_steps=args.eval_steps or 500,
        save_only_model=True,
        save_total_limit=1,
        load_best_model_at_end=with_eval,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        bf16=args.resolved_bf16(),
        use_cpu=args.resolved_device() == "cpu",
        seed=args.seed,
        data_seed=args.seed,
        report_to=[],
        push_to_hub=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        prediction_loss_only=True,
    )


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    args: TrainArguments,
    *,
    train_features: list[Features],
    eval_features: list[Features],
    checkpoints: Path,
    progress: ProgressFn | None = None,
) -> Trainer:
    """A Trainer over ready-made features, logging to `logging` (not stdout); with `select_on_eval` it evaluates
    every epoch, stops on the eval loss and keeps the best epoch."""
    with_eval = bool(eval_features) and args.select_on_eval
    callbacks: list[TrainerCallback] = [LogToLogger()]
    if with_eval:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
    if progress is not None:
        callbacks.append(ReportProgress(progress))
    trainer = GateScoredTrainer(
        model=model,
        args=training_arguments(args, checkpoints, train_rows=len(train_features), with_eval=with_eval),
        data_collator=PadCollator(_pad_id(tokenizer)),
        train_dataset=train_features,
        eval_dataset=eval_features if with_eval else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


class GateScoredTrainer(Trainer):
    """A Trainer whose evaluations score the held-out samples as the promotion gate and the final report do
    (`features_loss`: token-weighted, each sample on its own), not as the mean of per-batch means. So the losses
    logged while training, the checkpoint kept as the best, and the loss recorded for the kept model are one
    measure: the best loss the log shows is the one the version is registered with."""

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        features = self.eval_dataset if eval_dataset is None else eval_dataset
        assert isinstance(self.model, PreTrainedModel) and isinstance(features, list)  # as `build_trainer` made them
        pad_token_id = self.data_collator.pad_token_id  # type: ignore[union-attr]
        loss = features_loss(self.model, features, pad_token_id=pad_token_id, batch_size=self.args.eval_batch_size)
        metrics = {f"{metric_key_prefix}_loss": loss if loss is not None else math.nan}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def mean_loss(
    model: PreTrainedModel, encoded: Sequence[Encoded], *, pad_token_id: int, batch_size: int = 8
) -> float | None:
    """Token-weighted mean cross-entropy over the labelled positions, each sample on its own (as at inference).

    None when there is nothing to score. Samples are batched by length so little compute goes to padding.
    """
    return features_loss(model, unpacked(encoded), pad_token_id=pad_token_id, batch_size=batch_size)


def features_loss(
    model: PreTrainedModel, features: Sequence[Features], *, pad_token_id: int, batch_size: int = 8
) -> float | None:
    """`mean_loss` over feature rows (one per sample)."""
    if not features:
        return None
    collate = PadCollator(pad_token_id)
    ordered = sorted(features, key=lambda f: len(f["input_ids"]))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.train(False)
    with torch.inference_mode():
        for start in range(0, len(ordered), batch_size):
            batch = {k: v.to(device) for k, v in collate(ordered[start : start + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            targets = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(losses)
            count += int((targets != -100).sum())
    return total / count if count else None


def evaluate_loss(
    model_dir: str | Path,
    eval_samples: Sequence[Sample],
    *,
    max_length: int,
    response_only: bool,
    batch_size: int,
    threads: int | None = None,
) -> float:
    """Scores a saved model on samples; the gate calls it for the active and the new version on the same split,
    with the run's `TrainArguments` values (`threads` None leaves torch's thread count as it is)."""
    if threads is not None:
        torch.set_num_threads(threads)
    model, tokenizer = load_for_training(str(model_dir))
    encoded = encode_samples(
        eval_samples, tokenizer, max_length=min(max_length, context_size(model)), response_only=response_only
    )
    loss = mean_loss(model, encoded, pad_token_id=_pad_id(tokenizer), batch_size=batch_size)
    if loss is None:
        raise ValueError("no evaluation samples to score")
    return loss


def _metrics(
    args: TrainArguments, state: TrainerState, data: _Data, *, train_loss: float, eval_loss: float | None
) -> dict[str, Any]:
    stamps = [e.sample.target.created_at for e in data.train if e.sample.target.created_at is not None]
    evals = [entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry]
    return {
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "perplexity": perplexity(eval_loss),
        "eval_loss_per_epoch": evals,
        "loss_curve": loss_curve(state),
        "eval_loss_by_step": [[e["step"], e["eval_loss"]] for e in state.log_history if "eval_loss" in e],
        "best_step": state.best_global_step,
        "train_samples": len(data.train),
        "eval_samples": len(data.eval),
        "train_tokens": sum(len(e.input_ids) for e in data.train),
        "samples_trimmed": data.stats.trimmed,
        "samples_too_long": data.stats.too_long,
        "max_length": data.max_length,
        "steps": state.global_step,
        "epochs_run": state.epoch,
        "stopped_early": bool(state.max_steps and state.global_step < state.max_steps),
        "data_from": min(stamps).isoformat() if stamps else None,
        "data_to": max(stamps).isoformat() if stamps else None,
        "bf16": args.resolved_bf16(),
        "arguments": asdict(args),
        "created_at": datetime.now(UTC).isoformat(),
    }


def loss_curve(state: TrainerState) -> list[list[float]]:
    """[step, training loss] every TRAIN_LOGGING_STEPS steps (and the first): what the dashboard plots of a run."""
    return [[entry["step"], entry["loss"]] for entry in state.log_history if "loss" in entry and "step" in entry]


def _save(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    directory: Path,
    *,
    metrics: dict[str, Any],
    train: Sequence[Encoded],
) -> None:
    """Weights as safetensors (save_pretrained's default), config, tokenizer, metrics and the manifest. An adapter
    saves only its own weights and config: its tokenizer is its base model's."""
    model.save_pretrained(directory)
    if not (directory / ADAPTER_CONFIG).is_file():
        tokenizer.save_pretrained(directory)
    manifest = dict(pair for e in train for pair in e.sample.sources())
    (directory / "manifest.json").write_text(json.dumps({"messages": sorted(manifest.items())}))
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))


def read_manifest(version_dir: Path) -> dict[int, int | None]:
    """Message id -> author id of what a version was trained on (for registering it in the database)."""
    data = json.loads((Path(version_dir) / "manifest.json").read_text())
    return {int(message_id): user_id for message_id, user_id in data["messages"]}
