"""When a platform may tell its server that a message arrived: once the message is settled.

A platform whose server delivers again what was not confirmed (Telegram's getUpdates offset) must confirm a
message only once Magpie can no longer lose it: when it is in the log, known to be there already, or given up on
(its author was asked to send it again). The adapter wraps the handling of each event in `when_settled(callback)`;
the chat service calls `message_settled()` at that moment (`core.chat.service`), before the answer is made. A
`ContextVar` carries the callback, so the `ChatHandler` interface stays as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_on_settled: ContextVar[Callable[[], None] | None] = ContextVar("magpie_on_settled", default=None)


@contextmanager
def when_settled(callback: Callable[[], None]) -> Iterator[None]:
    """Calls `callback` once the message handled in this context is settled: in the log, known to be there already,
    or given up on (its author was asked to send it again). A platform that confirms receipt to its server (Telegram's
    getUpdates offset) confirms only settled messages, so an outage of the database loses none."""
    token = _on_settled.set(callback)
    try:
        yield
    finally:
        _on_settled.reset(token)


def message_settled() -> None:
    """The message handled in this context is settled: calls the adapter's callback, if it gave one."""
    callback = _on_settled.get()
    if callback is not None:
        callback()
