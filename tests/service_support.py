"""Talking to the chat service in tests: incoming messages, and a look at the prompts the engine was asked to
answer. Shared by the service's own tests and crash recovery's."""

from __future__ import annotations

import itertools
from datetime import datetime

from core.chat.messages import ChatKind, IncomingMessage
from core.serving.engine import Engine

_ids = itertools.count(1)


def msg(
    text: str | None,
    *,
    user: str = "1",
    chat: str = "100",
    kind: ChatKind = ChatKind.PRIVATE,
    addressed: bool = False,
    message_id: str | None = None,
    platform: str = "telegram",
    sent_at: datetime | None = None,
) -> IncomingMessage:
    """An incoming message from user `user` in chat `chat` (sent at `sent_at`, else now)."""
    return IncomingMessage(
        platform=platform,
        chat_id=chat,
        chat_kind=kind,
        author_id=user,
        author_name=f"name-{user}",
        text=text,
        message_id=message_id or str(next(_ids)),
        addressed=addressed,
        sent_at=sent_at,
    )


def record_prompts(engine: Engine) -> list[list[str]]:
    """Wraps the real engine so a test can see the turns of every prompt it was asked to answer."""
    seen: list[list[str]] = []
    original = engine.generate_response

    async def spy(turns, **kwargs):  # type: ignore[no-untyped-def]
        seen.append([turn.text for turn in turns])
        return await original(turns, **kwargs)

    engine.generate_response = spy  # type: ignore[method-assign]
    return seen
