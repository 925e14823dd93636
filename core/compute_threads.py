"""Heavy torch work away from the event loop and from the engine: each call in a thread of its own that ends with it.

Why not `asyncio.to_thread`: torch's CPU kernels run on OpenMP (libgomp in the PyPI wheels), which keeps a team of
worker threads for every thread that has run a parallel region, for as long as that thread lives. Once the process
holds more OpenMP threads than CPUs, libgomp stops spinning between parallel regions (a thousand spins instead of
~300 thousand) and every region pays a sleep and a wake-up. A decoding step is ~150 short regions, so the engine's
worker gets ~2x slower per token from the moment any other thread has run one large torch op (GPT-2 small, int8,
one chat, 2 cores: 4.8 -> 10.1 ms/token; `bench/omp_teams.py`). An executor's thread lives on idle after its call
and keeps its team: one `to_thread(load)` for a hot swap, or the starter built before serving, slowed every reply
after it. A thread that exits takes its team with it, so the engine is again the only OpenMP user.

The main thread must not run large torch ops in a serving process for the same reason (its team lives as long as
the process); scripts that time the engine (bench/) run their baselines through `run_in_own_thread` too.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")


def run_in_own_thread(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """`fn(*args, **kwargs)` in a new thread, joined before returning (its result, or its exception raised here)."""
    outcome: list[_T] = []
    failure: list[BaseException] = []
    context = contextvars.copy_context()

    def target() -> None:
        try:
            outcome.append(context.run(fn, *args, **kwargs))
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=target, name=f"magpie-{getattr(fn, '__name__', 'work')}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


async def in_own_thread(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """`asyncio.to_thread`, but in a new thread that ends with the call (see the module's docstring). Like
    `to_thread`, the caller's context variables go along, and cancelling the caller does not stop `fn`."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()
    context = contextvars.copy_context()

    def target() -> None:
        try:
            result = context.run(fn, *args, **kwargs)
        except BaseException as exc:  # delivered to the awaiting task
            deliver(loop, future, exc)
        else:
            deliver(loop, future, result)

    threading.Thread(target=target, name=f"magpie-{getattr(fn, '__name__', 'work')}", daemon=True).start()
    return await future


def _resolve(future: asyncio.Future[_T], outcome: _T | BaseException) -> None:
    """Runs on the future's loop; a caller who already gave up has a cancelled future, which is left alone."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def deliver(loop: asyncio.AbstractEventLoop, future: asyncio.Future[_T], outcome: _T | BaseException) -> None:
    """Settles `future` (a result, or the exception to raise) from another thread, on its own loop."""
    try:
        loop.call_soon_threadsafe(_resolve, future, outcome)
    except RuntimeError:  # the caller's loop is closed: nobody is waiting any more
        log.debug("dropping a result for a closed event loop")
