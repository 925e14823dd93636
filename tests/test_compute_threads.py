"""Heavy torch work runs in threads that end with it (core/compute_threads.py says why: a thread that lives on keeps
its OpenMP team, and a second team in the process slows every decoding step of the engine)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from core.compute_threads import in_own_thread, run_in_own_thread
from core.serving.dialogue import Turn
from core.serving.engine import Engine, ModelRef
from core.serving.engine import _engine as engine_module
from tests.engine_probe import SHORT, make_engine, probe

__all__ = ["make_engine", "probe"]  # fixtures

JOIN_S = 10.0
caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="nobody")


def where() -> tuple[threading.Thread, str]:
    return threading.current_thread(), caller.get()


def fail() -> None:
    raise ValueError("the load failed")


def test_run_in_own_thread_returns_from_a_thread_that_has_ended() -> None:
    caller.set("the test")
    thread, seen = run_in_own_thread(where)
    assert thread is not threading.current_thread()
    assert not thread.is_alive()
    assert seen == "the test"
    with pytest.raises(ValueError, match="the load failed"):
        run_in_own_thread(fail)


async def test_in_own_thread_runs_each_call_in_a_new_thread_that_ends() -> None:
    caller.set("a task")
    first, seen = await in_own_thread(where)
    second, _ = await in_own_thread(where)
    assert first is not second, "an executor would reuse its thread, and with it its OpenMP team"
    assert seen == "a task"
    for thread in (first, second):
        thread.join(JOIN_S)
        assert not thread.is_alive()
    with pytest.raises(ValueError, match="the load failed"):
        await in_own_thread(fail)


async def test_a_cancelled_caller_leaves_the_work_to_finish_quietly() -> None:
    release, finished = threading.Event(), threading.Event()

    def slow() -> str:
        release.wait(JOIN_S)
        finished.set()
        return "done"

    task = asyncio.create_task(in_own_thread(slow))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    assert await asyncio.to_thread(finished.wait, JOIN_S)
    await asyncio.sleep(0)  # the late result reaches a cancelled future, which is left alone


async def test_a_swap_loads_in_a_thread_that_has_ended_when_it_returns(
    make_engine: Callable[..., Awaitable[Engine]], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await make_engine()
    loaders: list[threading.Thread] = []
    real_prepare = engine_module.prepare

    def recording_prepare(*args: Any, **kwargs: Any) -> Any:
        loaders.append(threading.current_thread())
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(engine_module, "prepare", recording_prepare)
    await engine.swap(ModelRef(str(tiny_model_dir), "v2", version_id=2))
    [loader] = loaders
    loader.join(JOIN_S)
    assert not loader.is_alive(), "the swap's loading thread lives on, and its OpenMP team with it"
    assert (await engine.generate_response([Turn("alice", "still there?")], params=SHORT)).model.name == "v2"
