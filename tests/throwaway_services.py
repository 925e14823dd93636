"""Services a test starts, breaks and starts again itself, on free ports of 127.0.0.1 in its own temporary
directory: never the machine's shared servers, which other tests (and other people) use."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


class ThrowawayRedis:
    """A redis-server of the test's own, that the test kills and starts again (on the same port)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._directory = directory
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        options = ["--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        self._process = await asyncio.create_subprocess_exec(
            "redis-server", *options, cwd=self._directory, stdout=asyncio.subprocess.DEVNULL
        )
        async with asyncio.timeout(20):
            while not answers(self.port):
                assert self._process.returncode is None, "redis-server exited"
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()


@pytest.fixture
async def throwaway_redis(tmp_path: Path) -> AsyncIterator[ThrowawayRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = ThrowawayRedis(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


class ThrowawayPostgres:
    """A PostgreSQL cluster of the test's own: `initdb` in a temporary directory, its own free port, run as the
    postgres user (PostgreSQL refuses root); stopped and started again by the test, removed at the end."""

    def __init__(self, bin_dir: Path) -> None:
        self.port = free_port()
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"
        self._bin = bin_dir
        self._directory = Path(tempfile.mkdtemp(prefix="magpie-pg-"))  # not under pytest's 0700 temp folders
        shutil.chown(self._directory, "postgres", "postgres")
        self._data = self._directory / "data"

    @staticmethod
    def binaries() -> Path | None:
        """The newest /usr/lib/postgresql/*/bin with initdb and pg_ctl, or None."""
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
        return found[-1].parent if found else None

    async def _as_postgres(self, *command: str) -> None:
        process = await asyncio.create_subprocess_exec(
            "runuser", "-u", "postgres", "--", *command,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await process.communicate()
        assert process.returncode == 0, f"{command[0]} failed: {output.decode(errors='replace')[-2000:]}"

    async def create(self) -> None:
        await self._as_postgres(
            str(self._bin / "initdb"), "-D", str(self._data), "-U", "postgres", "-A", "trust", "--no-sync"
        )

    async def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self._directory} -c fsync=off"
        log = str(self._directory / "server.log")
        await self._as_postgres(
            str(self._bin / "pg_ctl"), "-D", str(self._data), "-o", options, "-l", log, "-w", "start"
        )

    async def stop(self) -> None:
        """A fast shutdown, as a restart or failover does it: open connections are cut."""
        await self._as_postgres(str(self._bin / "pg_ctl"), "-D", str(self._data), "-m", "fast", "-w", "stop")

    async def remove(self) -> None:
        if (self._data / "postmaster.pid").exists():
            await self._as_postgres(str(self._bin / "pg_ctl"), "-D", str(self._data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self._directory, ignore_errors=True)


@pytest.fixture
async def throwaway_postgres() -> AsyncIterator[ThrowawayPostgres]:
    bin_dir = ThrowawayPostgres.binaries()
    if bin_dir is None or shutil.which("runuser") is None or os.geteuid() != 0:
        pytest.skip("needs PostgreSQL's server binaries (/usr/lib/postgresql/*/bin), runuser and root")
    server = ThrowawayPostgres(bin_dir)
    try:
        await server.create()
        await server.start()
        yield server
    finally:
        await server.remove()
