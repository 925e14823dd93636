"""`python -m tests.celery_worker`: `magpie worker`, but each run is `tests.paused_retrain` (the real training
program, paused before it records), so a test can kill the worker at an exact moment of a run."""

from __future__ import annotations

import logging
import sys

from core.settings import load_settings
from trainer.worker import run_worker

if __name__ == "__main__":
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, stream=sys.stderr)
    run_worker(settings, trainer_module="tests.paused_retrain")
