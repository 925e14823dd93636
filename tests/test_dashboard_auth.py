"""Guessing the dashboard's token, over real HTTP: wrong tokens are throttled per client address (429 with
Retry-After, waits that grow), logged without the token; a guessable DASHBOARD_TOKEN stops the start; and nobody's
form is read before they are known."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from bot.web.dashboard import build_dashboard_app
from bot.web.dashboard_auth import FREE_FAILURES, MAX_LOCKOUT, Throttle
from bot.web.dashboard_plots import PLOTS
from core.errors import ConfigError
from core.serving.model_serving import ModelServing
from core.settings import load_settings, token_strength_bits
from core.storage.db import Database
from tests.dashboard_support import NOW, PREFIX, TOKEN, dashboard_settings, serve

WRONG = "wrong-token-of-some-length"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def base_url(tmp_path: Path, clock: Clock) -> AsyncIterator[str]:
    """The dashboard on an ephemeral port, with a clock the test moves (no database is read by these requests)."""
    settings = dashboard_settings(tmp_path, "sqlite+aiosqlite://")
    db = Database.connect(settings.database_url)
    app = build_dashboard_app(settings=settings, db=db, serving=ModelServing(settings=settings, db=db),
                              retrainer=None, clock=clock)  # fmt: skip
    try:
        async with serve(app) as url:
            yield url
    finally:
        await db.close()


async def _login(http: aiohttp.ClientSession, base_url: str, token: str) -> tuple[int, str | None]:
    async with http.post(f"{base_url}/login", data={"token": token}, allow_redirects=False) as response:
        return response.status, response.headers.get("Retry-After")


async def _bearer(http: aiohttp.ClientSession, base_url: str, token: str) -> tuple[int, str | None]:
    headers = {"Authorization": f"Bearer {token}"}
    async with http.get(f"{base_url}/plots/{next(iter(PLOTS))}.svg", headers=headers) as response:
        return response.status, response.headers.get("Retry-After")


async def test_wrong_tokens_are_throttled_per_address_with_growing_waits(
    base_url: str, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bot.web.dashboard_auth")
    async with aiohttp.ClientSession() as http:
        for _ in range(FREE_FAILURES - 1):
            assert await _login(http, base_url, WRONG) == (403, None)
        assert await _bearer(http, base_url, WRONG) == (401, None), "a bearer guess counts the same"
        assert await _login(http, base_url, WRONG) == (429, "1"), "the address must wait now"
        assert await _login(http, base_url, TOKEN) == (429, "1"), "while it waits, not even the token is compared"
        assert await _bearer(http, base_url, TOKEN) == (429, "1")
        clock.now += timedelta(seconds=1)
        assert await _bearer(http, base_url, WRONG) == (401, None)
        assert await _login(http, base_url, WRONG) == (429, "2"), "each wrong token doubles the wait"
        clock.now += timedelta(seconds=2)
        assert await _login(http, base_url, WRONG) == (403, None)
        assert await _bearer(http, base_url, WRONG) == (429, "4")
        clock.now += timedelta(seconds=4)
        assert await _login(http, base_url, TOKEN) == (303, None), "the right token, once the wait is over"
        assert await _login(http, base_url, WRONG) == (403, None), "and the count starts again"
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == FREE_FAILURES + 2 + 1, "every wrong token, not the refused ones"
    assert all("127.0.0.1" in line for line in lines) and "must wait 4 s" in lines[-2]
    assert not [line for line in lines if WRONG in line or TOKEN in line], "never a token in the log"


def test_the_wait_is_capped_and_forgotten_after_an_hour_without_a_wrong_token() -> None:
    clock = Clock()
    throttle = Throttle(clock=clock)
    for _ in range(FREE_FAILURES + 30):
        throttle.failed("203.0.113.7", "bearer token")
    assert throttle.retry_after("203.0.113.7") == MAX_LOCKOUT.total_seconds()
    assert throttle.retry_after("198.51.100.1") is None, "other addresses are not held up"
    clock.now += timedelta(hours=1)
    throttle.failed("203.0.113.7", "bearer token")
    assert throttle.retry_after("203.0.113.7") is None, "counted from one again"


@pytest.mark.parametrize("token", ["aaaaaaaaaaaaaaaa", "abababababababab", "1111111122222222"])
def test_a_guessable_token_stops_the_start_with_one_line(
    token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no developer .env
    monkeypatch.setenv("DASHBOARD_TOKEN", token)
    with pytest.raises(ConfigError, match="DASHBOARD_TOKEN: is too easy to guess") as refused:
        load_settings()
    assert "\n" not in str(refused.value) and token not in str(refused.value)


@pytest.mark.parametrize(
    "token", [TOKEN, "3zzh5-rsEGkvR4z-OExtw30hNdEBWD00", "3daf1f077752a58c67fa4d9d9b503308", "tr7JiWVoK-WjHVkw"]
)
def test_tokens_of_real_randomness_are_accepted(token: str) -> None:
    assert token_strength_bits(token) >= 64


async def _status_of_head_only(base_url: str, path: str, length: int, headers: str = "") -> bytes:
    """Sends a POST's head announcing a `length`-byte form, and none of the body: returns the answer's status line,
    which can only come if the server decided without reading the form."""
    host, _, port = base_url.removeprefix("http://").partition("/")[0].partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST {PREFIX}{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {length}\r\n{headers}\r\n".encode()
        )
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 20.0)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_no_form_is_read_before_its_sender_is_known(base_url: str) -> None:
    """A 900 KB form to /retrain or /rollback without credentials is refused on its head alone; the login form,
    the one read before anyone is known, is refused unread when it is longer than a token needs."""
    for path in ("/retrain", "/rollback", "/logout"):
        assert await _status_of_head_only(base_url, path, 900_000) == b"HTTP/1.1 401 Unauthorized\r\n"
    wrong = f"Authorization: Bearer {WRONG}\r\n"
    assert await _status_of_head_only(base_url, "/retrain", 900_000, wrong) == b"HTTP/1.1 401 Unauthorized\r\n"
    assert await _status_of_head_only(base_url, "/login", 900_000) == b"HTTP/1.1 413 Request Entity Too Large\r\n"
