"""The engine's public value types: how to sample, how to serve, which model, and what came back."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from core.settings import Settings

Precision = Literal["auto", "fp32", "bf16", "int8"]
"""SERVE_PRECISION: the number format the engine serves in (see `core.serving.engine._precision`)."""


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """How to sample one reply. `temperature == 0` means greedy decoding.

    The sampling fields mirror settings and have no default here (their defaults live in `Settings` only; build
    with `from_settings`). `min_new_tokens` (at least 1) is no setting: it keeps EOS and the end-of-turn stop away
    until that many tokens exist, and the benchmark sets it equal to `max_new_tokens` to force replies of an exact
    length.
    """

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    min_new_tokens: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError("need 1 <= min_new_tokens <= max_new_tokens")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0 and repetition_penalty > 0")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> GenerationParams:
        """MAX_NEW_TOKENS, TEMPERATURE, TOP_P, TOP_K and REPETITION_PENALTY, with keyword overrides on top."""
        params = cls(
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            repetition_penalty=settings.repetition_penalty,
        )
        return replace(params, **overrides)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How the engine serves; every field mirrors a setting, so none has a default here (see `from_settings`).

    `device` is a resolved device (`cpu`, `cuda`), never `auto`; `params` are the sampling parameters of a request
    that names none; `precision` is SERVE_PRECISION, resolved per model at load (the served one is
    `Engine.precision`); `fp32_packed` lays fp32 projections out for oneDNN on the CPU (`_packed`).
    """

    device: str
    max_batch_size: int
    queue_size: int
    batch_wait_ms: float
    timeout_s: float
    torch_threads: int | None
    history_turns: int
    seed: int | None
    params: GenerationParams
    precision: Precision
    fp32_packed: bool

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.queue_size < 1 or self.batch_wait_ms < 0 or self.timeout_s <= 0:
            raise ValueError("need max_batch_size, queue_size >= 1, batch_wait_ms >= 0 and timeout_s > 0")
        if self.history_turns < 0:
            raise ValueError("need history_turns >= 0")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> EngineConfig:
        """The ENGINE_* settings, DEVICE (resolved), TORCH_THREADS, HISTORY_TURNS, SEED, SERVE_PRECISION,
        SERVE_FP32_PACKED and the sampling settings, with keyword overrides on top."""
        config = cls(
            device=settings.resolved_device,
            max_batch_size=settings.engine_max_batch_size,
            queue_size=settings.engine_queue_size,
            batch_wait_ms=settings.engine_batch_wait_ms,
            timeout_s=settings.engine_timeout_s,
            torch_threads=settings.torch_threads,
            history_turns=settings.history_turns,
            seed=settings.seed,
            params=GenerationParams.from_settings(settings),
            precision=settings.serve_precision,
            fp32_packed=settings.serve_fp32_packed,
        )
        return replace(config, **overrides)


@dataclass(frozen=True, slots=True)
class ModelRef:
    """Which model to serve: `source` is a hub id or a local directory; `version_id` is None for a base model."""

    source: str
    name: str
    version_id: int | None = None


@dataclass(frozen=True, slots=True)
class VoiceRef:
    """A voice: a LoRA adapter on the served model, by the name requests use and the directory it was loaded from."""

    name: str
    source: str


@dataclass(frozen=True, slots=True)
class Generation:
    """A reply (never the prompt, never empty) and the model that actually wrote it, which matters across a swap;
    `voice` is the adapter it spoke with (None: the model alone), which matters when a voice is replaced."""

    text: str
    model: ModelRef
    voice: VoiceRef | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """What the engine is doing, for metrics: requests waiting, rows decoding, two counters that only grow, and
    the voices loaded."""

    queue_depth: int
    batch_rows: int
    tokens_generated: int
    generate_seconds: float
    voices_loaded: int = 0
    voice_bytes: int = 0  # what the loaded voices' adapter matrices take
