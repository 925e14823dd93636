"""The training data's types: a line, a sample (a target line with its context) and the dataset report.

`trainer.dataset` builds them from the log, `trainer.poisoning` caps and filters them, `trainer.packing` turns them
into token ids; they are tokenizer-free so the gate can score two models with different tokenizers on one split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from core.serving.dialogue import GPT2_EOS, Turn, format_dialogue


@dataclass(frozen=True, slots=True)
class Line:
    """A turn plus where it came from (database ids are None for corpus lines)."""

    speaker: str
    text: str
    message_id: int | None = None
    user_id: int | None = None
    created_at: datetime | None = None
    learnable: bool = True
    """False for a line that may be context but must never be learned (blocklisted, repetitive, capped, a bot
    reply when bot replies are not targets): its tokens get no loss wherever it appears."""

    @property
    def turn(self) -> Turn:
        return Turn(self.speaker, self.text)


@dataclass(frozen=True, slots=True)
class Sample:
    """A target line with its context; the prompt is a prefix of the text (response-only loss relies on it)."""

    context: tuple[Line, ...]
    target: Line
    conversation: str
    """Which conversation it comes from: the unit the held-out split draws (a chat cut at /reset and at long
    silences, or a corpus dialogue)."""
    answers: Line | None = None
    """The line the target answers (`trainer.exchanges`): the message it replies to on the platform, else the line
    before it by someone else; None for a line that answers nothing (it opens a conversation)."""
    kind: str = "opening"
    """How `answers` was found (`trainer.exchanges.TargetKind`: reply, follow_up, opening)."""
    exchange: bool = False
    """A short sample: only `answers` as context, the prompt a fresh chat gives the bot (`trainer.exchanges`)."""

    def prompt(self, eos: str = GPT2_EOS) -> str:
        """What the model sees before it writes the target: the same text the engine builds at inference."""
        return format_dialogue([line.turn for line in self.context], responder=self.target.speaker, eos=eos)

    def text(self, eos: str = GPT2_EOS) -> str:
        """The whole sample: prompt, target text and the end-of-turn EOS."""
        turns = [line.turn for line in (*self.context, self.target)]
        return format_dialogue(turns, responder=self.target.speaker, eos=eos, open_reply=False)

    def sources(self) -> Iterator[tuple[int, int | None]]:
        """(message id, user id) of every logged message in the sample: what the training manifest records."""
        for line in (*self.context, self.target):
            if line.message_id is not None:
                yield line.message_id, line.user_id


@dataclass
class DatasetReport:
    """The split dataset plus an account of every message that did not become a target, by reason."""

    train: list[Sample]
    eval: list[Sample]
    excluded: Counter[str] = field(default_factory=Counter)
    messages_read: int = 0
    targets: Counter[str] = field(default_factory=Counter)
    """What the training targets are, by how their answered line was found (`trainer.exchanges.TargetKind`)."""

    def manifest(self) -> dict[int, int | None]:
        """Message id -> author id of every message in the training split (context included)."""
        return dict(pair for sample in self.train for pair in sample.sources())

    def time_range(self) -> tuple[datetime | None, datetime | None]:
        """When the oldest and newest training targets were written."""
        stamps = [s.target.created_at for s in self.train if s.target.created_at is not None]
        return (min(stamps), max(stamps)) if stamps else (None, None)

    def summary(self) -> dict[str, Any]:
        first, last = self.time_range()
        return {
            "messages_read": self.messages_read,
            "train_samples": len(self.train),
            "eval_samples": len(self.eval),
            "train_conversations": len({s.conversation for s in self.train}),
            "eval_conversations": len({s.conversation for s in self.eval}),
            "excluded": dict(sorted(self.excluded.items())),
            "targets": dict(sorted(self.targets.items())),
            "data_from": first.isoformat() if first else None,
            "data_to": last.isoformat() if last else None,
        }
