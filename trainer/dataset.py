"""Logged conversations -> training samples in the shared dialogue format.

A sample is one *target* turn with the turns before it as context, rendered from the target speaker's point of
view (`core.dialogue`: the target's author is `Bot`, so the model learns how this community answers under the
label it fills at inference). Pipeline, in order:

1. per chat, in message order: `/reset` cuts the context (and, like a long silence, starts a new conversation);
   private chats (unless `train_on_private_chats`; the operator's console always counts), commands, opted-out users
   and the bot's replies to them, bot replies not known to have been delivered, empty lines, a user's immediate
   repeats and bot lines of rolled-back versions are dropped entirely; e-mail addresses and phone numbers are
   redacted; every remaining line becomes context for what follows (at most `history_turns`);
2. target eligibility: human turns (bot turns too with `train_on_bot_replies`), except blocklisted and
   repetitive lines, which stay context only;
3. Tay defence across the whole dataset: a user's near-duplicate targets (same normalised text) are dropped,
   then no user may own more than `train_user_share_cap` of the targets that remain (which ones stay is a
   deterministic hash, not "the first N");
4. every line that is not a target in the end (step 2 or 3) is marked not learnable wherever it appears as
   context, so it carries no loss anywhere (`trainer.packing` masks it);
5. a deterministic split by conversation into train and eval.

The dataset is tokenizer-free on purpose: the promotion gate scores the active and the new model, which may use
different tokenizers, on the same split. The token-length bound is applied when samples are encoded
(`trainer.packing.encode_samples`), which drops the oldest context turns first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import aliased

from core.db import Database
from core.dialogue import GPT2_EOS, Turn, clean_text, format_dialogue, speaker_key
from core.messages import ChatKind
from core.models import Chat, Delivery, Message, ModelVersion, Role, User, VersionStatus
from core.settings import Settings
from trainer.corpus import Dialogue

log = logging.getLogger(__name__)

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE = re.compile(r"(?<![0-9A-Za-z+])\+?\d[\d ().-]{5,}\d(?![0-9A-Za-z])")
_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")
_REPEATED_UNIT = re.compile(r"(.{1,4}?)\1{3,}")
_LONG_RUNS = re.compile(r"(.)\1{2,}")

_DELIVERED = (Delivery.SENT, None)
"""Bot replies that reached the chat; None is a row logged before delivery was tracked."""


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
            "data_from": first.isoformat() if first else None,
            "data_to": last.isoformat() if last else None,
        }


# --- text filters ---------------------------------------------------------------------------------------------


def redact_pii(text: str) -> str:
    """Replaces e-mail addresses and phone-like numbers (7-15 digits, not dates) with placeholders."""
    text = _EMAIL.sub("[email]", text)

    def phone(match: re.Match[str]) -> str:
        candidate = match.group(0)
        digits = sum(ch.isdigit() for ch in candidate)
        if not 7 <= digits <= 15 or _DATE.fullmatch(candidate.strip()):
            return candidate
        return "[phone]"

    return _PHONE.sub(phone, text)


def normalise(text: str) -> str:
    """The text two near-duplicates share: case, punctuation, spacing and stretched letters ("sooo") removed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch if ch.isalnum() else " " for ch in text)
    text = _LONG_RUNS.sub(r"\1\1", text)
    return " ".join(text.split())


def is_repetitive(text: str) -> bool:
    """A line that is mostly one repeated word or a short repeated unit ("lol lol lol lol", "hahahahaha")."""
    words = normalise(text).split()
    if len(words) >= 3 and Counter(words).most_common(1)[0][1] / len(words) >= 0.6:
        return True
    compact = "".join(text.split())
    return len(compact) >= 8 and _REPEATED_UNIT.fullmatch(compact) is not None


def is_blocklisted(text: str, blocklist: Sequence[str]) -> bool:
    lowered = text.casefold()
    return any(item.casefold() in lowered for item in blocklist)


