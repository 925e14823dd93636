"""The `magpie` command line: Magpie's composition root.

It is the one place that reads settings, configures logging, and wires storage, engine, service, retrainer and
adapters together; everything below it receives what it needs as arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bot import cli_training
from bot.backend import Backend, BackendNotifier
from bot.console import CHAT_ID as CONSOLE_CHAT_ID
from bot.console import PLATFORM as CONSOLE_PLATFORM
from bot.console import ConsoleBackend
from core.chat.limits import LocalUserLimits, UserLimits
from core.chat.service import ChatService, RecoveryPlan
from core.errors import ConfigError, MagpieError
from core.ops.health import HealthCheck
from core.ops.logging_setup import CorrelationFilter, JsonFormatter, RedactSecrets, secret_values
from core.ops.telemetry import Telemetry
from core.retraining import Retrainer
from core.serving.engine import Engine
from core.serving.model_serving import ModelServing, quiet_model_progress_bars
from core.settings import Settings, load_settings
from core.storage.chat_log import collect_stats
from core.storage.db import Database, upgrade
from core.storage.retention import RetentionJob, prune_old_messages

if TYPE_CHECKING:
    from aiohttp import web

    from bot.web.http_server import HttpServer
    from trainer.orchestrator import TrainingOrchestrator

log = logging.getLogger("magpie")


async def open_user_limits(settings: Settings, *, clock: Callable[[], float]) -> UserLimits:
    """Redis-backed limits when REDIS_URL is set (checked reachable now, so a wrong URL stops the start with a
    clear line), else the in-process ones. Redis is imported only when configured."""
    if settings.redis_url is None:
        return LocalUserLimits(limit=settings.rate_limit_per_minute, clock=clock)
    from core.chat.redis_limits import RedisUserLimits

    return await RedisUserLimits.connect(settings)


def configure_logging(settings: Settings) -> None:
    """Logging is configured here only; noisy libraries are turned down so tokens in URLs never reach logs.
    LOG_FORMAT=json writes one JSON object per line, with the correlation id of the message it belongs to."""
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets(secret_values(settings)))
        handler.addFilter(CorrelationFilter())
        if settings.log_format == "json":
            handler.setFormatter(JsonFormatter())
    # telegram.Bot / telegram.ext.ExtBot log the API URL, token included, at DEBUG: never let them.
    for noisy in (
        "telegram.Bot",
        "telegram.ext.ExtBot",
        "httpx",
        "httpcore",
        "telegram.ext.Updater",
        "discord.gateway",
        "discord.http",
        "aiosqlite",
        "alembic",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("discord.client").setLevel(logging.ERROR)  # "voice will NOT be supported" on every start
    quiet_model_progress_bars()


async def _db_upgrade(settings: Settings, quiet: bool) -> None:
    await upgrade(settings.database_url)
    if not quiet:
        print("Database is up to date.")


def _backends(settings: Settings, service: ChatService, telemetry: Telemetry) -> list[Backend]:
    """The platforms that have tokens, sharing one service (engine and database); the console when none has,
    unless CONSOLE=off (then none at all: the process serves HTTP until a signal)."""
    backends: list[Backend] = []
    # Imported only when configured: each platform library costs start-up time the console should not pay.
    if settings.telegram_bot_token is not None:
        from bot.telegram import TelegramBackend

        backends.append(TelegramBackend(settings=settings, handler=service, telemetry=telemetry))
    if settings.discord_bot_token is not None:
        from bot.discord_bot import DiscordBackend

        backends.append(DiscordBackend(settings=settings, handler=service, telemetry=telemetry))
    if backends and not settings.allowed_chats:
        log.warning("ALLOWED_CHATS is empty: any group that adds the bot is logged and learned from")
    if not backends and settings.console == "auto":
        exports = Path("data") / "exports"
        grace = settings.shutdown_grace_seconds
        console = ConsoleBackend(
            handler=service,
            bot_name=settings.bot_name,
            exports_dir=exports,
            stop_grace_s=grace,
            telemetry=telemetry,
            language=settings.console_language,
        )
        backends.append(console)
    return backends


def _http_server(
    settings: Settings, health: HealthCheck, telemetry: Telemetry, extra: Mapping[str, web.Application] | None = None
) -> HttpServer | None:
    """The server on HTTP_LISTEN (None when it is off): /healthz, /metrics, and `extra`'s sub-apps by prefix."""
    address = settings.http_address
    if address is None:
        return None
    from bot.web.http_server import HttpServer, build_http_app  # aiohttp's import is for `run` only

    app = build_http_app(health=health, telemetry=telemetry, extra=extra)
    return HttpServer(app, host=address[0], port=address[1])


