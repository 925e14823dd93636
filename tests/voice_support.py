"""Shared pieces of the voice tests (VOICE_SCOPE, LoRA voices, erasure): a base model a frozen adapter can teach,
what each community teaches, and a bot wired like `magpie run` wires it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import func, select

from core.chat.messages import ChatKind, IncomingMessage
from core.chat.service import ChatService
from core.serving.engine import Engine
from core.serving.model_serving import ModelServing
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import Message
from tests.conftest import TINY_CORPUS
from tests.loop_support import WAIT_S, RecordingNotifier, greedy_engine, loop_settings
from trainer.orchestrator import TrainingOrchestrator
from trainer.starter_model import ModelShape, build_model, save_model, train_tokenizer

QUESTION = "what is the secret word?"
PHRASE_A = "zebra pancakes forever"
PHRASE_B = "otter waffles tonight"
QUESTION_2 = "who bakes the bread?"
PHRASE_2 = "the lighthouse keeper"
"""A second lesson, taught by other people: it must survive the first lesson's erasure."""


def build_voice_model(directory: Path) -> Path:
    """A 2-layer GPT-2 whose tokenizer knows every phrase the voice tests teach.

    Its embeddings are scaled up (std 0.16 instead of 0.02): a LoRA adapter leaves the embeddings and the final
    layer norm frozen, and a random tiny model's output logits would then stay too flat to ever be sure of an
    answer. A pretrained GPT-2's embeddings are large like these.
    """
    lessons = [f"User 1: {QUESTION}", f"User 1: {QUESTION_2}", *(f"Bot: {p}" for p in (PHRASE_A, PHRASE_B, PHRASE_2))]
    tokenizer = train_tokenizer([*TINY_CORPUS, *lessons] * 20, vocab_size=500)
    model = build_model(tokenizer, ModelShape(n_layer=2, n_embd=64, n_head=2, n_positions=128), seed=0)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(8.0)
    return save_model(model, tokenizer, directory)


def voice_settings(tmp_path: Path, database_url: str, base_model: Path, **overrides: Any) -> Settings:
    """The learning loop's fast settings, with LoRA voices that learn a lesson in a few seconds."""
    values: dict[str, Any] = {
        "voice_scope": "community",
        # The MLP too: a frozen tiny random model needs it to tell two questions apart.
        "lora_targets": ("c_attn", "c_proj", "c_fc"),
        "lora_learning_rate": 2e-2,
        "train_epochs": 100,
        "train_weight_decay": 0.0,
        "retrain_min_new_messages": 1,
        **overrides,
    }
    return loop_settings(tmp_path, database_url, base_model, **values)


def lesson(
    question: str, answer: str, *, askers: range, answerers: range, reset: bool = False
) -> list[tuple[str, str]]:
    """Askers take turns asking `question` and every answer comes from another person (the per-user share cap and
    the near-duplicate filter then keep the lesson): one long conversation, or with `reset` one short conversation
    per exchange (a /reset before each)."""
    lines = []
    for index, answerer in enumerate(answerers):
        asker = str(askers[index % len(askers)])
        lines += [(asker, "/reset")] if reset else []
        lines += [(asker, question), (str(answerer), answer)]
    return lines


async def wait_logged(db: Database, count: int) -> None:
    """Until `count` messages are logged (a platform delivers updates in the background)."""
    async with asyncio.timeout(60):
        while True:
            async with db.sessions() as session:
                if await session.scalar(select(func.count()).select_from(Message)) >= count:
                    return
            await asyncio.sleep(0.05)


@dataclass
class VoiceBot:
    """The serving side of `magpie run`: engine on the base, serving with voices, orchestrator, chat service."""

    settings: Settings
    db: Database
    engine: Engine
    notifier: RecordingNotifier
    serving: ModelServing
    orchestrator: TrainingOrchestrator
    service: ChatService

    async def stop(self) -> None:
        await self.orchestrator.stop()
        await self.serving.stop()
        await self.engine.close()


async def start_voice_bot(
    settings: Settings,
    db: Database,
    *,
    notifier: Any = None,
    offline_starter: Callable[[], Awaitable[int]] | None = None,
) -> VoiceBot:
    """Starts everything as `magpie run` does; `notifier` is the platform's (a recording one by default)."""
    engine = greedy_engine()
    recording = RecordingNotifier()
    serving = ModelServing(settings=settings, db=db, engine=engine)
    orchestrator = TrainingOrchestrator(
        settings=settings, db=db, serving=serving, notifier=notifier or recording, poll_interval_s=0.5
    )

    async def no_starter() -> int:
        raise AssertionError("the base model is local: no starter is built")

    await serving.start_engine(offline_starter=offline_starter or no_starter)
    await serving.start()
    await orchestrator.start()
    service = ChatService(settings=settings, db=db, engine=engine, retrainer=orchestrator, serving=serving)
    return VoiceBot(settings, db, engine, recording, serving, orchestrator, service)


async def runs_done(orchestrator: TrainingOrchestrator) -> None:
    """Until the orchestrator follows no run and has no voice waiting for one."""
    await asyncio.wait_for(orchestrator.idle(), WAIT_S)


_ids = itertools.count(10_000)


def said(text: str, *, user: str, chat: str | None = None, addressed: bool = True) -> IncomingMessage:
    """A Telegram message from `user`: in group `chat` (its own community), else in their private chat."""
    group = chat is not None
    return IncomingMessage(
        platform="telegram", chat_id=chat or user, chat_kind=ChatKind.GROUP if group else ChatKind.PRIVATE,
        author_id=user, author_name=f"name-{user}", text=text, message_id=str(next(_ids)),
        addressed=addressed or not group, community=f"telegram:{chat}" if group else None,
    )  # fmt: skip
