"""Who may use the dashboard: DASHBOARD_TOKEN, a login session in a cookie, and a CSRF token per session.

Two ways in:
- a browser posts the token once to the login form and gets a random session id in a cookie that is `HttpOnly`
  (no script reads it), `SameSite=Strict` (no other site's page sends it along) and `Secure` over HTTPS. Every form
  that changes something (retrain, rollback, log out) also carries the session's CSRF token, checked in constant
  time: a request that did not come from the dashboard's own page is refused even if a browser did send the cookie;
- a script sends `Authorization: Bearer <token>`. Browsers never add that header by themselves, so such a request
  cannot be forged across sites and needs no CSRF token.

Sessions live in memory (a restart logs everyone out) and expire after SESSION_TTL. The token itself is never
stored in the cookie, logged or echoed.

Guessing is throttled per client address (`Throttle`): after FREE_FAILURES wrong tokens (by the form or as a bearer
token) the address must wait, 1 s after the next, then 2 s, 4 s... up to MAX_LOCKOUT; while it waits, every token
it offers is answered 429 with Retry-After and not even compared. Behind a reverse proxy every client has the
proxy's address, so the throttle is then one for all clients: an attack locks the operator out too, for as long as
it lasts (docs/security.md).
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import SecretStr

log = logging.getLogger(__name__)

COOKIE = "magpie_dashboard"
SESSION_TTL = timedelta(hours=12)
MAX_SESSIONS = 64
"""Logins beyond this push out the oldest session: a memory bound, not a security one."""


@dataclass
class Session:
    csrf: str
    expires_at: datetime
    notice: str | None = None
    """What the last action said, shown once on the page it redirects to (post/redirect/get)."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Sessions:
    """The dashboard's login sessions and the check of the token."""

    def __init__(self, token: SecretStr, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._token = token.get_secret_value().encode()
        self._clock = clock
        self._open: dict[str, Session] = {}

    def token_matches(self, offered: str) -> bool:
        """Constant-time comparison, so the time taken says nothing about how much of a guess was right."""
        return hmac.compare_digest(offered.strip().encode(), self._token)

    def bearer_matches(self, authorization: str | None) -> bool:
        scheme, _, credentials = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and bool(credentials) and self.token_matches(credentials)

    def open(self) -> tuple[str, Session]:
        """A new session (after a correct token): its id for the cookie, and the session with its CSRF token."""
        self._drop_expired()
        while len(self._open) >= MAX_SESSIONS:
            del self._open[next(iter(self._open))]
        session_id = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(32), expires_at=self._clock() + SESSION_TTL)
        self._open[session_id] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._open.get(session_id)
        if session is None or session.expires_at <= self._clock():
            self._open.pop(session_id, None)
            return None
        return session

    def close(self, session_id: str | None) -> None:
        if session_id:
            self._open.pop(session_id, None)

    def _drop_expired(self) -> None:
        now = self._clock()
        for session_id in [key for key, session in self._open.items() if session.expires_at <= now]:
            del self._open[session_id]


def csrf_matches(session: Session, offered: object) -> bool:
    return isinstance(offered, str) and hmac.compare_digest(offered.encode(), session.csrf.encode())


FREE_FAILURES = 5
"""Wrong tokens an address may offer before it has to wait: a typo or two, a token pasted with a space."""
MAX_LOCKOUT = timedelta(minutes=15)
"""The longest wait: at most ~100 guesses a day from one address, and the operator's own typos cost minutes."""
FORGET_AFTER = timedelta(hours=1)
"""An address with no wrong token for this long starts again from FREE_FAILURES."""
MAX_ADDRESSES = 10_000
"""Addresses remembered at once (the oldest go first): a memory bound against a scan from many addresses."""


@dataclass
class _Failures:
    count: int
    last: datetime
    locked_until: datetime


class Throttle:
    """Wrong tokens per client address, and how long each address must wait before it may offer another."""

    def __init__(self, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._clock = clock
        self._addresses: dict[str, _Failures] = {}

    def retry_after(self, address: str) -> int | None:
        """Whole seconds `address` must still wait before a token it offers is checked, or None."""
        failures = self._addresses.get(address)
        now = self._clock()
        if failures is None or failures.locked_until <= now:
            return None
        return max(1, math.ceil((failures.locked_until - now).total_seconds()))

    def failed(self, address: str, what: str) -> None:
        """Counts a wrong token (`what`: how it came) from `address`, and logs it (never the token)."""
        now = self._clock()
        failures = self._addresses.pop(address, None)
        if failures is None or now - failures.last >= FORGET_AFTER:
            failures = _Failures(0, now, now)
        failures.count += 1
        failures.last = now
        beyond = failures.count - FREE_FAILURES
        if beyond >= 0:
            failures.locked_until = now + min(timedelta(seconds=2**beyond), MAX_LOCKOUT)
        self._addresses[address] = failures  # the most recent last: the oldest go first
        while len(self._addresses) > MAX_ADDRESSES:
            del self._addresses[next(iter(self._addresses))]
        wait = self.retry_after(address)
        log.warning(
            "dashboard: a wrong %s from %s (%d in a row)%s",
            what, address, failures.count, f"; it must wait {wait} s before the next" if wait else "",
        )  # fmt: skip

    def succeeded(self, address: str) -> None:
        """The right token: the address's count starts again."""
        self._addresses.pop(address, None)
