"""/forget leaves nothing that names the person: messages, the bot's answers to them, and the display name."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from core.chat.messages import ChatKind, IncomingMessage
from core.chat.service import ChatService
from core.serving.engine import Engine
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import Message, User


def said(text: str, message_id: str, *, user: str = "7", name: str = "Ann Example") -> IncomingMessage:
    return IncomingMessage(
        platform="telegram", chat_id=user, chat_kind=ChatKind.PRIVATE, author_id=user, author_name=name,
        text=text, message_id=message_id,
    )  # fmt: skip


async def test_forget_anonymises_the_user_row(db: Database, engine: Engine, tmp_path: Path) -> None:
    service = ChatService(settings=Settings(_env_file=None, models_dir=tmp_path), db=db, engine=engine)  # type: ignore[call-arg]
    await service.handle(said("hello", "1"))
    await service.handle(said("hi", "1", user="8", name="Bo Other"))
    reply = await service.handle(said("/forget", "2"))
    assert reply is not None and "deleted 2 messages" in reply.text
    async with db.sessions() as session:
        names = {uid: name for uid, name in await session.execute(select(User.platform_user_id, User.display_name))}
        authors = set((await session.scalars(select(Message.author_id))).all())
    assert names == {"7": "", "8": "Bo Other"}
    assert len(authors - {None}) == 1  # only Bo's message (and bot rows) remain
