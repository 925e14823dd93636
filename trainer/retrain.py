"""One training run, start to finish, in a process of its own: `python -m trainer.retrain --run-id N`.

The serving process (or `magpie retrain`) creates a `training_runs` row and starts this program; everything else
happens here, so the bot's event loop never runs torch code and a crash or a kill here cannot take the chat down.
Settings come from the environment alone (`trainer.process.child_environment` hands the parent's settings down,
secrets left out), never from a `.env` file (`trainer.process.TrainerSettings`). The run's row is read and
written through `trainer.runs`, which owns it.

Stages, top to bottom:
1. claim the run row (it must be `running`) and record this process's pid and start token;
2. build the dataset from the database (`trainer.dataset.build_dataset`: filters, caps, redaction, split by
   conversation); too little data ends the run `failed` with the reason;
3. start from the active version (or BASE_MODEL) and train into `MODELS_DIR/v<run id>` with `trainer.train.train`
   (TRAIN_THREADS threads; the directory appears only once complete);
4. score the active version and the new one on the SAME held-out split (`evaluate_loss`);
5. gate and record, in one transaction: register the version with its manifest, then either activate it (new eval
   loss <= active eval loss + PROMOTION_MARGIN, and the active version is still the one it was compared with) or
   mark it `rejected` with the reason; the run row gets the status, metrics and finish time. In that same
   transaction the manifest is checked against the log as it is now: if any message it trained on was deleted
   (`/forget`) or withdrawn (`/optout`) while it trained, the version is not registered at all, its directory is
   deleted, and the run ends `rejected` ("training data changed during the run"); the orchestrator then starts
   one new run, which reads the data again;
6. after a promotion, delete the files of versions MODELS_KEEP no longer keeps (`trainer.version_retention`).

A run that fails after its directory was renamed into place (scoring, recording) deletes that directory: only a
registered version keeps files under MODELS_DIR.

Progress goes two ways: the row's `progress` column, and JSON lines on stdout for the parent process:
`{"event": "stage", "stage": "training"}`, `{"event": "progress", "progress": 0.42}`,
`{"event": "finished", "status": "promoted"}`. Logs go to stderr. The exit status is 0 when an outcome (promoted or
rejected) was recorded, 1 when the run failed (recorded with its reason), 2 when the run row was not usable.

The module is longer than most (about 450 lines) on purpose: it reads top to bottom as one run's stages, like
transformers' `run_clm.py`, and the gate and the recording transaction it ends with are that story's last stage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import shutil
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from core.compute_threads import in_own_thread
from core.errors import MagpieError, ModelLoadError
from core.ops.logging_setup import correlated, secret_values
from core.outcomes import DATA_WITHDRAWN, NOT_ENOUGH_DATA, RunEndReason
from core.perplexity import perplexity
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import RunStatus, VersionStatus
from core.storage.versions import (
    Withdrawn,
    activate_version,
    get_active_version,
    register_version,
    set_version_status,
    withdrawn_training_data,
)
from core.texts import not_enough_data
from trainer import recall_probe, runs
from trainer.dataset import build_dataset
from trainer.model_dirs import partial_dirs, version_name
from trainer.process import die_with_parent, load_trainer_settings
from trainer.rehearsal import rehearsal_samples
from trainer.runs import RunNotClaimableError
from trainer.samples import DatasetReport, Sample
from trainer.version_retention import prune_after_promotion

if TYPE_CHECKING:
    from trainer.train import TrainArguments

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]
"""Where progress events go: JSON lines on stdout in the child process, a list in tests."""
BeforeRecord = Callable[[], Awaitable[None]]
"""Awaited after scoring, right before the recording transaction (tests act "while the run trains" there)."""
__all__ = ["DATA_WITHDRAWN", "RunNotClaimableError", "main", "retrain"]


class NotEnoughDataError(MagpieError):
    """The logged conversations do not yet make a training set with a held-out split; `facts` say what they hold
    (recorded with the run, so the admin's report words them in the admin's language)."""

    def __init__(self, facts: dict[str, int]) -> None:
        super().__init__(not_enough_data(**facts))
        self.facts = facts


class SharedVoiceNotTrainedError(MagpieError):
    """VOICE_SCOPE=community: the shared voice (private chats) is the base model, never trained on anyone's log."""

    def __init__(self) -> None:
        super().__init__(
            "with VOICE_SCOPE=community the shared voice is the base model and is not trained: each community "
            "trains its own voice"
        )


