"""The one interface every platform backend (console, Telegram, Discord) implements.

A backend owns its platform's connection: it translates native events into `core.messages.IncomingMessage` in one
place, hands them to the `ChatHandler`, and sends replies through its own send path. The composition root
(`bot/cli.py`) starts every configured backend and stops them all on shutdown.
"""

from __future__ import annotations

from typing import Protocol


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
