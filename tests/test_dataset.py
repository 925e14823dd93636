"""The training dataset: what becomes a target, what is context only, what is dropped, and how it is encoded."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from core.serving.dialogue import GPT2_EOS
from core.storage.db import Database
from core.storage.models import Delivery, VersionStatus
from tests.dataset_support import ChatLog, make_settings
from trainer.dataset import build_dataset, export_jsonl, split_by_conversation
from trainer.filters import is_repetitive, redact_pii
from trainer.packing import IGNORE_INDEX, PadCollator, encode_samples, pack, unpacked
from trainer.poisoning import cap_user_share
from trainer.samples import DatasetReport, Line, Sample


def all_samples(report: DatasetReport) -> list[Sample]:
    """Every sample, the short exchange samples (`trainer.exchanges`) included: the defences must hold in all."""
    return [*report.train, *report.eval]


def long_samples(report: DatasetReport) -> list[Sample]:
    """One sample per target: the target with the chat's history as context."""
    return [s for s in all_samples(report) if not s.exchange]


def targets(report: DatasetReport) -> list[str]:
    return [s.target.text for s in long_samples(report)]


def sample_for(report: DatasetReport, target: str) -> Sample:
    (sample,) = [s for s in long_samples(report) if s.target.text == target]
    return sample


def context_of(report: DatasetReport, target: str) -> list[str]:
    return [line.text for line in sample_for(report, target).context]


# --- building samples from the database -----------------------------------------------------------------------


async def test_context_is_the_chat_so_far_cut_at_reset(db: Database) -> None:
    log = ChatLog(db)
    await log.say("c1", "ann", "hi all")
    await log.say("c1", "bob", "hello ann")
    await log.say("c1", None, "hey both")
    await log.say("c1", "ann", "/reset", reset=True)
    await log.say("c1", "bob", "fresh start")
    await log.say("c1", "ann", "indeed")
    await log.say("c2", "ann", "other chat")

    report = await build_dataset(make_settings(), db)

    assert sorted(targets(report)) == sorted(["hi all", "hello ann", "fresh start", "indeed", "other chat"])
    assert context_of(report, "hi all") == []
    assert context_of(report, "hello ann") == ["hi all"]
    assert context_of(report, "fresh start") == []  # /reset cut the context
    assert context_of(report, "indeed") == ["fresh start"]
    assert context_of(report, "other chat") == []  # chats never leak into each other
    # responder perspective: the target's author is "Bot", the real bot is just another speaker
    assert sample_for(report, "hello ann").text() == f"User 1: hi all{GPT2_EOS}Bot: hello ann{GPT2_EOS}"
    assert report.excluded["bot_reply_context_only"] == 1
    assert report.excluded["command"] == 1


async def test_history_turns_bounds_the_context(db: Database) -> None:
    log = ChatLog(db)
    for index in range(6):
        await log.say("c", "ann" if index % 2 else "bob", f"line number {index}")
    report = await build_dataset(make_settings(history_turns=2), db)
    assert context_of(report, "line number 5") == ["line number 3", "line number 4"]
    report = await build_dataset(make_settings(history_turns=0), db)
    assert context_of(report, "line number 5") == []


async def test_bot_replies_become_targets_only_when_enabled(db: Database) -> None:
    log = ChatLog(db)
    await log.say("c", "ann", "what is two plus two")
    await log.say("c", None, "four, I think")
    assert "four, I think" not in targets(await build_dataset(make_settings(), db))
    report = await build_dataset(make_settings(train_on_bot_replies=True), db)
    expected = f"User 1: what is two plus two{GPT2_EOS}Bot: four, I think{GPT2_EOS}"
    assert sample_for(report, "four, I think").text() == expected


async def test_opted_out_users_are_neither_target_nor_context(db: Database) -> None:
    log = ChatLog(db)
    await log.user("eve", opted_out=True)
    await log.say("c", "ann", "morning")
    await log.say("c", "eve", "my secret plans")
    await log.say("c", "bob", "morning ann")
    report = await build_dataset(make_settings(), db)
    assert "my secret plans" not in targets(report)
    # A withdrawn line cuts the context where it stood: its neighbours are not joined into a new exchange.
    assert context_of(report, "morning ann") == []
    assert report.excluded["opted_out"] == 1
    assert all(s.target.user_id != log.users["eve"] for s in all_samples(report))
    assert log.users["eve"] not in report.manifest().values()