class DataWithdrawnError(MagpieError):
    """Messages the new version trained on were deleted or withdrawn while it trained: it must not serve."""

    def __init__(self, count: int) -> None:
        noun = "message was" if count == 1 else "messages were"
        super().__init__(
            f"training data changed during the run: {count} {noun} deleted or withdrawn (/forget or /optout), "
            "so the version it trained was discarded"
        )
        self.count = count


@dataclass(frozen=True)
class StartPoint:
    """The model a run is compared with (its voice's active version, or BASE_MODEL: version id None) and the one
    it trains from: the same for a full fine-tune of the shared voice, BASE_MODEL for an adapter (a community's
    voice, or TRAIN_METHOD=lora), which always starts fresh."""

    source: str
    name: str
    version_id: int | None
    trains_from: str
    method: Literal["full", "lora"] = "full"
    community: str | None = None


@dataclass(frozen=True)
class GateDecision:
    """The promotion gate's verdict on a candidate, with the numbers it was based on; `reason` is why not (None
    when it promotes)."""

    reason: RunEndReason | None
    active_loss: float
    new_loss: float

    @property
    def promote(self) -> bool:
        return self.reason is None

    def __str__(self) -> str:
        """For the log: the verdict with its numbers."""
        verdict = "promote" if self.reason is None else self.reason.value
        return f"{verdict}: eval loss {self.active_loss:.3f} -> {self.new_loss:.3f}"


def decide(*, active_loss: float, new_loss: float, margin: float) -> GateDecision:
    """Promote only a version that is not worse than the active one on the same held-out split (plus `margin`)."""
    if not math.isfinite(new_loss):
        return GateDecision(RunEndReason.DIVERGED, active_loss, new_loss)
    if not math.isfinite(active_loss) or new_loss <= active_loss + margin:
        return GateDecision(None, active_loss, new_loss)
    return GateDecision(RunEndReason.WORSE_THAN_ACTIVE, active_loss, new_loss)


async def retrain(
    settings: Settings, run_id: int, *, emit: Emit, before_record: BeforeRecord | None = None
) -> RunStatus:
    """Runs the whole training run `run_id`, recording every outcome on its row; returns the final status."""
    db = Database.connect(settings.database_url)
    try:
        await runs.claim(db, run_id)
        output_dir = _output_dir(settings, run_id)
        try:
            status = await _train_and_gate(
                settings, db, run_id, emit, output_dir=output_dir, before_record=before_record
            )
        except Exception as exc:
            reason = _failure_reason(exc)
            if isinstance(exc, MagpieError):
                log.warning("training run #%d failed: %s", run_id, exc)
            else:
                log.exception("training run #%d failed", run_id)
            before_training = isinstance(exc, NotEnoughDataError)  # no cooldown after a run that never trained
            facts = {NOT_ENOUGH_DATA: exc.facts} if isinstance(exc, NotEnoughDataError) else None
            await runs.fail(db, run_id, reason, now=datetime.now(UTC), before_training=before_training, metrics=facts)
            # Nothing was registered (the recording transaction is the last step): no files may stay behind.
            for leftover in (*partial_dirs(settings.models_dir, run_id), output_dir):
                shutil.rmtree(leftover, ignore_errors=True)
            status = RunStatus.FAILED
        if status is RunStatus.PROMOTED:
            await prune_after_promotion(settings, db)  # MODELS_KEEP: logs a failure, never fails the promoted run
        emit({"event": "finished", "status": status.value})
        return status
    finally:
        await db.close()


