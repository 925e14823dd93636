"""The operator's dashboard over real HTTP: the token, the login session and its CSRF token, what the page shows,
the plots, and the retrain and rollback buttons going through the same paths as the chat commands."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
from pydantic import SecretStr

from bot.web.dashboard_auth import SESSION_TTL, Sessions
from bot.web.http_server import HttpServer, build_http_app
from core.errors import ConfigError
from core.ops.dashboard_data import load_overview, percentile
from core.ops.health import HealthCheck
from core.ops.telemetry import Telemetry
from core.serving.engine import Engine
from core.serving.model_serving import ModelServing
from core.settings import Settings, load_settings
from core.storage.db import Database
from core.storage.models import RunStatus, TrainingRun
from core.storage.versions import get_active_version, get_version
from tests.dashboard_support import (
    CURVE,
    EXCLUDED,
    GATES,
    MESSAGES_PER_DAY,
    NOW,
    PREFIX,
    REPLIES,
    REPLY_CHAT,
    TOKEN,
    VERSIONS,
    dashboard_app,
    dashboard_settings,
    reply_chat_per_day,
    seed_history,
    serve,
)
from tests.run_rows import new_run
from trainer.orchestrator import TrainingOrchestrator

BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return dashboard_settings(tmp_path, database_url)


@pytest.fixture
async def base_url(db: Database, settings: Settings, tiny_model_dir: Path) -> AsyncIterator[str]:
    """The dashboard on an ephemeral port, over a history (v5 active), with the real orchestrator as retrainer."""
    await seed_history(db, tiny_model_dir)
    serving = ModelServing(settings=settings, db=db)
    retrainer = TrainingOrchestrator(settings=settings, db=db, clock=lambda: NOW)
    async with serve(dashboard_app(settings, db, serving, retrainer)) as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # unsafe: the jar keeps cookies for an IP address (127.0.0.1), which the default jar does not
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def _login(http: aiohttp.ClientSession, base_url: str) -> str:
    """Logs in through the form; returns the CSRF token the page's forms carry."""
    async with http.post(f"{base_url}/login", data={"token": TOKEN}) as response:
        assert response.status == 200 and response.url.path == f"{PREFIX}/"
        page = await response.text()
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match is not None
    return match.group(1)


async def _active(db: Database) -> str | None:
    async with db.sessions() as session:
        active = await get_active_version(session)
    return active.name if active is not None else None


def test_without_a_token_there_is_no_dashboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no developer .env
    monkeypatch.setenv("DASHBOARD_TOKEN", "")
    assert load_settings().dashboard_token is None
    monkeypatch.setenv("DASHBOARD_TOKEN", "short")
    with pytest.raises(ConfigError, match="DASHBOARD_TOKEN: must be at least 16 characters"):
        load_settings()
    settings = dashboard_settings(tmp_path, "sqlite+aiosqlite://", dashboard_token=None)
    db = Database.connect("sqlite+aiosqlite://")
    with pytest.raises(ConfigError, match="DASHBOARD_TOKEN is not set"):
        dashboard_app(settings, db, ModelServing(settings=settings, db=db))


async def test_without_the_token_nothing_is_shown_or_done(
    base_url: str, http: aiohttp.ClientSession, db: Database
) -> None:
    async with http.get(f"{base_url}/") as response:
        assert response.status == 401
        page = await response.text()
    assert 'name="token"' in page and "v5" not in page, "a login form, and nothing of the bot"
    assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    async with http.get(f"{base_url}/plots/eval-loss.svg") as response:
        assert response.status == 401
    async with http.post(f"{base_url}/rollback", data={"csrf": "x"}) as response:
        assert response.status == 401
    async with http.post(f"{base_url}/rollback", headers={"Authorization": "Bearer wrong-token-of-some-length"}) as r:
        assert r.status == 401
    async with http.post(f"{base_url}/login", data={"token": "wrong-token-of-some-length"}) as response:
        assert response.status == 403
        assert "That is not the dashboard token." in await response.text()
        assert "magpie_dashboard" not in response.cookies
    assert await _active(db) == "v5"