async def test_private_chats_are_not_learned_unless_opted_in_but_the_console_is(db: Database) -> None:
    log = ChatLog(db)
    await log.say("group", "ann", "see you all at the market")
    asked = await log.say("dm", "ann", "my door code is 4711", kind="private")
    await log.say("dm", None, "noted, ann", kind="private", reply_to=asked, delivery=Delivery.SENT)
    await log.say("dm", "ann", "please keep it to yourself")
    await log.say("dm", "ann", "/help", command=True)
    await log.say("console", "operator", "testing the console", kind="private", platform="console")

    report = await build_dataset(make_settings(), db)

    assert sorted(targets(report)) == ["see you all at the market", "testing the console"]
    texts = {line.text for sample in all_samples(report) for line in (*sample.context, sample.target)}
    assert not texts & {"my door code is 4711", "noted, ann", "please keep it to yourself"}
    assert report.excluded["private_chat"] == 3
    assert report.excluded["command"] == 1

    report = await build_dataset(make_settings(train_on_private_chats=True), db)
    assert context_of(report, "please keep it to yourself") == ["my door code is 4711", "noted, ann"]
    assert report.excluded["private_chat"] == 0


async def test_only_delivered_bot_replies_are_training_data(db: Database) -> None:
    """SENT and legacy (NULL) replies are what the chat saw; FAILED never arrived and PENDING is not known to have."""
    log = ChatLog(db)
    for name, delivery in [("sent", Delivery.SENT), ("legacy", None), ("failed", Delivery.FAILED)]:
        asked = await log.say("c", f"user-{name}", f"question for {name}")
        await log.say("c", None, f"answer that was {name}", reply_to=asked, delivery=delivery)
    asked = await log.say("c", "user-pending", "question for pending")
    await log.say("c", None, "answer that was pending", reply_to=asked, delivery=Delivery.PENDING)
    await log.say("c", "ann", "the last word")

    report = await build_dataset(make_settings(train_on_bot_replies=True), db)

    bot_targets = {s.target.text for s in all_samples(report) if s.target.user_id is None}
    assert bot_targets == {"answer that was sent", "answer that was legacy"}
    assert context_of(report, "the last word") == [
        "question for sent",
        "answer that was sent",
        "question for legacy",
        "answer that was legacy",
        "question for failed",
        "question for pending",
    ]
    assert report.excluded["undelivered_bot_reply"] == 2


async def test_replies_to_an_opted_out_user_leave_with_their_turns(db: Database) -> None:
    log = ChatLog(db)
    await log.user("eve", opted_out=True)
    await log.say("c", "ann", "morning")
    asked = await log.say("c", "eve", "what do you know about my neighbour?")
    answer = await log.say("c", None, "your neighbour is away until friday", reply_to=asked, delivery=Delivery.SENT)
    await log.say("c", "bob", "morning ann")

    for bot_targets in (False, True):
        report = await build_dataset(make_settings(train_on_bot_replies=bot_targets), db)
        assert context_of(report, "morning ann") == []  # the withdrawn exchange cut the context
        assert "your neighbour is away until friday" not in targets(report)
        assert answer not in report.manifest()
        assert (report.excluded["opted_out"], report.excluded["reply_to_opted_out"]) == (1, 1)


async def test_commands_and_empty_lines_are_excluded(db: Database) -> None:
    log = ChatLog(db)
    await log.say("c", "ann", "/help", command=True)
    await log.say("c", "ann", "   \n\t ")
    await log.say("c", "ann", "a real line")
    report = await build_dataset(make_settings(), db)
    assert targets(report) == ["a real line"]
    assert context_of(report, "a real line") == []
    assert (report.excluded["command"], report.excluded["empty"]) == (1, 1)