async def _train_and_gate(
    settings: Settings,
    db: Database,
    run_id: int,
    emit: Emit,
    *,
    output_dir: Path,
    before_record: BeforeRecord | None,
) -> RunStatus:
    # torch and transformers load only now, so a run without enough data fails in a moment.
    from trainer.train import TrainArguments, train

    # Voice and start point: its active version (or BASE_MODEL), recorded on the row as the run's parent.
    start = await _start_point(settings, db, run_id)

    # Dataset: everything the filters let through (a community's voice: only its own chats), split.
    emit({"event": "stage", "stage": "dataset"})
    report = await build_dataset(settings, db, community=start.community)
    _check_enough(report)

    # Train in a worker thread: the event loop stays free to record progress in the database.
    emit({"event": "stage", "stage": "training"})
    # No early stopping on the held-out conversations: the gate below scores the new version on them, and a
    # version picked for doing well on them would be judged on its own selection data.
    args = TrainArguments.from_settings(settings, select_on_eval=False, method=start.method)
    # Beside them, a slice of the corpus the base learned from, so that learning them does not erase the rest
    # (read and parsed in a worker thread too: the YAML corpus takes a moment).
    rehearsal = await asyncio.to_thread(
        rehearsal_samples, start.trains_from, community_samples=len(report.train),
        share=settings.train_rehearsal_share, history_turns=settings.history_turns,
    )  # fmt: skip
    result = await in_own_thread(
        train,
        args,
        [*report.train, *rehearsal],
        report.eval,
        model_source=start.trains_from,
        output_dir=output_dir,
        parent_version=start.name,
        progress=_progress_reporter(db, run_id, emit, asyncio.get_running_loop()),
        metadata={"rehearsal_samples": len(rehearsal)},
    )

    # Score the active and the new version on the same held-out samples, the same way.
    emit({"event": "stage", "stage": "scoring"})
    active_loss = await in_own_thread(_score, start.source, report.eval, args)
    new_loss = await in_own_thread(_score, str(output_dir), report.eval, args)
    gate = decide(active_loss=active_loss, new_loss=new_loss, margin=settings.promotion_margin)
    # Beside the loss, what a user would notice: the held-out recurring exchanges answered as the community does.
    result.metrics[recall_probe.METRIC] = await in_own_thread(_probe, report, start.source, output_dir, args)

    # Gate and record atomically: the version row, the activation (or rejection) and the run's outcome.
    recorded = _recorded(settings, report, result.metrics, start, gate, output_dir)
    if before_record is not None:
        await before_record()
    return await _record_or_discard(db, run_id, recorded)


async def _record_or_discard(db: Database, run_id: int, recorded: Recorded) -> RunStatus:
    """Records the outcome; a version trained on data that was deleted or withdrawn meanwhile is not registered,
    its files are deleted and the run ends `rejected` (marked so the orchestrator trains again)."""
    try:
        return await _record(db, run_id, recorded)
    except DataWithdrawnError as withdrawn:
        shutil.rmtree(recorded.output_dir, ignore_errors=True)
        log.warning("training run #%d: %s", run_id, withdrawn)
        metrics = {**recorded.run_metrics, DATA_WITHDRAWN: withdrawn.count}
        await runs.end_if_running(
            db, run_id, RunStatus.REJECTED, RunEndReason.TRAINING_DATA_WITHDRAWN, now=datetime.now(UTC), metrics=metrics
        )
        return RunStatus.REJECTED


def _recorded(  # noqa: PLR0917 (the stages' results, in the order they came)
    settings: Settings,
    report: DatasetReport,
    train_metrics: dict[str, Any],
    start: StartPoint,
    gate: GateDecision,
    output_dir: Path,
) -> Recorded:
    from trainer.train import read_manifest

    version_metrics, run_metrics = _metrics(train_metrics, report, gate, version=output_dir.name)
    # How it was made: a full fine-tune inherits its parent's weights (and whatever they learned), an adapter not.
    version_metrics.update(method=start.method, trained_from=start.trains_from)
    run_metrics.update(community=start.community)
    return Recorded(
        output_dir,
        start,
        gate,
        version_metrics,
        run_metrics,
        read_manifest(output_dir),
        created=_created_at(report.train),
        retention_days=settings.log_retention_days,
    )


