"""Data access for the chat path: users, chats and the message log.

Every function takes the session explicitly and keyword-only arguments; the caller owns the transaction (one
unit of work per `async with db.sessions.begin()`). Writes that may race (the same update delivered twice, two
first messages from a new user at once) run in a savepoint and fall back to the row that won.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from core.storage.models import Chat, Delivery, Message, ModelVersion, Role, TrainingRun, User
from core.storage.versions import get_active_version


async def upsert_user(session: AsyncSession, *, platform: str, platform_user_id: str, display_name: str) -> User:
    """The user row for a platform id, created on first sight; the display name follows renames."""
    query = select(User).where(User.platform == platform, User.platform_user_id == platform_user_id)
    user = (await session.execute(query)).scalar_one_or_none()
    if user is None:
        try:
            async with session.begin_nested():
                user = User(platform=platform, platform_user_id=platform_user_id, display_name=display_name[:256])
                session.add(user)
        except IntegrityError:
            user = (await session.execute(query)).scalar_one()
    if display_name and user.display_name != display_name[:256]:
        user.display_name = display_name[:256]
    return user


async def upsert_chat(
    session: AsyncSession, *, platform: str, platform_chat_id: str, kind: str, community: str | None = None
) -> Chat:
    """The chat row for a platform chat id, created on first sight with its community. A recorded community is
    kept (a group that moved to a new id keeps its voice); a chat logged before communities were recorded gets
    its community now."""
    chat = await _find_chat(session, platform, platform_chat_id)
    if chat is None:
        try:
            async with session.begin_nested():
                chat = Chat(platform=platform, platform_chat_id=platform_chat_id, kind=kind, community=community)
                session.add(chat)
        except IntegrityError:
            chat = await _find_chat(session, platform, platform_chat_id)
            assert chat is not None  # the row that won the race
    if chat.community is None and community is not None:
        chat.community = community
    return chat


async def migrate_chat(session: AsyncSession, *, platform: str, old_chat_id: str, new_chat_id: str) -> bool:
    """Moves a chat's log to the id the platform gave it (a Telegram group upgraded to a supergroup).

    The old messages keep their history and training value under the new id. Their platform message ids are
    prefixed with the old chat id: the new chat numbers its messages afresh, and an unprefixed old id would make
    a new message look like a redelivered one. If the new chat already has rows (its first messages were logged
    before the migration notice), the old chat's messages join it. False when there is nothing to move.
    """
    old = await _find_chat(session, platform, old_chat_id)
    if old is None or old_chat_id == new_chat_id:
        return False
    await session.execute(
        update(Message)
        .where(Message.chat_id == old.id, Message.platform_message_id.is_not(None))
        .values(platform_message_id=func.substr(f"{old_chat_id}/" + Message.platform_message_id, 1, 64))
    )
    new = await _find_chat(session, platform, new_chat_id)
    if new is None:
        old.platform_chat_id = new_chat_id
    else:
        await session.execute(update(Message).where(Message.chat_id == old.id).values(chat_id=new.id))
        new.community = old.community or new.community  # the group keeps its voice (and its /learning) under its new id
        await session.delete(old)
    return True


async def _find_chat(session: AsyncSession, platform: str, platform_chat_id: str) -> Chat | None:
    query = select(Chat).where(Chat.platform == platform, Chat.platform_chat_id == platform_chat_id)
    return (await session.execute(query)).scalar_one_or_none()


async def log_message(session: AsyncSession, message: Message) -> bool:
    """Stores a message once, noting which message it follows in its chat (`Message.follows_id`); False when the
    same platform message id was already logged in that chat."""
    if message.platform_message_id is not None:
        existing = await session.execute(
            select(Message.id).where(
                Message.chat_id == message.chat_id, Message.platform_message_id == message.platform_message_id
            )
        )
        if existing.first() is not None:
            return False
    chat = await session.get(Chat, message.chat_id)
    assert chat is not None, "a message is logged in a chat that exists"
    if chat.last_message_id is None:  # a chat logged before follows_id existed
        chat.last_message_id = (
            await session.execute(select(func.max(Message.id)).where(Message.chat_id == chat.id))
        ).scalar()
    message.follows_id = chat.last_message_id
    try:
        async with session.begin_nested():
            session.add(message)
    except IntegrityError:
        return False
    chat.last_message_id = message.id
    return True


def _context_query(chat_id: int, user_id: int | None) -> Select[Message]:
    """Messages of one conversation context: the whole chat, or (per-user group context) one user's thread."""
    query = select(Message).where(Message.chat_id == chat_id)
    if user_id is not None:
        asked = aliased(Message)
        replies_to_user = select(asked.id).where(asked.author_id == user_id)
        query = query.where(or_(Message.author_id == user_id, Message.reply_to_id.in_(replies_to_user)))
    return query


