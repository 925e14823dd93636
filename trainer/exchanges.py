"""What each line answers, and the short samples that teach the bot to answer the message in front of it.

Why this exists (measured by `bench/learning.py`, docs/benchmarks.md): trained only on long group history, a model
memorised the community's conversations (training loss 0.45) yet answered 4 taught questions in 10 when asked in a
fresh private chat. A fresh chat shows the model one line, `User 1: <question><eos>Bot:`, a prompt it never saw in
training, where every question sat deep in a group's history after other people's lines. So every target also gets
an *exchange* sample: the line it answers as the only context, exactly the prompt the bot gets at inference.

What a line answers, in order of evidence:
1. the message it replies to on the platform (a Telegram reply, a Discord reference): the person said so;
2. else the line just before it, when someone else said that (a plain follow-up);
3. else nothing (the line opens a conversation, or follows its own author): no exchange sample.

A reply whose message is not in the data (deleted, withdrawn, never logged, a command) is context only: trained
after whatever line happens to precede it, it would teach an answer to a question nobody asked. A question that repeats
the line it answers (a second person asking the same question) is no answer: it is context only, or the model
would learn to echo questions; any other repeat (agreement) keeps its target but gets no exchange sample.

Withdrawn lines (`/forget`, `/optout`, a platform deletion) *cut* the context where they stood
(`ChatWalk.cut`): the lines after them start afresh, as after a `/reset`. Without the cut, deleting the answers of
one exchange left its questions directly before unrelated lines, and the next version learned those pairings (a
question answered with another question). A deletion is known from `Message.follows_id`: each message records the
message logged before it in its chat, and an id that is no longer in the log marks the place.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from trainer.filters import normalise
from trainer.samples import Line, Sample

RECURRING_PEOPLE = 3
"""Different people who must give the same answer to a prompt before it counts as the community's (and more than
half of those who answered it): agreement, not one account's habit."""

WITHDRAWN_REASONS = frozenset({"opted_out", "reply_to_opted_out"})
"""Reasons `trainer.dataset` leaves a line out that withdraw it on someone's request: they cut the context too."""


class TargetKind(StrEnum):
    """How a training target's answered line was found (the dataset report counts targets by kind)."""

    REPLY = "reply"
    """It replies to that message on the platform."""
    FOLLOW_UP = "follow_up"
    """It follows someone else's line."""
    OPENING = "opening"
    """It answers nothing: the first line of a context, or a line after its own author's."""


@dataclass
class ChatWalk:
    """The running state of one chat as the dataset walks it: the context so far and the lines by platform id."""

    history_turns: int
    history: list[Line] = field(default_factory=list)
    by_platform_id: dict[str, Line] = field(default_factory=dict)

    def context(self) -> tuple[Line, ...]:
        """What the bot would have seen before the next line (at most `history_turns`)."""
        return tuple(self.history[-self.history_turns :] if self.history_turns else ())

    def cut(self) -> None:
        """A /reset, or a withdrawn line here: nothing before it is context for what follows."""
        self.history.clear()

    def unlearn_earlier(self) -> None:
        """A new conversation starts: earlier lines may be held out, so as context they must carry no loss."""
        self.history[:] = [replace(line, learnable=False) for line in self.history]
        self.by_platform_id = {key: replace(line, learnable=False) for key, line in self.by_platform_id.items()}

    def add(self, line: Line, platform_id: str | None) -> None:
        self.history.append(line)
        if platform_id is not None:
            self.by_platform_id[platform_id] = line

    def answered(self, line: Line, replies_to: str | None) -> tuple[Line | None, TargetKind | None]:
        """The line `line` answers and how it was found; (None, None) for a reply to a message not in the data."""
        if replies_to is not None:
            replied = self.by_platform_id.get(replies_to)
            return (replied, TargetKind.REPLY) if replied is not None else (None, None)
        if self.history and self.history[-1].speaker != line.speaker:
            return self.history[-1], TargetKind.FOLLOW_UP
        return None, TargetKind.OPENING


def is_echo(prompt: Line, target: Line) -> bool:
    """A line that says again what the line it answers said: a repeat, not an answer."""
    return normalise(prompt.text) == normalise(target.text)


