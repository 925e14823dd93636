"""The model engine: one worker thread owns the model and serves batched generation to asyncio callers.

Why this shape:
- *One worker thread* owns the model, so the event loop never runs torch code and never waits on it; results come
  back through `loop.call_soon_threadsafe` on per-request futures. (An executor pool would run several
  `generate` calls at once, which on CPU only splits the same cores and multiplies memory.)
- *Dynamic batching*: requests that arrive while the model is busy wait in a bounded queue and are served together
  by one `generate` call. One decoding step for 16 rows costs little more than a step for one on CPU, because each
  step reads all the weights once whatever the batch size; that is where the throughput comes from.
- *Batches group identical `GenerationParams`* instead of running a custom sampling loop with per-row parameters:
  in a deployment every request uses the settings' parameters, so grouping costs nothing, and it keeps the
  well-tested `generate` (its caches, processors and devices) instead of a second decoding loop to maintain.
- *Swaps* load the new model in a separate thread while serving continues; the worker switches between batches,
  so requests in flight finish on the old model and each `Generation` names the model that wrote it.

Lifecycle of a request: `generate_response` queues it (or raises `EngineBusyError` when the queue is full) → the
worker waits up to `batch_wait_ms` for company, takes the oldest request and every waiting request with the same
parameters (up to `max_batch_size`) → fits each prompt into the context window → one `generate` → each reply is cut
at the end of the bot's turn. A caller that times out or is cancelled withdraws its request: it is dropped if it
has not started, and if it is mid-batch its row stops early and its result is discarded.

Modules: `_types` (the public value types, the engine's `EngineConfig` among them), `_loading` (from_pretrained
and its errors), `_precision` (SERVE_PRECISION: int8/bf16 conversion and the loss gate of `auto`), `_decoding`
(prompt fitting, one batched `generate`, reply parsing), `_engine` (the queue, the worker thread and the asyncio
side).
"""

from __future__ import annotations

from core.engine._decoding import EMPTY_REPLY, build_prompt_ids
from core.engine._engine import Engine
from core.engine._loading import hub_reachable, load_pretrained
from core.engine._precision import cpu_has_native_bf16
from core.engine._types import EngineConfig, EngineStats, Generation, GenerationParams, ModelRef, Precision

__all__ = [
    "EMPTY_REPLY",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "Generation",
    "GenerationParams",
    "ModelRef",
    "Precision",
    "build_prompt_ids",
    "cpu_has_native_bf16",
    "hub_reachable",
    "load_pretrained",
]