def _dashboard(
    settings: Settings, db: Database, serving: ModelServing, retrainer: Retrainer
) -> dict[str, web.Application]:
    """The operator's dashboard at /dashboard/ when DASHBOARD_TOKEN is set and the HTTP server is on."""
    if settings.dashboard_token is None or settings.http_address is None:
        return {}
    from bot.web.dashboard import build_dashboard_app  # jinja2 and matplotlib load only for a dashboard

    return {"/dashboard": build_dashboard_app(settings=settings, db=db, serving=serving, retrainer=retrainer)}


async def _serve(settings: Settings) -> None:
    """Runs the bot until SIGINT/SIGTERM, or until the console reaches the end of its input."""
    from trainer.orchestrator import TrainingOrchestrator

    db = Database.connect(settings.database_url)
    engine = Engine.from_settings(settings)
    telemetry, health = _telemetry(db, engine)
    notifier = BackendNotifier()
    serving = ModelServing(settings=settings, db=db, engine=engine)
    orchestrator = TrainingOrchestrator(
        settings=settings, db=db, serving=serving, notifier=notifier, telemetry=telemetry
    )
    retention = RetentionJob(db, days=settings.log_retention_days)
    http = _http_server(settings, health, telemetry, extra=_dashboard(settings, db, serving, orchestrator))
    limits: UserLimits | None = None
    try:
        await db.check_schema()
        limits = await open_user_limits(settings, clock=time.monotonic)
        if http is not None:  # before the model loads (minutes, for a starter build): /healthz says "engine"
            await http.start()
        retention.start()
        await _start_engine(settings, db, serving)
        await serving.start()
        await orchestrator.start()
        service = ChatService(
            settings=settings,
            db=db,
            engine=engine,
            retrainer=orchestrator,
            serving=serving,
            telemetry=telemetry,
            limits=limits,
        )
        backends = _backends(settings, service, telemetry)
        notifier.attach(backends)
        health.watch_platforms(backends)
        # Fixed before any backend takes a message: recovery answers only what the previous run left behind.
        plan = await service.plan_recovery([backend.platform for backend in backends])

        async def finish(stop: asyncio.Event) -> None:
            if not stop.is_set():  # the console reached the end of its input, nobody pressed Ctrl-C
                await _let_console_run_finish(orchestrator, stop)
            await orchestrator.stop()

        async def recover(started: Sequence[Backend], stop: asyncio.Event) -> None:
            if plan is not None:
                await _recover(service, plan, started, stop)

        await _run_backends(backends, before_stop=finish, after_start=recover, grace_s=settings.shutdown_grace_seconds)
    finally:
        if http is not None:
            await http.stop()
        await retention.stop()
        await orchestrator.stop()
        await serving.stop()
        await engine.close()
        if limits is not None:
            await limits.close()
        await db.close()


def _telemetry(db: Database, engine: Engine) -> tuple[Telemetry, HealthCheck]:
    """The app's metrics (the engine's read when scraped, database errors counted as they happen) and health."""
    telemetry = Telemetry()
    telemetry.watch_engine(engine)
    telemetry.watch_database(db)
    return telemetry, HealthCheck(db=db, engine=engine)


async def _start_engine(settings: Settings, db: Database, serving: ModelServing) -> None:
    """Serves the active version (or what can stand in for it, see `ModelServing.start_engine`); offline with no
    model at all, builds the starter once, with a progress bar."""

    async def offline_starter() -> int:
        return (await cli_training.build_starter(settings, db)).version_id

    await serving.start_engine(offline_starter=offline_starter)


async def _let_console_run_finish(orchestrator: TrainingOrchestrator, stop: asyncio.Event) -> None:
    """A `/retrain` typed into the console promised a report there: at the end of input (a script, or Ctrl-D),
    wait for that run's outcome rather than stop it; Ctrl-C still stops it at once."""
    waiting = asyncio.ensure_future(orchestrator.wait_for_run(notify=(CONSOLE_PLATFORM, CONSOLE_CHAT_ID)))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiting, stopped):
            task.cancel()
        await asyncio.gather(waiting, stopped, return_exceptions=True)


async def _recover(
    service: ChatService, plan: RecoveryPlan, backends: Sequence[Backend], stop: asyncio.Event | None = None
) -> None:
    """Hands each reply the previous run owed to the backend of its platform (the core knows no platform), until
    `stop` is set: what is left then stays in the outbox for the next start."""
    by_platform = {backend.platform: backend for backend in backends}
    count = 0
    async with contextlib.aclosing(service.recover(plan)) as owed:  # closed at once on break: no work left behind
        async for item in owed:
            if stop is not None and stop.is_set():
                break
            backend = by_platform.get(item.platform)
            if backend is None:  # its backend failed to start: the reply stays in the outbox for the next start
                continue
            await backend.deliver_reply(item.chat_id, item.reply, parts_sent=item.parts_sent)
            count += 1
    if count:
        log.info("Recovery: delivered %d answers owed since before the restart", count)


