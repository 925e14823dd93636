"""The model engine: one worker thread owns the model and decodes all requests together, step by step.

Why this shape:
- *One worker thread* owns the model, so the event loop never runs torch code and never waits on it; results come
  back through `loop.call_soon_threadsafe` on per-request futures. (An executor pool would run several forward
  passes at once, which on CPU only splits the same cores and multiplies memory.)
- *Iteration-level (continuous) batching*: one decoding step for 16 rows costs little more than a step for one on
  CPU, because each step reads all the weights once whatever the batch size. Chat traffic arrives one message at a
  time and replies have different lengths, so rows join the running batch at the next step (after one prefill
  pass for all who arrived meanwhile) and leave the moment their reply is complete; nobody waits for a batch to
  finish. transformers' `ContinuousBatchingManager` was measured first: on CPU it was 1.8x slower than a static
  `generate` batch for the same 16 prompts, and it has no repetition penalty, end-of-turn stop or per-row
  minimum length, so the engine runs its own step loop (`_batching`) over a KV cache that grows in place.
- *Per-row decoding* (`_sampling`): each row has its own `GenerationParams` (greedy and sampled rows share a
  batch), with `generate`'s processing order, so greedy answers equal `generate`'s.
- *Swaps* load the new model in a separate thread while serving continues; at the next step new requests start on
  the new model while rows already decoding finish on the old one, side by side, so a reply is never written by
  two models and each `Generation` names the model that wrote it.

Lifecycle of a request: `generate_response` queues it (or raises `EngineBusyError` when the queue is full) → when
the engine is idle the worker waits up to `batch_wait_ms` for company; while rows decode, arrivals are taken at
the next step, up to `max_batch_size` rows → each prompt is fitted into the context window (`_prompts`) and
prefilled → one token per row per step → a reply ends at EOS, at the next speaker's label or at `max_new_tokens`
and is delivered at once. A caller that times out or is cancelled withdraws its request: it is dropped if it has
not started, and if it is decoding its row leaves at the next step, freeing the slot.

Modules: `_types` (the public value types, `EngineConfig` and `EngineStats` among them), `_loading`
(from_pretrained and its errors), `_precision` (SERVE_PRECISION: int8/bf16 conversion and the loss gate of `auto`),
`_prompts` (prompt fitting), `_batching` (the KV cache rows join and leave), `_sampling` (one row's next token and
its end), `_engine` (the queue, the worker thread and the asyncio side), `_converted` (a version's int8 weights
kept beside it and loaded without the float checkpoint), `_compiled` (the fused GPT-2 decoding step).
"""

from __future__ import annotations

from core.engine._engine import Engine
from core.engine._loading import hub_reachable, load_pretrained
from core.engine._precision import cpu_has_native_bf16
from core.engine._prompts import build_prompt_ids
from core.engine._sampling import EMPTY_REPLY
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
