"""The fixed texts every platform shows: /help and /start say which chats the bot learns from."""

from __future__ import annotations

import pytest

from core.db import Database
from core.engine import Engine
from core.messages import ChatKind, IncomingMessage
from core.service import ChatService
from core.settings import Settings


@pytest.mark.parametrize(
    ("platform", "opted_in", "private_learned"),
    [("telegram", False, False), ("discord", False, False), ("telegram", True, True), ("console", False, True)],
)
async def test_help_and_start_say_which_chats_are_learned_from(
    db: Database, platform: str, opted_in: bool, private_learned: bool
) -> None:
    """Private chats are learned from only with TRAIN_ON_PRIVATE_CHATS; the console is the operator's own."""
    settings = Settings(_env_file=None, train_on_private_chats=opted_in)  # type: ignore[call-arg]
    engine = Engine.from_settings(settings)  # never started: commands need no model
    service = ChatService(settings=settings, db=db, engine=engine)
    for index, command in enumerate(("/help", "/start")):
        incoming = IncomingMessage(
            platform=platform,
            chat_id="7",
            chat_kind=ChatKind.PRIVATE,
            author_id="7",
            author_name="someone",
            text=command,
            message_id=f"m{index}",
        )
        reply = await service.handle(incoming)
        assert reply is not None
        assert "I learn from what people write in group chats" in reply.text
        if private_learned:
            assert "and in private chats with me" in reply.text
        else:
            assert "what you tell me in a private chat is never trained on" in reply.text
