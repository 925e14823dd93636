"""`make install-torch`: the CPU wheel index first, pip's usual index when it does not answer, and fast.

pip itself is the network boundary here: a stand-in `python` in a scratch venv records the pip commands the
Makefile runs (installing torch for real takes minutes), while the index probe runs the real interpreter against
sockets on 127.0.0.1 that refuse, never answer, or serve a page.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

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
    return run_make(venv, "install-torch", **variables)


def run_make(venv: Path, target: str, **variables: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """`make TARGET` with VENV=venv (the stand-in's) and `variables`; returns the result and how long it took."""
    assignments = [f"{key}={value}" for key, value in {"VENV": str(venv), **variables}.items()]
    started = time.monotonic()
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), target, *assignments],
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


# --- the locked install: exact versions, checked against their hashes -------------------------------------------

LOCKS = {"requirements.lock": False, "requirements-dev.lock": True}
"""Each lock file, and whether it holds the dev extra (`make install` uses the dev lock, the Dockerfile the other)."""
SECURITY_FLOORS = {
    # name: (first fixed version, why); direct dependencies are floored in pyproject.toml as well
    "aiohttp": ("3.13.4", "CVE-2024-30251, CVE-2026-34517: request parsing before authentication"),
    "tornado": ("6.5.5", "multipart DoS in PTB's webhook server"),
    "torch": ("2.10", "torch.load RCEs CVE-2025-32434, CVE-2026-24747"),
    "jinja2": ("3.1.6", "sandbox escapes CVE-2024-56201, CVE-2024-56326, CVE-2025-27516"),
    "tqdm": ("4.66.3", "CVE-2024-34062"),
}
TRANSITIVE_FLOORS = {"urllib3": "2.5.0", "requests": "2.32.4", "h11": "0.16.0", "setuptools": "78.1.1"}
"""Advisories of packages Magpie does not depend on directly: only the lock files can hold them back."""


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", requirement).lower()


def _locked(path: Path) -> dict[str, list[tuple[Version, str, int]]]:
    """Each package of a lock file: its pinned versions, each with its environment marker and its number of hashes."""
    entries: dict[str, list[tuple[Version, str, int]]] = {}
    for block in re.split(r"\n(?=\S)", path.read_text()):
        if block.startswith("#") or not block.strip():
            continue
        head = block.splitlines()[0].rstrip(" \\")
        pin, _, marker = head.partition(";")
        name, equals, version = pin.strip().partition("==")
        assert equals, f"{path.name}: {head!r} is not pinned with =="
        entries.setdefault(_name(name), []).append((Version(version), marker.strip(), block.count("--hash=sha256:")))
    return entries


def _declared(with_dev: bool) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(text) for text in project["dependencies"]]
    return declared + ([Requirement(text) for text in project["optional-dependencies"]["dev"]] if with_dev else [])


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_a_lock_file_pins_every_dependency_but_torch_with_hashes(lock: str) -> None:
    locked = _locked(ROOT / lock)
    assert all(hashes > 0 for versions in locked.values() for _, _, hashes in versions), "every pin has hashes"
    assert "torch" not in locked and not [name for name in locked if name.startswith(("nvidia-", "triton"))]
    for requirement in _declared(LOCKS[lock]):
        name = _name(requirement.name)
        if name == "torch":
            continue
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        assert name in locked, f"{lock} lacks {requirement} (run `make lock`)"
        for version, _, _ in locked[name]:
            assert requirement.specifier.contains(version, prereleases=True), (
                f"{lock}: {name}=={version} vs {requirement}"
            )


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_no_locked_version_has_a_known_advisory(lock: str) -> None:
    floors = {name: floor for name, (floor, _) in SECURITY_FLOORS.items() if name != "torch"} | TRANSITIVE_FLOORS
    locked = _locked(ROOT / lock)
    for name, floor in floors.items():
        for version, _, _ in locked.get(name, []):
            assert version >= Version(floor), f"{lock}: {name}=={version}, fixed in {floor}"


def test_pyproject_allows_no_version_with_a_known_advisory() -> None:
    declared = {_name(requirement.name): requirement for requirement in _declared(with_dev=False)}
    for name, (floor, why) in SECURITY_FLOORS.items():
        assert name in declared, f"{name} must be a direct dependency, floored for {why}"
        below = (*Version(floor).release[:-1], Version(floor).release[-1] - 1)
        assert not declared[name].specifier.contains(".".join(map(str, below))), f"{name} below {floor}: {why}"
    assert int(TORCH_SPEC_IN_MAKEFILE().split("==")[1].split(".")[1]) >= 10, "TORCH_SPEC meets torch's floor"


def TORCH_SPEC_IN_MAKEFILE() -> str:
    match = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match is not None
    return match.group(1)


def test_make_install_installs_torch_then_the_lock_by_hash_then_magpie_alone(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    venv, log = scratch_venv(tmp_path)

    result, _ = run_make(venv, str(venv / "bin" / "magpie"), TORCH_INDEX=f"http://127.0.0.1:{closed}/whl/cpu")

    assert result.returncode == 0, result.stderr
    assert pip_calls(log) == [
        "-m pip install -q --upgrade pip",
        "-m pip install -q torch==2.13.0",
        "-m pip install -q --require-hashes --no-deps -r requirements-dev.lock",
        "-m pip install -q --no-deps --no-build-isolation -e .",
        "-m pip check",
    ]


def test_the_image_installs_the_lock_by_hash_and_downloads_nothing_else() -> None:
    runs = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("RUN python -m pip")]
    assert runs[1] == "RUN python -m pip install --require-hashes --no-deps -r /src/requirements.lock"
    assert runs[2].startswith("RUN python -m pip install --no-deps --no-build-isolation /src && python -m pip check")