def stable_fraction(key: str) -> float:
    """A number in [0, 1) that depends only on `key`: the same chat lands in the same split on every run."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) / 2**64


# --- building samples -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Row:
    """One logged message with what the filters need."""

    id: int
    chat: str
    author_id: int | None
    role: Role
    text: str
    created_at: datetime
    is_command: bool
    resets_context: bool
    model_version_id: int | None
    opted_out: bool
    platform: str
    private: bool
    """A one-to-one chat with the bot (`Settings.learns_from_private_chats` says whether it is training data)."""
    delivery: Delivery | None
    answers_opted_out: bool
    """A bot reply to a message by a user who opted out: it leaves the data with their turns."""


async def build_dataset(settings: Settings, db: Database) -> DatasetReport:
    """Reads every logged message and returns the filtered, capped, split samples with the exclusion counts."""
    rows, rolled_back = await _read_rows(db)
    if not settings.train_exclude_rolled_back:
        rolled_back = set()
    report = DatasetReport(train=[], eval=[], messages_read=len(rows))
    candidates: list[Sample] = []
    for chat_rows in _by_chat(rows):
        candidates.extend(_chat_samples(chat_rows, settings, rolled_back, report.excluded))
    targets = drop_near_duplicates(candidates, report.excluded)
    targets = cap_user_share(targets, settings.train_user_share_cap, report.excluded)
    targets = unlearn_dropped_targets(targets, candidates)
    report.train, report.eval = split_by_conversation(targets, settings.train_eval_fraction)
    log.info("dataset: %s", json.dumps(report.summary()))
    return report


async def _read_rows(db: Database) -> tuple[list[_Row], set[int]]:
    """Every message in chat order with its author's opt-out flag, and the ids of rolled-back versions.

    A bot reply also carries the opt-out flag of the person it answered (`reply_to_id` -> that message's author).
    """
    asked, asker = aliased(Message), aliased(User)
    query = (
        select(
            Message.id,
            Chat.platform,
            Chat.platform_chat_id,
            Chat.kind,
            Message.author_id,
            Message.role,
            Message.text,
            Message.created_at,
            Message.is_command,
            Message.resets_context,
            Message.model_version_id,
            Message.delivery,
            User.opted_out,
            asker.opted_out.label("answers_opted_out"),
        )
        .join(Chat, Message.chat_id == Chat.id)
        .outerjoin(User, Message.author_id == User.id)
        .outerjoin(asked, Message.reply_to_id == asked.id)
        .outerjoin(asker, asked.author_id == asker.id)
        .order_by(Message.chat_id, Message.id)
    )
    rolled_back_query = select(ModelVersion.id).where(ModelVersion.status == VersionStatus.ROLLED_BACK)
    async with db.sessions() as session:
        rolled_back = set((await session.scalars(rolled_back_query)).all())
        rows = [_row(columns) for columns in await session.execute(query)]
    return rows, rolled_back


def _row(columns: Any) -> _Row:
    return _Row(
        id=columns.id,
        chat=f"{columns.platform}:{columns.platform_chat_id}",
        author_id=columns.author_id,
        role=columns.role,
        text=columns.text,
        created_at=columns.created_at,
        is_command=columns.is_command,
        resets_context=columns.resets_context,
        model_version_id=columns.model_version_id,
        opted_out=bool(columns.opted_out),
        platform=columns.platform,
        private=columns.kind == ChatKind.PRIVATE.value,
        delivery=columns.delivery,
        answers_opted_out=bool(columns.answers_opted_out),
    )


def _by_chat(rows: Sequence[_Row]) -> Iterator[list[_Row]]:
    chats: dict[str, list[_Row]] = defaultdict(list)
    for row in rows:
        chats[row.chat].append(row)
    yield from chats.values()


def _chat_samples(
    rows: Iterable[_Row], settings: Settings, rolled_back: set[int], excluded: Counter[str]
) -> Iterator[Sample]:
    """Walks one chat in order, keeping the running context and yielding a sample per eligible target.

    The context is what the chat service would show the model: everything since the last /reset. The held-out
    split needs smaller units than a chat (a bot may live in one big group), so a /reset or a silence of
    TRAIN_CONVERSATION_GAP_MINUTES also starts a new conversation, each held out or trained on as a whole
    (0 keeps each chat one conversation: a split by whole chats).
    """
    by_chat = settings.train_conversation_gap_minutes == 0
    gap = timedelta(minutes=settings.train_conversation_gap_minutes)
    history: list[Line] = []
    conversation, last_seen = 0, None
    for row in rows:
        if row.resets_context:
            history.clear()
        new_conversation = row.resets_context or (last_seen is not None and row.created_at - last_seen > gap)
        if new_conversation and not by_chat:
            conversation += 1
            # The earlier conversation may be held out: as context here it must not be learned (it would leak
            # eval targets into training); it is still what the bot would have seen.
            history[:] = [replace(line, learnable=False) for line in history]
        last_seen = row.created_at
        line, reason = _to_line(row, settings, rolled_back, history)
        if line is None:
            excluded[reason] += 1
            continue
        reason = _target_reason(row, line, settings)
        if reason:
            excluded[reason] += 1
            line = replace(line, learnable=False)
        else:
            context = tuple(history[-settings.history_turns :] if settings.history_turns else ())
            yield Sample(context, line, f"{row.chat}#{conversation}")
        history.append(line)


def _to_line(row: _Row, settings: Settings, rolled_back: set[int], history: Sequence[Line]) -> tuple[Line | None, str]:
    """The message as a context line, or None and why it is left out of the data altogether."""
    if row.is_command or row.resets_context:
        return None, "command"
    if row.opted_out:
        return None, "opted_out"
    if row.private and not settings.learns_from_private_chats(row.platform):
        return None, "private_chat"
    if row.role == Role.BOT and row.answers_opted_out:
        return None, "reply_to_opted_out"
    if row.role == Role.BOT and row.delivery not in _DELIVERED:
        return None, "undelivered_bot_reply"
    if row.role == Role.BOT and row.model_version_id in rolled_back:
        return None, "rolled_back_bot_reply"
    text = clean_text(row.text, eos=GPT2_EOS)
    if settings.train_redact_pii:
        text = redact_pii(text)
    if not text:
        return None, "empty"
    speaker = speaker_key(row.author_id, bot=row.role == Role.BOT)
    if history and history[-1].speaker == speaker and normalise(history[-1].text) == normalise(text):
        return None, "repeated_line"
    user_id = row.author_id if row.role == Role.USER else None
    return Line(speaker, text, row.id, user_id, row.created_at), ""


def _target_reason(row: _Row, line: Line, settings: Settings) -> str:
    """Why a kept line is context only ("" when it is a target)."""
    if row.role == Role.BOT and not settings.train_on_bot_replies:
        return "bot_reply_context_only"
    if is_blocklisted(line.text, settings.train_blocklist):
        return "blocklisted_context_only"
    if is_repetitive(line.text):
        return "repetitive_context_only"
    return ""


def drop_near_duplicates(samples: Iterable[Sample], excluded: Counter[str]) -> list[Sample]:
    """Keeps a user's first target of each normalised text; repeats by the same author are flooding.

    Different people giving the same answer is kept: that agreement is what the model should learn, and the
    per-user share cap bounds what any one account can add.
    """
    seen: set[tuple[str, str]] = set()
    kept = []
    for sample in sorted(samples, key=lambda s: s.target.message_id or 0):
        key = (sample.target.speaker, normalise(sample.target.text))
        if key in seen:
            excluded["near_duplicate_target"] += 1
            continue
        seen.add(key)
        kept.append(sample)
    return kept


def cap_user_share(samples: Sequence[Sample], cap: float, excluded: Counter[str]) -> list[Sample]:
    """Keeps no author above `cap` of the targets that remain, each capped author keeping a hash-chosen (stable,
    time-spread) subset of the same size; authors under the limit keep everything."""
    by_author: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_author[sample.target.speaker].append(sample)
    limit = share_limit([len(author_samples) for author_samples in by_author.values()], cap)
    keep: set[int] = set()
    for author_samples in by_author.values():
        ranked = sorted(author_samples, key=lambda s: stable_fraction(f"{s.conversation}/{s.target.message_id}"))
        keep.update(id(s) for s in ranked[:limit])
        excluded["user_share_cap"] += max(0, len(ranked) - limit)
    return [s for s in samples if id(s) in keep]


def share_limit(counts: Sequence[int], cap: float) -> int:
    """The most targets one author may keep so that, after capping, nobody owns more than `cap` of the rest.

    The limit must count the flooder out of its own base: `cap x all targets` lets one account with 1,000 lines
    among 50 honest ones keep most of the data. With a limit L each author keeps min(n, L) of the total
    T(L) = sum(min(n, L)), and L is the largest value with min(L, max n) <= cap' x T(L). `cap'` is `cap`, or an
    equal share (1 / authors) when fewer than 1/cap people contributed, so a small group still trains. The slack
    cap' x T(L) - L is concave in L and holds at L = 1, so the values that fit form a range a bisection finds.
    """
    if not counts:
        return 0
    share = max(Fraction(cap).limit_denominator(10**6), Fraction(1, len(counts)))
    largest = max(counts)

    def fits(limit: int) -> bool:
        return min(limit, largest) <= share * sum(min(n, limit) for n in counts)

    low, high = 1, largest  # fits(1) always holds: every author has at least one target
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def unlearn_dropped_targets(kept: Sequence[Sample], candidates: Iterable[Sample]) -> list[Sample]:
    """Marks every context line whose message was dropped as a target (a near-duplicate, over the share cap) as not
    learnable: it stays context for the lines after it, but would otherwise be learned there after all."""
    dropped = {s.target.message_id for s in candidates} - {s.target.message_id for s in kept} - {None}
    return [_unlearn(sample, dropped) for sample in kept] if dropped else list(kept)


def _unlearn(sample: Sample, message_ids: set[int | None]) -> Sample:
    if not any(line.message_id in message_ids for line in sample.context):
        return sample
    context = tuple(
        replace(line, learnable=False) if line.message_id in message_ids else line for line in sample.context
    )
    return replace(sample, context=context)


def split_by_conversation(samples: Sequence[Sample], eval_fraction: float) -> tuple[list[Sample], list[Sample]]:
    """Holds out whole conversations (hash of the key), so eval never sees a conversation it trained on.

    Training never comes out empty (if the hash put every conversation in eval, the highest-hash one comes back),
    and with two or more conversations neither does eval (if the hash put none there, the lowest-hash one goes).
    """
    keys = sorted({s.conversation for s in samples}, key=stable_fraction)
    held = {key for key in keys if stable_fraction(key) < eval_fraction}
    if len(keys) >= 2 and not held:
        held = {keys[0]}
    if keys and len(held) == len(keys):
        held.discard(keys[-1])
    train = [s for s in samples if s.conversation not in held]
    held_out = [s for s in samples if s.conversation in held]
    return train, held_out


def samples_from_dialogues(dialogues: Iterable[Dialogue], *, history_turns: int) -> list[Sample]:
    """Corpus samples: every line that answers something, with the lines before it as context.

    Speakers alternate (`a`, `b`); a dialogue's first line is the prompt someone wrote to elicit the answers,
    so it is context only, never a target. Exact repeats of a sample are dropped: chatterbot-corpus repeats many
    exchanges across files, and a repeat costs training time and would leak into the held-out split.
    """
    samples: dict[str, Sample] = {}
    for dialogue in dialogues:
        lines = [Line("ab"[index % 2], clean_text(text, eos=GPT2_EOS)) for index, text in enumerate(dialogue.lines)]
        for index in range(1, len(lines)):
            context = lines[max(0, index - history_turns) : index] if history_turns else []
            sample = Sample(tuple(context), lines[index], dialogue.key)
            if sample.target.text:
                samples.setdefault(sample.text(), sample)
    return list(samples.values())


# --- export ---------------------------------------------------------------------------------------------------


def _line_json(line: Line) -> dict[str, Any]:
    return {
        "speaker": line.speaker,
        "text": line.text,
        "message_id": line.message_id,
        "user_id": line.user_id,
        "created_at": line.created_at.isoformat() if line.created_at else None,
        "learnable": line.learnable,
    }


def export_jsonl(report: DatasetReport, path: Path) -> int:
    """Writes the dataset for inspection (`magpie dataset export`).

    The first line is `{"report": <summary with exclusion counts>}`; every further line is one sample with its
    split, rendered text (as the model will see it) and the structured turns. Returns the samples written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("w", encoding="utf-8") as out:
        out.write(json.dumps({"report": report.summary()}, ensure_ascii=False) + "\n")
        for split, samples in (("train", report.train), ("eval", report.eval)):
            for sample in samples:
                record = {
                    "split": split,
                    "conversation": sample.conversation,
                    "text": sample.text(),
                    "context": [_line_json(line) for line in sample.context],
                    "target": _line_json(sample.target),
                }
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
    return written
