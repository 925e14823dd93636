"""The trainer's process: how it is started, which process a training run belongs to, and whether it still lives.

A run's trainer is a child process (`python -m trainer.retrain --run-id N`, `spawn_trainer`) whose environment
carries the parent's settings (`child_environment`), so the child sees exactly what the parent was configured with.

A `training_runs` row records the trainer's pid and its start token: the process's start time in clock ticks
after boot (field 22 of `/proc/<pid>/stat`). The kernel reuses pids, but not a pid together with its start time,
so "the pid exists and started at the recorded time" is "the run's own process is alive"; anything else (no such
pid, a reused pid, a process of another user that we may not even signal) is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from pydantic import SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from core.settings import Settings, load_settings

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent

LAUNCHER_ONLY = frozenset({"retrain_backend", "celery_broker_url", "celery_queue"})
"""Settings of whoever starts runs, not of the trainer (which then sees the defaults)."""
SERVING_ONLY_PREFIXES = ("telegram_", "discord_", "dashboard_")
"""Settings of the chat platforms and the dashboard: a trainer talks to neither."""
_STAT_START_FIELD = 22
_GONE_STATES = frozenset({"Z", "X", "x"})
"""A zombie (exited, not yet reaped) or dead process keeps its /proc entry but no longer trains."""


def process_start_token(pid: int) -> str | None:
    """The start time of `pid` from /proc, or None when there is no such (live) process or no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 is the command name in parentheses and may itself contain spaces or parentheses.
    fields = stat[stat.rfind(")") + 2 :].split()
    if not fields or fields[0] in _GONE_STATES:
        return None
    try:
        return fields[_STAT_START_FIELD - 3]
    except IndexError:
        return None


def this_host() -> str:
    """This machine's name, as a worker records it on the run it takes (pids mean something only here)."""
    return socket.gethostname()


def has_proc() -> bool:
    """Whether this system has a Linux-style /proc (start tokens can be read)."""
    return Path(f"/proc/{os.getpid()}/stat").is_file()


def trainer_process_alive(pid: int | None, start_token: str | None) -> bool:
    """Whether the run's own process (pid AND start token) is alive.

    Without /proc (not Linux) only the pid can be checked: it counts when we may signal it (our own user's);
    a PermissionError means the pid belongs to someone else now, so it is not our trainer.
    """
    if pid is None:
        return False
    if has_proc():
        current = process_start_token(pid)
        if current is None:
            return False
        if start_token is None:  # a row written before start tokens existed: the command line must say trainer
            with contextlib.suppress(OSError):
                return b"trainer.retrain" in Path(f"/proc/{pid}/cmdline").read_bytes()
            return False
        return current == start_token
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def kill_trainer(pid: int | None, start_token: str | None) -> bool:
    """SIGKILLs the run's process if it is verifiably still that process; returns whether a signal was sent."""
    if pid is None or not trainer_process_alive(pid, start_token):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    log.warning("killed training process %d", pid)
    return True


# --- starting the trainer -------------------------------------------------------------------------------------


async def spawn_trainer(
    module: str, run_id: int, settings: Settings, *, tied: bool = False
) -> asyncio.subprocess.Process:
    """Starts `python -m <module> --run-id N` (under `accelerate launch` with TRAIN_LAUNCHER=accelerate): the
    settings go through its environment, its log to our stderr, its progress lines (JSON) to a pipe.

    Under accelerate the trainer is a grandchild, so the launcher gets a process group of its own: stopping the
    run signals the whole group (`signal_trainer`). A `tied` child (a worker's) dies with this process: a worker
    that dies mid-run takes its trainer along (under accelerate the trainer is tied to the launcher in turn)."""
    return await asyncio.create_subprocess_exec(
        *trainer_command(module, run_id, settings),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        env=child_environment(settings, os.environ),
        limit=2**20,
        start_new_session=settings.train_launcher == "accelerate",
        preexec_fn=die_with_parent if tied else None,
    )


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: this process is SIGKILLed when the one that started it exits (prctl PR_SET_PDEATHSIG); elsewhere
    nothing happens. Runs in the child between fork and exec, or first thing in a trainer."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def trainer_command(module: str, run_id: int, settings: Settings) -> list[str]:
    """The trainer's command line; raises FileNotFoundError when ACCELERATE_CONFIG names no file."""
    program = ["-m", module, "--run-id", str(run_id)]
    if settings.train_launcher != "accelerate":
        return [sys.executable, *program]
    config = settings.accelerate_config
    if config is not None and not config.is_file():
        raise FileNotFoundError(f"ACCELERATE_CONFIG {config} is not a file")
    options = ["--config_file", str(config)] if config is not None else []
    return [sys.executable, "-m", "accelerate.commands.launch", *options, *program]


