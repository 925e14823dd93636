"""The learning loop's shell commands: `magpie retrain`, `magpie models …`, `magpie dataset export`, `magpie bootstrap`,
`magpie worker`.

They go through the same code as the chat commands: `magpie retrain` runs the same training child as `/retrain`
(`TrainingOrchestrator.run_in_foreground`), and `magpie models activate/rollback` switch versions in the database
the same atomic way as `/rollback` (`core.serving.model_serving.ModelServing`, here without an engine). A running bot
notices the new active version within seconds and hot-swaps (its serving side's watcher), so these commands never need
the bot to stop. What they print about runs and versions is worded by `core.texts`, like the chat's answers.
`magpie worker` is the training machine's side of RETRAIN_BACKEND=celery (`trainer.worker`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import math
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Never, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from core import texts
from core.errors import ConfigError
from core.i18n import _, speaking
from core.outcomes import RunOutcome, SwitchRefused, VoicesQueued
from core.serving.model_serving import ModelServing
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import RunStatus
from core.texts import run_outcome, run_request, starter_built, switch, version_list, voice_label
from trainer.orchestrator import TrainingOrchestrator

if TYPE_CHECKING:
    from trainer.bootstrap import StarterVersion

Handler = Callable[[argparse.Namespace, Settings, Database], Awaitable[int]]


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `retrain`, `models`, `dataset` and `bootstrap` to the `magpie` parser."""
    retrain = subparsers.add_parser("retrain", help="train a new model version now, with a progress bar")
    retrain.add_argument(
        "--force",
        action="store_true",
        help="ignore RETRAIN_COOLDOWN_MINUTES, and clear a run recorded as running whose process is gone or never "
        "started",
    )
    retrain.add_argument(
        "--stop-running",
        action="store_true",
        help="also stop a training run whose process is still alive (marked failed), then start a new one",
    )

    models = subparsers.add_parser("models", help="list and switch model versions")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_commands.add_parser("list", help="the model versions, newest first")
    activate = models_commands.add_parser("activate", help="make a version the active one")
    activate.add_argument("name", help="the version's name, e.g. v3")
    rollback = models_commands.add_parser(
        "rollback", help="go back to the previous (or a named) version, marking the current one rolled back"
    )
    rollback.add_argument("name", nargs="?", help="the version to go back to (default: the one before)")
    check = models_commands.add_parser(
        "check", help="compare MODELS_DIR with the registry: stray directories, versions whose files are missing"
    )
    check.add_argument("--remove", action="store_true", help="delete the stray directories")
    prune = models_commands.add_parser(
        "prune",
        help="delete the files of versions beyond MODELS_KEEP (the active one and the rollback target stay); "
        "their rows stay, marked pruned",
    )
    prune.add_argument("--keep", type=_count, help="keep this many newest versions instead of MODELS_KEEP")
    prune.add_argument("--dry-run", action="store_true", help="only list what would be deleted")

    dataset = subparsers.add_parser("dataset", help="inspect the training data")
    dataset_commands = dataset.add_subparsers(dest="dataset_command", required=True)
    export = dataset_commands.add_parser("export", help="write the training set as JSONL, with exclusion counts")
    export.add_argument("path", type=Path, help="the JSONL file to write")

    bootstrap = subparsers.add_parser("bootstrap", help="build the offline starter model (small GPT-2 trained locally)")
    bootstrap.add_argument(
        "--minutes",
        type=_minutes,
        help="time budget for the build (default STARTER_BUDGET_MINUTES; 0 = the full recipe however long it takes)",
    )

    subparsers.add_parser(
        "worker", help="carry out training runs from CELERY_BROKER_URL's queue (RETRAIN_BACKEND=celery), one at a time"
    )


def _minutes(text: str) -> float:
    try:
        minutes = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of minutes") from None
    if not math.isfinite(minutes) or minutes < 0:
        raise argparse.ArgumentTypeError("give a number of minutes, 0 or more (0 = no time limit)")
    return minutes


def run_worker(settings: Settings) -> int:
    """`magpie worker`: checks the database, then runs the Celery worker until SIGTERM or Ctrl-C."""
    if settings.celery_broker_url is None:
        raise ConfigError("`magpie worker` needs CELERY_BROKER_URL (the broker the bot sends training runs to).")

    async def check_schema() -> None:
        async with Database.opened(settings.database_url):  # a worker on an outdated schema says so at once
            pass

    asyncio.run(check_schema())
    from trainer.worker import run_worker as worker

    worker(settings)
    return 0


