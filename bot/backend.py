"""The one interface every platform backend (console, Telegram, Discord) implements.

A backend owns its platform's connection: it translates native events into `core.messages.IncomingMessage` in one
place, hands them to the `ChatHandler`, and sends replies through its own send path. The composition root
(`bot/cli.py`) starts every configured backend and stops them all on shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from core.messages import Reply

log = logging.getLogger(__name__)


class Backend(Protocol):
    """A running connection to one chat platform."""

    platform: str

    async def start(self) -> None:
        """Connects and begins receiving messages; returns once it is running (does not block until stop)."""
        ...

    async def stop(self) -> None:
        """Stops receiving, lets in-flight replies finish or cancels them, and disconnects."""
        ...

    async def notify(self, chat_id: str, text: str) -> None:
        """Sends unsolicited text (e.g. retraining progress) to a chat; logs and swallows delivery failures."""
        ...

    async def deliver_reply(self, chat_id: str, reply: Reply, *, parts_sent: int = 0) -> None:
        """Delivers a reply that crash recovery found unsent into a chat by id, from the part after `parts_sent`,
        and reports the outcome to the core like any reply; only called once the backend has started."""
        ...


class BackendNotifier:
    """Routes `core.messages.Notifier` calls to the running backend of the named platform."""

    def __init__(self, backends: Sequence[Backend] = ()) -> None:
        self._by_platform = {backend.platform: backend for backend in backends}

    def attach(self, backends: Sequence[Backend]) -> None:
        """Backends are built after the services that notify through them; they are attached once running."""
        self._by_platform = {backend.platform: backend for backend in backends}

    async def notify(self, platform: str, chat_id: str, text: str) -> None:
        backend = self._by_platform.get(platform)
        if backend is None:
            log.warning("Cannot notify chat %s: platform %r is not running", chat_id, platform)
            return
        await backend.notify(chat_id, text)
