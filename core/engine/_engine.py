"""The Engine: a bounded request queue, the worker thread that owns the model, and the asyncio side.

Threading: the event loop only appends to and removes from the queue under `_cond` (held for microseconds, never
during generation) and awaits futures; the worker thread does all torch work and hands results back with
`loop.call_soon_threadsafe`. Model loads for swaps run in a third, short-lived thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch

from core.dialogue import Turn
from core.engine._decoding import generate_replies
from core.engine._loading import LoadedModel, prepare
from core.engine._types import EngineConfig, EngineStats, Generation, GenerationParams, ModelRef
from core.errors import EngineBusyError, EngineClosedError, EngineError, EngineTimeoutError, ModelLoadError
from core.logging_setup import current_correlation_id

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(eq=False, slots=True)
class _Request:
    turns: tuple[Turn, ...]
    params: GenerationParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Generation]
    queued_at: float = field(default_factory=time.monotonic)
    withdrawn: bool = False  # set on the event loop when the caller gave up; read by the worker
    correlation_id: str | None = field(default_factory=current_correlation_id)  # the worker logs it with the batch


@dataclass(slots=True)
class _Swap:
    loaded: LoadedModel
    loop: asyncio.AbstractEventLoop
    switched: asyncio.Future[None]


def _resolve(future: asyncio.Future[_T], outcome: _T | BaseException) -> None:
    """Runs on the future's loop; a caller who already gave up has a cancelled future, which is left alone."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _deliver(loop: asyncio.AbstractEventLoop, future: asyncio.Future[_T], outcome: _T | BaseException) -> None:
    try:
        loop.call_soon_threadsafe(_resolve, future, outcome)
    except RuntimeError:  # the caller's loop is closed: nobody is waiting any more
        log.debug("dropping a result for a closed event loop")