async def run_command(args: argparse.Namespace, settings: Settings) -> int | None:
    """Runs one of this module's commands and returns its exit status; None when `args` names another command."""
    handler = _HANDLERS.get(args.command)
    if handler is None:
        return None
    with speaking(settings.console_language):  # what it prints is worded like the chat's answers, for this terminal
        async with Database.opened(settings.database_url) as db:
            return await handler(args, settings, db)


BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed, {remaining} left"
"""Percent done and time, never a rate: tqdm's rate flips between "%/s" and "s/%" as the speed crosses one."""


@contextlib.contextmanager
def logs_above_the_bar() -> Iterator[None]:
    """Log lines meant for the terminal are written above a progress bar instead of into it (tqdm clears the bar,
    writes the line, draws the bar again). Only handlers that write to the terminal are swapped, for as long as
    the bar shows; with none (a log file, tests' capture) nothing changes."""
    loggers = _terminal_loggers()
    if not loggers:
        yield
        return
    with logging_redirect_tqdm(loggers):
        yield


def _terminal_loggers() -> list[logging.Logger]:
    """The root logger and any with a terminal handler of its own (transformers' warnings have one)."""
    named = (logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger))
    return [logger for logger in (logging.getLogger(), *named) if any(map(_writes_to_terminal, logger.handlers))]


