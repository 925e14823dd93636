"""Which process a training run belongs to, and whether it still lives.

A `training_runs` row records the trainer's pid and its start token: the process's start time in clock ticks
after boot (field 22 of `/proc/<pid>/stat`). The kernel reuses pids, but not a pid together with its start time,
so "the pid exists and started at the recorded time" is "the run's own process is alive"; anything else (no such
pid, a reused pid, a process of another user that we may not even signal) is not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)

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
