"""`python -m tests.paused_retrain --run-id N`: the real training program, paused right before it records.

Tests start runs with `TrainingOrchestrator(trainer_module="tests.paused_retrain")`. Once a run has trained and
scored its version (the directory is in place, nothing is registered yet), this program connects to the Unix
socket named by MAGPIE_TEST_PAUSE_SOCKET, sends the run id and does what the test answers: `go` records as
usual, `fail` raises (an error after the rename), `kill` SIGKILLs this process (a kill after the rename). So a
test can act "while the run trains" (send /forget, /optout) at an exact point, without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from trainer.retrain import main

SOCKET_VARIABLE = "MAGPIE_TEST_PAUSE_SOCKET"


class InjectedFailureError(RuntimeError):
    """The failure a test asked for after the version directory was renamed into place."""


def _run_id(argv: list[str]) -> str:
    return argv[argv.index("--run-id") + 1]


async def _pause() -> None:
    reader, writer = await asyncio.open_unix_connection(os.environ[SOCKET_VARIABLE])
    writer.write(f"{_run_id(sys.argv)}\n".encode())
    await writer.drain()
    answer = (await reader.readline()).decode().strip()
    writer.close()
    await writer.wait_closed()
    if answer == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if answer == "fail":
        raise InjectedFailureError("injected after the rename")


Decide = Callable[[int], Awaitable[str]]
"""The test's side: given the paused run's id, does what it wants and returns `go`, `fail` or `kill`."""


@contextlib.asynccontextmanager
async def pause_server(decide: Decide) -> AsyncIterator[str]:
    """Listens on a fresh Unix socket (a short path: they are limited to ~100 bytes) and yields its path, to be
    put in MAGPIE_TEST_PAUSE_SOCKET before the run starts."""

    errors: list[BaseException] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        run_id = int((await reader.readline()).decode())
        try:
            answer = await decide(run_id)
        except Exception as exc:  # the run must not wait forever; the test fails at the end of the block
            errors.append(exc)
            answer = "fail"
        with contextlib.suppress(ConnectionError):  # the test may have killed the run meanwhile
            writer.write(f"{answer}\n".encode())
            await writer.drain()
        writer.close()

    directory = Path(tempfile.mkdtemp(prefix="magpie-", dir="/tmp"))
    path = str(directory / "pause.sock")
    server = await asyncio.start_unix_server(handle, path)
    try:
        yield path
    finally:
        server.close()
        await server.wait_closed()
        shutil.rmtree(directory, ignore_errors=True)
    if errors:
        raise errors[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], before_record=_pause))