def _created_at(samples: Sequence[Sample]) -> dict[int, datetime]:
    """When each message the run trains on was logged (to tell retention pruning from deletions on request)."""
    return {
        line.message_id: line.created_at
        for sample in samples
        for line in (*sample.context, sample.target)
        if line.message_id is not None and line.created_at is not None
    }


def _check_enough(report: DatasetReport) -> None:
    """Raises `NotEnoughDataError` with what the data was made of, so the admin reads why (`core.texts`). Each
    split needs a target of its own: a line's short exchange sample is not a second line to learn from."""
    if any(not s.exchange for s in report.train) and any(not s.exchange for s in report.eval):
        return
    raise NotEnoughDataError(not_enough_data_facts(report))


def not_enough_data_facts(report: DatasetReport) -> dict[str, int]:
    """The numbers `core.texts.not_enough_data` words: distinct lines (targets), the conversations they come from,
    the messages read, and what the Tay defences left out of them."""
    targets = [s for s in (*report.train, *report.eval) if not s.exchange]
    return {
        "messages_read": report.messages_read,
        "targets": len(targets),
        "conversations": len({s.conversation for s in targets}),
        "repeats": report.excluded.get("near_duplicate_target", 0),
        "over_share": report.excluded.get("user_share_cap", 0),
    }


def _probe(report: DatasetReport, active: str, new: Path, args: TrainArguments) -> dict[str, int] | None:
    """The recall probe's numbers (`trainer.recall_probe`); None when the held-out part has no recurring exchange.
    It informs the admin and never decides the run, so a failure is logged, not raised."""
    items = recall_probe.probe_items(report)
    if not items:
        return None
    try:
        return {
            "prompts": len(items),
            "active": recall_probe.recalled(active, items, threads=args.threads),
            "new": recall_probe.recalled(str(new), items, threads=args.threads),
        }
    except Exception:
        log.warning("the recall probe failed; the run goes on without it", exc_info=True)
        return None


def _score(source: str, samples: Sequence[Sample], args: TrainArguments) -> float:
    from trainer.train import evaluate_loss

    return evaluate_loss(
        source,
        samples,
        max_length=args.max_length,
        response_only=args.loss_on_response_only,
        batch_size=args.eval_batch_size,
        threads=args.threads,
    )


def _output_dir(settings: Settings, run_id: int) -> Path:
    """`MODELS_DIR/v<id>`, or with a time suffix when that exists already (e.g. a database that was reset)."""
    models_dir = settings.models_dir.resolve()
    models_dir.mkdir(parents=True, exist_ok=True)
    candidate = models_dir / version_name(run_id)
    if candidate.exists():
        candidate = models_dir / f"{version_name(run_id)}-{datetime.now(UTC):%Y%m%d%H%M%S}"
    return candidate


def _progress_reporter(
    db: Database, run_id: int, emit: Emit, loop: asyncio.AbstractEventLoop
) -> Callable[[float], None]:
    """Called by the Trainer in the worker thread: the row's progress first (waited for, so the row is never behind
    what the parent was told and a late write can never land after the outcome), then the line for the parent."""

    def report(fraction: float) -> None:
        future = asyncio.run_coroutine_threadsafe(runs.set_progress(db, run_id, fraction), loop)
        try:
            future.result(timeout=30)
        except Exception:
            log.warning("could not record the progress of run #%d", run_id, exc_info=True)
        emit({"event": "progress", "progress": round(fraction, 4)})

    return report