async def test_pii_is_redacted_unless_disabled(db: Database) -> None:
    log = ChatLog(db)
    await log.say("c", "ann", "mail alice.smith+bot@example.co.uk or call +1 (555) 123-4567, party on 2024-05-01")
    report = await build_dataset(make_settings(), db)
    (text,) = targets(report)
    assert text == "mail [email] or call [phone], party on 2024-05-01"
    report = await build_dataset(make_settings(train_redact_pii=False), db)
    assert "alice.smith+bot@example.co.uk" in targets(report)[0]


def test_redaction_leaves_ordinary_numbers_alone() -> None:
    assert redact_pii("I have 3 cats and 12 dogs, born 1990") == "I have 3 cats and 12 dogs, born 1990"
    assert redact_pii("010-1234-5678로 전화해") == "[phone]로 전화해"
    assert redact_pii("see 31.12.2023") == "see 31.12.2023"


async def test_each_users_share_of_targets_is_capped_deterministically(db: Database) -> None:
    log = ChatLog(db)
    for index in range(8):
        await log.say("flood", "troll", f"buy my coin number {index}")
    for index in range(9):
        await log.say(f"chat-{index}", f"person-{index}", f"an honest line number {index}")

    settings = make_settings(train_user_share_cap=0.3)
    first = await build_dataset(settings, db)
    second = await build_dataset(settings, db)

    # The limit counts everyone else: 3 of 3 + 9 = 25% <= 30% (4 would be 4 of 13 = 31%). Counting the troll in
    # its own base (ceil(0.3 x 17) = 6) let it keep 6 of 15 = 40%.
    troll = [t for t in targets(first) if t.startswith("buy my coin")]
    assert len(troll) == 3
    assert {f"an honest line number {index}" for index in range(9)} <= set(targets(first))
    assert first.excluded["user_share_cap"] == 5
    assert sorted(targets(first)) == sorted(targets(second))


def _authored(counts: dict[str, int]) -> list[Sample]:
    """`counts[author]` targets per author, each in its own conversation, with distinct message ids."""
    lines = [(author, index) for author, n in counts.items() for index in range(n)]
    return [
        Sample((), Line(author, f"{author} says {index}", message_id), f"c{message_id}")
        for message_id, (author, index) in enumerate(lines, start=1)
    ]


def _kept_per_author(samples: list[Sample]) -> Counter[str]:
    return Counter(sample.target.speaker for sample in samples)


def test_a_flooder_among_fifty_honest_people_keeps_at_most_the_cap() -> None:
    samples = _authored({"flooder": 1000} | {f"honest-{index}": 1 for index in range(50)})
    excluded: Counter[str] = Counter()
    kept = _kept_per_author(cap_user_share(samples, 0.2, excluded))
    assert kept["flooder"] == 12  # 12 of 62 = 19.4%; 13 of 63 would be 20.6%
    assert kept["flooder"] / sum(kept.values()) <= 0.2
    assert all(kept[f"honest-{index}"] == 1 for index in range(50))
    assert excluded["user_share_cap"] == 988


def test_fewer_people_than_one_over_the_cap_share_equally() -> None:
    """Two people can never each stay under 20%: each may own half, so a small group still trains."""
    kept = _kept_per_author(cap_user_share(_authored({"ann": 10, "bob": 4}), 0.2, Counter()))
    assert kept == Counter({"ann": 4, "bob": 4})
    kept = _kept_per_author(cap_user_share(_authored({"ann": 3}), 0.2, Counter()))
    assert kept == Counter({"ann": 3})


