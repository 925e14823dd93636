"""What the operator's dashboard shows, read from the database in one go: typed values, no HTML and no plotting.

The web page (`bot.web.dashboard`) lives in `bot/`, which runs no SQL; these queries live here. Nothing is computed
twice: versions and the active one come from the registry (`core.storage.versions`), perplexity from `core.perplexity`,
and a run's loss curve, what its promotion gate compared and its training-data exclusion counts are what the trainer
recorded in the run's row (`trainer.retrain`: `metrics["loss_curve"]`, `metrics["active_eval_loss"]` beside
`metrics["eval_loss"]`, and `metrics["excluded"]` from `trainer.dataset`'s report). Reply counts and latencies come
from the chat log: a reply row points at the message it answers (`reply_to_id`), and both carry when they were
logged.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from core.perplexity import perplexity
from core.storage.chat_log import communities
from core.storage.db import Database
from core.storage.models import Chat, Delivery, Message, ModelVersion, Role, RunStatus, TrainingRun, VersionStatus
from core.storage.versions import get_active_version, list_versions

RECENT_RUNS = 20
"""How many of the newest runs are searched for the last loss curve and exclusion counts (failed runs have none),
and shown with what their promotion gate compared."""
REPLY_DAYS = 7
"""The window of the replies-per-hour and reply-latency plots: the last days, hour by hour."""


@dataclass(frozen=True)
class VersionRow:
    """One model version as the dashboard lists and plots it."""

    name: str
    status: VersionStatus
    eval_loss: float | None
    created_at: datetime
    activated_at: datetime | None
    note: str | None

    @property
    def perplexity(self) -> float | None:
        return perplexity(self.eval_loss)


@dataclass(frozen=True)
class RunCurve:
    """A finished run's training loss per logged step, and the held-out loss it was judged on."""

    run_id: int
    status: RunStatus
    version: str | None
    finished_at: datetime | None
    points: tuple[tuple[int, float], ...]
    eval_loss: float | None


@dataclass(frozen=True)
class Exclusions:
    """Why logged messages did not become training targets, as counted by the dataset builder for one run."""

    run_id: int
    finished_at: datetime | None
    counts: Mapping[str, int]
    train_samples: int | None
    eval_samples: int | None


@dataclass(frozen=True)
class RunningRun:
    run_id: int
    progress: float
    started_at: datetime
    triggered_by: str


@dataclass(frozen=True)
class GateScore:
    """What a run's promotion gate compared (`trainer.retrain`: the run row's `active_eval_loss` and `eval_loss`):
    the version it started from (the active one, or BASE_MODEL) and the new one, on that run's own held-out
    samples. Two runs' losses are on different samples, so only the two losses of one run compare."""

    run_id: int
    status: RunStatus
    version: str | None
    finished_at: datetime | None
    active_loss: float | None
    new_loss: float
    eval_samples: int | None


@dataclass(frozen=True)
class ReplyStats:
    """The model's replies over the last `REPLY_DAYS` days: how many per UTC hour (every hour of the window, zeros
    included), and how long each took, from the incoming message logged to the reply logged (generation and the
    queue before it), per UTC day."""

    hours: tuple[datetime, ...]
    per_hour: tuple[int, ...]
    latency_by_day: Mapping[date, Sequence[float]]
    """Seconds per reply, by the UTC day the reply was logged."""

    @property
    def total(self) -> int:
        return sum(self.per_hour)

    @property
    def latencies(self) -> list[float]:
        return sorted(value for values in self.latency_by_day.values() for value in values)


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of sorted `values` (p50: `fraction` 0.5), None for none: a latency users
    actually waited, never an interpolation between two."""
    if not values:
        return None
    rank = max(1, math.ceil(fraction * len(values)))
    return values[rank - 1]


@dataclass(frozen=True)
class CommunityRow:
    """A community's voice (VOICE_SCOPE=community): what serves it, its last run, and whether any of its versions
    learned from withdrawn messages (such a version never serves again)."""

    community: str
    active: str | None
    """The active version's name; None: the base model answers."""
    last_run_id: int | None
    last_run_status: RunStatus | None
    last_run_at: datetime | None
    holds_withdrawn: bool


