"""What a line answers (issue #19): platform replies and follow-ups trained as answers in the prompt a fresh chat
gives the bot, withdrawn lines that cut the context instead of joining their neighbours, the recall probe, and the
admin told why a run had nothing to train on. Logged through the real chat service, as an adapter hands lines over."""

from __future__ import annotations

from itertools import count
from pathlib import Path

import pytest
from sqlalchemy import select

from core.chat.messages import ChatKind, IncomingMessage
from core.chat.service import ChatService
from core.i18n import speaking
from core.outcomes import NOT_ENOUGH_DATA, RECALL_PROBE, RunOutcome
from core.serving.engine import Engine
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import Message, RunStatus
from core.texts import run_outcome
from trainer.dataset import build_dataset
from trainer.exchanges import TargetKind, recurring_answers
from trainer.recall_probe import probe_items
from trainer.retrain import NotEnoughDataError, _check_enough
from trainer.samples import DatasetReport, Sample

_ids = count(1)
GROUP = "-100"


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"train_user_share_cap": 1.0, "history_turns": 10, "models_dir": tmp_path}
    return Settings(_env_file=None, **{**values, **overrides})  # type: ignore[call-arg]


class Group:
    """People talking in one Telegram group, through the chat service; `say` returns the platform message id."""

    def __init__(self, service: ChatService, chat: str = GROUP) -> None:
        self.service, self.chat = service, chat

    async def say(self, person: str, text: str, *, replying_to: str | None = None) -> str:
        ident = str(next(_ids))
        message = IncomingMessage(
            "telegram", self.chat, ChatKind.GROUP, person, f"name {person}", text, ident,
            reply_to_message_id=replying_to,
        )  # fmt: skip
        assert await self.service.handle(message) is None
        return ident

    async def private(self, person: str, text: str) -> str:
        reply = await self.service.handle(IncomingMessage("telegram", person, ChatKind.PRIVATE, person, "p", text, "1"))
        assert reply is not None
        return reply.text


def samples(report: DatasetReport) -> list[Sample]:
    return [*report.train, *report.eval]


def exchanges(report: DatasetReport) -> set[tuple[str, str]]:
    """(prompt, answer) of every sample with one line of context: what the model learns to say to a message on its
    own, the prompt of a fresh private chat."""
    return {(s.context[0].text, s.target.text) for s in samples(report) if len(s.context) == 1}


def contexts(report: DatasetReport, target: str) -> list[list[str]]:
    return [[line.text for line in s.context] for s in samples(report) if s.target.text == target]


async def test_a_platform_reply_is_stored_with_what_it_replies_to(db: Database, engine: Engine, tmp_path: Path) -> None:
    group = Group(ChatService(settings=settings_for(tmp_path), db=db, engine=engine))
    asked = await group.say("1", "what is the password?")
    await group.say("2", "purple elephant dance", replying_to=asked)
    async with db.sessions() as session:
        first, second = (await session.scalars(select(Message).order_by(Message.id))).all()
    assert second.replies_to_platform_id == asked and first.replies_to_platform_id is None
    assert second.follows_id == first.id and first.follows_id is None


async def test_a_reply_is_trained_as_the_answer_to_the_line_it_replies_to(
    db: Database, engine: Engine, tmp_path: Path
) -> None:
    group = Group(ChatService(settings=settings_for(tmp_path), db=db, engine=engine))
    asked = await group.say("1", "what is the password?")
    await group.say("3", "anyone up for a walk later?")
    await group.say("2", "purple elephant dance", replying_to=asked)
    await group.say("4", "ok sounds good")
    report = await build_dataset(settings_for(tmp_path), db)
    # The short sample is the prompt a fresh private chat gives the bot: the question alone.
    assert ("what is the password?", "purple elephant dance") in exchanges(report)
    assert ("anyone up for a walk later?", "purple elephant dance") not in exchanges(report)
    assert ("purple elephant dance", "ok sounds good") in exchanges(report)  # a plain follow-up answers the line before
    assert report.targets[TargetKind.REPLY] == 1 and report.targets[TargetKind.FOLLOW_UP] == 2
    assert report.summary()["targets"]["exchange_samples"] == sum(s.exchange for s in samples(report))