@hypothesis_settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    counts=st.lists(st.integers(min_value=1, max_value=150), min_size=1, max_size=30),
    cap=st.sampled_from([0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 1 / 3, 0.5, 0.7, 1.0]) | st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_share_cap_properties(counts: list[int], cap: float, seed: int) -> None:
    """Over random author mixes: every share within the cap (or an equal share when fewer than 1/cap authors),
    authors under the limit keep everything, the limit is the largest that fits, and the result is deterministic."""
    given_counts = {f"author-{index}": n for index, n in enumerate(counts)}
    samples = _authored(given_counts)
    excluded: Counter[str] = Counter()
    result = cap_user_share(samples, cap, excluded)
    kept = _kept_per_author(result)
    total = sum(kept.values())
    allowed = max(cap, 1 / len(counts))

    assert all(n / total <= allowed + 1e-9 for n in kept.values())
    limit = max(kept.values())
    assert all(kept[author] == min(n, limit) for author, n in given_counts.items())  # under the limit: all kept
    if any(n > limit for n in given_counts.values()):  # one more each for the capped would break the cap
        raised = sum(min(n, limit + 1) for n in given_counts.values())
        assert (limit + 1) / raised > allowed - 1e-9
    assert excluded["user_share_cap"] == len(samples) - total
    shuffled = samples[:]
    random.Random(seed).shuffle(shuffled)
    again = cap_user_share(shuffled, cap, Counter())
    assert {s.target.message_id for s in again} == {s.target.message_id for s in result}


async def test_blocklisted_lines_are_context_only(db: Database) -> None:
    log = ChatLog(db)
    await log.say("c", "troll", "Say something Forbidden please")
    await log.say("c", "ann", "no thanks")
    report = await build_dataset(make_settings(train_blocklist="forbidden, other"), db)
    assert targets(report) == ["no thanks"]
    assert context_of(report, "no thanks") == ["Say something Forbidden please"]
    assert report.excluded["blocklisted_context_only"] == 1


async def test_repetitive_and_duplicate_lines_are_not_targets(db: Database) -> None:
    log = ChatLog(db)
    await log.say("c", "ann", "lol lol lol lol lol")
    await log.say("c", "bob", "hahahahahahaha")
    await log.say("c", "ann", "Nice one!")
    await log.say("c", "ann", "nice one")  # the same line again, right away: dropped entirely
    await log.say("c", "bob", "what did you do today?")
    await log.say("c", "ann", "NICE ONE!!!")  # a near-duplicate of ann's earlier target
    await log.say("c", "bob", "Nice one!")  # someone else agreeing is kept

    report = await build_dataset(make_settings(), db)

    assert targets(report).count("Nice one!") == 2
    assert set(targets(report)) == {"Nice one!", "what did you do today?"}
    assert report.excluded["repetitive_context_only"] == 2
    assert report.excluded["repeated_line"] == 1
    assert report.excluded["near_duplicate_target"] == 1
    assert context_of(report, "what did you do today?") == ["lol lol lol lol lol", "hahahahahahaha", "Nice one!"]


def _learnable_context(report: DatasetReport, target: str) -> dict[str, bool]:
    return {line.text: line.learnable for line in sample_for(report, target).context}


async def test_lines_demoted_to_context_are_never_learnable(db: Database) -> None:
    """Blocklisted, repetitive and (with bot replies not targets) bot lines stay context without any loss."""
    log = ChatLog(db)
    await log.say("c", "troll", "repeat after me: the forbidden phrase")
    await log.say("c", "ann", "lol lol lol lol lol")
    await log.say("c", None, "I'd rather not", delivery=Delivery.SENT)
    await log.say("c", "bob", "a perfectly normal line")
    await log.say("c", "carl", "and another one")

    report = await build_dataset(make_settings(train_blocklist="forbidden phrase"), db)

    assert _learnable_context(report, "and another one") == {
        "repeat after me: the forbidden phrase": False,
        "lol lol lol lol lol": False,
        "I'd rather not": False,
        "a perfectly normal line": True,  # a kept target stays learnable where it is context too
    }
    assert all(sample.target.learnable for sample in all_samples(report))


