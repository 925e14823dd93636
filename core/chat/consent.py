"""Consent: which groups Magpie may be in (ALLOWED_CHATS), and groups that turned learning off (`/learning`).

Both are decided here, in the core, for every platform. What only the platform can tell arrives on the message
(`IncomingMessage.community`, `.chat_admin`, `.as_chat`); leaving a group is the adapter's part (`Reply.leave`).

- A group outside ALLOWED_CHATS: nothing said there is logged or answered. The group is told once (per process)
  why, and the adapter leaves it; private chats are never turned away.
- `/learning off` by the group's own admin (or an ADMIN_IDS admin) opens a `LearningPause`; `/learning on` closes
  it. The trainer leaves out what was said in the group's chats while a pause covers it (`paused_chats`), as
  targets and as context; the chat itself goes on as before (the bot still answers, from its recent history).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core.chat.messages import Arrival, ChatKind, IncomingMessage, Reply
from core.i18n import _, speaking
from core.settings import Settings
from core.storage.models import Chat, LearningPause
from core.texts import NOT_ALLOWED_HERE, welcome_text

log = logging.getLogger(__name__)

Period = tuple[int, int | None]
"""A pause of learning, as log ids: after the message that turned it off, before the one that turned it on (None:
still off)."""


def community_of(message: IncomingMessage) -> str | None:
    """The group a message was said in, as `IncomingMessage.community` names it (`telegram:<group id>`,
    `discord:<guild id>`); None in a private chat; an adapter that could not tell names the chat itself."""
    if message.chat_kind is ChatKind.PRIVATE:
        return None
    return message.community or f"{message.platform}:{message.chat_id}"


def platform_id(community: str) -> str:
    """The platform's own id of a community (`telegram:-100123` -> `-100123`): what an adapter leaves."""
    return community.partition(":")[2] or community


class ChatGate:
    """Keeps Magpie out of groups outside ALLOWED_CHATS, and greets the ones it is added to."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._told: set[str] = set()
        """The groups already told why Magpie leaves: a group that keeps writing before the leave lands (or on a
        platform where leaving failed) hears it once, not once per message."""

    def admits(self, message: IncomingMessage) -> bool:
        community = community_of(message)
        return community is None or self._settings.allows_group(community)

    def turn_away(self, community: str, language: str | None) -> Reply | None:
        """The one note a refused group gets (with `leave` set), then silence."""
        if community in self._told:
            return None
        self._told.add(community)
        log.warning("Group %s is not in ALLOWED_CHATS: not logged, not answered; leaving it", community)
        with speaking(language):
            return Reply(_(NOT_ALLOWED_HERE).format(bot_name=self._settings.bot_name), leave=True)

    def greet(self, arrival: Arrival) -> Reply | None:
        """What the bot says when added to a group: what it logs and how to say no, or why it leaves."""
        if not self._settings.allows_group(arrival.community):
            return self.turn_away(arrival.community, arrival.language)
        log.info("Added to group %s", arrival.community)
        with speaking(arrival.language):
            return Reply(welcome_text(self._settings.bot_name))


async def learning_paused(session: AsyncSession, *, platform: str, community: str) -> LearningPause | None:
    """The group's open pause (learning is off), or None."""
    query = select(LearningPause).where(
        LearningPause.platform == platform, LearningPause.community == community, LearningPause.resumed_at.is_(None)
    )
    return (await session.execute(query.limit(1))).scalar_one_or_none()


async def set_learning(
    session: AsyncSession, *, platform: str, community: str, on: bool, by: str, at_message_id: int
) -> bool:
    """Turns learning on or off for a group from the logged command `at_message_id` on; False when it already was."""
    pause = await learning_paused(session, platform=platform, community=community)
    if on and pause is not None:
        pause.resumed_at, pause.resumed_at_id, pause.resumed_by = datetime.now(UTC), at_message_id, by[:128]
        return True
    if not on and pause is None:
        pause = LearningPause(platform=platform, community=community, paused_after_id=at_message_id, paused_by=by[:128])
        session.add(pause)
        return True
    return False


async def paused_chats(session: AsyncSession) -> dict[str, list[Period]]:
    """Every chat whose group ever turned learning off, as "<platform>:<platform chat id>" (the trainer's chat
    key), with the periods it was off."""
    pause = (LearningPause.paused_after_id, LearningPause.resumed_at_id)
    query = select(Chat.platform, Chat.platform_chat_id, *pause).join(
        LearningPause, (LearningPause.platform == Chat.platform) & (LearningPause.community == Chat.community)
    )
    periods: dict[str, list[Period]] = {}
    for platform, chat_id, since, until in await session.execute(query):
        periods.setdefault(f"{platform}:{chat_id}", []).append((since, until))
    return periods


def while_paused(periods: list[Period], message_id: int) -> bool:
    """Whether a logged message falls in a pause: any message while one is open, else one inside a closed one."""
    return any(until is None or since < message_id < until for since, until in periods)
