"""A base for the tests' own `ChatHandler`s: the log-maintenance events (edits, deletions, chat migrations) that an
adapter test does not look at are accepted and ignored."""

from __future__ import annotations

from core.messages import Arrival, Reply


class IgnoresLogEvents:
    async def message_edited(self, platform: str, chat_id: str, message_id: str, text: str | None) -> None:
        return None

    async def message_deleted(self, platform: str, chat_id: str, message_id: str) -> None:
        return None

    async def migrate_chat(self, platform: str, old_chat_id: str, new_chat_id: str) -> None:
        return None

    async def joined(self, arrival: Arrival) -> Reply | None:
        return None