async def recent_history(
    session: AsyncSession, *, chat_id: int, limit: int, user_id: int | None = None, up_to_id: int | None = None
) -> list[Message]:
    """The last `limit` conversational messages since the latest `/reset`, oldest first.

    Commands and the bot's system replies (help texts, refusals) are not conversation and are left out, and so are
    replies that never reached the chat: nobody read them, so the bot must not carry on as if they were said.
    `up_to_id` ends the history at that message (a late answer sees the conversation as it was then).
    """
    context = _context_query(chat_id, user_id)
    if up_to_id is not None:
        context = context.where(Message.id <= up_to_id)
    last_reset = (
        await session.execute(context.where(Message.resets_context.is_(True)).order_by(Message.id.desc()).limit(1))
    ).scalar_one_or_none()
    query = context.where(
        Message.is_command.is_(False),
        Message.text != "",
        or_(Message.delivery.is_(None), Message.delivery != Delivery.FAILED),
    )
    if last_reset is not None:
        query = query.where(Message.id > last_reset.id)
    rows = (await session.execute(query.order_by(Message.id.desc()).limit(limit))).scalars().all()
    return list(reversed(rows))


async def set_delivery(
    session: AsyncSession,
    *,
    message_id: int,
    delivery: Delivery,
    platform_message_id: str | None,
    error: str | None,
    parts_sent: int | None = None,
) -> None:
    message = await session.get(Message, message_id)
    if message is None:  # deleted meanwhile (e.g. /forget)
        return
    message.delivery = delivery
    message.delivery_error = error
    if parts_sent is not None:
        message.parts_sent = parts_sent
    if platform_message_id is not None and message.platform_message_id is None:
        message.platform_message_id = platform_message_id


@dataclass(frozen=True)
class Unanswered:
    """A logged message that should have been answered and has no delivered (or given-up) reply: the outbox."""

    message: Message
    chat: Chat
    author: User
    pending: Message | None
    """The reply already written for it and never confirmed sent (None: no reply was written yet)."""


async def last_message_id(session: AsyncSession) -> int:
    """The newest message id (0 for an empty log): where crash recovery stops, so it never meets a message that
    the live path logs after it."""
    return int((await session.execute(select(func.coalesce(func.max(Message.id), 0)))).scalar_one())


async def unanswered_messages(
    session: AsyncSession, *, since: datetime, up_to_id: int, platforms: Collection[str]
) -> list[Unanswered]:
    """Messages logged since `since` (up to `up_to_id`) that await a reply and have none SENT or FAILED, oldest
    first, each with its newest PENDING reply if one was written."""
    reply = aliased(Message)
    settled = select(reply.id).where(
        reply.reply_to_id == Message.id, reply.delivery.in_([Delivery.SENT, Delivery.FAILED])
    )
    rows = (
        await session.execute(
            select(Message, Chat, User)
            .join(Chat, Chat.id == Message.chat_id)
            .join(User, User.id == Message.author_id)
            .where(
                Message.role == Role.USER,
                Message.awaits_reply.is_(True),
                Message.created_at >= since,
                Message.id <= up_to_id,
                Chat.platform.in_(list(platforms)),
                ~settled.exists(),
            )
            .order_by(Message.id)
        )
    ).all()
    ids = [message.id for message, _, _ in rows]
    pending: dict[int, Message] = {}
    if ids:
        replies = await session.scalars(
            select(Message)
            .where(Message.reply_to_id.in_(ids), Message.delivery == Delivery.PENDING)
            .order_by(Message.id)
        )
        pending = {row.reply_to_id: row for row in replies if row.reply_to_id is not None}
    return [Unanswered(message, chat, user, pending.get(message.id)) for message, chat, user in rows]


async def forget_user(session: AsyncSession, *, user_id: int) -> int:
    """Deletes every message the user sent, in every chat (bot replies to them go too), and their display name.

    The user row itself stays, anonymous: it carries the opt-out flag and lets the training manifest name the
    versions that contained their data. Their name also leaves other people's Discord messages, where the adapter
    wrote each mention as `@<display name>` (`bot.discord_bot`): the name they last wrote under is the one known.
    """
    user = await session.get(User, user_id)
    if user is not None and user.platform == "discord" and user.display_name:
        await _scrub_mentions(session, platform=user.platform, name=user.display_name)
    await session.execute(update(User).where(User.id == user_id).values(display_name=""))
    count = (
        await session.execute(select(func.count()).select_from(Message).where(Message.author_id == user_id))
    ).scalar_one()
    own_ids = select(Message.id).where(Message.author_id == user_id).scalar_subquery()
    await session.execute(delete(Message).where(Message.reply_to_id.in_(own_ids)))
    await session.execute(delete(Message).where(Message.author_id == user_id))
    return int(count)


FORGOTTEN_MENTION = "@[forgotten]"
"""What a mention of someone who sent /forget becomes in the log."""


async def _scrub_mentions(session: AsyncSession, *, platform: str, name: str) -> None:
    mention = f"@{name}"
    whole = re.compile(re.escape(mention) + r"(?!\w)")  # "@Bo" is not inside "@Bob"
    query = (
        select(Message)
        .join(Chat, Chat.id == Message.chat_id)
        .where(Chat.platform == platform, Message.text.contains(mention, autoescape=True))
    )
    for row in await session.scalars(query):
        row.text = whole.sub(FORGOTTEN_MENTION, row.text)