def _writes_to_terminal(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and handler.stream in {sys.stdout, sys.stderr}


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[tqdm[Never]]:
    """A bar from 0 to 100% on stderr, with the log's lines above it."""
    with tqdm(total=100, desc=description, file=sys.stderr, bar_format=BAR_FORMAT) as bar, logs_above_the_bar():
        yield bar


def _operator() -> str:
    """Who ran the command, for the audit trail (`cli:<login>`)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return "cli"


async def _retrain(args: argparse.Namespace, settings: Settings, db: Database) -> int:
    """One run of the shared voice; with VOICE_SCOPE=community, one run of each community with enough new data,
    one after another, each outcome printed as it ends and a closing summary."""
    orchestrator = TrainingOrchestrator(settings=settings, db=db)
    if not settings.community_voices:
        return await _retrain_voice(args, orchestrator, None)
    due = await orchestrator.communities_due()
    print(run_request(VoicesQueued(tuple(due))), file=sys.stderr)
    status = 0
    for community in due:
        status = max(status, await _retrain_voice(args, orchestrator, community))
    return status


async def _retrain_voice(args: argparse.Namespace, orchestrator: TrainingOrchestrator, community: str | None) -> int:
    bars: list[tqdm[Never]] = []  # opened at the first progress line, so a refusal prints no empty bar

    async def show(fraction: float) -> None:
        if not bars:
            bars.append(tqdm(total=100, desc=community or "Training", file=sys.stderr, bar_format=BAR_FORMAT))
        bars[0].update(max(0, round(fraction * 100) - bars[0].n))

    try:
        with logs_above_the_bar():
            outcome = await orchestrator.run_in_foreground(
                triggered_by=_operator(),
                on_progress=show,
                force=args.force,
                stop_running=args.stop_running,
                community=community,
            )
    finally:
        for bar in bars:
            bar.close()
    if not isinstance(outcome, RunOutcome):
        print(run_request(outcome), file=sys.stderr)
        return 1
    for earlier in outcome.earlier:
        print(run_outcome(earlier))
    print(f"{voice_label(community)}: {run_outcome(outcome)}" if community else run_outcome(outcome))
    return 1 if outcome.status is RunStatus.FAILED else 0


async def _models(args: argparse.Namespace, settings: Settings, db: Database) -> int:
    serving = ModelServing(settings=settings, db=db)  # no engine here: a running bot's watcher follows
    if args.models_command == "check":
        return await _models_check(settings, db, remove=args.remove)
    if args.models_command == "prune":
        return await _models_prune(settings, db, keep=args.keep, dry_run=args.dry_run)
    if args.models_command == "list":
        print(version_list(await serving.list_versions()))
        return 0
    result = await serving.switch_version(
        version=args.name, rolled_back=args.models_command == "rollback", triggered_by=_operator()
    )
    refused = isinstance(result, SwitchRefused)
    print(switch(result), file=sys.stderr if refused else sys.stdout)
    return 1 if refused else 0


async def _models_check(settings: Settings, db: Database, *, remove: bool) -> int:
    """`magpie models check [--remove]`: exit 0 when the registry and MODELS_DIR agree (after removing strays)."""
    from trainer.model_dirs import check_models, remove_dirs

    async with db.sessions() as session:
        check = await check_models(session, settings.models_dir)
    for path in check.strays:
        print(texts.models_stray(str(path)))
    for name, where, problem in check.broken:
        print(texts.models_broken(name, problem, str(where)))
    if check.strays and remove:
        remove_dirs(check.strays)
        print(texts.models_removed(len(check.strays)))
    elif check.strays:
        print(_(texts.MODELS_REMOVE_HINT))
    if check.ok:
        print(texts.models_agree(str(settings.models_dir)))
    return 0 if not check.broken and (remove or not check.strays) else 1


async def _models_prune(settings: Settings, db: Database, *, keep: int | None, dry_run: bool) -> int:
    """`magpie models prune [--keep N] [--dry-run]`: what MODELS_KEEP does after each promotion, now."""
    from trainer.version_retention import prune_versions

    keep = settings.models_keep if keep is None else keep
    if keep == 0:
        print(_(texts.MODELS_KEEP_ALL))
        return 0
    report = await prune_versions(db, settings, keep=keep, dry_run=dry_run)
    for version in report.pruned:
        print(texts.models_pruned(version.name, version.freed_bytes, str(version.path), dry_run=dry_run))
    for name in report.outside:
        print(texts.models_left_outside(name, str(settings.models_dir)))
    print(texts.models_freed(report.freed_bytes, report.kept, dry_run=dry_run))
    return 0


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of versions")
    return int(text)


async def _dataset(args: argparse.Namespace, settings: Settings, db: Database) -> int:
    from trainer.dataset import build_dataset, export_jsonl

    report = await build_dataset(settings, db)
    written = export_jsonl(report, args.path)
    summary = report.summary()
    print(
        f"Wrote {written} samples to {args.path}: {summary['train_samples']} for training from "
        f"{summary['train_conversations']} conversations, {summary['eval_samples']} held out from "
        f"{summary['eval_conversations']} conversations "
        f"({summary['messages_read']} messages read)."
    )
    if report.excluded:
        print("Not used as training targets, by reason:")
        for reason, count in sorted(report.excluded.items()):
            print(f"  {reason}: {count}")
    return 0


async def build_starter(
    settings: Settings, db: Database, *, minutes: float | None = None, report: TextIO | None = None
) -> StarterVersion:
    """Builds the offline starter within `minutes` (default STARTER_BUDGET_MINUTES) with a progress bar on stderr
    (stdout stays free for replies), and ends with one plain line on `report` (default stderr) saying what was
    built and how to build a better one."""
    from trainer.bootstrap import bootstrap

    minutes = settings.starter_budget_minutes if minutes is None else minutes
    with speaking(settings.console_language):  # also when `magpie run` builds it
        print(texts.starter_explanation(minutes), file=sys.stderr)
    with progress_bar("Starter model") as bar:

        def show(fraction: float) -> None:  # called from the training thread; tqdm locks internally
            bar.update(max(0, round(fraction * 100) - bar.n))

        starter = await bootstrap(settings, db, progress=show, minutes=minutes)
    with speaking(settings.console_language):
        print(_starter_report(starter), file=report or sys.stderr)
    return starter


def _starter_report(starter: StarterVersion) -> str:
    metrics, schedule = starter.metrics, starter.metrics.get("schedule")
    return starter_built(
        starter.name,
        str(starter.path),
        eval_loss=metrics.get("eval_loss"),
        steps=int(metrics.get("steps", 0)),
        recipe_steps=schedule["recipe_steps"] if schedule else None,
        budget_minutes=schedule["budget_s"] / 60 if schedule else None,
        best_step=metrics.get("best_step") if metrics.get("eval_loss_by_step") else None,
        activated=starter.activated,
    )


async def _bootstrap(args: argparse.Namespace, settings: Settings, db: Database) -> int:
    await build_starter(settings, db, minutes=args.minutes, report=sys.stdout)
    return 0


_HANDLERS: dict[str, Handler] = {
    "retrain": _retrain,
    "models": _models,
    "dataset": _dataset,
    "bootstrap": _bootstrap,
}
