"""Logged conversations -> training samples in the shared dialogue format.

A sample is one *target* turn with the turns before it as context, rendered from the target speaker's point of
view (`core.serving.dialogue`: the target's author is `Bot`, so the model learns how this community answers under the
label it fills at inference). Pipeline, in order:

1. per chat, in message order: `/reset` cuts the context (and, like a long silence, starts a new conversation);
   private chats (unless `train_on_private_chats`; the operator's console always counts), commands, opted-out users
   and the bot's replies to them, bot replies not known to have been delivered, empty lines, a user's immediate
   repeats and bot lines of rolled-back versions are dropped entirely; e-mail addresses and phone numbers are
   redacted; every remaining line becomes context for what follows (at most `history_turns`);
2. target eligibility: human turns (bot turns too with `train_on_bot_replies`), except blocklisted and
   repetitive lines, which stay context only;
3. Tay defence across the whole dataset (`trainer.poisoning`): a user's near-duplicate targets (same normalised
   text) are dropped, then no user may own more than `train_user_share_cap` of the targets that remain (which
   ones stay is a deterministic hash, not "the first N"); the community's recurring questions (asked by many,
   answered alike) become context only, so the bot learns to answer them, not to ask them (`trainer.exchanges`);
4. every line that is not a target in the end (step 2 or 3) is marked not learnable wherever it appears as
   context, so it carries no loss anywhere (`trainer.packing` masks it);
5. a deterministic split by conversation into train and eval; a log that is one long conversation (a community
   whose group never pauses) holds out its most recent part instead (`split_by_conversation`).

A community's voice (VOICE_SCOPE=community) reads only that community's chats (`community=`), so its held-out
split, its caps and its filters are its own.

Besides, each line is linked to the line it answers (`trainer.exchanges`: the message it replies to on the platform,
else the line before it by someone else); a kept target also gets a short *exchange* sample with only that line as
context, the prompt a fresh chat gives the bot (not a plain line that follows a message someone else answered with
a platform reply: the platform said which line answered it). A withdrawn line (opted out, deleted) cuts the context
like a /reset, a reply to a message not in the data and a line repeating the one it answers are context only.

The dataset is tokenizer-free on purpose: the promotion gate scores the active and the new model, which may use
different tokenizers, on the same split. The token-length bound is applied when samples are encoded
(`trainer.packing.encode_samples`), which drops the oldest context turns first.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import aliased

from core.chat.consent import paused_chats, while_paused
from core.chat.messages import ChatKind
from core.serving.dialogue import GPT2_EOS, clean_text, speaker_key
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import Chat, Delivery, Message, ModelVersion, Role, User, VersionStatus
from trainer.corpus import Dialogue
from trainer.exchanges import (
    WITHDRAWN_REASONS,
    ChatWalk,
    TargetKind,
    count_targets,
    drop_recurring_questions,
    exchange_samples,
    is_echoed_question,
)
from trainer.filters import is_blocklisted, is_repetitive, normalise, redact_pii, stable_fraction
from trainer.poisoning import cap_user_share, drop_near_duplicates, unlearn_dropped_targets
from trainer.samples import DatasetReport, Line, Sample

log = logging.getLogger(__name__)

_DELIVERED = (Delivery.SENT, None)
"""Bot replies that reached the chat; None is a row logged before delivery was tracked."""


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
    platform_message_id: str | None = None
    replies_to_platform_id: str | None = None
    """The message it replies to on the platform (`trainer.exchanges`)."""
    follows_id: int | None = None
    """The message logged before it in its chat; when that one is gone, a withdrawn line stood here."""


async def build_dataset(settings: Settings, db: Database, *, community: str | None = None) -> DatasetReport:
    """Reads the logged messages (every chat's, or with `community` only that community's) and returns the
    filtered, capped, split samples with the exclusion counts."""
    rows, rolled_back = await _read_rows(db, community)
    if not settings.train_exclude_rolled_back:
        rolled_back = set()
    report = DatasetReport(train=[], eval=[], messages_read=len(rows))
    rows = await _without_paused_learning(db, rows, report.excluded)
    candidates: list[Sample] = []
    logged = {row.id for row in rows}
    for chat_rows in _by_chat(rows):
        candidates.extend(_chat_samples(chat_rows, settings, rolled_back, report.excluded, logged))
    targets = drop_near_duplicates(candidates, report.excluded)
    targets = cap_user_share(targets, settings.train_user_share_cap, report.excluded)
    targets = drop_recurring_questions(targets, report.excluded)
    targets = [*targets, *exchange_samples(targets)]
    report.targets = count_targets(targets)
    targets = unlearn_dropped_targets(targets, candidates)
    report.train, report.eval = split_by_conversation(targets, settings.train_eval_fraction)
    log.info("dataset: %s", json.dumps(report.summary()))
    return report


async def _read_rows(db: Database, community: str | None) -> tuple[list[_Row], set[int]]:
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
            Message.platform_message_id,
            Message.replies_to_platform_id,
            Message.follows_id,
            User.opted_out,
            asker.opted_out.label("answers_opted_out"),
        )
        .join(Chat, Message.chat_id == Chat.id)
        .outerjoin(User, Message.author_id == User.id)
        .outerjoin(asked, Message.reply_to_id == asked.id)
        .outerjoin(asker, asked.author_id == asker.id)
        .order_by(Message.chat_id, Message.id)
    )
    if community is not None:
        query = query.where(Chat.community == community)
    rolled_back_query = select(ModelVersion.id).where(ModelVersion.status == VersionStatus.ROLLED_BACK)
    async with db.sessions() as session:
        rolled_back = set((await session.scalars(rolled_back_query)).all())
        rows = [_row(columns) for columns in await session.execute(query)]
    return rows, rolled_back


async def _without_paused_learning(db: Database, rows: list[_Row], excluded: Counter[str]) -> list[_Row]:
    """The one consent filter: what was said in a group's chats while it had learning off (`/learning off`,
    `core.chat.consent`) is out of the data, neither a target nor context (all of it while learning is still off)."""
    async with db.sessions() as session:
        paused = await paused_chats(session)
    kept = [row for row in rows if not while_paused(paused.get(row.chat, []), row.id)]
    if len(kept) < len(rows):
        excluded["learning_off"] += len(rows) - len(kept)
    return kept


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
        platform_message_id=columns.platform_message_id,
        replies_to_platform_id=columns.replies_to_platform_id,
        follows_id=columns.follows_id,
    )


def _by_chat(rows: Sequence[_Row]) -> Iterator[list[_Row]]:
    chats: dict[str, list[_Row]] = defaultdict(list)
    for row in rows:
        chats[row.chat].append(row)
    yield from chats.values()


def _chat_samples(
    rows: Iterable[_Row], settings: Settings, rolled_back: set[int], excluded: Counter[str], logged: set[int]
) -> Iterator[Sample]:
    """Walks one chat in order, keeping the running context and yielding a sample per eligible target.

    The context is what the chat service would show the model: everything since the last /reset. The held-out
    split needs smaller units than a chat (a bot may live in one big group), so a /reset or a silence of
    TRAIN_CONVERSATION_GAP_MINUTES also starts a new conversation, each held out or trained on as a whole
    (0 keeps each chat one conversation: a split by whole chats). A withdrawn line (its author opted out, or it
    was deleted: the message it follows is no longer `logged`) cuts the context like a /reset, so its neighbours
    are never trained as each other's context (`trainer.exchanges`).
    """
    by_chat = settings.train_conversation_gap_minutes == 0
    gap = timedelta(minutes=settings.train_conversation_gap_minutes)
    walk = ChatWalk(settings.history_turns)
    conversation, last_seen = 0, None
    for row in rows:
        if row.resets_context or _after_withdrawn(row, logged):
            walk.cut()
        new_conversation = row.resets_context or (last_seen is not None and row.created_at - last_seen > gap)
        if new_conversation and not by_chat:
            conversation += 1
            # The earlier conversation may be held out: as context here it must not be learned (it would leak
            # eval targets into training); it is still what the bot would have seen.
            walk.unlearn_earlier()
        last_seen = row.created_at
        line, reason = _to_line(row, settings, rolled_back, walk.history)
        if line is None:
            excluded[reason] += 1
            if reason in WITHDRAWN_REASONS:
                walk.cut()
            continue
        answers, kind = walk.answered(line, row.replies_to_platform_id)
        reason = _target_reason(row, line, settings) or _answer_reason(line, answers, kind)
        if reason:
            excluded[reason] += 1
            line = replace(line, learnable=False)
        else:
            yield Sample(walk.context(), line, f"{row.chat}#{conversation}", answers=answers, kind=str(kind))
        walk.add(line, row.platform_message_id)


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


def _after_withdrawn(row: _Row, logged: set[int]) -> bool:
    """The message logged before this one in its chat is gone (deleted on request or on the platform). A message
    can only follow an earlier one: SQLite gives a deleted newest row's id to the next row."""
    return row.follows_id is not None and (row.follows_id not in logged or row.follows_id >= row.id)