def is_echoed_question(prompt: Line, target: Line) -> bool:
    """A question asked again right after someone asked it: trained as its answer, it teaches the bot to answer a
    question with itself. (Agreement, "nice one!" after "nice one!", is an answer and stays a target.)"""
    return is_question(target.text) and is_echo(prompt, target)


def exchange_samples(samples: Iterable[Sample]) -> list[Sample]:
    """One short sample per target that answers a line: that line alone as context (see the module docstring).

    Made after the dataset-wide Tay passes, from the targets they kept, so a short sample adds no target: the
    near-duplicate rule and the share cap have already counted it once. An echo gets none, neither does a target
    whose context already is just the line it answers (the long sample is the same sample), nor a plain follow-up
    of a message that someone answered with a platform reply (`answered_by_replies`).
    """
    samples = list(samples)
    replied = answered_by_replies(samples)
    short = []
    for sample in samples:
        answers = sample.answers
        if answers is None or is_echo(answers, sample.target) or sample.context == (answers,):
            continue
        if sample.kind == TargetKind.FOLLOW_UP and answers.message_id in replied:
            continue
        short.append(replace(sample, context=(answers,), exchange=True))
    return short


def drop_recurring_questions(samples: Sequence[Sample], excluded: Counter[str]) -> list[Sample]:
    """The community's recurring questions are context only: the bot learns to answer them, not to ask them.

    "what is the password?" asked by a dozen people after a dozen different lines opens an exchange, it answers
    none of them; trained as targets, such questions taught the bot to meet a question with another taught question
    (`bench/learning.py`: 6 of 40 replies, most in a group, where chatter was followed by a taught question in
    every other sample). A question is recurring when the community agrees on its answer (`recurring_answers`).
    Counted as `recurring_question_context_only`; `unlearn_dropped_targets` keeps them unlearned as context."""
    asked = set(recurring_answers(samples))
    kept = []
    for sample in samples:
        if is_question(sample.target.text) and normalise(sample.target.text) in asked:
            excluded["recurring_question_context_only"] += 1
            continue
        kept.append(sample)
    return kept


def answered_by_replies(samples: Iterable[Sample]) -> set[int]:
    """Messages someone answered with a platform reply. A plain line that follows such a message is not taken for
    its answer: the platform said which line answered it, and in a group the line in between usually belongs to
    another thread ("who is the captain?" / "haha yes" / ↪ "captain biscuit"). Measured in `bench/learning.py`:
    a quarter of the questions there had such a line after them, and trained as answers they taught the bot to meet
    a question with chatter. The line keeps its long sample (it was said there); it only gets no short one."""
    return {
        sample.answers.message_id
        for sample in samples
        if sample.kind == TargetKind.REPLY and sample.answers is not None and sample.answers.message_id is not None
    }


def recurring_answers(samples: Sequence[Sample]) -> dict[str, str]:
    """Normalised prompt -> its recurring answer (normalised), over every target that answers a line."""
    answers: dict[str, dict[str, set[int | None]]] = defaultdict(lambda: defaultdict(set))
    seen: set[int | None] = set()
    for sample in samples:
        if sample.answers is None or sample.target.message_id in seen:
            continue
        seen.add(sample.target.message_id)
        people = answers[normalise(sample.answers.text)][normalise(sample.target.text)]
        people.add(sample.target.user_id if sample.target.user_id is not None else sample.target.speaker)  # type: ignore[arg-type]
    recurring = {}
    for prompt, by_answer in answers.items():
        counts = Counter({answer: len(people) for answer, people in by_answer.items()})
        (answer, count), total = counts.most_common(1)[0], sum(counts.values())
        if prompt and count >= RECURRING_PEOPLE and count * 2 > total:
            recurring[prompt] = answer
    return recurring


def is_question(text: str) -> bool:
    return text.rstrip().endswith(("?", "？"))


def count_targets(samples: Sequence[Sample]) -> Counter[str]:
    """Targets by kind, and how many exchange samples they gave (`DatasetReport.targets`)."""
    counts: Counter[str] = Counter()
    for sample in samples:
        counts["exchange_samples" if sample.exchange else sample.kind] += 1
    return counts
