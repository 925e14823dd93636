"""The seam between the chat service and the trainer.

The service calls a `Retrainer`; the implementation lives in `trainer/` and is injected by the composition root
(`bot/cli.py`), so `core` never imports `trainer`.
"""

from __future__ import annotations

from typing import Protocol


class Retrainer(Protocol):
    """Starts training runs and switches model versions on request."""

    async def request(self, *, triggered_by: str, notify_platform: str | None, notify_chat_id: str | None) -> str:
        """Starts a run in the background unless one is running or cooling down; returns what to tell the
        requester right away. Progress and the outcome go to the notify chat, if given."""
        ...

    async def rollback(self, *, version: str | None, triggered_by: str) -> str:
        """Activates `version` (by name), or the previous active version, and hot-swaps the engine to it."""
        ...

    async def list_versions(self) -> str:
        """A short human-readable list of model versions and their status and metrics."""
        ...