@dataclass(frozen=True)
class Overview:
    """Everything the page shows; `messages_per_day` maps a chat's label to its message count per UTC day."""

    active: VersionRow | None
    versions: tuple[VersionRow, ...]
    """Newest first."""
    last_curve: RunCurve | None
    exclusions: Exclusions | None
    running: RunningRun | None
    days: tuple[date, ...]
    messages_per_day: Mapping[str, Mapping[date, int]] = field(default_factory=dict)
    gate_scores: tuple[GateScore, ...] = ()
    """Oldest first."""
    replies: ReplyStats | None = None
    communities: tuple[CommunityRow, ...] = ()
    """Every community with a logged chat, in order of first appearance."""


async def load_overview(db: Database, *, now: datetime, days: int) -> Overview:
    """One read-only transaction, so the numbers on the page agree with each other."""
    first_day = (now - timedelta(days=days - 1)).date()
    async with db.sessions() as session:
        versions = tuple(_version_row(version) for version in await list_versions(session))
        active = await get_active_version(session)
        runs = await _recent_runs(session)
        per_day = await messages_per_day(session, since=first_day)
        replies = await reply_stats(session, now=now)
        voices = await community_rows(session)
    return Overview(
        active=_version_row(active) if active is not None else None,
        versions=versions,
        last_curve=_last_curve(runs),
        exclusions=_last_exclusions(runs),
        running=_running(runs),
        days=tuple(first_day + timedelta(days=offset) for offset in range(days)),
        messages_per_day=per_day,
        gate_scores=tuple(reversed([score for run in runs if (score := _gate_score(run)) is not None])),
        replies=replies,
        communities=voices,
    )


async def community_rows(session: AsyncSession) -> tuple[CommunityRow, ...]:
    """Each community's voice: its active version, its last run, whether a version of it holds withdrawn data."""
    rows = []
    for community in await communities(session):
        active = await get_active_version(session, community=community)
        run = await session.scalar(
            select(TrainingRun).where(TrainingRun.community == community).order_by(TrainingRun.id.desc()).limit(1)
        )
        withdrawn = await session.scalar(
            select(func.count())
            .select_from(ModelVersion)
            .where(ModelVersion.community == community, ModelVersion.holds_withdrawn_at.is_not(None))
        )
        rows.append(
            CommunityRow(
                community,
                active.name if active is not None else None,
                run.id if run else None,
                run.status if run else None,
                run.started_at if run else None,
                bool(withdrawn),
            )
        )
    return tuple(rows)


def _version_row(version: ModelVersion) -> VersionRow:
    return VersionRow(
        name=version.name,
        status=version.status,
        eval_loss=_finite((version.metrics or {}).get("eval_loss")),
        created_at=version.created_at,
        activated_at=version.activated_at,
        note=version.note,
    )


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


async def _recent_runs(session: AsyncSession) -> Sequence[TrainingRun]:
    query = select(TrainingRun).order_by(TrainingRun.id.desc()).limit(RECENT_RUNS)
    return (await session.scalars(query)).all()


def _last_curve(runs: Sequence[TrainingRun]) -> RunCurve | None:
    """The newest run that recorded a loss curve (older runs, and runs that failed before scoring, have none)."""
    for run in runs:
        metrics = run.metrics or {}
        points = tuple(
            (int(step), float(loss))
            for step, loss in metrics.get("loss_curve") or ()
            if _finite(step) is not None and _finite(loss) is not None
        )
        if points:
            version = metrics.get("version")
            return RunCurve(
                run.id,
                run.status,
                version if isinstance(version, str) else None,
                run.finished_at,
                points,
                _finite(metrics.get("eval_loss")),
            )
    return None