def _answer_reason(line: Line, answers: Line | None, kind: TargetKind | None) -> str:
    """Why a line is context only for what it answers ("" when it may be a target): it replies to a message that
    is not in the data, or it asks again the question it follows (`trainer.exchanges`)."""
    if kind is None:
        return "replies_to_unavailable"
    if answers is not None and is_echoed_question(answers, line):
        return "echoed_question_context_only"
    return ""


def _target_reason(row: _Row, line: Line, settings: Settings) -> str:
    """Why a kept line is context only ("" when it is a target)."""
    if row.role == Role.BOT and not settings.train_on_bot_replies:
        return "bot_reply_context_only"
    if is_blocklisted(line.text, settings.train_blocklist):
        return "blocklisted_context_only"
    if is_repetitive(line.text):
        return "repetitive_context_only"
    return ""


def split_by_conversation(samples: Sequence[Sample], eval_fraction: float) -> tuple[list[Sample], list[Sample]]:
    """Holds out whole conversations (hash of the key), so eval never sees a conversation it trained on.

    Training never comes out empty (if the hash put every conversation in eval, the highest-hash one comes back),
    and with two or more conversations neither does eval (if the hash put none there, the lowest-hash one goes).
    With one conversation, its most recent part is held out (`split_by_time`).
    """
    keys = sorted({s.conversation for s in samples}, key=stable_fraction)
    if len(keys) == 1:
        return split_by_time(samples, eval_fraction)
    held = {key for key in keys if stable_fraction(key) < eval_fraction}
    if len(keys) >= 2 and not held:
        held = {keys[0]}
    if keys and len(held) == len(keys):
        held.discard(keys[-1])
    train = [s for s in samples if s.conversation not in held]
    held_out = [s for s in samples if s.conversation in held]
    return train, held_out


def split_by_time(samples: Sequence[Sample], eval_fraction: float) -> tuple[list[Sample], list[Sample]]:
    """Holds out the most recent `eval_fraction` of one conversation's targets (at least one, when there are two):
    a group that talks without pause is one conversation and must still train. Training samples are all older
    than held-out ones, so none of them saw a held-out line, even as context. A target's short exchange sample
    (`trainer.exchanges`) goes where the target goes: a held-out line is never trained on in either shape."""
    targets = [s for s in samples if not s.exchange]
    if len(targets) < 2:
        return list(samples), []
    held = min(len(targets) - 1, max(1, math.ceil(len(targets) * eval_fraction)))
    held_lines = {id(s.target) for s in targets[-held:]}
    return (
        [s for s in samples if id(s.target) not in held_lines],
        [s for s in samples if id(s.target) in held_lines],
    )


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
