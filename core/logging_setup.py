"""Structured logs: a correlation id per incoming message, and a JSON formatter (LOG_FORMAT=json).

A message's correlation id is set once, where the conversation loop takes the message (`bot.backend`), in a
`ContextVar`: every log record made while that message is handled (the service, the send, "typing…") carries it,
because asyncio copies the context into the tasks it starts. The engine's worker thread does not share that
context, so each queued request carries the id it was submitted with, and the worker logs a batch with the ids of
its rows (`correlation_ids`). Configuring handlers is the entry point's job (`bot/cli.py`, the trainer's
process); this module only supplies the pieces.

Secrets: the formatter writes the message and traceback as the handler's filters left them (the CLI's
`RedactSecrets` runs first) and no other attribute of the record, so nothing a library attaches to a record
(a request, a URL with a token in it) reaches the log by way of JSON.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

_correlation_id: ContextVar[str | None] = ContextVar("magpie_correlation_id", default=None)

_FIELDS = ("correlation_id", "correlation_ids")
"""The record attributes the JSON line carries besides time, level, logger and message."""


def current_correlation_id() -> str | None:
    """The id of the message being handled in this context, if any."""
    return _correlation_id.get()


@contextmanager
def correlated(correlation_id: str | None = None) -> Iterator[str]:
    """Everything logged inside (and in the tasks started inside) carries `correlation_id` (a new one if None)."""
    value = correlation_id or uuid.uuid4().hex[:16]
    token = _correlation_id.set(value)
    try:
        yield value
    finally:
        _correlation_id.reset(token)


class CorrelationFilter(logging.Filter):
    """Stamps each record with the correlation id of its context (unless the call passed one in `extra`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "correlation_id"):
            record.correlation_id = _correlation_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the correlation id(s), and the
    traceback as `exc`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def log_formatter(log_format: str) -> logging.Formatter:
    """The formatter LOG_FORMAT names: `json`, or the plain text line Magpie has always written."""
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