def _gate_score(run: TrainingRun) -> GateScore | None:
    """A scored run's comparison (promoted or rejected; failed runs were never scored)."""
    metrics = run.metrics or {}
    new_loss = _finite(metrics.get("eval_loss"))
    if run.status not in {RunStatus.PROMOTED, RunStatus.REJECTED} or new_loss is None:
        return None
    version = metrics.get("version")
    return GateScore(
        run.id,
        run.status,
        version if isinstance(version, str) else None,
        run.finished_at,
        _finite(metrics.get("active_eval_loss")),
        new_loss,
        _count(metrics.get("eval_samples")),
    )


def _last_exclusions(runs: Sequence[TrainingRun]) -> Exclusions | None:
    for run in runs:
        metrics = run.metrics or {}
        counts = metrics.get("excluded")
        if isinstance(counts, dict):
            return Exclusions(
                run.id,
                run.finished_at,
                {str(reason): int(count) for reason, count in sorted(counts.items())},
                _count(metrics.get("train_samples")),
                _count(metrics.get("eval_samples")),
            )
    return None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def _running(runs: Sequence[TrainingRun]) -> RunningRun | None:
    for run in runs:
        if run.status is RunStatus.RUNNING:
            return RunningRun(run.id, run.progress, run.started_at, run.triggered_by)
    return None


def _utc_day(session: AsyncSession) -> ColumnElement[Any]:
    """The UTC calendar day of a message: PostgreSQL converts from its timestamptz; SQLite stores UTC text."""
    if session.get_bind().dialect.name == "postgresql":
        return func.date(func.timezone("UTC", Message.created_at))
    return func.date(Message.created_at)


async def messages_per_day(session: AsyncSession, *, since: date) -> dict[str, dict[date, int]]:
    """Logged messages (people's and the bot's) per chat and UTC day, from `since` on; chats are labelled
    `platform:chat id`."""
    day = _utc_day(session).label("day")
    label = (Chat.platform + ":" + Chat.platform_chat_id).label("chat")
    query = (
        select(label, day, func.count(Message.id))
        .join(Chat, Message.chat_id == Chat.id)
        .where(Message.created_at >= datetime(since.year, since.month, since.day, tzinfo=UTC))
        .group_by(label, day)
    )
    counts: dict[str, dict[date, int]] = defaultdict(dict)
    for chat, when, count in await session.execute(query):
        counts[chat][when if isinstance(when, date) else date.fromisoformat(str(when))] = int(count)
    return dict(counts)


async def reply_stats(session: AsyncSession, *, now: datetime, days: int = REPLY_DAYS) -> ReplyStats:
    """The model's replies (bot messages answering a logged message, not commands' answers, not failed sends)
    logged in the `days` days up to `now`, with the time since the message each answers was logged."""
    first_hour = (now - timedelta(days=days)).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    incoming = aliased(Message)
    query = (
        select(Message.created_at, incoming.created_at)
        .join(incoming, Message.reply_to_id == incoming.id)
        .where(
            Message.role == Role.BOT,
            Message.is_command.is_(False),
            Message.delivery.is_distinct_from(Delivery.FAILED),
            Message.created_at >= first_hour,
            Message.created_at <= now,
        )
    )
    hours = tuple(first_hour + timedelta(hours=offset) for offset in range(days * 24))
    counts = dict.fromkeys(hours, 0)
    latency: dict[date, list[float]] = defaultdict(list)
    for replied_at, asked_at in await session.execute(query):
        hour = replied_at.replace(minute=0, second=0, microsecond=0)
        if hour in counts:
            counts[hour] += 1
        latency[replied_at.date()].append(max(0.0, (replied_at - asked_at).total_seconds()))
    return ReplyStats(hours, tuple(counts[hour] for hour in hours), {day: sorted(v) for day, v in latency.items()})
