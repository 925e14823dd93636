"""The dataset tests' shared helpers: settings for one test and a chat log written the way the chat service logs it
(used by the dataset tests and the voices' unit tests)."""

from __future__ import annotations

from datetime import datetime
from itertools import count

from core.settings import Settings
from core.storage.db import Database
from core.storage.models import Chat, Delivery, Message, ModelVersion, Role, User, VersionStatus

_ids = count(1)


def make_settings(**overrides: object) -> Settings:
    """Settings for one test; the share cap is off unless a test is about it."""
    values: dict[str, object] = {"train_user_share_cap": 1.0, "history_turns": 10}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


class ChatLog:
    """Writes a conversation into the database the way the chat service logs it."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.users: dict[str, int] = {}
        self.chats: dict[str, int] = {}

    async def user(self, name: str, *, opted_out: bool = False) -> int:
        async with self.db.sessions.begin() as session:
            user = User(platform="telegram", platform_user_id=str(next(_ids)), display_name=name, opted_out=opted_out)
            session.add(user)
            await session.flush()
            self.users[name] = user.id
        return user.id

    async def say(
        self,
        chat: str,
        author: str | None,
        text: str,
        *,
        command: bool = False,
        reset: bool = False,
        version: int | None = None,
        at: datetime | None = None,
        kind: str = "group",
        platform: str = "telegram",
        reply_to: int | None = None,
        delivery: Delivery | None = None,
    ) -> int:
        """`author=None` is the bot; `/reset` is a command that also resets the context; `at` the time sent.

        `kind` and `platform` apply when the chat is first seen; a bot reply answers `reply_to` (a message id) and
        was `delivery` (None: logged before delivery was tracked).
        """
        async with self.db.sessions.begin() as session:
            if chat not in self.chats:
                row = Chat(platform=platform, platform_chat_id=chat, kind=kind)
                session.add(row)
                await session.flush()
                self.chats[chat] = row.id
            if author is not None and author not in self.users:
                user = User(platform="telegram", platform_user_id=str(next(_ids)), display_name=author)
                session.add(user)
                await session.flush()
                self.users[author] = user.id
            message = Message(
                chat_id=self.chats[chat],
                author_id=self.users[author] if author else None,
                role=Role.BOT if author is None else Role.USER,
                text=text,
                platform_message_id=str(next(_ids)),
                is_command=command or reset,
                resets_context=reset,
                model_version_id=version,
                reply_to_id=reply_to,
                delivery=delivery,
            )
            if at is not None:
                message.created_at = at
            session.add(message)
            await session.flush()
            return message.id

    async def version(self, status: VersionStatus) -> int:
        async with self.db.sessions.begin() as session:
            row = ModelVersion(name=f"v{next(_ids)}", path="/nowhere", status=status)
            session.add(row)
            await session.flush()
            return row.id
