"""The seams between the serving side and the trainer.

The service calls a `Retrainer` to start a run; the implementation lives in `trainer/` and is injected by the
composition root (`bot/cli.py`), so `core` never imports `trainer`. The other way round, the trainer's orchestrator
tells the serving side that a run promoted a version through a `ServingFollower` (`core.serving.ModelServing`),
so `trainer` never imports the engine. Both return typed results (`core.outcomes`), worded by `core.texts`.
"""

from __future__ import annotations

from typing import Protocol

from core.outcomes import RunRequest, SwapOutcome


class Retrainer(Protocol):
    """Starts training runs on request."""

    async def request(
        self, *, triggered_by: str, notify_platform: str | None, notify_chat_id: str | None
    ) -> RunRequest:
        """Starts a run in the background unless one is running or cooling down. Progress and the outcome go to
        the notify chat, if given."""
        ...


class ServingFollower(Protocol):
    """The serving side, as the trainer sees it: told when the registry's active version changed."""

    async def follow_active(self) -> SwapOutcome:
        """Brings the engine to the active version; says whether it serves it now."""
        ...
