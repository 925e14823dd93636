from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from core.errors import DatabaseError, SchemaOutdatedError
from core.storage.db import Database, downgrade, upgrade
from core.storage.models import Base


def _diff(conn: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


def _tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


async def test_models_match_migrations(db: Database) -> None:
    async with db.engine.connect() as conn:
        assert await conn.run_sync(_diff) == []


async def test_migrations_go_down_and_up(database_url: str) -> None:
    database = Database.connect(database_url)
    try:
        await downgrade(database_url, "base")
        async with database.engine.connect() as conn:
            assert await conn.run_sync(_tables) <= {"alembic_version"}
        with pytest.raises(SchemaOutdatedError, match="magpie db upgrade"):
            await database.check_schema()
        await upgrade(database_url)
        await database.check_schema()
        async with database.engine.connect() as conn:
            assert {"users", "chats", "messages", "model_versions", "training_runs"} <= await conn.run_sync(_tables)
    finally:
        await database.close()


async def test_unreachable_database_is_one_clear_error() -> None:
    database = Database.connect("postgresql+asyncpg://nobody:secret@127.0.0.1:1/none")
    try:
        with pytest.raises(DatabaseError) as info:
            await database.check_schema()
        assert "DATABASE_URL" in str(info.value)
        assert "secret" not in str(info.value)
    finally:
        await database.close()
