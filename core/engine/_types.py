"""The engine's public value types: what to sample, which model, and what came back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.settings import Settings


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """How to sample one reply. `temperature == 0` means greedy decoding.

    `min_new_tokens` (at least 1) keeps EOS and the end-of-turn stop away until that many tokens exist; the
    benchmark sets it equal to `max_new_tokens` to force replies of an exact length.
    """

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.2
    min_new_tokens: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError("need 1 <= min_new_tokens <= max_new_tokens")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0 and repetition_penalty > 0")

    @classmethod
    def from_settings(cls, settings: Settings) -> GenerationParams:
        return cls(
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            repetition_penalty=settings.repetition_penalty,
        )


@dataclass(frozen=True, slots=True)
class ModelRef:
    """Which model to serve: `source` is a hub id or a local directory; `version_id` is None for a base model."""

    source: str
    name: str
    version_id: int | None = None


@dataclass(frozen=True, slots=True)
class Generation:
    """A reply (never the prompt, never empty) and the model that actually wrote it, which matters across a swap."""

    text: str
    model: ModelRef
