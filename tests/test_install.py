"""`make install-torch`: the CPU wheel index first, pip's usual index when it does not answer, and fast.

pip itself is the network boundary here: a stand-in `python` in a scratch venv records the pip commands the
Makefile runs (installing torch for real takes minutes), while the index probe runs the real interpreter against
sockets on 127.0.0.1 that refuse, never answer, or serve a page.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

STAND_IN = """#!/bin/sh
# the index probe runs for real; pip and the closing report are recorded
case "$2" in
  *urlopen*) exec {python} "$@" ;;
esac
echo "$*" >> {log}
"""

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def scratch_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A venv directory whose `bin/python` is the recording stand-in; returns (venv, log file)."""
    log = tmp_path / "calls.log"
    log.touch()
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(STAND_IN.format(python=sys.executable, log=log))
    python.chmod(0o755)
    return tmp_path / "venv", log


def install_torch(venv: Path, **variables: str) -> tuple[subprocess.CompletedProcess[str], float]:
    assignments = [f"{key}={value}" for key, value in {"VENV": str(venv), **variables}.items()]
    started = time.monotonic()
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "install-torch", *assignments],
        capture_output=True,
        text=True,
        timeout=60,
        env={key: value for key, value in os.environ.items() if not key.startswith("MAKE")},
        check=False,
    )
    return result, time.monotonic() - started


def pip_calls(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("-m pip")]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers: a hanging index."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


@pytest.fixture
def answering_index() -> Iterator[str]:
    """A PyPI-style simple index on 127.0.0.1 that answers every page."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html></html>")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_an_unreachable_cpu_index_falls_back_to_the_usual_index_at_once(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    venv, log = scratch_venv(tmp_path)

    result, elapsed = install_torch(venv, TORCH_INDEX=f"http://127.0.0.1:{closed}/whl/cpu")

    assert result.returncode == 0, result.stderr
    assert pip_calls(log) == ["-m pip install -q torch==2.13.0"]
    assert "usual index" in result.stderr
    assert elapsed < 10


def test_a_cpu_index_that_never_answers_costs_only_the_timeout(tmp_path: Path, silent_port: int) -> None:
    venv, log = scratch_venv(tmp_path)

    result, elapsed = install_torch(
        venv, TORCH_INDEX=f"http://127.0.0.1:{silent_port}/whl/cpu", TORCH_INDEX_TIMEOUT="1"
    )

    assert result.returncode == 0, result.stderr
    assert pip_calls(log) == ["-m pip install -q torch==2.13.0"]
    assert 1 <= elapsed < 8


def test_an_answering_cpu_index_is_used_first(tmp_path: Path, answering_index: str) -> None:
    venv, log = scratch_venv(tmp_path)

    result, _ = install_torch(venv, TORCH_INDEX=answering_index)

    assert result.returncode == 0, result.stderr
    assert pip_calls(log) == [f"-m pip install -q --index-url {answering_index} torch==2.13.0"]
    assert "usual index" not in result.stderr


def test_an_empty_torch_spec_leaves_torch_alone(tmp_path: Path, answering_index: str) -> None:
    venv, log = scratch_venv(tmp_path)

    result, _ = install_torch(venv, TORCH_INDEX=answering_index, TORCH_SPEC="")

    assert result.returncode == 0, result.stderr
    assert log.read_text() == ""
