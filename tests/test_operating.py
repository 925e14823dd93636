"""Operating Magpie (issue #13, item 1): `/healthz` and `/metrics` over real HTTP, and JSON logs in which one
correlation id follows a message through the service, the engine and the send.

Everything is real but the platforms' servers (the Telegram fake): the database, the tiny model's engine, the
console backend reading a pipe, the aiohttp server on a free port, and `magpie run` itself in a subprocess.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import discord
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.cli import _serve, configure_logging
from bot.console import ConsoleBackend
from bot.discord_bot import DiscordBackend
from bot.telegram import TelegramBackend
from bot.web.http_server import HttpServer, build_http_app
from core.chat.service import ChatService
from core.errors import ConfigError
from core.ops.health import HealthCheck
from core.ops.logging_setup import CorrelationFilter, JsonFormatter, correlated
from core.ops.telemetry import Telemetry
from core.serving.engine import Engine
from core.settings import Settings, load_settings
from core.storage.db import Database
from tests.fake_discord import FakeDiscord
from tests.fake_telegram import FakeTelegram

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _settings(**overrides: Any) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


@asynccontextmanager
async def http_server(health: HealthCheck, telemetry: Telemetry) -> AsyncIterator[str]:
    """The app's HTTP server on a free port; yields its base URL."""
    server = HttpServer(build_http_app(health=health, telemetry=telemetry), host="127.0.0.1", port=0)
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def samples(exposition: str) -> Samples:
    """Every sample of a Prometheus exposition by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def value(found: Samples, metric: str, /, **labels: str) -> float:
    return found[(metric, frozenset(labels.items()))]


@contextmanager
def console_input() -> Iterator[tuple[io.TextIOWrapper, int]]:
    """A pipe the console reads as its stdin: it stays connected, blocked on the next line, until the writing end
    closes (end of input)."""
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "r") as stdin:
        try:
            yield stdin, write_fd
        finally:
            with suppress(OSError):  # the test closed it already
                os.close(write_fd)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- /healthz ------------------------------------------------------------------------------------------------------


async def test_healthz_is_200_with_every_part_and_the_active_version(
    db: Database, engine: Engine, tmp_path: Path
) -> None:
    service = ChatService(settings=_settings(), db=db, engine=engine)
    health = HealthCheck(db=db, engine=engine)
    with console_input() as (stdin, write_end):
        console = ConsoleBackend(handler=service, bot_name="Magpie", exports_dir=tmp_path, stdin=stdin)
        health.watch_platforms([console])
        await console.start()
        async with http_server(health, Telemetry()) as url:
            status, body = await get(f"{url}/healthz")
        os.close(write_end)
        await asyncio.wait_for(console.finished.wait(), timeout=10)
        await console.stop()
    assert status == 200, body
    report = json.loads(body)
    assert report["status"] == "ok" and report["failing"] == []
    assert {name: part["ok"] for name, part in report["parts"].items()} == {
        "database": True,
        "engine": True,
        "console": True,
    }
    assert report["parts"]["engine"]["detail"] == "serving tiny in fp32"
    assert report["active_version"] == {"name": "tiny", "id": None}


async def test_healthz_is_503_naming_an_unreachable_database_without_its_password(engine: Engine) -> None:
    url = f"postgresql+asyncpg://magpie:hunter2-secret@127.0.0.1:{free_port()}/magpie"
    db = Database.connect(url)
    telemetry = Telemetry()
    telemetry.watch_database(db)
    try:
        async with http_server(HealthCheck(db=db, engine=engine), telemetry) as base:
            status, body = await get(f"{base}/healthz")
            _, metrics = await get(f"{base}/metrics")
    finally:
        await db.close()
    assert status == 503
    report = json.loads(body)
    assert report["failing"] == ["database"]
    assert report["parts"]["database"]["detail"].startswith("unreachable (")
    assert report["parts"]["engine"]["ok"] is True
    assert "hunter2" not in body
    errors = {
        labels: count for (name, labels), count in samples(metrics).items() if name == "magpie_database_errors_total"
    }
    assert sum(errors.values()) >= 1, metrics


async def test_healthz_is_503_naming_telegram_while_its_polling_fails(sqlite_url: str, engine: Engine) -> None:
    db = Database.connect(sqlite_url)
    async with FakeTelegram() as telegram:
        telegram.fail_next("getUpdates", status=502)
        settings = _settings(
            telegram_bot_token=telegram.token,
            telegram_base_url=telegram.base_url,
            telegram_base_file_url=telegram.base_file_url,
        )
        backend = TelegramBackend(settings=settings, handler=ChatService(settings=settings, db=db, engine=engine))
        health = HealthCheck(db=db, engine=engine)
        health.watch_platforms([backend])
        await backend.start()
        try:
            # PTB reports the failed poll before it polls again (after a 1 s backoff)
            await telegram.wait_until(lambda: len(telegram.calls_to("getUpdates")) >= 2)
            async with http_server(health, Telemetry()) as base:
                status, body = await get(f"{base}/healthz")
        finally:
            await backend.stop()
            await db.close()
    assert status == 503
    report = json.loads(body)
    assert report["failing"] == ["telegram"]
    assert report["parts"]["telegram"] == {"ok": False, "detail": "not connected"}
    assert telegram.token not in body


async def test_each_platform_is_connected_while_it_runs_only(sqlite_url: str, engine: Engine) -> None:
    db = Database.connect(sqlite_url)
    endpoints = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY  # process-global
    try:
        async with FakeTelegram() as telegram, FakeDiscord() as fake_discord:
            settings = _settings(
                telegram_bot_token=telegram.token, telegram_base_url=telegram.base_url,
                telegram_base_file_url=telegram.base_file_url, discord_bot_token=fake_discord.token,
                discord_api_base_url=fake_discord.api_base_url, discord_gateway_url=fake_discord.gateway_url,
                discord_guild_ids=str(fake_discord.guild_id),
            )  # fmt: skip
            service = ChatService(settings=settings, db=db, engine=engine)
            backends: list[TelegramBackend | DiscordBackend] = [
                TelegramBackend(settings=settings, handler=service),
                DiscordBackend(settings=settings, handler=service, ready_timeout=15, guild_ready_timeout=0.05),
            ]
            before = [backend.connected for backend in backends]
            for backend in backends:
                await backend.start()
            running = [backend.connected for backend in backends]
            for backend in backends:
                await backend.stop()
            after = [backend.connected for backend in backends]
    finally:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = endpoints
        await db.close()
    assert (before, running, after) == ([False, False], [True, True], [False, False])


# --- /metrics ------------------------------------------------------------------------------------------------------


async def test_metrics_count_real_messages_through_the_console(db: Database, engine: Engine, tmp_path: Path) -> None:
    telemetry = Telemetry()
    telemetry.watch_engine(engine)
    service = ChatService(settings=_settings(max_input_chars=40), db=db, engine=engine, telemetry=telemetry)
    lines = "hello there, how are you?\n" + "a long message " * 5 + "\n"
    console = ConsoleBackend(
        handler=service, bot_name="Magpie", exports_dir=tmp_path, stdin=io.StringIO(lines), stdout=io.StringIO(),
        telemetry=telemetry,
    )  # fmt: skip
    await console.start()
    await asyncio.wait_for(console.finished.wait(), timeout=60)
    await console.stop()
    async with (
        http_server(HealthCheck(db=db, engine=engine), telemetry) as base,
        aiohttp.ClientSession() as session,
        session.get(f"{base}/metrics") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        found = samples(await response.text())
    assert value(found, "magpie_messages_received_total", platform="console") == 2
    assert value(found, "magpie_replies_total", platform="console", outcome="delivered") == 2
    assert value(found, "magpie_reply_latency_seconds_count", platform="console") == 2
    assert value(found, "magpie_reply_latency_seconds_sum", platform="console") > 0
    refusals = {reason: value(found, "magpie_refusals_total", reason=reason) for reason in ("rate_limit", "too_long")}
    assert refusals == {"rate_limit": 0, "too_long": 1}
    assert value(found, "magpie_engine_tokens_generated_total") >= 1  # the one model answer
    assert value(found, "magpie_engine_generate_seconds_total") > 0
    assert value(found, "magpie_engine_queue_depth") == 0 and value(found, "magpie_engine_batch_rows") == 0
    assert value(found, "magpie_engine_voices_loaded") == 0
    assert value(found, "magpie_active_version", name="tiny", version_id="none") == 1


def test_a_finished_training_run_is_counted_by_outcome_with_its_duration() -> None:
    telemetry = Telemetry()
    telemetry.training_run_finished("promoted", duration_s=95.0)
    telemetry.training_run_finished("failed", duration_s=4.0)
    found = samples(telemetry.exposition(None)[0].decode())
    assert value(found, "magpie_training_runs_total", outcome="promoted") == 1
    assert value(found, "magpie_training_runs_total", outcome="failed") == 1
    assert value(found, "magpie_training_run_duration_seconds_sum", outcome="promoted") == 95.0
    assert value(found, "magpie_training_run_duration_seconds_bucket", outcome="promoted", le="300.0") == 1
    assert value(found, "magpie_training_run_duration_seconds_bucket", outcome="promoted", le="60.0") == 0


# --- JSON logs -----------------------------------------------------------------------------------------------------


@contextmanager
def root_logging() -> Iterator[logging.Logger]:
    """The root logger with no handlers, as in a fresh process; its handlers, level and every logger's level are
    put back afterwards (`configure_logging` turns noisy libraries down)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {
        name: logger.level for name, logger in root.manager.loggerDict.items() if isinstance(logger, logging.Logger)
    }
    root.handlers = []
    try:
        yield root
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers = handlers
        root.setLevel(level)
        for name, logger_level in levels.items():
            logging.getLogger(name).setLevel(logger_level)


