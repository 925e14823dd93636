"""Magpie's Prometheus metrics: one registry per app, the instruments the message and learning paths count, and
a collector that reads the engine when scraped.

Why a registry per `Telemetry` rather than prometheus-client's global one: two apps in one process (tests, or a
bench beside a bot) must not add to each other's counts, and a registry that is built, not imported, is handed to
the HTTP server like any other dependency.

What counts where:
- the chat service (`core.chat.service`): messages received per platform, refusals by reason;
- the conversation loop (`bot.backend`): replies per platform and outcome, and the latency of a delivered reply
  (from the message reaching the backend to its last part sent);
- the training orchestrator: finished runs by outcome, and their duration;
- the database engine (a SQLAlchemy `handle_error` hook): every error the driver raised;
- the engine, read at scrape time through `Engine.stats()`: queue depth, rows in the batch being generated,
  tokens generated and seconds spent generating (tokens/s is `rate()` of the first, or of the first over the
  second for the speed while busy), and the version it serves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import event

from core.errors import EngineBusyError, EngineError, EngineTimeoutError

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect, ExceptionContext

    from core.serving.engine import Engine
    from core.storage.db import Database

Refusal = Literal["rate_limit", "too_long", "busy", "timeout"]
REFUSALS: tuple[Refusal, ...] = ("rate_limit", "too_long", "busy", "timeout")
"""Why a message got a short note instead of an answer: over RATE_LIMIT_PER_MINUTE, over MAX_INPUT_CHARS, the
engine's queue full or the platform's sends backlogged (the user reads the same "busy" note), or no reply within
ENGINE_TIMEOUT_S."""

ReplyOutcome = Literal["delivered", "undelivered", "interrupted"]

LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
RUN_BUCKETS_S = (30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0)


class Telemetry:
    """The instruments of one app, in their own registry; the methods are what the rest of Magpie calls."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._received = Counter(
            "magpie_messages_received", "Messages received, per platform", ["platform"], registry=registry
        )
        self._replies = Counter(
            "magpie_replies", "Replies handed to a platform, per platform and outcome", ["platform", "outcome"],
            registry=registry,
        )  # fmt: skip
        self._latency = Histogram(
            "magpie_reply_latency_seconds", "From a message reaching the bot to its reply delivered, per platform",
            ["platform"], buckets=LATENCY_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self._refusals = Counter("magpie_refusals", "Messages answered with a refusal, per reason", ["reason"],
                                 registry=registry)  # fmt: skip
        for reason in REFUSALS:  # present (at 0) before the first refusal, so alerts on rate() work from the start
            self._refusals.labels(reason)
        self._runs = Counter("magpie_training_runs", "Finished training runs, per outcome", ["outcome"],
                             registry=registry)  # fmt: skip
        self._run_seconds = Histogram(
            "magpie_training_run_duration_seconds", "How long finished training runs took, per outcome",
            ["outcome"], buckets=RUN_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self._db_errors = Counter(
            "magpie_database_errors", "Errors raised by the database driver, per error type", ["error"],
            registry=registry,
        )  # fmt: skip

    # --- what the paths report ---------------------------------------------------------------------------------

    def message_received(self, platform: str) -> None:
        self._received.labels(platform).inc()

    def refused(self, reason: Refusal) -> None:
        self._refusals.labels(reason).inc()

    def reply_finished(self, platform: str, outcome: ReplyOutcome, *, latency_s: float | None = None) -> None:
        """One reply's fate; `latency_s` only for a delivered reply to a live message (not a recovered one)."""
        self._replies.labels(platform, outcome).inc()
        if latency_s is not None:
            self._latency.labels(platform).observe(latency_s)

    def training_run_finished(self, outcome: str, *, duration_s: float) -> None:
        self._runs.labels(outcome).inc()
        self._run_seconds.labels(outcome).observe(max(0.0, duration_s))

    def database_error(self, error: BaseException) -> None:
        self._db_errors.labels(type(error).__name__).inc()

    # --- what is read when scraped -----------------------------------------------------------------------------

    def watch_engine(self, engine: Engine) -> None:
        """The engine's numbers and the version it serves, read at each scrape (nothing to keep in step)."""
        self.registry.register(EngineCollector(engine))

    def watch_database(self, db: Database) -> None:
        """Counts every error the database raises, whoever ran the statement: SQLAlchemy's `handle_error` sees the
        driver's errors, and a connection that cannot even be opened (asyncpg's refused connection is a plain
        `OSError`, which `handle_error` never sees) is counted where connections are made, once either way."""
        sync_engine = db.engine.sync_engine

        def count(context: ExceptionContext) -> None:
            self.database_error(context.original_exception)

        def connect(dialect: Dialect, record: Any, cargs: Any, cparams: Any) -> Any:
            try:
                return dialect.connect(*cargs, **cparams)  # what SQLAlchemy does when no listener returns one
            except Exception as exc:
                if not isinstance(exc, dialect.loaded_dbapi.Error):  # a driver error reaches `count` as well
                    self.database_error(exc)
                raise

        event.listen(sync_engine, "handle_error", count)
        event.listen(sync_engine, "do_connect", connect)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry in the format the scraper's Accept header asks for (Prometheus text by default), and that
        format's content type."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


def refusal_for(error: EngineError) -> Refusal | None:
    """The refusal an engine error stands for (None: a failure, not a refusal)."""
    if isinstance(error, EngineBusyError):
        return "busy"
    if isinstance(error, EngineTimeoutError):
        return "timeout"
    return None


class EngineCollector(Collector):
    """Reads `Engine.stats()` and the served model when Prometheus scrapes (a lock held for microseconds)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterable[Metric]:
        stats = self._engine.stats()
        yield _gauge("magpie_engine_queue_depth", "Requests waiting for the model", stats.queue_depth)
        yield _gauge("magpie_engine_batch_rows", "Rows in the batch being generated now", stats.batch_rows)
        yield _gauge("magpie_engine_voices_loaded", "Community voices (LoRA adapters) loaded", stats.voices_loaded)
        yield CounterMetricFamily(
            "magpie_engine_tokens_generated", "Tokens the engine generated", stats.tokens_generated
        )
        yield CounterMetricFamily(
            "magpie_engine_generate_seconds", "Seconds the engine spent generating", stats.generate_seconds
        )
        ref = self._engine.model_ref
        yield _gauge("magpie_engine_serving", "1 while a model serves", 1 if ref is not None else 0)
        active = GaugeMetricFamily(
            "magpie_active_version", "The model version serving (1), by name and id (none: a base model)",
            labels=["name", "version_id"],
        )  # fmt: skip
        if ref is not None:
            active.add_metric([ref.name, "none" if ref.version_id is None else str(ref.version_id)], 1)
        yield active

    def describe(self) -> Iterable[Metric]:
        return []  # read live: registering must not call `collect` (the engine may not be running yet)


def _gauge(name: str, documentation: str, value: Any) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
