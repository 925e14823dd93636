"""Shared fixtures: tiny real GPT-2 models and throwaway SQLite / PostgreSQL databases.

PostgreSQL: each test session creates its own database on the server at MAGPIE_TEST_POSTGRES_URL (default: the
local trust-auth server) and drops it at the end. Without a server those tests are skipped with the reason shown,
unless MAGPIE_REQUIRE_POSTGRES=1 (as in CI), where a missing server is an error.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from core.serving.engine import Engine, EngineConfig, GenerationParams, ModelRef
from core.settings import Settings
from core.storage.db import Database, upgrade
from core.storage.models import Base
from trainer.starter_model import ModelShape, build_model, save_model, train_tokenizer

pytest_plugins = ["tests.throwaway_services"]
"""Fixtures of services a test starts and breaks itself (`throwaway_redis`, `throwaway_postgres`)."""

# `magpie run` in a test's subprocess serves /healthz and /metrics on a free port: tests running side by side (and a
# Magpie deployed on this machine) never fight over 127.0.0.1:8080.
os.environ["HTTP_LISTEN"] = "127.0.0.1:0"

POSTGRES_ADMIN_URL = os.environ.get("MAGPIE_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")

TINY_CORPUS = [
    "hello there, how are you today?",
    "I am fine, thank you. And you?",
    "what is your favourite colour?",
    "I like blue and green, like the sea.",
    "안녕하세요, 오늘 기분이 어때요?",
    "좋아요! 날씨가 정말 좋네요 😀",
    "שלום, מה שלומך?",
    "the quick brown fox jumps over the lazy dog",
    "do you like pizza or pasta more?",
    "pizza, obviously. with extra cheese 🍕",
]


def generation_params(**overrides: Any) -> GenerationParams:
    """Sampling parameters with Settings' defaults (the only place they live), overridden where a test cares."""
    return GenerationParams.from_settings(Settings(_env_file=None), **overrides)  # type: ignore[call-arg]


def engine_config(**overrides: Any) -> EngineConfig:
    """An engine configuration on the CPU with Settings' defaults, overridden where a test cares; fp32 unless asked,
    since the engine's tests assert fp32's batch invariance (int8's rounding depends on the batch)."""
    overrides.setdefault("precision", "fp32")
    return EngineConfig.from_settings(Settings(_env_file=None, device="cpu"), **overrides)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 with a locally trained byte-level BPE, saved with save_pretrained (seeded)."""
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = train_tokenizer(TINY_CORPUS * 20, vocab_size=400)
    assert len(tokenizer) > 300, "tokenizer came out (nearly) empty"
    model = build_model(tokenizer, ModelShape(n_layer=2, n_embd=64, n_head=2, n_positions=128), seed=0)
    return save_model(model, tokenizer, directory)


@pytest.fixture
async def engine(tiny_model_dir: Path) -> AsyncIterator[Engine]:
    """The real engine over the tiny model, greedy and short, so answers are deterministic and quick."""
    engine = Engine(engine_config(params=generation_params(max_new_tokens=6, temperature=0.0), seed=0))
    await engine.start(ModelRef(source=str(tiny_model_dir), name="tiny"))
    try:
        yield engine
    finally:
        await engine.close()


def _postgres_reachable(url: str) -> bool:
    parsed = make_url(url)
    try:
        with socket.create_connection((parsed.host or "127.0.0.1", parsed.port or 5432), timeout=2):
            return True
    except OSError:
        return False


async def _pg_admin(sql: str) -> None:
    import asyncpg

    parsed = make_url(POSTGRES_ADMIN_URL)
    conn = await asyncpg.connect(host=parsed.host, port=parsed.port, user=parsed.username, database=parsed.database)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    """A migrated throwaway PostgreSQL database for this test session, dropped afterwards."""
    if not _postgres_reachable(POSTGRES_ADMIN_URL):
        reason = f"PostgreSQL not reachable at {make_url(POSTGRES_ADMIN_URL).render_as_string()}"
        if os.environ.get("MAGPIE_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason + " (MAGPIE_REQUIRE_POSTGRES=1)")
        pytest.skip(reason)
    name = f"magpie_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        asyncio.run(upgrade(url))
        yield url
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite file for this test session."""
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'magpie.db'}"
    asyncio.run(upgrade(url))
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """The URL of a migrated database, once per backend."""
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A connected Database on each backend; every table is emptied after the test."""
    database = Database.connect(database_url)
    try:
        yield database
    finally:
        await _empty_tables(database)
        await database.close()


async def _empty_tables(database: Database) -> None:
    tables = [table.name for table in reversed(Base.metadata.sorted_tables)]
    async with database.engine.begin() as conn:
        if database.backend == "postgresql":
            await conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for table in tables:
                await conn.execute(text(f"DELETE FROM {table}"))