async def find_user_message(
    session: AsyncSession, *, platform: str, platform_chat_id: str, platform_message_id: str
) -> Message | None:
    """A person's logged message by its platform ids (None for the bot's own messages and unknown ids)."""
    query = (
        select(Message)
        .join(Chat, Message.chat_id == Chat.id)
        .where(
            Chat.platform == platform,
            Chat.platform_chat_id == platform_chat_id,
            Message.platform_message_id == platform_message_id,
            Message.role == Role.USER,
        )
    )
    return (await session.execute(query)).scalar_one_or_none()


async def delete_message(session: AsyncSession, *, message_id: int) -> int:
    """Deletes one logged message and the bot's replies to it; how many rows went."""
    doomed = or_(Message.id == message_id, Message.reply_to_id == message_id)
    count = (await session.execute(select(func.count()).select_from(Message).where(doomed))).scalar_one()
    await session.execute(delete(Message).where(doomed))
    return int(count)


async def prune_messages(session: AsyncSession, *, before: datetime, limit: int) -> int:
    """Deletes up to `limit` of the oldest messages logged before `before`, with the bot's replies to them.

    One bounded batch per call (the caller commits between batches): a single transaction over a large log held
    SQLite's write lock for minutes, and incoming messages failed to log meanwhile.
    """
    doomed = (
        (await session.execute(select(Message.id).where(Message.created_at < before).order_by(Message.id).limit(limit)))
        .scalars()
        .all()
    )
    if not doomed:
        return 0
    replies = await session.execute(delete(Message).where(Message.reply_to_id.in_(doomed), Message.id.not_in(doomed)))
    await session.execute(delete(Message).where(Message.id.in_(doomed)))
    return len(doomed) + int(replies.rowcount)  # type: ignore[attr-defined]


async def export_user(session: AsyncSession, *, user_id: int) -> list[dict[str, Any]]:
    """The user's own logged messages, oldest first, in a shape fit for a JSON download."""
    rows = await session.execute(
        select(Message, Chat)
        .join(Chat, Chat.id == Message.chat_id)
        .where(Message.author_id == user_id)
        .order_by(Message.id)
    )
    return [
        {
            "platform": chat.platform,
            "chat_id": chat.platform_chat_id,
            "message_id": message.platform_message_id,
            "sent_at": message.created_at.isoformat(),
            "text": message.text,
        }
        for message, chat in rows
    ]


@dataclass(frozen=True)
class Stats:
    """What `/status` and `magpie db stats` report about the data."""

    users: int
    chats: int
    messages: int
    user_messages: int
    bot_messages: int
    since_last_training: int
    last_run: TrainingRun | None
    active_version: ModelVersion | None


async def collect_stats(session: AsyncSession, *, community: str | None = None) -> Stats:
    """The whole log's numbers, or with `community` that community's: its chats, its voice's runs and version."""

    async def count(query: Any) -> int:
        return int((await session.execute(query)).scalar_one())

    runs = select(TrainingRun).order_by(TrainingRun.id.desc()).limit(1)
    if community is not None:
        runs = runs.where(TrainingRun.community == community)
    last_run = (await session.execute(runs)).scalar_one_or_none()
    active = await get_active_version(session, community=community)
    since: datetime | None = last_run.started_at if last_run is not None else None
    messages = select(func.count()).select_from(Message)
    chats = select(func.count()).select_from(Chat)
    users = select(func.count()).select_from(User)
    if community is not None:
        in_community = Message.chat_id.in_(select(Chat.id).where(Chat.community == community))
        messages = messages.where(in_community)
        chats = chats.where(Chat.community == community)
        users = select(func.count(func.distinct(Message.author_id))).where(in_community)
    conversational = messages.where(Message.role == Role.USER, Message.is_command.is_(False))
    return Stats(
        users=await count(users),
        chats=await count(chats),
        messages=await count(messages),
        user_messages=await count(messages.where(Message.role == Role.USER)),
        bot_messages=await count(messages.where(Message.role == Role.BOT)),
        since_last_training=await count(
            conversational if since is None else conversational.where(Message.created_at > since)
        ),
        last_run=last_run,
        active_version=active,
    )


async def communities(session: AsyncSession) -> list[str]:
    """Every community with a logged chat, in order of first appearance."""
    query = select(Chat.community).where(Chat.community.is_not(None)).group_by(Chat.community)
    result = await session.scalars(query.order_by(func.min(Chat.id)))
    return [community for community in result.all() if community is not None]


async def communities_with_new_data(session: AsyncSession, *, min_new_messages: int) -> list[tuple[str, int]]:
    """The communities with at least `min_new_messages` (and at least one) conversational messages since their
    voice's last training run, with that count: what a retrain of every community trains, one after another."""
    due = []
    for community in await communities(session):
        new = (await collect_stats(session, community=community)).since_last_training
        if new >= max(1, min_new_messages):
            due.append((community, new))
    return due
