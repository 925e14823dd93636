"""Structured logs: a correlation id per incoming message, and a JSON formatter (LOG_FORMAT=json).

A message's correlation id is set once, where the conversation loop takes the message (`bot.backend`), in a
`ContextVar`: every log record made while that message is handled (the service, the send, "typing…") carries it,
because asyncio copies the context into the tasks it starts. The engine's worker thread does not share that
context, so each queued request carries the id it was submitted with, and the worker logs a batch with the ids of
its rows (`correlation_ids`). Configuring handlers is the entry point's job (`bot/cli.py`, the trainer's
process); this module only supplies the pieces.

Secrets: `RedactSecrets`, on every handler of a Magpie process (the bot's, a worker's, a trainer's), replaces each
of `secret_values` that still made it into a record: the tokens, the broker's URL, and the passwords inside
DATABASE_URL, REDIS_URL and CELERY_BROKER_URL (as written and URL-decoded: a library may print either). The
formatter writes the message and traceback as the filters left them and no other attribute of the record, so
nothing a library attaches to a record (a request, a URL with a token in it) reaches the log by way of JSON.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from core.settings import Settings

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


MIN_SECRET_LENGTH = 6
"""Shorter strings are not redacted: replacing every "abc" in a log would hide more than it protects."""


class RedactSecrets(logging.Filter):
    """Last line of defence: replaces any configured secret that still made it into a log record."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self._secrets = sorted({secret for secret in secrets if len(secret) >= MIN_SECRET_LENGTH}, key=len)[::-1]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = message
        for secret in self._secrets:
            redacted = redacted.replace(secret, "[redacted]")
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            for secret in self._secrets:
                record.exc_text = record.exc_text.replace(secret, "[redacted]")
        return True


def secret_values(settings: Settings) -> list[str]:
    """Every secret of `settings` as it could appear in a log line: the secret settings, and the password inside
    each URL that may carry one (as written, and URL-decoded)."""
    secrets = [
        secret.get_secret_value()
        for secret in (
            settings.telegram_bot_token,
            settings.discord_bot_token,
            settings.telegram_webhook_secret,
            settings.dashboard_token,
            settings.celery_broker_url,
        )
        if secret is not None
    ]
    broker = settings.celery_broker_url.get_secret_value() if settings.celery_broker_url is not None else None
    for url in (settings.database_url, settings.redis_url, broker):
        password = _password(url)
        if password:
            secrets += [password, unquote(password)]
    return secrets


def _password(url: str | None) -> str | None:
    if not url:
        return None
    try:
        return urlsplit(url).password
    except ValueError:  # not a URL urllib can read (a port that is not a number): nothing to find in it
        return None