async def test_a_line_between_a_question_and_its_platform_reply_is_not_taken_for_its_answer(
    db: Database, engine: Engine, tmp_path: Path
) -> None:
    group = Group(ChatService(settings=settings_for(tmp_path), db=db, engine=engine))
    await group.say("5", "good morning everyone")
    asked = await group.say("1", "who is the captain?")
    await group.say("3", "haha yes")
    await group.say("2", "captain biscuit", replying_to=asked)
    await group.say("1", "what do we eat tonight?")
    await group.say("4", "cold pancakes forever")
    report = await build_dataset(settings_for(tmp_path), db)
    assert ("who is the captain?", "captain biscuit") in exchanges(report)
    assert ("who is the captain?", "haha yes") not in exchanges(report)  # the platform said who answered it
    assert contexts(report, "haha yes") == [["good morning everyone", "who is the captain?"]]  # said there: kept
    assert ("what do we eat tonight?", "cold pancakes forever") in exchanges(report)  # no reply: a follow-up answers


async def test_the_communitys_recurring_questions_open_exchanges_they_answer_none(
    db: Database, engine: Engine, tmp_path: Path
) -> None:
    group = Group(ChatService(settings=settings_for(tmp_path), db=db, engine=engine))
    await group.say("h", "hello all")
    for round_ in range(3):  # three people ask it after three different lines; three others agree on the answer
        await group.say(f"c{round_}", ["good morning everyone", "the bus was late again", "haha yes"][round_])
        await group.say(f"a{round_}", "what is the password?")
        await group.say(f"t{round_}", "purple elephant dance")
    await group.say("m", "i am moving to berlin")
    await group.say("n", "when do you leave?")  # a question that answers the line before: kept
    report = await build_dataset(settings_for(tmp_path), db)
    learned = exchanges(report)
    assert ("what is the password?", "purple elephant dance") in learned
    assert not {prompt for prompt, answer in learned if answer == "what is the password?"}
    assert ("i am moving to berlin", "when do you leave?") in learned
    assert not contexts(report, "what is the password?")  # no target anywhere: the bot answers it, never asks it
    assert report.excluded["recurring_question_context_only"] == 3
    assert all(  # and where it stands as context it carries no loss
        not line.learnable for s in samples(report) for line in s.context if line.text == "what is the password?"
    )


async def test_an_echo_is_no_answer_and_a_reply_to_an_unknown_message_is_context_only(
    db: Database, engine: Engine, tmp_path: Path
) -> None:
    group = Group(ChatService(settings=settings_for(tmp_path), db=db, engine=engine))
    await group.say("1", "how is the weather?")
    await group.say("2", "How is the weather??")
    await group.say("3", "raining frogs again", replying_to="999999")  # a message the bot never logged
    report = await build_dataset(settings_for(tmp_path), db)
    assert not any(
        prompt.casefold().startswith("how is") and "weather" in answer for prompt, answer in exchanges(report)
    )
    assert "raining frogs again" not in [s.target.text for s in samples(report)]
    assert report.excluded["replies_to_unavailable"] == 1
    assert report.excluded["echoed_question_context_only"] == 1  # the question asked again teaches nothing


async def _teach_two_pairs(group: Group) -> None:
    for round_ in range(2):
        await group.say(f"a{round_}", "what is the password?")
        await group.say(f"t{round_}", "purple elephant dance")
        await group.say(f"b{round_}", "how is the weather?")
        await group.say(f"u{round_}", "raining frogs again")


async def test_forgetting_one_side_of_an_exchange_teaches_no_new_pairing(
    db: Database, engine: Engine, tmp_path: Path
) -> None:
    """Before, the askers' questions stood next to the next pair's question once the answers were deleted, and the
    next version answered questions with questions."""
    service = ChatService(settings=settings_for(tmp_path), db=db, engine=engine)
    group = Group(service)
    await _teach_two_pairs(group)
    for teacher in ("t0", "t1"):
        assert "Done" in await group.private(teacher, "/forget")
    report = await build_dataset(settings_for(tmp_path), db)
    targets = [s.target.text for s in samples(report)]
    assert "purple elephant dance" not in targets
    assert ("what is the password?", "how is the weather?") not in exchanges(report)
    assert all("what is the password?" not in context for context in contexts(report, "how is the weather?"))
    assert ("how is the weather?", "raining frogs again") in exchanges(report)  # the untouched pair is kept


