"""Telegram's flood limits, as the fake Bot API (`tests/fake_telegram.py`) enforces them.

Telegram documents three budgets (core.telegram.org/bots/faq, "My bot is hitting limits"): about 30 messages a
second for the whole bot, one message a second in one chat ("we may allow short bursts that go over this limit"),
and 20 messages a minute in one group. Past a budget the Bot API refuses the call, without carrying it out, with

    {"ok": false, "error_code": 429, "description": "Too Many Requests: retry after N",
     "parameters": {"retry_after": N}}

where N is a whole number of seconds. Each budget here is a token bucket (`Budget`: `burst` calls at once, then
`rate` a second), the shape PTB's AIORateLimiter (aiolimiter's leaky bucket) paces with, so a client that keeps to
the documented rates never sees a 429 and one that floods does. What is charged where:

- the bot's budget: every call that names a chat (`chat_id`): sends, "typing…", edits — the calls AIORateLimiter
  paces; getUpdates, getMe and the other calls about the bot itself are free;
- a chat's budget: only the calls that post a message (`send*` but `sendChatAction`, copies and forwards), one
  bucket per private chat (positive ids) and one per group, supergroup or channel (negative ids or `@name`).

A refused call is not charged. Calls that a client paced correctly still reach the server bunched by the network
and the event loop, so a call is refused only when it came more than `JITTER_GRACE_S` too early (Telegram's own
"30 a second or so" has slack too; without it an exact AIORateLimiter draws 429s on a loaded machine).

The limiter is switchable per test (`FakeTelegram.flood = FloodControl(...)`, or `FloodLimits.UNLIMITED`), and
takes a clock, so a test can move time instead of waiting for it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

JITTER_GRACE_S = 0.5
"""How much too early a call may arrive before it is refused: the bunching of well-paced calls on the way."""
_MESSAGE_METHODS = frozenset({"copymessage", "copymessages", "forwardmessage", "forwardmessages"})


@dataclass(frozen=True)
class Budget:
    """A token bucket: up to `burst` calls at once, refilled at `rate` calls a second."""

    rate: float
    burst: float

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError(f"a budget needs rate > 0 and burst >= 1, not {self}")


@dataclass(frozen=True)
class FloodLimits:
    """The three budgets (None: that one is not enforced). The defaults are Telegram's documented rates; the
    private chat's burst of 3 is the fake's reading of "short bursts", which Telegram does not quantify."""

    per_bot: Budget | None = Budget(rate=30.0, burst=30.0)
    per_private_chat: Budget | None = Budget(rate=1.0, burst=3.0)
    per_group: Budget | None = Budget(rate=20 / 60, burst=20.0)

    UNLIMITED: ClassVar[FloodLimits]


FloodLimits.UNLIMITED = FloodLimits(per_bot=None, per_private_chat=None, per_group=None)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class FloodControl:
    """Decides, call by call, whether Telegram would refuse it for flooding, and charges the budgets it spends."""

    def __init__(
        self,
        limits: FloodLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        grace_s: float = JITTER_GRACE_S,
    ) -> None:
        self.limits = FloodLimits() if limits is None else limits
        self.grace_s = grace_s
        self.refused = 0
        """How many calls were refused with a 429."""
        self._clock = clock
        self._buckets: dict[tuple[str, Any], _Bucket] = {}

    def retry_after(self, method: str, params: dict[str, Any]) -> int | None:
        """None when the call may go ahead (its budgets are charged); else the whole seconds Telegram would ask
        the client to wait, as in its 429's `retry_after`."""
        chat = params.get("chat_id")
        if chat is None or chat == "":
            return None
        spends: list[tuple[tuple[str, Any], Budget | None]] = [(("bot", None), self.limits.per_bot)]
        if _posts_a_message(method):
            private = _is_private(chat)
            budget = self.limits.per_private_chat if private else self.limits.per_group
            spends.append((("chat", str(chat)), budget))
        now = self._clock()
        charged = [(self._bucket(key, budget, now), budget) for key, budget in spends if budget is not None]
        early = max((1 - bucket.tokens) / budget.rate for bucket, budget in charged) if charged else 0.0
        if early > self.grace_s:
            self.refused += 1
            return max(1, math.ceil(early))
        for bucket, _ in charged:
            bucket.tokens -= 1
        return None

    def _bucket(self, key: tuple[str, Any], budget: Budget, now: float) -> _Bucket:
        """The bucket for `key`, refilled up to now."""
        bucket = self._buckets.setdefault(key, _Bucket(budget.burst, now))
        bucket.tokens = min(budget.burst, bucket.tokens + (now - bucket.updated) * budget.rate)
        bucket.updated = now
        return bucket


def _posts_a_message(method: str) -> bool:
    name = method.lower()
    return (name.startswith("send") and name != "sendchataction") or name in _MESSAGE_METHODS


def _is_private(chat: Any) -> bool:
    """Telegram's ids: a private chat's is its person's (positive); groups and channels are negative, and a
    channel may be named `@name`."""
    try:
        return int(chat) > 0
    except (TypeError, ValueError):
        return False