def test_the_cli_writes_json_lines_with_the_correlation_id_and_never_a_token() -> None:
    token = "123456:SECRET-TOKEN"
    stream = io.StringIO()
    with root_logging() as root:
        configure_logging(_settings(log_format="json", telegram_bot_token=token))
        (handler,) = root.handlers
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        logger = logging.getLogger("tests.operating")
        with correlated("abc123"):
            try:
                raise RuntimeError(f"GET https://api.telegram.org/bot{token}/getMe failed")
            except RuntimeError:
                logger.exception("calling %s", f"https://api.telegram.org/bot{token}/getMe")
        logger.warning("outside any message")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert "SECRET-TOKEN" not in stream.getvalue()
    assert first["correlation_id"] == "abc123" and first["level"] == "ERROR" and first["logger"] == "tests.operating"
    assert "[redacted]" in first["message"] and "RuntimeError" in first["exc"]
    assert "correlation_id" not in second and second["message"] == "outside any message"


# --- `magpie run`: the server, the metrics and the logs of the composed app ----------------------------------------


class JsonRecords(logging.Handler):
    """Keeps every record as its JSON line (parsed), from any thread, and lets the test await given ones."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.addFilter(CorrelationFilter())
        self.records: list[dict[str, Any]] = []
        self._loop = loop
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(json.loads(self.format(record)))
        self._loop.call_soon_threadsafe(self._changed.set)

    def matching(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        return [record for record in self.records if predicate(record)]

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], count: int = 1, within: float = 60.0
    ) -> list[dict[str, Any]]:
        """The records matching `predicate`, once there are `count` of them."""
        async with asyncio.timeout(within):
            while len(self.matching(predicate)) < count:
                self._changed.clear()
                if len(self.matching(predicate)) < count:
                    await self._changed.wait()
        return self.matching(predicate)


def delivered(record: dict[str, Any]) -> bool:
    return record["logger"] == "bot.backend" and str(record["message"]).endswith(" delivered")


async def test_magpie_run_serves_health_and_metrics_and_logs_each_message_under_one_id(
    sqlite_url: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """`magpie run` as composed by the CLI (in this process, on the console reading a pipe)."""
    monkeypatch.chdir(tmp_path)
    settings = _settings(
        database_url=sqlite_url, base_model=str(tiny_model_dir), models_dir=tmp_path / "models", max_new_tokens=8,
        temperature=0.0, http_listen="127.0.0.1:0", recovery_window_minutes=0, retrain_interval_hours=0,
    )  # fmt: skip
    records = JsonRecords(asyncio.get_running_loop())
    with root_logging() as root, console_input() as (stdin, write_end):
        root.addHandler(records)
        root.setLevel(logging.DEBUG)
        monkeypatch.setattr(sys, "stdin", stdin)
        serving = asyncio.create_task(_serve(settings))
        try:
            started = await records.wait_for(lambda r: str(r["message"]).startswith("HTTP server on http://"))
            base = str(started[0]["message"]).split()[3]
            os.write(write_end, b"hello there, how are you?\nwhat is your favourite colour?\n")
            await records.wait_for(delivered, count=2)  # logged once counted
            health_status, health = await get(f"{base}/healthz")
            _, metrics = await get(f"{base}/metrics")
        finally:
            os.close(write_end)  # end of input: the console, then `magpie run`, finish
            await asyncio.wait_for(serving, timeout=60)
    assert health_status == 200 and json.loads(health)["parts"]["console"]["ok"] is True, health
    found = samples(metrics)
    assert value(found, "magpie_messages_received_total", platform="console") == 2
    assert value(found, "magpie_replies_total", platform="console", outcome="delivered") == 2
    assert value(found, "magpie_reply_latency_seconds_count", platform="console") == 2
    assert len(capsys.readouterr().out.strip().splitlines()) >= 2  # the replies, on stdout
    # One id per message: the backend taking it, the service, the engine's worker (batch lines list the ids of
    # their rows) and the send
    received = records.matching(lambda r: str(r["message"]).startswith("Console: message "))
    assert len(received) == 2 and received[0]["correlation_id"] != received[1]["correlation_id"]
    for message in received:
        cid = message["correlation_id"]
        assert {"bot.backend", "core.chat.service"} <= {
            r["logger"] for r in records.records if r.get("correlation_id") == cid
        }
        assert any(cid in r.get("correlation_ids", []) for r in records.matching(lambda r: "reply of" in r["message"]))
        assert any(r.get("correlation_id") == cid for r in records.matching(delivered))


# --- HTTP_LISTEN ---------------------------------------------------------------------------------------------------


def test_http_listen_is_host_and_port_or_off_and_a_bad_one_names_itself(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no developer's .env
    monkeypatch.delenv("HTTP_LISTEN")  # conftest points test subprocesses at a free port
    assert _settings().http_address == ("127.0.0.1", 8080)
    assert _settings(http_listen="0.0.0.0:9100").http_address == ("0.0.0.0", 9100)
    assert _settings(http_listen="[::1]:8080").http_address == ("::1", 8080)
    assert _settings(http_listen="off").http_address is None and _settings(http_listen=" OFF ").http_address is None
    assert _settings(http_listen="").http_address == ("127.0.0.1", 8080)  # empty is unset, as for every setting
    for bad in ("8080", "localhost", "127.0.0.1:http", "127.0.0.1:70000"):
        monkeypatch.setenv("HTTP_LISTEN", bad)
        with pytest.raises(ConfigError, match="HTTP_LISTEN") as info:
            load_settings()
        assert "host:port" in str(info.value)


async def test_an_address_in_use_stops_the_server_with_http_listen_named(engine: Engine, sqlite_url: str) -> None:
    db = Database.connect(sqlite_url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = build_http_app(health=HealthCheck(db=db, engine=engine), telemetry=Telemetry())
        server = HttpServer(app, host="127.0.0.1", port=port)
        with pytest.raises(ConfigError, match=f"HTTP_LISTEN 127.0.0.1:{port} cannot be used"):
            await server.start()
        await server.stop()
    await db.close()