async def _run_backends(
    backends: Sequence[Backend],
    *,
    before_stop: Callable[[asyncio.Event], Awaitable[None]] | None = None,
    after_start: Callable[[Sequence[Backend], asyncio.Event], Awaitable[None]] | None = None,
    grace_s: float = 0.0,
) -> None:
    """Starts every backend, runs `after_start` (crash recovery) alongside them, and on a signal (or the end of
    the console's input) stops taking new work: recovery starts no new reply and gets `grace_s` to finish the
    one it is sending (what it leaves stays in the outbox), then each backend stops, finishing what it can within
    SHUTDOWN_GRACE_SECONDS."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    waiters = [asyncio.create_task(stop.wait())]
    started: list[Backend] = []
    background: asyncio.Task[None] | None = None
    stopping = asyncio.Event()  # not `stop`: that one says whether a signal (rather than the console's end) came
    try:
        for backend in backends:
            await backend.start()
            started.append(backend)
            if isinstance(backend, ConsoleBackend):
                waiters.append(asyncio.create_task(backend.finished.wait()))
        if after_start is not None:
            work = after_start(started, stopping)
            background = asyncio.create_task(_logging_failures(work), name="recovery")
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        stopping.set()
        if background is not None:
            await asyncio.wait({background}, timeout=grace_s)
            background.cancel()
            await asyncio.gather(background, return_exceptions=True)
        if before_stop is not None:
            await before_stop(stop)
        for backend in reversed(started):
            await backend.stop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def _logging_failures(work: Awaitable[None]) -> None:
    """Background work must not die silently: a failure is logged (the bot keeps serving)."""
    try:
        await work
    except Exception:
        log.exception("Crash recovery failed; the messages it did not answer stay in the outbox")


async def _db_prune(settings: Settings, days: float | None) -> None:
    days = settings.log_retention_days if days is None else days
    if days <= 0:
        raise ConfigError("Nothing to prune: pass --days N, or set LOG_RETENTION_DAYS (0 keeps everything).")
    async with Database.opened(settings.database_url) as db:
        removed = await prune_old_messages(db, days=days)
    print(f"Deleted {removed} messages logged more than {days:g} days ago.")


async def _db_stats(settings: Settings) -> None:
    async with Database.opened(settings.database_url) as db, db.sessions() as session:
        stats = await collect_stats(session)
    active = stats.active_version.name if stats.active_version else "none (BASE_MODEL)"
    print(f"users: {stats.users}\nchats: {stats.chats}\nmessages: {stats.messages}")
    print(f"  from people: {stats.user_messages}\n  from the bot: {stats.bot_messages}")
    print(f"new since the last training run: {stats.since_last_training}\nactive model: {active}")


def _positive_days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if days <= 0:
        raise argparse.ArgumentTypeError("give a number of days above 0")
    return days


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magpie", description="A self-hosted GPT-2 chatbot that learns.")
    commands = parser.add_subparsers(dest="command", required=True)
    db = commands.add_parser("db", help="database maintenance").add_subparsers(dest="db_command", required=True)
    up = db.add_parser("upgrade", help="apply the schema migrations")
    up.add_argument("--quiet", action="store_true", help="print nothing on success")
    db.add_parser("stats", help="count what has been logged")
    prune = db.add_parser("prune", help="delete logged messages older than LOG_RETENTION_DAYS (or --days)")
    prune.add_argument("--days", type=_positive_days, help="override LOG_RETENTION_DAYS for this run")
    commands.add_parser("run", help="start the bot (the console when no platform token is set)")
    cli_training.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # The interpreter's last garbage collection walks every object torch and transformers made: seconds on a busy
    # machine after Ctrl-C, with nothing left to clean up by then. Frozen at exit, they are skipped and the
    # process ends as soon as the command has.
    atexit.register(gc.freeze)
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(settings)
        if args.command == "db" and args.db_command == "upgrade":
            asyncio.run(_db_upgrade(settings, args.quiet))
        elif args.command == "db" and args.db_command == "stats":
            asyncio.run(_db_stats(settings))
        elif args.command == "db" and args.db_command == "prune":
            asyncio.run(_db_prune(settings, args.days))
        elif args.command == "run":
            asyncio.run(_serve(settings))
        elif args.command == "worker":
            return cli_training.run_worker(settings)
        elif (code := asyncio.run(cli_training.run_command(args, settings))) is not None:
            return code
        return 0
    except MagpieError as exc:
        print(f"magpie: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
