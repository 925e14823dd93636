"""Connecting to the database: engines, sessions, SQLite pragmas, and the schema check at start.

The schema itself lives in `core/storage/models.py` and changes only through Alembic migrations (`alembic/`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from alembic import command
from core.errors import DatabaseError, SchemaOutdatedError

log = logging.getLogger(__name__)

URL_FORMS = "sqlite+aiosqlite:///path/to/magpie.db or postgresql+asyncpg://user:password@host:5432/magpie"
"""The DATABASE_URL forms that work (async drivers Magpie installs), named by every error about the URL."""
DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")


def _alembic_dir() -> Path:
    """The migration scripts: `alembic/` in a source checkout, the `magpie_migrations` package when installed."""
    source = Path(__file__).resolve().parents[2] / "alembic"
    if (source / "env.py").is_file():
        return source
    spec = importlib.util.find_spec("magpie_migrations")
    if spec is None or not spec.submodule_search_locations:
        raise DatabaseError("Magpie's migration scripts are missing: reinstall the package.")
    return Path(next(iter(spec.submodule_search_locations)))


ALEMBIC_DIR = _alembic_dir()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets the trainer read while the bot writes; foreign keys are off by default in SQLite; secure_delete
    overwrites what /forget and deletions remove instead of leaving it in free pages (its default is the build's)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _parsed(url: str) -> URL:
    """The URL, if it names a driver Magpie ships: another (`postgresql://`, `mysql://`) would fail deep inside
    SQLAlchemy as a ModuleNotFoundError. The message names the scheme only: the URL may hold a password."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"DATABASE_URL is not a database URL: use {URL_FORMS}.") from None
    if parsed.drivername not in DRIVERS:
        raise DatabaseError(f"DATABASE_URL {parsed.drivername}://… cannot be used: use {URL_FORMS}.")
    return parsed


def create_engine(url: str) -> AsyncEngine:
    """Creates an async engine; for SQLite it also creates the file's folder and sets the pragmas."""
    parsed = _parsed(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_async_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


@dataclass
class Database:
    """An engine and its session factory; the one handle the app passes around."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]

    @classmethod
    def connect(cls, url: str) -> Database:
        engine = create_engine(url)
        return cls(engine, async_sessionmaker(engine, expire_on_commit=False))

    @classmethod
    @contextlib.asynccontextmanager
    async def opened(cls, url: str) -> AsyncIterator[Database]:
        """A connection for one command: the schema checked first (with the fix named), disposed afterwards."""
        db = cls.connect(url)
        try:
            await db.check_schema()
            yield db
        finally:
            await db.close()

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    async def close(self) -> None:
        await self.engine.dispose()

    async def check_schema(self) -> None:
        """Refuses to run on a database that is unreachable or behind the migrations, saying how to fix it."""
        current = await self.schema_heads()
        expected = set(_script().get_heads())
        if current != expected:
            state = "has no Magpie tables yet" if not current else "is at an older schema version"
            raise SchemaOutdatedError(
                f"The database {_safe_url(self.engine)} {state}. Run `magpie db upgrade` to migrate it."
            )

    async def schema_heads(self) -> set[str]:
        """The schema's migration heads; an unreachable database is one line naming the URL (password hidden)."""
        try:
            async with self.engine.connect() as conn:
                return await conn.run_sync(_current_heads)
        except (SQLAlchemyError, OSError) as exc:
            raise DatabaseError(
                f"Cannot reach the database at {_safe_url(self.engine)}: {type(exc).__name__}. "
                f"Check DATABASE_URL ({URL_FORMS}) and that the server is running."
            ) from None


def _current_heads(conn: Connection) -> set[str]:
    return set(MigrationContext.configure(conn).get_current_heads())


def _safe_url(engine: AsyncEngine) -> str:
    return engine.url.render_as_string(hide_password=True)


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at our scripts and the given database."""
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config("sqlite://"))


async def upgrade(url: str, revision: str = "head") -> None:
    """Applies migrations up to `revision` (Alembic's env.py runs its own async engine). The database is reached
    once first, so a wrong URL or a server that is down is one line, not Alembic's traceback."""
    db = Database.connect(url)
    try:
        await db.schema_heads()
    finally:
        await db.close()
    await asyncio.to_thread(command.upgrade, alembic_config(url), revision)


async def downgrade(url: str, revision: str) -> None:
    """Reverts migrations down to `revision` ("base" removes everything)."""
    await asyncio.to_thread(command.downgrade, alembic_config(url), revision)
