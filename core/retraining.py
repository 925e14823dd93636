"""The seams between the serving side and the trainer.

The service calls a `Retrainer` to start a run; the implementation lives in `trainer/` and is injected by the
composition root (`bot/cli.py`), so `core` never imports `trainer`. The other way round, the trainer's orchestrator
tells the serving side that a run promoted a version through a `ServingFollower`
(`core.serving.model_serving.ModelServing`), so `trainer` never imports the engine. Both return typed results
(`core.outcomes`), worded by `core.texts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from core.outcomes import RunRequest, SwapOutcome, VoicesQueued


class Retrainer(Protocol):
    """Starts training runs on request."""

    async def request(
        self,
        *,
        triggered_by: str,
        notify_platform: str | None,
        notify_chat_id: str | None,
        community: str | None = None,
    ) -> RunRequest:
        """Starts a run of the voice `community` (None: the shared voice; with VOICE_SCOPE=community, every
        community with enough new data, one after another) in the background unless one is running or cooling
        down. Progress and the outcome go to the notify chat, if given."""
        ...

    async def retrain_voices(
        self, communities: Sequence[str | None], *, triggered_by: str, notify: tuple[str, str] | None = None
    ) -> VoicesQueued:
        """Queues a run of each voice (None: the shared voice), carried out one after another after the run in
        progress, whatever the cooldown (an erasure must reach the model)."""
        ...


class ServingFollower(Protocol):
    """The serving side, as the trainer sees it: told when the registry's active version changed."""

    async def follow_active(self) -> SwapOutcome:
        """Brings the engine to the active version; says whether it serves it now."""
        ...
