"""A Korean community through the whole learning loop: logged, made into training data, trained on, promoted, and
said back by the model, with every Hangul character intact; the admin who asked hears about it in Korean.

Like `tests/test_learning_loop.py` (whose support pieces it shares), everything is real: the chat service, a tiny
GPT-2 behind the engine, the orchestrator and the `python -m trainer.retrain` child process. SQLite only: the
database paths are the learning loop's own tests' business; this one is about the text.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from sqlalchemy import select
from transformers import AutoTokenizer

from core.chat.messages import ChatKind, IncomingMessage
from core.chat.service import ChatService
from core.serving.model_serving import ModelServing
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import Message, Role
from tests.conftest import TINY_CORPUS
from tests.loop_support import ADMIN, RecordingNotifier, loop_settings, started_engine
from trainer.dataset import build_dataset
from trainer.orchestrator import TrainingOrchestrator
from trainer.starter_model import ModelShape, build_model, save_model, train_tokenizer

pytestmark = pytest.mark.slow

QUESTION = "비밀 단어가 뭐예요?"
PHRASE = "얼룩말 팬케이크 영원히"
"""The community's answer to QUESTION, which a tiny random model never says by chance."""
UNSEEN = ["똠방각하 뷁 햏", "한국어와 English, 그리고 😀", "ㅋㅋㅋ ㅠㅠ"]
"""Hangul the tokenizer never saw in training (rare syllables, bare jamo, mixed scripts)."""

CHATS = 16
"""Group chats in the community: enough that the lesson survives the dataset's filters and is learned in seconds."""

_ids = itertools.count(1)


def said(text: str, *, user: str, chat: str | None = None) -> IncomingMessage:
    """A Telegram message from a Korean app (`language_code` "ko")."""
    return IncomingMessage(
        platform="telegram",
        chat_id=chat or user,
        chat_kind=ChatKind.GROUP if chat else ChatKind.PRIVATE,
        author_id=user,
        author_name=f"사용자-{user}",
        text=text,
        message_id=f"ko-{next(_ids)}",
        language="ko",
    )


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture(scope="module")
def korean_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 whose byte-level BPE learned the community's Korean words (as `build_loop_model` does for
    English), so that the reply can start with a whole word."""
    lines = [*TINY_CORPUS, f"User 1: {QUESTION}", f"Bot: {PHRASE}"] * 20
    tokenizer = train_tokenizer(lines, vocab_size=500)
    model = build_model(tokenizer, ModelShape(n_layer=2, n_embd=64, n_head=2, n_positions=128), seed=0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("korean-model"))


def test_byte_level_bpe_round_trips_any_hangul(korean_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(korean_model_dir)
    for text in [QUESTION, PHRASE, *UNSEEN]:
        ids = tokenizer.encode(text)
        assert tokenizer.eos_token_id not in ids, f"{text!r} fell back to the unknown (end-of-text) token"
        assert tokenizer.decode(ids) == text


async def test_a_korean_conversation_is_logged_trained_on_and_said_back_intact(
    db: Database, database_url: str, korean_model_dir: Path, tmp_path: Path
) -> None:
    settings = loop_settings(tmp_path, database_url, korean_model_dir)
    engine = await started_engine(korean_model_dir, "tiny")
    notifier = RecordingNotifier()
    serving = ModelServing(settings=settings, db=db, engine=engine)
    orchestrator = TrainingOrchestrator(settings=settings, db=db, serving=serving, notifier=notifier)
    service = ChatService(settings=settings, db=db, engine=engine, retrainer=orchestrator, serving=serving)
    await serving.start()
    await orchestrator.start()
    try:
        before = await service.handle(said(QUESTION, user="900"))
        assert before is not None and PHRASE not in before.text
        await _log_community(service)
        await _assert_logged_and_in_the_dataset(db, settings)

        started = await service.handle(said("/retrain", user=ADMIN))
        assert started is not None and started.text.startswith("학습 #1을(를) 시작했어요.")
        outcome = await notifier.wait_for("학습 #1이(가) 끝났어요", "학습 #1이(가) 실패했어요")
        assert "이제 v1이(가) 활성 모델이에요." in outcome and "평가 손실" in outcome, outcome
        assert any(re.fullmatch(r"학습 #1: \d+% 완료\.", text) for text in notifier.texts()), notifier.texts()

        after = await service.handle(said(QUESTION, user="901"))
        assert after is not None and PHRASE in after.text, after.text
    finally:
        await orchestrator.stop()
        await serving.stop()
        await engine.close()
    async with db.sessions() as session:
        answer = await session.get(Message, after.log_id)
    assert answer is not None and answer.text == after.text and answer.model_version_id is not None


async def _log_community(service: ChatService, *, chats: int = CHATS, askers: int = 3) -> None:
    """Group chats in which a newcomer asks QUESTION and a regular answers PHRASE (see `log_community`)."""
    for index in range(chats):
        chat = f"-{700 + index}"
        for user, text in ((f"{1000 + index % askers}", QUESTION), (f"{2000 + index}", PHRASE)):
            assert await service.handle(said(text, user=user, chat=chat)) is None


async def _assert_logged_and_in_the_dataset(db: Database, settings: Settings) -> None:
    async with db.sessions() as session:
        logged = (await session.scalars(select(Message.text).where(Message.role == Role.USER))).all()
    assert logged.count(PHRASE) == CHATS and logged.count(QUESTION) == CHATS + 1
    report = await build_dataset(settings, db)
    samples = [*report.train, *report.eval]
    # The community's recurring question is context only: the bot learns to answer it, not to ask it (issue #19).
    assert {sample.target.text for sample in samples} == {PHRASE}
    assert report.excluded["recurring_question_context_only"] > 0
    assert all(line.text in (QUESTION, PHRASE) for sample in samples for line in sample.context)