async def _start_point(settings: Settings, db: Database, run_id: int) -> StartPoint:
    """The run's voice (its row says), the version it is compared with, and what it trains from. A version that
    holds withdrawn data is never a start point: a voice whose active version holds some (it is being replaced)
    starts from BASE_MODEL."""
    base = settings.base_model
    async with db.sessions.begin() as session:
        community = await runs.community_of(session, run_id)
        if community is None and settings.community_voices:
            raise SharedVoiceNotTrainedError()
        active = await get_active_version(session, community=community)
        if active is not None and active.holds_withdrawn_at is not None:
            active = None
        await runs.set_parent(session, run_id, active.id if active is not None else None)
    method = "lora" if community is not None else settings.train_method
    if active is None:
        return StartPoint(base, base, None, base, method, community)
    trains_from = base if method == "lora" else active.path
    return StartPoint(active.path, active.name, active.id, trains_from, method, community)


def _metrics(
    train_metrics: dict[str, Any], report: DatasetReport, gate: GateDecision, *, version: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The version row's metrics (`metrics.json` with the gate's score) and the run row's (both scores side by
    side, plus the data counts), JSON-safe."""
    version_metrics = {key: value for key, value in train_metrics.items() if key != "arguments"}
    version_metrics.update(eval_loss=gate.new_loss, perplexity=perplexity(gate.new_loss))
    run_metrics = {
        "version": version,
        "active_eval_loss": gate.active_loss,
        "active_perplexity": perplexity(gate.active_loss),
        "eval_loss": gate.new_loss,
        "perplexity": perplexity(gate.new_loss),
        "train_loss": train_metrics.get("train_loss"),
        "loss_curve": train_metrics.get("loss_curve", []),
        "steps": train_metrics.get("steps"),
        "train_samples": len(report.train),
        "eval_samples": len(report.eval),
        "excluded": dict(report.excluded),
        "targets": dict(report.targets),
        recall_probe.METRIC: train_metrics.get(recall_probe.METRIC),
        "data_from": train_metrics.get("data_from"),
        "data_to": train_metrics.get("data_to"),
        "timings": train_metrics.get("timings", {}),
    }
    return json_safe(version_metrics), json_safe(run_metrics)


def json_safe(value: Any) -> Any:
    """NaN and infinity become None: JSON has no such numbers, and PostgreSQL refuses them in a JSON column."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


@dataclass(frozen=True)
class Recorded:
    """Everything the final transaction writes."""

    output_dir: Path
    start: StartPoint
    gate: GateDecision
    version_metrics: dict[str, Any]
    run_metrics: dict[str, Any]
    manifest: dict[int, int | None]
    created: Mapping[int, datetime] = field(default_factory=dict)
    retention_days: float = 0.0

    def forbidden(self, withdrawn: Withdrawn) -> int:
        """How many training messages may no longer be used. A message older than LOG_RETENTION_DAYS that left
        the log was pruned by the log's housekeeping, not deleted at someone's request: that does not count (or
        with retention on, every run longer than the pruning interval would be discarded)."""
        deleted = withdrawn.deleted
        if self.retention_days > 0:
            cutoff = datetime.now(UTC) - timedelta(days=self.retention_days)
            deleted = frozenset(i for i in deleted if not (i in self.created and self.created[i] < cutoff))
        return len(deleted) + len(withdrawn.opted_out)


async def _record(db: Database, run_id: int, recorded: Recorded) -> RunStatus:
    """One transaction: a crash anywhere in it leaves the old version active and the run `running` (recovered as
    failed at the next start), never a half-promoted version.

    Raises `DataWithdrawnError` (nothing written) when the manifest holds messages deleted or withdrawn since the
    dataset was read, and `RunNotClaimableError` when the run was ended meanwhile (timed out, `--force`).
    """
    output_dir, start, gate = recorded.output_dir, recorded.start, recorded.gate
    async with db.sessions.begin() as session:
        version = await register_version(
            session,
            name=output_dir.name,
            path=str(output_dir),
            parent_id=start.version_id,
            metrics=recorded.version_metrics,
            note=f"trained by run #{run_id}",
            manifest=recorded.manifest.items(),
            community=start.community,
        )
        run = await runs.lock_for_outcome(session, run_id)
        forbidden = recorded.forbidden(await withdrawn_training_data(session, version_id=version.id))
        if forbidden:
            raise DataWithdrawnError(forbidden)
        active = await get_active_version(session, community=start.community)
        if active is not None and active.holds_withdrawn_at is not None:
            active = None  # being replaced by the clean version or the base, which the run was compared with
        reason = gate.reason
        if reason is None and (active.id if active is not None else None) != start.version_id:
            reason = RunEndReason.ACTIVE_CHANGED
            log.info("training run #%d: the active version is now %s", run_id, active.name if active else "none")
        if reason is None:
            await activate_version(session, version_id=version.id)
        else:
            await set_version_status(session, version_id=version.id, status=VersionStatus.REJECTED, note=reason.value)
        runs.record_outcome(
            run,
            promoted=reason is None,
            version_id=version.id,
            metrics=recorded.run_metrics,
            reason=reason,
            now=datetime.now(UTC),
        )
    log.info("training run #%d: %s %s (%s)", run_id, output_dir.name, run.status.value, reason or gate)
    return run.status