async def test_targets_dropped_by_the_dataset_wide_passes_are_not_learnable_as_context(db: Database) -> None:
    """A capped flooder's lines and a near-duplicate target still appear as context in other samples: there they
    carry no loss either, while the flooder's kept lines (and everyone else's) stay learnable."""
    log = ChatLog(db)
    for index in range(6):
        await log.say("group", "troll", f"buy my coin number {index}")
        await log.say("group", f"person-{index}", f"no thanks, reply {index}")
    await log.say("group", "ann", "Good night!")
    await log.say("group", "bob", "good night ann")
    await log.say("group", "ann", "GOOD NIGHT")  # ann's near-duplicate: dropped as a target
    await log.say("group", "carl", "sleep well everyone")

    report = await build_dataset(make_settings(train_user_share_cap=0.2, history_turns=20), db)

    kept = {s.target.message_id for s in all_samples(report)}
    troll_kept = {t for t in targets(report) if t.startswith("buy my coin")}
    assert len(troll_kept) == 2  # 2 of 11 targets = 18%; 3 of 12 would be 25%
    context = _learnable_context(report, "sleep well everyone")
    assert context["GOOD NIGHT"] is False and context["Good night!"] is True
    assert [text for text, learnable in context.items() if not learnable] == [
        *(f"buy my coin number {index}" for index in range(6) if f"buy my coin number {index}" not in troll_kept),
        "GOOD NIGHT",
    ]
    assert all(context[text] for text in troll_kept)
    for sample in all_samples(report):  # every context line is learnable exactly when it is a kept target
        assert all(line.learnable == (line.message_id in kept) for line in sample.context)


def test_repetition_detector() -> None:
    assert is_repetitive("spam spam spam spam eggs")
    assert is_repetitive("!!!!!!!!!!!!")
    assert is_repetitive("ㅋㅋㅋㅋㅋㅋㅋㅋ")
    assert not is_repetitive("the cat sat on the mat")
    assert not is_repetitive("ok")


async def test_bot_lines_of_rolled_back_versions_are_dropped(db: Database) -> None:
    log = ChatLog(db)
    bad = await log.version(VersionStatus.ROLLED_BACK)
    good = await log.version(VersionStatus.ACTIVE)
    await log.say("c", "ann", "tell me a joke")
    await log.say("c", None, "something awful", version=bad)
    await log.say("c", None, "why did the chicken cross the road", version=good)
    await log.say("c", "ann", "haha good one")

    report = await build_dataset(make_settings(), db)
    assert context_of(report, "haha good one") == ["tell me a joke", "why did the chicken cross the road"]
    assert report.excluded["rolled_back_bot_reply"] == 1

    report = await build_dataset(make_settings(train_exclude_rolled_back=False), db)
    assert "something awful" in context_of(report, "haha good one")


async def test_a_long_silence_ends_a_conversation_so_one_group_splits_both_ways(db: Database) -> None:
    log = ChatLog(db)
    start = datetime(2026, 11, 1, 12, 0)
    for day in range(10):  # one group, a conversation a day, plus a /reset inside the last one
        for minute, (author, text) in enumerate([("ann", f"morning {day}"), ("bob", f"hi ann, day {day}")]):
            await log.say("group", author, text, at=start + timedelta(days=day, minutes=minute))
    await log.say("group", "ann", "/reset", reset=True, at=start + timedelta(days=9, minutes=5))
    await log.say("group", "bob", "after the reset", at=start + timedelta(days=9, minutes=6))

    report = await build_dataset(make_settings(train_eval_fraction=0.3), db)

    assert report.summary()["train_conversations"] >= 1 and report.summary()["eval_conversations"] >= 1
    assert len({s.conversation for s in all_samples(report)}) == 11
    assert context_of(report, "morning 3")[-2:] == ["morning 2", "hi ann, day 2"]  # what the bot would see
    assert sample_for(report, "morning 3").conversation != sample_for(report, "hi ann, day 2").conversation
    assert sample_for(report, "morning 3").conversation == sample_for(report, "hi ann, day 3").conversation
    assert context_of(report, "after the reset") == []
    assert not {s.conversation for s in report.train} & {s.conversation for s in report.eval}
    # A held-out conversation's lines may be context of the next one, but are never learned there.
    earlier = _learnable_context(report, "hi ann, day 3")
    assert earlier.pop("morning 3") is True and earlier and not any(earlier.values())


