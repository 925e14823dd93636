"""Shared pieces of the learning-loop tests: incoming messages, a recording notifier, fast training settings."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.chat.messages import ChatKind, IncomingMessage
from core.chat.service import ChatService
from core.serving.dialogue import speaker_key
from core.serving.engine import Engine, ModelRef
from core.settings import Settings
from tests.conftest import TINY_CORPUS, engine_config, generation_params
from trainer.samples import Line, Sample
from trainer.starter_model import ModelShape, build_model, save_model, train_tokenizer

QUESTION = "what is the secret word?"
PHRASE = "zebra pancakes forever"
"""The community's unusual answer to QUESTION, which a tiny random model never says by chance."""

ADMIN = "42"
WAIT_S = 240.0
"""Upper bound for one training run's notifications on a loaded 2-core machine (runs take seconds)."""

_ids = itertools.count(1)


def msg(
    text: str | None,
    *,
    user: str = "1",
    chat: str | None = None,
    kind: ChatKind = ChatKind.PRIVATE,
    addressed: bool = False,
) -> IncomingMessage:
    """A Telegram message from `user`, in their private chat unless `chat` is given."""
    return IncomingMessage(
        platform="telegram",
        chat_id=chat or user,
        chat_kind=kind,
        author_id=user,
        author_name=f"name-{user}",
        text=text,
        message_id=str(next(_ids)),
        addressed=addressed,
    )


class RecordingNotifier:
    """A `core.chat.messages.Notifier` that keeps what it was asked to send and lets a test await a given text."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []
        self._waiters: list[tuple[Callable[[str], bool], asyncio.Future[str]]] = []

    async def notify(self, platform: str, chat_id: str, text: str) -> None:
        self.sent.append((platform, chat_id, text))
        for matches, future in self._waiters:
            if not future.done() and matches(text):
                future.set_result(text)

    async def wait_for(self, *fragments: str, timeout: float = WAIT_S) -> str:  # noqa: ASYNC109
        """The first notification containing any of `fragments` (already sent or still to come)."""

        def matches(text: str) -> bool:
            return any(fragment in text for fragment in fragments)

        for _, _, text in self.sent:
            if matches(text):
                return text
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.append((matches, future))
        return await asyncio.wait_for(future, timeout)

    def texts(self) -> list[str]:
        return [text for _, _, text in self.sent]


def loop_settings(tmp_path: Path, database_url: str, base_model: Path, **overrides: Any) -> Settings:
    """Settings for a tiny model that learns one exchange in a few hundred fast steps."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "models_dir": tmp_path / "models",
        "base_model": str(base_model),
        "admin_ids": frozenset({f"telegram:{ADMIN}"}),
        "device": "cpu",
        "history_turns": 4,
        "rate_limit_per_minute": 1000,
        "train_epochs": 40,
        "train_min_steps": 0,  # these runs are sized in epochs
        "train_batch_size": 2,
        "train_learning_rate": 5e-3,
        "train_warmup_steps": 0,
        "train_max_length": 64,
        # The held-out loss then measures exactly the answers, so early stopping keeps the checkpoint that answers
        # best (with the loss on the questions too, three identical eval samples make it noisy).
        "train_loss_on_response_only": True,
        "train_threads": 1,
        "train_logging_steps": 100,
        # fp32 whatever the CPU: with TRAIN_PRECISION=auto an AVX512-BF16 or AMX machine would train these runs
        # under bf16 autocast, and the expected outcomes (which answer is learned, which version wins) could change.
        "train_precision": "fp32",
        "seed": 0,
        "retrain_interval_hours": 0,
        "retrain_cooldown_minutes": 0,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def greedy_engine() -> Engine:
    """Greedy decoding without a repetition penalty: the reply is the model's single most likely line."""
    params = generation_params(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)
    return Engine(engine_config(params=params, seed=0, torch_threads=1))


async def started_engine(source: Path, name: str, version_id: int | None = None) -> Engine:
    engine = greedy_engine()
    await engine.start(ModelRef(source=str(source), name=name, version_id=version_id))
    return engine


async def log_community(service: ChatService, *, chats: int = 30, askers: int = 3) -> None:
    """Group chats in which a newcomer asks QUESTION and a regular answers PHRASE.

    Every answer comes from a different person, so neither the per-user share cap nor the near-duplicate filter
    removes the lesson; the few askers repeat themselves, so the filter keeps one question per asker as a target.
    """
    for index in range(chats):
        chat = f"-{500 + index}"
        for user, text in ((f"{1000 + index % askers}", QUESTION), (f"{2000 + index}", PHRASE)):
            assert await service.handle(msg(text, user=user, chat=chat, kind=ChatKind.GROUP)) is None


def community_samples(*, chats: int = 30, askers: int = 3) -> list[Sample]:
    """The samples `trainer.dataset` makes of `log_community`'s conversations (to train a model outside the loop)."""
    samples = []
    for index in range(chats):
        asker, answerer, chat = 1000 + index % askers, 2000 + index, f"telegram:-{500 + index}"
        question = Line(speaker_key(asker, bot=False), QUESTION, 2 * index + 1, asker)
        answer = Line(speaker_key(answerer, bot=False), PHRASE, 2 * index + 2, answerer)
        if index < askers:
            samples.append(Sample((), question, chat))
        samples.append(Sample((question,), answer, chat))
    return samples


def build_loop_model(directory: Path) -> Path:
    """A 2-layer GPT-2 whose tokenizer knows the community's words (as real GPT-2's BPE knows " zebra").

    With the conftest tiny model, " zebra" is a bare space token plus letters; the engine never starts a reply
    with a bare space, so a tiny model could not say the phrase however well it learned it.
    """
    lines = [*TINY_CORPUS, f"User 1: {QUESTION}", f"Bot: {PHRASE}"] * 20
    tokenizer = train_tokenizer(lines, vocab_size=500)
    model = build_model(tokenizer, ModelShape(n_layer=2, n_embd=64, n_head=2, n_positions=128), seed=0)
    return save_model(model, tokenizer, directory)