def _failure_reason(exc: Exception) -> RunEndReason:
    """What the chat is told of a failure; the error's own text (and any traceback) stays in the trainer's log."""
    if isinstance(exc, NotEnoughDataError):
        return RunEndReason.NOT_ENOUGH_DATA
    if isinstance(exc, ModelLoadError):
        return RunEndReason.MODEL_LOAD_FAILED
    return RunEndReason.TRAINING_ERROR


def _print_event(event: dict[str, Any]) -> None:
    """A JSON line for the parent. If the parent is gone the run carries on: the row records it all anyway."""
    with contextlib.suppress(BrokenPipeError, ValueError):  # ValueError: stdout already closed
        print(json.dumps(event), flush=True)


def main(argv: Sequence[str] | None = None, *, before_record: BeforeRecord | None = None) -> int:
    """`python -m trainer.retrain --run-id N`: settings from the environment, progress as JSON lines on stdout."""
    parser = argparse.ArgumentParser(prog="python -m trainer.retrain", description="Run one Magpie training run.")
    parser.add_argument("--run-id", type=int, required=True, help="the training_runs row to carry out")
    options = parser.parse_args(argv)
    try:
        settings = load_trainer_settings()
    except MagpieError as exc:
        print(f"magpie trainer: {exc}", file=sys.stderr)
        return 2
    from trainer.training_logs import configure_process_logging

    configure_process_logging(settings.log_level, settings.log_format, secret_values(settings))
    if (refusal := _several_processes(settings)) is not None:
        is_main, why = refusal
        log.error("training run #%d: %s", options.run_id, why)
        if is_main:  # one process speaks for the run; the others only leave
            asyncio.run(_fail(settings, options.run_id, RunEndReason.SEVERAL_PROCESSES))
        return 1
    try:
        with correlated(f"training-run-{options.run_id}"):  # every line of the run, in the bot's log, says which
            status = asyncio.run(retrain(settings, options.run_id, emit=_print_event, before_record=before_record))
    except RunNotClaimableError as exc:
        print(f"magpie trainer: {exc}", file=sys.stderr)
        return 2
    return 0 if status in (RunStatus.PROMOTED, RunStatus.REJECTED) else 1


def _several_processes(settings: Settings) -> tuple[bool, str] | None:
    """Under `accelerate launch`: ties this process to the launcher, and refuses several processes (every one of
    them would run this whole program: claim, train, record) until a run is split by rank. Returns (this is the
    main process, the reason) when refused."""
    if settings.train_launcher != "accelerate":
        return None
    die_with_parent()  # the launcher is our parent: a run stopped (or a worker dead) stops us with it
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes <= 1:
        return None
    reason = (
        f"TRAIN_LAUNCHER=accelerate with {state.num_processes} processes is not supported yet: "
        "set num_processes: 1 in ACCELERATE_CONFIG"
    )
    return state.is_main_process, reason


async def _fail(settings: Settings, run_id: int, reason: RunEndReason) -> None:
    db = Database.connect(settings.database_url)
    try:
        await runs.fail(db, run_id, reason, now=datetime.now(UTC))
    finally:
        await db.close()


if __name__ == "__main__":
    sys.exit(main())