async def test_a_platform_deletion_and_an_optout_cut_the_context_too(
    db: Database, engine: Engine, tmp_path: Path
) -> None:
    service = ChatService(settings=settings_for(tmp_path), db=db, engine=engine)
    group = Group(service)
    await _teach_two_pairs(group)
    await group.private("u1", "/optout")  # the last line of the teaching: "raining frogs again"
    await group.say("v", "nice one")
    answer = await group.say("t9", "purple elephant dance")  # another teaching, deleted on the platform
    await service.message_deleted("telegram", GROUP, answer)
    await group.say("z", "who is the captain?")
    report = await build_dataset(settings_for(tmp_path), db)
    assert ("raining frogs again", "what is the password?") in exchanges(report)  # u0's line, before any withdrawal
    assert contexts(report, "nice one") == [[]]  # after the opted-out line: nothing joined to it
    assert ("how is the weather?", "nice one") not in exchanges(report)
    assert contexts(report, "who is the captain?") == [[]]  # after the deleted line: the same
    assert ("nice one", "who is the captain?") not in exchanges(report)


def test_the_probe_asks_the_held_out_recurring_exchanges() -> None:
    from trainer.samples import Line

    def exchange(n: int, conversation: str, answer: str = "purple elephant dance") -> Sample:
        question = Line(f"user:{100 + n}", "What is the password?", 2 * n, 100 + n)
        return Sample((question,), Line(f"user:{n}", answer, 2 * n + 1, n), conversation, answers=question)

    train = [exchange(1, "a"), exchange(2, "a"), exchange(3, "b", "no idea")]
    held_out = [exchange(4, "c"), exchange(5, "c")]
    assert recurring_answers([*train, *held_out]) == {"what is the password": "purple elephant dance"}
    items = probe_items(DatasetReport(train=train, eval=held_out))
    assert [(item.prompt, item.answer) for item in items] == [("What is the password?", "purple elephant dance")]
    # Two people agreeing is not yet a recurring exchange.
    assert probe_items(DatasetReport(train=train[:1], eval=held_out[:1])) == []


def test_the_admin_reads_the_probe_and_what_the_targets_were() -> None:
    metrics = {
        "active_eval_loss": 3.2, "eval_loss": 2.9, "eval_samples": 12, "train_samples": 80,
        RECALL_PROBE: {"prompts": 9, "active": 1, "new": 8},
        "targets": {"reply": 30, "follow_up": 40, "opening": 10, "exchange_samples": 60},
    }  # fmt: skip
    text = run_outcome(RunOutcome(3, RunStatus.PROMOTED, "v3", metrics))
    assert "answered as the community does: 8 of 9 (active version: 1)" in text
    assert "30 platform replies, 40 follow-ups, 10 opening lines; 60 short exchange samples" in text
    with speaking("ko"):
        assert "8" in run_outcome(RunOutcome(3, RunStatus.PROMOTED, "v3", metrics))


async def test_a_person_repeating_themselves_is_told_why_nothing_trains(
    db: Database, engine: Engine, tmp_path: Path
) -> None:
    group = Group(ChatService(settings=settings_for(tmp_path, train_user_share_cap=0.2), db=db, engine=engine))
    for _ in range(24):  # two people would be two distinct lines, enough with the most recent held out
        await group.say("1", "hi")
    report = await build_dataset(settings_for(tmp_path, train_user_share_cap=0.2), db)
    with pytest.raises(NotEnoughDataError) as raised:
        _check_enough(report)
    facts = raised.value.facts
    assert (facts["messages_read"], facts["targets"], facts["conversations"]) == (24, 1, 1)
    outcome = RunOutcome(1, RunStatus.FAILED, reason=str(raised.value), metrics={NOT_ENOUGH_DATA: facts})
    text = run_outcome(outcome)
    assert "1 distinct line to learn from, out of 24 logged messages" in text
    assert "1 more distinct line needed" in text and "at least two distinct lines" in text
    with speaking("ko"):
        korean = run_outcome(outcome)
    assert korean != text and "24" in korean
