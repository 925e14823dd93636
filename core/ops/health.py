"""Is this Magpie healthy? The parts `GET /healthz` reports: the database answers, the engine serves, each platform
is connected; and which model version serves.

It is platform-free: a platform is anything with a `platform` name and a `connected` flag (the backends in
`bot/`), handed over by the composition root once they exist (`watch_platforms`). A part that fails names itself,
with a reason that carries no secret (an error's type, never its text, which may hold a URL with a password).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from core.serving.engine import Engine
from core.storage.db import Database

log = logging.getLogger(__name__)

DATABASE_TIMEOUT_S = 3.0
"""Longer than a healthy database ever takes to answer `SELECT 1`; shorter than a health checker waits."""


class Platform(Protocol):
    """A platform connection as the health check sees it."""

    @property
    def platform(self) -> str: ...

    @property
    def connected(self) -> bool:
        """Whether the platform can be reached now; answers at once."""
        ...


@dataclass(frozen=True, slots=True)
class PartHealth:
    """One part's verdict and, in words, why."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Health:
    """Every part's verdict and the version serving (None: no model serves)."""

    parts: tuple[PartHealth, ...]
    version_name: str | None
    version_id: int | None

    @property
    def ok(self) -> bool:
        return all(part.ok for part in self.parts)

    @property
    def failing(self) -> list[str]:
        return [part.name for part in self.parts if not part.ok]

    def as_json(self) -> dict[str, Any]:
        """The body of `/healthz`: `status`, the `failing` parts by name, each part, and the active version."""
        version = None if self.version_name is None else {"name": self.version_name, "id": self.version_id}
        return {
            "status": "ok" if self.ok else "failing",
            "failing": self.failing,
            "parts": {part.name: {"ok": part.ok, "detail": part.detail} for part in self.parts},
            "active_version": version,
        }


class HealthCheck:
    """Checks the database, the engine and the platforms watched, when asked (nothing runs in between)."""

    def __init__(self, *, db: Database, engine: Engine, database_timeout_s: float = DATABASE_TIMEOUT_S) -> None:
        self._db = db
        self._engine = engine
        self._timeout_s = database_timeout_s
        self._platforms: list[Platform] = []

    def watch_platforms(self, platforms: Iterable[Platform]) -> None:
        """Reports each of `platforms` as a part (by its name) from now on."""
        self._platforms.extend(platforms)

    async def check(self) -> Health:
        parts = [await self._database(), self._engine_part()]
        parts += [_platform(platform) for platform in self._platforms]
        ref = self._engine.model_ref
        return Health(tuple(parts), ref.name if ref else None, ref.version_id if ref else None)

    async def _database(self) -> PartHealth:
        try:
            async with asyncio.timeout(self._timeout_s), self._db.engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
        except TimeoutError:
            return PartHealth("database", False, f"no answer within {self._timeout_s:g} s")
        except Exception as exc:  # whatever the driver raises, the verdict is the same: unreachable
            log.debug("health: the database is unreachable: %s", type(exc).__name__)
            return PartHealth("database", False, f"unreachable ({type(exc).__name__})")
        return PartHealth("database", True, "reachable")

    def _engine_part(self) -> PartHealth:
        ref = self._engine.model_ref
        if ref is None:
            return PartHealth("engine", False, "not serving (loading a model, or stopped)")
        return PartHealth("engine", True, f"serving {ref.name} in {self._engine.precision}")


def _platform(platform: Platform) -> PartHealth:
    if platform.connected:
        return PartHealth(platform.platform, True, "connected")
    return PartHealth(platform.platform, False, "not connected")