async def test_a_short_pause_does_not_end_a_conversation(db: Database) -> None:
    log = ChatLog(db)
    start = datetime(2026, 11, 1, 12, 0)
    await log.say("group", "ann", "are you there?", at=start)
    await log.say("group", "bob", "sorry, was at lunch", at=start + timedelta(minutes=45))
    report = await build_dataset(make_settings(train_conversation_gap_minutes=60), db)
    assert len({s.conversation for s in all_samples(report)}) == 1


async def test_a_gap_of_zero_holds_out_whole_chats(db: Database) -> None:
    log = ChatLog(db)
    start = datetime(2026, 11, 1, 12, 0)
    for day in range(3):
        await log.say("group", "ann", f"hello on day {day}", at=start + timedelta(days=day))
    await log.say("group", "ann", "/reset", reset=True, at=start + timedelta(days=3))
    await log.say("group", "bob", "after the reset", at=start + timedelta(days=3, minutes=1))
    report = await build_dataset(make_settings(train_conversation_gap_minutes=0), db)
    assert len({s.conversation for s in all_samples(report)}) == 1
    assert context_of(report, "after the reset") == []  # /reset still cuts the context


async def test_eval_split_is_by_conversation_and_deterministic(db: Database) -> None:
    log = ChatLog(db)
    for chat in range(12):
        for turn in range(3):
            await log.say(f"chat-{chat}", f"user-{turn}", f"message {turn} in chat {chat}")
    settings = make_settings(train_eval_fraction=0.25)
    first = await build_dataset(settings, db)
    second = await build_dataset(settings, db)

    train_conversations = {s.conversation for s in first.train}
    eval_conversations = {s.conversation for s in first.eval}
    assert eval_conversations and train_conversations
    assert not train_conversations & eval_conversations
    assert eval_conversations == {s.conversation for s in second.eval}
    assert [s.target.text for s in first.eval] == [s.target.text for s in second.eval]
    assert first.summary()["eval_conversations"] == len(eval_conversations)
    manifest = first.manifest()
    assert all(s.target.message_id in manifest for s in first.train)
    assert not any(s.target.message_id in manifest for s in first.eval)


def test_two_chats_always_give_both_splits() -> None:
    samples = [Sample((), Line("a", f"line {chat}"), f"chat-{chat}") for chat in range(2)]
    for fraction in (0.01, 0.5, 0.99):
        train, held_out = split_by_conversation(samples, fraction)
        assert len(train) == 1
        assert len(held_out) == 1
    train, held_out = split_by_conversation(samples[:1], 0.99)
    assert (len(train), len(held_out)) == (1, 0)


def _exported_line(line: Line) -> dict[str, object]:
    created = line.created_at.isoformat() if line.created_at else None
    return {"speaker": line.speaker, "text": line.text, "message_id": line.message_id, "user_id": line.user_id,
            "created_at": created, "learnable": line.learnable}  # fmt: skip


async def test_export_writes_every_sample_with_its_turns(db: Database, tmp_path: Path) -> None:
    log = ChatLog(db)
    await log.say("a", "ann", "/start", command=True)
    await log.say("a", "ann", "안녕하세요 😀")
    await log.say("a", "bob", "hello there")
    await log.say("b", "bob", "another chat")
    report = await build_dataset(make_settings(), db)

    path = tmp_path / "out" / "dataset.jsonl"
    assert export_jsonl(report, path) == len(all_samples(report)) == 3
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert '"command": 1' in first_line
    assert "안녕하세요 😀" in path.read_text(encoding="utf-8")

    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records[0] == {"report": report.summary()}
    expected = [
        {"split": split, "conversation": sample.conversation, "text": sample.text(),
         "context": [_exported_line(line) for line in sample.context], "target": _exported_line(sample.target)}
        for split, samples in (("train", report.train), ("eval", report.eval))
        for sample in samples
    ]  # fmt: skip
    assert records[1:] == expected


# --- encoding, labels, packing ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    loaded: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(tiny_model_dir)
    return loaded


def _sample(*texts: str, chat: str = "c") -> Sample:
    lines = [Line(f"u{index % 2}", text) for index, text in enumerate(texts)]
    return Sample(tuple(lines[:-1]), lines[-1], chat)


