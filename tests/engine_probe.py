"""Watching the engine's worker from a test: which forward passes it runs, and holding it inside one.

`ForwardProbe` stands in for `load_pretrained` (and fp32's `load_packed`): it loads for real, then wraps each model's
`forward` to record every pass (a prefill of joining rows, or a decoding step for the running rows) and, when a test
closes its gate, to hold the worker inside a pass. That makes "the model is busy" a state the test controls instead
of a race.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import core.serving.engine._loading
from core.serving.engine import Engine, ModelRef, load_pretrained
from core.serving.engine._packed import load_packed
from tests.conftest import engine_config, generation_params

GREEDY = generation_params(max_new_tokens=16, temperature=0.0, repetition_penalty=2.0)
SHORT = generation_params(max_new_tokens=8, temperature=0.0, repetition_penalty=2.0)
WAIT_S = 10.0


@dataclass(frozen=True)
class Pass:
    """One forward pass: `prefill` for rows joining (their prompt lengths padded to `width`), else a step."""

    source: str
    prefill: bool
    rows: int
    width: int


class ForwardProbe:
    def __init__(self) -> None:
        self.passes: list[Pass] = []
        self.gate = threading.Event()  # cleared: a pass waits inside the worker thread
        self.gate.set()
        self.load_threads: list[str] = []
        self.loaded: list[str] = []
        self._changed = threading.Condition()
        self._hold_at: int | None = None

    def load(self, source: str, device: str) -> tuple[Any, Any]:
        model, tokenizer = load_pretrained(source, device)
        return self._watched(model, source), tokenizer

    def load_packed(self, directory: Path) -> Any:
        """fp32 serving's own loader (core/serving/engine/_packed.py), watched the same way."""
        model = load_packed(directory)
        return self._watched(model, str(directory)) if model is not None else None

    def _watched(self, model: Any, source: str) -> Any:
        original = model.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            ids = kwargs["input_ids"]
            record = Pass(source, "logits_to_keep" in kwargs, int(ids.shape[0]), int(ids.shape[1]))
            with self._changed:
                self.passes.append(record)
                if self._hold_at is not None and len(self.passes) >= self._hold_at:
                    self.gate.clear()
                    self._hold_at = None
                self._changed.notify_all()
            if not self.gate.wait(timeout=30):
                raise RuntimeError("the test never opened the gate")
            return original(*args, **kwargs)

        model.forward = forward
        with self._changed:
            self.load_threads.append(threading.current_thread().name)
            self.loaded.append(source)
            self._changed.notify_all()
        return model

    @property
    def prefills(self) -> list[int]:
        """Rows of each prefill, in order."""
        return [p.rows for p in self.passes if p.prefill]

    @property
    def steps(self) -> list[int]:
        """Rows of each decoding step, in order."""
        return [p.rows for p in self.passes if not p.prefill]

    def forget(self) -> None:
        with self._changed:
            self.passes.clear()

    def hold_at_pass(self, count: int) -> None:
        """Closes the gate when the `count`-th recorded pass begins (the worker then waits inside it)."""
        with self._changed:
            self._hold_at = count

    async def until(self, predicate: Callable[[ForwardProbe], bool]) -> None:
        """Waits until `predicate(self)` holds, re-checked at each pass and load."""

        def wait() -> None:
            with self._changed:
                if not self._changed.wait_for(lambda: predicate(self), timeout=WAIT_S):
                    raise TimeoutError(f"the engine never got there; passes: {self.passes[-10:]}")

        await asyncio.to_thread(wait)

    async def entered(self) -> Pass:
        """Waits until the worker is held inside a pass; returns it."""
        await self.until(lambda probe: not probe.gate.is_set() and bool(probe.passes))
        return self.passes[-1]


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> ForwardProbe:
    probe = ForwardProbe()
    monkeypatch.setattr(core.serving.engine._loading, "load_pretrained", probe.load)
    monkeypatch.setattr(core.serving.engine._loading, "load_packed", probe.load_packed)
    return probe


@pytest.fixture
async def make_engine(tiny_model_dir: Path, probe: ForwardProbe) -> AsyncIterator[Callable[..., Awaitable[Engine]]]:
    """Starts engines on the tiny model (seeded, greedy by default) and closes them after the test.

    One torch thread: for a model this small a second thread only adds OpenMP hand-offs, which stall for whole
    scheduler slices when the machine's two cores are shared.
    """
    engines: list[Engine] = []
    threads = torch.get_num_threads()

    async def make(**kwargs: Any) -> Engine:
        options: dict[str, Any] = {"seed": 0, "batch_wait_ms": 0.0, "params": GREEDY, "torch_threads": 1}
        options.update(kwargs)
        engine = Engine(engine_config(**options))
        engines.append(engine)
        await engine.start(ModelRef(str(tiny_model_dir), "tiny"))
        return engine

    yield make
    probe.gate.set()
    for engine in engines:
        await engine.close()
    torch.set_num_threads(threads)
