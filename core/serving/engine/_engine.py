"""The Engine: a bounded request queue, the worker thread that owns the model and decodes step by step, and the
asyncio side.

Threading: the event loop only appends to and removes from the queue under `_cond` (held for microseconds, never
during generation) and awaits futures; the worker thread does all torch work and hands results back with
`loop.call_soon_threadsafe`. Model loads for swaps and adapter reads for voices run in a third thread that ends
with the load (`core.compute_threads.in_own_thread`: an executor thread would live on with its OpenMP team, and two
teams on a small machine make every decoding step ~1.8x slower).

Voices: `load_voice` reads a LoRA adapter off the worker thread and registers it under its name (under `_cond`);
a request names its voice, checked when it is queued and resolved to the adapter when it is admitted, between two
steps. A row keeps the adapter it was admitted with, so replacing or unloading a voice never changes a reply
already being written (like a swap): the old adapter is dropped with its last row.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from core.compute_threads import deliver, in_own_thread
from core.errors import (
    EngineBusyError,
    EngineClosedError,
    EngineError,
    EngineTimeoutError,
    ModelLoadError,
    UnknownVoiceError,
    VoiceLoadError,
)
from core.ops.logging_setup import current_correlation_id
from core.serving.dialogue import Turn
from core.serving.engine._batching import KVBatch
from core.serving.engine._loading import LoadedModel, prepare
from core.serving.engine._prompts import build_prompt_ids
from core.serving.engine._sampling import RowDecoder, reply_budget
from core.serving.engine._types import EngineConfig, EngineStats, Generation, GenerationParams, ModelRef, VoiceRef
from core.serving.engine._voices import Adapter, VoiceRouting, attach, read_adapter

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class _Request:
    turns: tuple[Turn, ...]
    params: GenerationParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Generation]
    queued_at: float = field(default_factory=time.monotonic)
    withdrawn: bool = False  # set on the event loop when the caller gave up; read by the worker
    correlation_id: str | None = field(default_factory=current_correlation_id)  # the worker logs it with the row
    voice: str | None = None  # the voice's name; resolved to its adapter when the row is admitted


@dataclass(slots=True)
class _Swap:
    loaded: LoadedModel
    loop: asyncio.AbstractEventLoop
    switched: asyncio.Future[None]


class Engine:
    """Serves `generate_response` from one worker thread that owns the model (see the package docstring)."""

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        # Shared with the worker thread and guarded by `_cond` (single attribute reads excepted).
        self._cond = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._running = 0  # rows admitted and not yet finished, across models
        self._loaded: LoadedModel | None = None  # the model new requests start on
        self._cohorts: list[_Cohort] = []  # worker thread only
        self._tokens_generated = 0  # written by the worker only
        self._generate_seconds = 0.0
        self._swap: _Swap | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self._swap_lock = asyncio.Lock()
        self._voices: dict[str, Adapter] = {}  # the adapter each voice's new requests start on; under `_cond`

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
        """Requests waiting plus those being decoded."""
        return len(self._pending) + self._running

    def stats(self) -> EngineStats:
        """A consistent snapshot for metrics; the counters only grow, so a scraper derives rates from them."""
        with self._cond:
            return EngineStats(
                len(self._pending),
                self._running,
                self._tokens_generated,
                self._generate_seconds,
                len(self._voices),
                sum(adapter.nbytes for adapter in self._voices.values()),
            )

    @property
    def voices(self) -> dict[str, VoiceRef]:
        """The voices loaded now, by name, with the adapter directory each was loaded from."""
        with self._cond:
            return {name: adapter.ref for name, adapter in self._voices.items()}

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
        voice: str | None = None,
    ) -> Generation:
        """The bot's next line after `turns`, in `voice` (a name given to `load_voice`; None: the model alone).

        Raises `EngineBusyError` at once when the queue is full, `UnknownVoiceError` when `voice` is not loaded
        (at once, or when it is unloaded before the request starts), `EngineTimeoutError` after `timeout` seconds
        (default `timeout_s`) of waiting plus generating, and `EngineClosedError` when the engine is not running.
        """
        request = self._submit(turns, params or self._config.params, voice)
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
        """Loads `ref` beside the running model, then has the worker switch to it between two decoding steps.

        Serving continues during the load. Rows already decoding finish on the old model (a reply is never written
        by two models) while every request that starts after the switch decodes on the new one, side by side, so
        nobody waits for the old rows; the old model is dropped with its last row. Returns once the switch is made;
        raises `ModelLoadError` (the old model stays).
        """
        async with self._swap_lock:
            if self._loaded is None or self._closing:
                raise EngineClosedError("the engine is not running")
            loaded = await in_own_thread(
                prepare, ref, self._config.device, self._config.precision, packed=self._config.fp32_packed
            )
            loop = asyncio.get_running_loop()
            switched: asyncio.Future[None] = loop.create_future()
            with self._cond:
                if self._closing:
                    raise EngineClosedError("the engine closed during the swap")
                self._swap = _Swap(loaded, loop, switched)
                self._cond.notify_all()
            await switched
        log.info("swapped to model %s from %s in %s", ref.name, ref.source, loaded.precision)

    async def load_voice(self, voice: str, adapter_dir: str | Path) -> None:
        """Loads the peft LoRA adapter in `adapter_dir` (trained on the served base model) as `voice`.

        The adapter is read and checked in another thread while serving continues; requests admitted from the next
        step on speak with it. Loading a name that is loaded replaces it: rows already decoding with the old
        adapter finish on it (a reply never mixes two adapters) and it is dropped with its last row. Raises
        `VoiceLoadError` (the previous adapter, if any, stays) or `EngineClosedError`.
        """
        loaded = self._loaded
        if loaded is None or self._closing:
            raise EngineClosedError("the engine is not running")
        adapter = await in_own_thread(read_adapter, VoiceRef(voice, str(adapter_dir)), loaded.model)
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine closed while the voice was loading")
            replaced = self._voices.get(voice)
            self._voices[voice] = adapter
        log.info(
            "%s voice %s from %s (%.1f MiB)",
            "replaced" if replaced else "loaded",
            voice,
            adapter_dir,
            adapter.nbytes / 2**20,
        )

    async def unload_voice(self, voice: str) -> None:
        """Stops serving `voice`: later requests for it raise `UnknownVoiceError`, rows decoding with it finish.

        Unloading a voice that is not loaded does nothing, so that "make sure this voice is gone" (erasure) needs no
        check first.
        """
        with self._cond:
            removed = self._voices.pop(voice, None)
        if removed is not None:
            log.info("unloaded voice %s (%s)", voice, removed.ref.source)

    async def close(self) -> None:
        """Fails waiting requests with `EngineClosedError`, lets the rows being decoded finish, and joins the worker."""
        with self._cond:
            self._closing = True
            drained, self._pending = list(self._pending), deque()
            swap, self._swap = self._swap, None
            self._cond.notify_all()
        for request in drained:
            deliver(request.loop, request.future, EngineClosedError("the engine is shutting down"))
        if swap is not None:
            deliver(swap.loop, swap.switched, EngineClosedError("the engine is shutting down"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._loaded = None

    def _submit(self, turns: Sequence[Turn], params: GenerationParams, voice: str | None) -> _Request:
        loop = asyncio.get_running_loop()
        request = _Request(tuple(turns), params, loop, loop.create_future(), voice=voice)
        with self._cond:
            if self._loaded is None or self._closing:
                raise EngineClosedError("the engine is not running")
            if voice is not None and voice not in self._voices:
                raise UnknownVoiceError(f"voice {voice!r} is not loaded")
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
            self._loaded = prepare(ref, self._config.device, self._config.precision, packed=self._config.fp32_packed)
        except Exception as exc:
            if not isinstance(exc, ModelLoadError):
                log.exception("preparing %s failed", ref.source)
                exc = ModelLoadError(f'Model "{ref.source}" could not be prepared for serving ({type(exc).__name__}).')
            deliver(loop, started, exc)
            return
        self._cohorts = [_Cohort(self._loaded)]
        deliver(loop, started, None)
        with torch.inference_mode():
            while (arrivals := self._next_work()) is not None:
                if arrivals:
                    self._admit(arrivals)
                self._step()

    def _next_work(self) -> list[_Request] | None:
        """The requests that join the running rows now (often none); None means stop.

        While rows are decoding this never waits: arrivals join at the next step. When nothing runs it blocks until
        a request is due (the queue holds a full batch, or its oldest request waited `batch_wait_ms`). A pending
        swap is applied here, between two steps.
        """
        with self._cond:
            while True:
                if self._swap is not None:
                    self._switch(self._swap)
                elif self._running:
                    return self._take(self._config.max_batch_size - self._running)
                elif self._closing:
                    return None
                elif not self._pending:
                    self._cond.wait()
                elif len(self._pending) < self._config.max_batch_size and (delay := self._gathering_left()) > 0:
                    self._cond.wait(delay)
                else:
                    return self._take(self._config.max_batch_size)

    def _gathering_left(self) -> float:
        return self._pending[0].queued_at + self._config.batch_wait_ms / 1000 - time.monotonic()

    def _take(self, free_slots: int) -> list[_Request]:
        """Up to `free_slots` of the oldest waiting requests (called under the lock)."""
        taken = [self._pending.popleft() for _ in range(min(free_slots, len(self._pending)))]
        self._running += len(taken)
        return taken

    def _switch(self, swap: _Swap) -> None:
        """Later requests start on the new model; rows already decoding finish on the old one (under the lock)."""
        self._loaded = swap.loaded
        self._cohorts.append(_Cohort(swap.loaded))
        self._swap = None
        deliver(swap.loop, swap.switched, None)

    def _admit(self, arrivals: list[_Request]) -> None:
        """Prefills the arrivals on the newest model and chooses their first tokens."""
        cohort = self._cohorts[-1]
        live = [request for request in arrivals if not request.withdrawn]
        self._release(len(arrivals) - len(live))
        voiced = self._resolve_voices(live, cohort)
        if not voiced:
            return
        started = time.perf_counter()
        try:
            rows = cohort.admit(voiced, history_turns=self._config.history_turns, seed=self._config.seed)
        except Exception:
            log.exception("prefill failed for %d requests", len(voiced))
            self._fail([request for request, _ in voiced])
            return
        self._account(len(rows), time.perf_counter() - started)
        self._finish(cohort)

    def _resolve_voices(self, requests: list[_Request], cohort: _Cohort) -> list[tuple[_Request, Adapter | None]]:
        """Each request with the adapter of its voice as loaded now; a request whose voice was unloaded meanwhile,
        or whose adapter does not fit the model (a swap to another base), fails here."""
        with self._cond:
            voices = dict(self._voices)
        resolved: list[tuple[_Request, Adapter | None]] = []
        for request in requests:
            adapter = voices.get(request.voice) if request.voice is not None else None
            try:
                if request.voice is not None and adapter is None:
                    raise UnknownVoiceError(f"voice {request.voice!r} is not loaded")
                if adapter is not None:
                    cohort.attach(adapter)
            except (UnknownVoiceError, VoiceLoadError) as exc:
                self._fail([request], exc)
                continue
            resolved.append((request, adapter))
        return resolved

    def _step(self) -> None:
        """One decoding step for every model's rows; finished and withdrawn rows leave at once."""
        for cohort in self._cohorts:
            before = len(cohort.rows)
            cohort.drop_withdrawn()
            self._release(before - len(cohort.rows))
            if not cohort.rows:
                continue
            started = time.perf_counter()
            try:
                cohort.step()
            except Exception:
                log.exception("a decoding step failed for %d rows", len(cohort.rows))
                self._fail([row.request for row in cohort.rows])
                cohort.reset()
                continue
            self._account(len(cohort.rows), time.perf_counter() - started)
            self._finish(cohort)
        if len(self._cohorts) > 1:  # an older model leaves once its last row is done
            self._cohorts = [cohort for cohort in self._cohorts[:-1] if cohort.rows] + self._cohorts[-1:]

    def _finish(self, cohort: _Cohort) -> None:
        finished = cohort.pop_finished()
        self._release(len(finished))  # before delivering, so a caller holding its reply never sees itself counted
        for row in finished:
            voice = row.adapter.ref if row.adapter is not None else None
            deliver(row.request.loop, row.request.future, Generation(row.decoder.text(), cohort.loaded.ref, voice))
            log.debug(
                "reply of %d tokens by %s, %d rows decoding",
                len(row.decoder.tokens),
                cohort.loaded.ref.name,
                len(cohort.rows),
                extra={"correlation_ids": [row.request.correlation_id]},
            )

    def _fail(self, requests: list[_Request], error: EngineError | ModelLoadError | None = None) -> None:
        self._release(len(requests))
        for request in requests:
            deliver(request.loop, request.future, error or EngineError("generation failed"))

    def _release(self, rows: int) -> None:
        if rows:
            with self._cond:
                self._running -= rows

    def _account(self, tokens: int, seconds: float) -> None:
        with self._cond:
            self._tokens_generated += tokens
            self._generate_seconds += seconds


