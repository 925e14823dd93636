"""What a training run says while it runs: progress to the caller, the Trainer's losses to `logging` rather than
stdout, and none of transformers' false alarms or progress bars in the bot's log (a training process's stderr ends
up there)."""

from __future__ import annotations

import ast
import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import transformers
from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from core.ops.logging_setup import CorrelationFilter, RedactSecrets, log_formatter

log = logging.getLogger("trainer.train")

ProgressFn = Callable[[float], None]
"""Called with the fraction of training done (0..1)."""


_MISSING_KEYS = "There were missing keys in the checkpoint model loaded: "
_NO_LOSS_TYPE = "`loss_type=None` was set in the config but it is unrecognized."


class HideFalseAlarms(logging.Filter):
    """Drops two transformers warnings that are wrong about GPT-2: the Trainer's "missing keys" when every key it
    names is a tied parameter, and "loss_type=None … unrecognized" (GPT-2 names no loss type; transformers then uses
    the causal-LM loss, which is the right one. Setting it instead would change how the Trainer counts tokens per
    batch, and with it the training dynamics)."""

    def __init__(self, tied: set[str]) -> None:
        super().__init__()
        self._tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_NO_LOSS_TYPE):
            return False
        if not message.startswith(_MISSING_KEYS):
            return True
        try:
            missing = set(ast.literal_eval(message.removeprefix(_MISSING_KEYS).rstrip(".")))
        except (ValueError, SyntaxError):
            return True
        return not missing <= self._tied


@contextlib.contextmanager
def false_alarms_hidden(model: PreTrainedModel) -> Iterator[None]:
    """Keeps `HideFalseAlarms`' two warnings out of the logs while the Trainer runs. Reloading the best checkpoint,
    it reports GPT-2's output weights as missing, though they are tied to the input embedding (saved once, restored
    through the tie; transformers looks for the tie under an attribute GPT-2 no longer sets). Any other missing key
    still shows."""
    first_name: dict[int, str] = {}
    tied = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if first_name.setdefault(id(parameter), name) != name:
            tied.add(name)
    notice = HideFalseAlarms(tied)
    loggers = [logging.getLogger(name) for name in ("transformers.trainer", "transformers.modeling_utils")]
    for logger in loggers:
        logger.addFilter(notice)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(notice)


class ReportProgress(TrainerCallback):
    """Forwards the fraction of optimizer steps done, at most once per percent."""

    def __init__(self, report: ProgressFn) -> None:
        self.report = report
        self.last = 0.0

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        if state.max_steps:
            fraction = min(1.0, state.global_step / state.max_steps)
            if fraction - self.last >= 0.01:
                self.last = fraction
                self.report(fraction)


class LogToLogger(TrainerCallback):
    """The Trainer's periodic losses, to `logging` instead of stdout."""

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        if logs:
            log.info("step %d/%d: %s", state.global_step, state.max_steps, json.dumps(logs))


def configure_process_logging(level: str, log_format: str = "text", secrets: Sequence[str] = ()) -> None:
    """Logging for a training process (its stderr ends up in the bot's log): lines in the bot's LOG_FORMAT, with
    `secrets` (the database's password) redacted, and none of the progress bars transformers draws for every save
    and load ("Writing model shards", "Loading weights")."""
    handler = logging.StreamHandler()
    handler.setFormatter(log_formatter(log_format))
    handler.addFilter(RedactSecrets(secrets))
    handler.addFilter(CorrelationFilter())
    logging.basicConfig(level=level, handlers=[handler])
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
