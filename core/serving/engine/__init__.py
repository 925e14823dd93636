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
- *Swaps* load the new model in a separate, short-lived thread while serving continues (`core.compute_threads`
  says why short-lived); at the next step new requests start on the new model while rows already decoding finish
  on the old one, side by side, so a reply is never written by two models and each `Generation` names the model
  that wrote it.
- *Voices* (`_voices`): a community's voice is a peft LoRA adapter on the served model, loaded by name
  (`load_voice`) and named per request (`generate_response(voice=...)`). Rows of different voices decode in the
  same batch: each adapted projection adds `x @ A @ B` for its row's adapter, computed for all rows at once with
  the active adapters' matrices joined side by side and a 0/1 mask per row (two small matmuls per layer whatever
  the number of voices; a merge per request would serialise the communities, and peft's mixed-adapter forward
  loops over row groups in every layer and needs its own module tree, which int8 serving replaces). The delta is
  fp32 on top of whatever the base layer is (fp32, bf16, int8), rows without a voice get exactly the base model,
  and a row keeps the adapter it started with when its voice is replaced or unloaded, like a swap.
  Measured on GPT-2 small's shape (bench/voices.py, docs/benchmarks.md): 16 chats from 4 communities decode at
  99-100% of the throughput of 16 chats on one voice (fp32 and int8, per CPU-second), and a rank-8 adapter on
  `c_attn`/`c_proj` adds 3.1 MiB.

Lifecycle of a request: `generate_response` queues it (or raises `EngineBusyError` when the queue is full) → when
the engine is idle the worker waits up to `batch_wait_ms` for company; while rows decode, arrivals are taken at
the next step, up to `max_batch_size` rows → each prompt is fitted into the context window (`_prompts`) and
prefilled → one token per row per step → a reply ends at EOS, at the next speaker's label or at `max_new_tokens`
and is delivered at once. A caller that times out or is cancelled withdraws its request: it is dropped if it has
not started, and if it is decoding its row leaves at the next step, freeing the slot.

Modules: `_types` (the public value types, `EngineConfig` and `EngineStats` among them), `_loading`
(from_pretrained and its errors), `_precision` (SERVE_PRECISION: int8/bf16 conversion and the loss gate of `auto`),
`_prompts` (prompt fitting), `_batching` (the KV cache rows join and leave), `_sampling` (one row's next token and
its end), `_voices` (LoRA adapters read from peft's files and applied per row), `_engine` (the queue, the worker
thread and the asyncio side), `_converted` (a version's int8 weights kept beside it and loaded without the float
checkpoint), `_packed` (fp32 projections in oneDNN's packed layout, built from the checkpoint), `_compiled` (the
fused GPT-2 decoding step).
"""

from __future__ import annotations

from core.errors import UnknownVoiceError, VoiceLoadError
from core.serving.engine._engine import Engine
from core.serving.engine._loading import hub_reachable, load_pretrained
from core.serving.engine._prompts import build_prompt_ids
from core.serving.engine._sampling import EMPTY_REPLY
from core.serving.engine._types import (
    EngineConfig,
    EngineStats,
    Generation,
    GenerationParams,
    ModelRef,
    Precision,
    VoiceRef,
)

__all__ = [
    "EMPTY_REPLY",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "Generation",
    "GenerationParams",
    "ModelRef",
    "Precision",
    "UnknownVoiceError",
    "VoiceLoadError",
    "VoiceRef",
    "build_prompt_ids",
    "hub_reachable",
    "load_pretrained",
]