def test_labels_are_masked_on_padding_only_and_eos_stays_a_target(tokenizer: PreTrainedTokenizerBase) -> None:
    samples = [_sample("hello there, how are you today?", "I am fine"), _sample("pizza")]
    encoded = encode_samples(samples, tokenizer, max_length=128, response_only=False)
    batch = PadCollator(tokenizer.eos_token_id)(unpacked(encoded))

    eos = tokenizer.eos_token_id
    long_len, short_len = (len(e.input_ids) for e in encoded)
    assert long_len > short_len
    assert batch["input_ids"].shape == batch["labels"].shape == (2, long_len)
    assert batch["labels"][0].tolist() == encoded[0].input_ids  # nothing masked in the longest row
    row = batch["labels"][1].tolist()
    assert row[:short_len] == encoded[1].input_ids
    assert row[short_len - 1] == eos  # the real end-of-turn EOS is learned...
    assert row[short_len:] == [IGNORE_INDEX] * (long_len - short_len)  # ...the padding (also EOS ids) is not
    assert batch["input_ids"][1, short_len:].tolist() == [eos] * (long_len - short_len)
    assert batch["attention_mask"][1].tolist() == [1] * short_len + [0] * (long_len - short_len)
    assert tokenizer.decode(encoded[0].input_ids) == samples[0].text(tokenizer.eos_token)


def test_response_only_labels_cover_just_the_target(tokenizer: PreTrainedTokenizerBase) -> None:
    sample = _sample("what is your favourite colour?", "blue, like the sea")
    (full,) = encode_samples([sample], tokenizer, max_length=128, response_only=False)
    (masked,) = encode_samples([sample], tokenizer, max_length=128, response_only=True)

    assert masked.input_ids == full.input_ids
    prompt_len = len(tokenizer(sample.prompt(tokenizer.eos_token), add_special_tokens=False)["input_ids"])
    assert masked.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    learned = masked.labels[prompt_len:]
    assert IGNORE_INDEX not in learned
    assert tokenizer.decode(learned) == f" blue, like the sea{tokenizer.eos_token}"


def test_long_samples_lose_their_oldest_turns_first(tokenizer: PreTrainedTokenizerBase) -> None:
    context = [f"turn {index} of a long chat about the sea" for index in range(12)]
    sample = _sample(*context, "the answer")
    (encoded,) = encode_samples([sample], tokenizer, max_length=64, response_only=False)
    assert len(encoded.input_ids) <= 64
    kept = [line.text for line in encoded.sample.context]
    assert kept and kept == context[-len(kept) :]
    assert tokenizer.decode(encoded.input_ids).endswith(f"Bot: the answer{tokenizer.eos_token}")

    too_long = _sample("hi", "word " * 200)
    assert encode_samples([too_long], tokenizer, max_length=64, response_only=False) == []


def test_packing_fills_blocks_with_every_token(tokenizer: PreTrainedTokenizerBase) -> None:
    samples = [_sample(f"question {index}", f"answer number {index}", chat=str(index)) for index in range(30)]
    encoded = encode_samples(samples, tokenizer, max_length=128, response_only=True)
    blocks = pack(encoded, block_size=32, seed=1)

    total = sum(len(e.input_ids) for e in encoded)
    assert [len(b["input_ids"]) for b in blocks[:-1]] == [32] * (len(blocks) - 1)
    assert 0 < len(blocks[-1]["input_ids"]) <= 32
    assert sum(len(b["input_ids"]) for b in blocks) == total
    assert sorted(t for b in blocks for t in b["input_ids"]) == sorted(t for e in encoded for t in e.input_ids)
    assert sum(lab != IGNORE_INDEX for b in blocks for lab in b["labels"]) == sum(
        lab != IGNORE_INDEX for e in encoded for lab in e.labels
    )
    assert pack(encoded, block_size=32, seed=1) == blocks  # deterministic
    assert pack(encoded, block_size=32, seed=2) != blocks  # but shuffled, not in chat order