class Engine:
    """Serves `generate_response` from one worker thread that owns the model (see the package docstring)."""

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        # Shared with the worker thread and guarded by `_cond` (single attribute reads excepted).
        self._cond = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._running = 0
        self._loaded: LoadedModel | None = None
        self._swap: _Swap | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self._swap_lock = asyncio.Lock()
        self._tokens_generated = 0  # cumulative, for `stats` (written by the worker under `_cond`)
        self._generate_seconds = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        return cls(EngineConfig.from_settings(settings))

    @property
    def config(self) -> EngineConfig:
        """What the engine was built with (read-only)."""
        return self._config

    @property
    def model_ref(self) -> ModelRef | None:
        loaded = self._loaded
        return loaded.ref if loaded else None

    @property
    def precision(self) -> str | None:
        """The number format the current model serves in (SERVE_PRECISION resolved for it); None when stopped."""
        loaded = self._loaded
        return loaded.precision if loaded else None

    @property
    def queue_depth(self) -> int:
        """Requests waiting plus those in the batch being generated."""
        return len(self._pending) + self._running

    def stats(self) -> EngineStats:
        """A consistent snapshot of the queue and the cumulative work, for metrics (see `EngineStats`)."""
        with self._cond:
            return EngineStats(len(self._pending), self._running, self._tokens_generated, self._generate_seconds)

    @property
    def context_window(self) -> int:
        """The current model's context window in tokens (prompt plus reply)."""
        loaded = self._loaded
        if loaded is None:
            raise EngineClosedError("the engine is not running")
        return loaded.context_window

    # --- the event-loop side -----------------------------------------------------------------------------------

    async def start(self, ref: ModelRef) -> None:
        """Starts the worker thread, which loads `ref` itself; raises `ModelLoadError` if the load fails."""
        if self._thread is not None or self._closing:
            raise RuntimeError("Engine.start() may be called once")
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ref, loop, started), name="magpie-engine", daemon=True)
        self._thread.start()
        try:
            await started
        except ModelLoadError:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            raise
        log.info("serving model %s from %s in %s", ref.name, ref.source, self.precision)

    async def generate_response(
        self,
        turns: Sequence[Turn],
        *,
        params: GenerationParams | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (includes queueing; the error must be EngineTimeoutError)
    ) -> Generation:
        """The bot's next line after `turns`.

        Raises `EngineBusyError` at once when the queue is full, `EngineTimeoutError` after `timeout` seconds
        (default `timeout_s`) of waiting plus generating, and `EngineClosedError` when the engine is not running.
        """
        request = self._submit(turns, params or self._config.params)
        limit = self._config.timeout_s if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                return await request.future
        except TimeoutError:
            raise EngineTimeoutError(f"no reply within {limit:g} s") from None
        finally:
            if request.future.cancelled():
                self._withdraw(request)

    async def swap(self, ref: ModelRef) -> None:
        """Loads `ref` beside the running model, then has the worker switch to it between two batches.

        Serving continues during the load; requests already in a batch finish on the old model and nothing fails.
        Returns once every later batch uses the new model; raises `ModelLoadError` (the old model stays).
        """
        async with self._swap_lock:
            if self._loaded is None or self._closing:
                raise EngineClosedError("the engine is not running")
            loaded = await asyncio.to_thread(prepare, ref, self._config.device, self._config.precision)
            loop = asyncio.get_running_loop()
            switched: asyncio.Future[None] = loop.create_future()
            with self._cond:
                if self._closing:
                    raise EngineClosedError("the engine closed during the swap")
                self._swap = _Swap(loaded, loop, switched)
                self._cond.notify_all()
            await switched
        log.info("swapped to model %s from %s in %s", ref.name, ref.source, loaded.precision)

    async def close(self) -> None:
        """Fails waiting requests with `EngineClosedError`, lets the running batch finish, and joins the worker."""
        with self._cond:
            self._closing = True
            drained, self._pending = list(self._pending), deque()
            swap, self._swap = self._swap, None
            self._cond.notify_all()
        for request in drained:
            _deliver(request.loop, request.future, EngineClosedError("the engine is shutting down"))
        if swap is not None:
            _deliver(swap.loop, swap.switched, EngineClosedError("the engine is shutting down"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._loaded = None

    def _submit(self, turns: Sequence[Turn], params: GenerationParams) -> _Request:
        loop = asyncio.get_running_loop()
        request = _Request(tuple(turns), params, loop, loop.create_future())
        with self._cond:
            if self._loaded is None or self._closing:
                raise EngineClosedError("the engine is not running")
            if len(self._pending) >= self._config.queue_size:
                raise EngineBusyError(f"{len(self._pending)} requests are already waiting")
            self._pending.append(request)
            self._cond.notify_all()
        return request

    def _withdraw(self, request: _Request) -> None:
        request.withdrawn = True
        with self._cond:
            if request in self._pending:
                self._pending.remove(request)

    # --- the worker thread -------------------------------------------------------------------------------------

    def _run(self, ref: ModelRef, loop: asyncio.AbstractEventLoop, started: asyncio.Future[None]) -> None:
        if self._config.torch_threads is not None:
            torch.set_num_threads(self._config.torch_threads)
        try:
            self._loaded = prepare(ref, self._config.device, self._config.precision)
        except Exception as exc:
            if not isinstance(exc, ModelLoadError):
                log.exception("preparing %s failed", ref.source)
                exc = ModelLoadError(f'Model "{ref.source}" could not be prepared for serving ({type(exc).__name__}).')
            _deliver(loop, started, exc)
            return
        _deliver(loop, started, None)
        while (batch := self._next_batch()) is not None:
            self._serve(batch)

    def _next_batch(self) -> list[_Request] | None:
        """Blocks until a batch is due (full, or its oldest request waited `batch_wait_ms`); None means stop.

        A pending swap is applied here, between batches, so a batch never mixes models.
        """
        with self._cond:
            while True:
                if self._swap is not None:
                    self._loaded = self._swap.loaded
                    _deliver(self._swap.loop, self._swap.switched, None)
                    self._swap = None
                elif self._closing:
                    return None
                elif not self._pending:
                    self._cond.wait()
                elif len(self._pending) < self._config.max_batch_size and (delay := self._gathering_left()) > 0:
                    self._cond.wait(delay)
                else:
                    return self._take_batch()

    def _gathering_left(self) -> float:
        return self._pending[0].queued_at + self._config.batch_wait_ms / 1000 - time.monotonic()

    def _take_batch(self) -> list[_Request]:
        """The oldest request and the next ones with the same parameters, in arrival order (called under the lock)."""
        params = self._pending[0].params
        batch: list[_Request] = []
        rest: deque[_Request] = deque()
        for request in self._pending:
            (batch if request.params == params and len(batch) < self._config.max_batch_size else rest).append(request)
        self._pending = rest
        self._running = len(batch)
        return batch

    def _serve(self, batch: list[_Request]) -> None:
        loaded = self._loaded
        assert loaded is not None
        batch = [request for request in batch if not request.withdrawn]
        started = time.perf_counter()
        outcomes: list[Generation | BaseException] = []
        try:
            if batch:
                with torch.inference_mode():
                    texts = generate_replies(
                        loaded, batch, batch[0].params, history_turns=self._config.history_turns, seed=self._config.seed
                    )
                outcomes = [Generation(text, loaded.ref) for text in texts]
        except Exception:
            log.exception("generation failed for a batch of %d", len(batch))
            outcomes = [EngineError("generation failed") for _ in batch]
        elapsed = time.perf_counter() - started
        ids = [request.correlation_id for request in batch]
        log.debug(
            "batch of %d served by %s in %.2f s", len(batch), loaded.ref.name, elapsed, extra={"correlation_ids": ids}
        )
        with self._cond:
            self._running = 0  # before delivering, so a caller holding its reply never sees itself counted
            self._generate_seconds += elapsed
        for request, outcome in zip(batch, outcomes, strict=True):
            _deliver(request.loop, request.future, outcome)
        tokens = _reply_tokens(loaded, outcomes)  # after delivering: counting must not delay a reply
        with self._cond:
            self._tokens_generated += tokens


def _reply_tokens(loaded: LoadedModel, outcomes: Sequence[Generation | BaseException]) -> int:
    """How many tokens the batch's replies hold (what users get; not the rows' padding after their turn ended)."""
    texts = [outcome.text for outcome in outcomes if isinstance(outcome, Generation)]
    return sum(len(ids) for ids in loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0
