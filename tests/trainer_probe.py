"""`python -m tests.trainer_probe --run-id N`: the real training program up to the run itself, which it replaces by
a report of what the trainer holds: each secret setting's value and the process environment, as one JSON line.

Tests start it through `trainer.process.spawn_trainer` (the bot's own way of starting a trainer), in a working
directory whose `.env` holds secrets, to show that none reaches the trainer."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from pydantic import SecretStr

from core.settings import Settings
from core.storage.models import RunStatus
from trainer import retrain


async def _report(settings: Settings, run_id: int, **_: Any) -> RunStatus:
    secrets = {
        name: value.get_secret_value()
        for name in type(settings).model_fields
        if isinstance(value := getattr(settings, name), SecretStr)
    }
    print(json.dumps({"event": "probe", "secrets": secrets, "environ": dict(os.environ)}), flush=True)
    return RunStatus.PROMOTED


if __name__ == "__main__":
    retrain.retrain = _report  # type: ignore[assignment]
    sys.exit(retrain.main(sys.argv[1:]))