def signal_trainer(process: asyncio.subprocess.Process, signum: int) -> None:
    """Sends `signum` to the trainer: to its process group when it leads one (accelerate), else to it alone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signum)
        else:
            os.kill(process.pid, signum)


async def progress_lines(process: asyncio.subprocess.Process) -> AsyncIterator[float]:
    """The progress fractions the trainer reports on stdout (`{"event": "progress", "progress": 0.42}`), until it
    closes stdout; anything else a library printed there is skipped."""
    stdout = process.stdout
    assert stdout is not None
    while True:
        try:
            raw = await stdout.readline()
        except ValueError:  # a line over the limit (not one of ours): skip it
            continue
        if not raw:
            return
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "progress" and "progress" in event:
            yield float(event["progress"])


def trainer_reads(name: str) -> bool:
    """Whether the setting `name` reaches a trainer: no secret (a platform token, the broker's URL, the dashboard
    token), nothing of how runs are queued, nothing of the platforms. DATABASE_URL does, password and all: the
    trainer reads and writes the database."""
    field = Settings.model_fields.get(name)
    if field is None or name in LAUNCHER_ONLY or name.startswith(SERVING_ONLY_PREFIXES):
        return False
    annotation = field.annotation
    return annotation is not SecretStr and SecretStr not in getattr(annotation, "__args__", ())


class TrainerSettings(Settings):
    """A trainer's settings: only its environment, which `child_environment` wrote, and only what `trainer_reads`.

    Never a `.env` file: the trainer runs in the bot's working directory, whose `.env` holds the platform tokens,
    the broker's URL and the dashboard token; a training run needs none of them, and a process that never holds a
    secret cannot leak it (into a crash report, a library's debug log, a core dump)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    @model_validator(mode="before")
    @classmethod
    def _only_what_training_needs(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items() if trainer_reads(str(key).lower())}


def load_trainer_settings() -> TrainerSettings:
    """The trainer's settings, with the one-line report of `load_settings` when one is bad."""
    settings = load_settings(TrainerSettings)
    assert isinstance(settings, TrainerSettings)
    return settings


def child_environment(settings: Settings, inherited: Mapping[str, str]) -> dict[str, str]:
    """The training process's environment: this process's settings as variables, so the child sees exactly what
    the parent was configured with (tests build Settings in code); what `trainer_reads` rejects is left out
    (secrets, the platforms' settings, how runs are queued: a trainer carries out one run); the thread
    settings bound every math library, not only torch, and library progress bars stay out of the child's log."""
    fields = type(settings).model_fields
    env = {key: value for key, value in inherited.items() if key.lower() not in fields}
    for name in fields:
        value = getattr(settings, name)
        if value is not None and trainer_reads(name):
            env[name.upper()] = _env_value(value)
    threads = str(settings.train_threads)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # the child's stderr is a log; progress comes back as JSON lines
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), inherited.get("PYTHONPATH")]))
    return env


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, frozenset | set):
        return ",".join(sorted(str(item) for item in value))
    if isinstance(value, tuple | list):
        return ",".join(str(item) for item in value)
    return str(value)