@dataclass(eq=False, slots=True)
class _Row:
    request: _Request
    decoder: RowDecoder
    adapter: Adapter | None = None  # the voice it speaks with, fixed for the whole reply


class _Cohort:
    """The rows decoding on one model: normally the only one; during a swap, the old model's rows draining."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.rows: list[_Row] = []
        self._batch = KVBatch(loaded.model)
        self._routing = VoiceRouting()
        self._routed = True  # whether the routing matches `rows` (a prefill routes only the newcomers)
        self._attached: set[int] = set()  # serials of the adapters wrapped into this model

    def attach(self, adapter: Adapter) -> None:
        """Makes `adapter` applicable to this model's rows (wraps its target layers once); may raise
        `VoiceLoadError`."""
        if adapter.serial not in self._attached:
            attach(self.loaded.model, adapter, self._routing)
            self._attached.add(adapter.serial)

    def admit(
        self, requests: list[tuple[_Request, Adapter | None]], *, history_turns: int, seed: int | None
    ) -> list[_Row]:
        """Prefills `requests` as new rows (each with its voice's adapter) and chooses each one's first token."""
        loaded = self.loaded
        rows, prompts = [], []
        for request, adapter in requests:
            new_tokens = reply_budget(request.params, loaded)
            prompt = build_prompt_ids(
                request.turns,
                tokenizer=loaded.tokenizer,
                max_prompt_tokens=loaded.context_window - new_tokens,
                history_turns=history_turns,
            )
            prompts.append(prompt)
            rows.append(_Row(request, RowDecoder(loaded, prompt, request.params, seed=seed), adapter))
        self._route([row.adapter for row in rows])
        self._routed = False
        logits = self._batch.prefill(prompts)
        for row, row_logits in zip(rows, logits, strict=True):
            row.decoder.choose(row_logits)
        self.rows.extend(rows)
        return rows

    def step(self) -> None:
        if not self._routed:
            self._route([row.adapter for row in self.rows])
            self._routed = True
        logits = self._batch.step([row.decoder.tokens[-1] for row in self.rows])
        for row, row_logits in zip(self.rows, logits, strict=True):
            row.decoder.choose(row_logits)

    def drop_withdrawn(self) -> None:
        self._keep([row for row in self.rows if not row.request.withdrawn])

    def pop_finished(self) -> list[_Row]:
        finished = [row for row in self.rows if row.decoder.done]
        if finished:
            self._keep([row for row in self.rows if not row.decoder.done])
        return finished

    def reset(self) -> None:
        self.rows, self._batch, self._routed = [], KVBatch(self.loaded.model), False

    def _route(self, adapters: list[Adapter | None]) -> None:
        if self._attached:  # a model no voice was ever attached to has no layer that reads the routing
            self._routing.route(adapters, self.loaded.model.device)

    def _keep(self, rows: list[_Row]) -> None:
        if len(rows) != len(self.rows):
            position = {id(row): index for index, row in enumerate(self.rows)}
            self._batch.keep([position[id(row)] for row in rows])
            self.rows, self._routed = rows, False