async def test_the_page_shows_versions_plots_and_what_the_data_left_out(
    base_url: str, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{base_url}/login", data={"token": TOKEN}, allow_redirects=False) as response:
        assert response.status == 303
        cookie = response.cookies["magpie_dashboard"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == f"{PREFIX}/"
    assert TOKEN not in cookie.value, "the cookie holds a session id, never the token"
    assert not cookie["secure"], "plain HTTP on 127.0.0.1: a Secure cookie would never come back"
    behind_proxy = {"X-Forwarded-Proto": "https"}
    async with (
        aiohttp.ClientSession() as other_browser,
        other_browser.post(
            f"{base_url}/login", data={"token": TOKEN}, headers=behind_proxy, allow_redirects=False
        ) as r,
    ):
        assert r.cookies["magpie_dashboard"]["secure"], "HTTPS at the proxy: the cookie never travels in clear"
    async with http.get(f"{base_url}/") as response:
        assert response.status == 200
        page = await response.text()
    assert re.search(r'id="active-version">v5<', page)
    assert "3.050" in page and "21.1" in page, "v5's eval loss and perplexity"
    for name, loss, _ in VERSIONS:
        assert re.search(rf'id="version-{name}">\s*<td>{name}</td>.*?<td class="num">{loss:.3f}</td>', page, re.S)
    for reason, count in EXCLUDED.items():
        assert re.search(rf'id="excluded-{reason}"><td>[^<]+</td><td class="num">{count}<', page)
    buttons = set(re.findall(r'id="rollback-(v\d)"', page))
    assert buttons == {"v1", "v2", "v4"}, "back only to versions that served well (not rolled back, not rejected)"
    visible = re.sub(r"<[^>]+>", " ", page.split("<body>", 1)[1])
    assert not re.findall(r"\b[a-z]+(?:_[a-z]+)+\b", visible), "no raw keys (rolled_back, user_share_cap, …)"
    assert "`" not in visible and "rolled back" in visible
    assert "over one person&#39;s share of the data (TRAIN_USER_SHARE_CAP)" in page
    assert "compare the two points of one run, not points of different runs" in page
    assert re.search(r'id="replies-summary">\d+ replies by the model in the last 7 days; from message to reply', page)
    for plot in ("gate", "loss-curve", "messages", "replies", "latency"):
        async with http.get(f"{base_url}/plots/{plot}.svg") as response:
            assert response.status == 200 and response.content_type == "image/svg+xml"
            assert b"<svg" in await response.read()
    async with http.get(f"{base_url}/plots/nope.svg") as response:
        assert response.status == 404


async def test_a_form_without_the_sessions_csrf_token_is_refused(
    base_url: str, http: aiohttp.ClientSession, db: Database
) -> None:
    """A forged form (another site's page posting to the dashboard with the operator's cookie) lacks the token."""
    csrf = await _login(http, base_url)
    for forged in ({}, {"csrf": "guessed"}, {"csrf": csrf[:-1]}):
        async with http.post(f"{base_url}/rollback", data=forged) as response:
            assert response.status == 403
    async with http.post(f"{base_url}/retrain", data={}) as response:
        assert response.status == 403
    assert await _active(db) == "v5"

    async with http.post(f"{base_url}/logout", data={"csrf": csrf}) as response:
        assert response.status == 401, "logged out: back to the login form"
    async with http.post(f"{base_url}/rollback", data={"csrf": csrf}) as response:
        assert response.status == 401, "the session is gone, and its CSRF token with it"
    assert await _active(db) == "v5"


async def test_rollback_switches_the_active_version_and_says_so(
    base_url: str, http: aiohttp.ClientSession, db: Database
) -> None:
    csrf = await _login(http, base_url)
    async with http.post(f"{base_url}/rollback", data={"csrf": csrf}) as response:
        assert response.status == 200 and response.url.path == f"{PREFIX}/", "post/redirect/get"
        page = await response.text()
    assert "Switched to v4. v5 is marked rolled back; its replies will not be used for training." in page
    assert await _active(db) == "v4"
    async with http.get(f"{base_url}/") as response:
        assert "Switched to v4" not in await response.text(), "the notice is shown once"

    # A script with the bearer token needs no CSRF token (browsers never send that header by themselves).
    async with http.post(f"{base_url}/rollback", data={"version": "v1"}, headers=BEARER) as response:
        assert response.status == 200
        assert (await response.text()).startswith("Switched to v1. v4 is marked rolled back")
    assert await _active(db) == "v1"


async def test_retrain_goes_through_the_orchestrator(base_url: str, http: aiohttp.ClientSession, db: Database) -> None:
    """The seeded run finished a day ago; one that finished 5 minutes ago makes the orchestrator refuse (cooldown),
    and the page says so in the words `/retrain` uses, without starting a training process."""
    async with db.sessions.begin() as session:
        session.add(
            TrainingRun(
                status=RunStatus.FAILED,
                triggered_by="test",
                started_at=NOW - timedelta(minutes=6),
                finished_at=NOW - timedelta(minutes=5),
            )
        )
    async with http.post(f"{base_url}/retrain", headers=BEARER) as response:
        assert response.status == 429, "a script tells a refusal from success by the status"
        assert response.headers["Retry-After"] == str(25 * 60)
        assert await response.text() == (
            "The last training run finished less than 30 minutes ago (RETRAIN_COOLDOWN_MINUTES). Try again in 25 min."
        )


async def test_a_script_reads_each_refusal_from_the_status_code(
    base_url: str, http: aiohttp.ClientSession, db: Database
) -> None:
    """The script API (bearer token) answers refusals with the status a script expects, in the same words as the
    chat: 404 for a version that is not there (unknown, or its files pruned), 409 for a rollback refused as things
    stand and for a run already going; the browser's form still goes back to the page."""
    async with db.sessions.begin() as session:
        (await get_version(session, name="v1")).pruned_at = NOW  # type: ignore[union-attr]
    cases = {
        "v9": (404, 'I don\'t know a model version called "v9". /models lists them.'),
        "v1": (404, "v1's files were deleted to save disk space (MODELS_KEEP), so I can't switch to it."),
        "v5": (409, "v5 is already the active model."),
    }
    for version, (status, words) in cases.items():
        async with http.post(f"{base_url}/rollback", data={"version": version}, headers=BEARER) as response:
            assert (response.status, await response.text()) == (status, words), version
    async with db.sessions.begin() as session:
        session.add(TrainingRun(status=RunStatus.RUNNING, triggered_by="test", started_at=NOW, progress=0.5))
    async with http.post(f"{base_url}/retrain", headers=BEARER) as response:
        assert response.status == 409 and (await response.text()).startswith("A training run (#")
    assert await _active(db) == "v5"

    csrf = await _login(http, base_url)
    async with http.post(f"{base_url}/rollback", data={"csrf": csrf, "version": "v9"}) as response:
        assert response.status == 200 and response.url.path == f"{PREFIX}/", "a browser sees the page, with the notice"
        assert "I don&#39;t know a model version called &#34;v9&#34;" in await response.text()


async def test_the_overview_counts_messages_per_utc_day_per_chat(db: Database, tiny_model_dir: Path) -> None:
    """The day is computed in SQL, differently on SQLite and PostgreSQL: both must agree."""
    await seed_history(db, tiny_model_dir)
    overview = await load_overview(db, now=NOW, days=30)
    expected = {
        chat: {(NOW - timedelta(days=ago)).date(): count for ago, count in days.items()}
        for chat, days in MESSAGES_PER_DAY.items()
    }
    expected[REPLY_CHAT] = reply_chat_per_day()
    assert overview.messages_per_day == expected, "the 90-day-old message is outside the window"
    gates = [(g.version, g.active_loss, g.new_loss, g.status) for g in overview.gate_scores]
    promoted = [(name, before, after, RunStatus.PROMOTED) for name, before, after in GATES]
    assert gates == [*promoted, ("v6", 3.04, 3.31, RunStatus.REJECTED)], "what each gate compared, oldest first"
    replies = overview.replies
    assert replies is not None and len(replies.hours) == 7 * 24 and replies.hours[-1] == NOW, "to the hour now is in"
    assert replies.total == len(REPLIES), "not a command's answer, a failed send, or one older than 7 days"
    assert replies.latencies == sorted(latency for _hours, latency in REPLIES)
    assert percentile(replies.latencies, 0.5) == sorted(latency for _h, latency in REPLIES)[len(REPLIES) // 2]
    assert len(overview.days) == 30 and overview.days[-1] == NOW.date()
    assert overview.active is not None and overview.active.name == "v5"
    assert [v.name for v in overview.versions] == [name for name, _, _ in reversed(VERSIONS)]
    assert overview.last_curve is not None and [list(p) for p in overview.last_curve.points] == CURVE
    assert overview.exclusions is not None and dict(overview.exclusions.counts) == EXCLUDED


async def test_a_run_in_progress_is_shown_and_the_page_follows_it(
    base_url: str, http: aiohttp.ClientSession, db: Database
) -> None:
    async with db.sessions.begin() as session:
        run = new_run(triggered_by="dashboard", started_at=NOW, progress=0.42)
        session.add(run)
        await session.flush()
        run_id = run.id
    async with http.get(f"{base_url}/", headers=BEARER) as response:
        page = await response.text()
    assert f"Training run #{run_id} is running: 42% done (started 2026-11-30 12:00 UTC by dashboard)." in page
    assert '<meta http-equiv="refresh"' in page
    assert "<form" not in page, "a script's page (bearer token) has no session, hence no forms"


def test_a_login_session_expires() -> None:
    now = [NOW]
    sessions = Sessions(SecretStr(TOKEN), clock=lambda: now[0])
    session_id, session = sessions.open()
    assert sessions.get(session_id) is session and session_id != session.csrf
    now[0] = NOW + SESSION_TTL
    assert sessions.get(session_id) is None
    assert not sessions.bearer_matches(f"Basic {TOKEN}") and sessions.bearer_matches(f"Bearer {TOKEN}")


async def test_the_start_up_log_names_the_dashboards_url(
    db: Database, settings: Settings, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator learns where the dashboard is from the log, as the bot's HTTP server mounts it."""
    dashboard = dashboard_app(settings, db, ModelServing(settings=settings, db=db))
    app = build_http_app(health=HealthCheck(db=db, engine=engine), telemetry=Telemetry(), extra={PREFIX: dashboard})
    server = HttpServer(app, host="127.0.0.1", port=0)
    with caplog.at_level(logging.INFO, logger="bot.web.http_server"):
        await server.start()
    try:
        assert f"Dashboard on http://127.0.0.1:{server.port}{PREFIX}/" in caplog.messages
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{server.port}{PREFIX}/") as response:
            assert response.status == 401, "that URL is the dashboard's login"
    finally:
        await server.stop()
