"""Services a test starts, breaks and starts again itself, on free ports of 127.0.0.1 in its own temporary
directory: never the machine's shared servers, which other tests (and other people) use."""

from __future__ import annotations

import asyncio
import shutil
import socket
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
