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
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import SecretStr

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
