"""The operator's dashboard: one server-rendered page on the bot's HTTP server, behind DASHBOARD_TOKEN.

It shows the active model, every version with its held-out loss and perplexity, five plots (what each run's
promotion gate compared, the last run's training loss curve, the model's replies per hour and their latency over
the last days, messages per day per chat), what the last run's data left out and why; and it has retrain and
rollback buttons. Those go through the same paths as `/retrain` and
`/rollback` in chat (`core.retraining.Retrainer`, `core.serving.model_serving.ModelServing.rollback`), and their answers
are the same words (`core.texts`), in the browser's language (its Accept-Language header: Korean or English). Data
comes from `core.ops.dashboard_data` (bot/ runs no SQL), plots from
`bot.web.dashboard_plots`, who may do what from `bot.web.dashboard_auth`.

`build_dashboard_app` returns an aiohttp sub-application; the composition root mounts it at a prefix of the HTTP
server (`app.add_subapp("/dashboard/", ...)`) only when DASHBOARD_TOKEN is set. Links are built from the
sub-application's routes, so any prefix works.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import jinja2
from aiohttp import web
from markupsafe import Markup, escape

from bot.web import dashboard_plots
from bot.web.dashboard_auth import COOKIE, SESSION_TTL, Session, Sessions, Throttle, csrf_matches
from core import texts
from core.errors import ConfigError
from core.i18n import _, accepted_language, current_language, speaking
from core.ops.dashboard_data import REPLY_DAYS, Overview, load_overview, percentile
from core.outcomes import (
    AlreadyRunning,
    CoolingDown,
    CouldNotStart,
    RunRequest,
    RunStarted,
    Switch,
    SwitchRefusal,
    SwitchRefused,
    VoicesQueued,
)
from core.retraining import Retrainer
from core.serving.model_serving import ModelServing
from core.settings import Settings
from core.storage.db import Database

log = logging.getLogger(__name__)

DEFAULT_DAYS = 30
OVERVIEW_TTL_S = 10.0
"""A page and its five plots are six requests: they share one read of the database (an action clears it)."""
MAX_DAYS = 366
TRIGGERED_BY = "dashboard"
"""Who asked, in the run's row and the serving log: the dashboard has one user, the operator."""
SECURITY_HEADERS = {
    # No scripts at all; images, styles and forms only from here; never inside another site's frame (a hidden
    # frame could trick the operator into pressing a button).
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="magpie-dashboard"'}
"""What a 401 asks for (RFC 9110): the token, as a bearer token or through the login form in the response's body."""

LOGIN_MAX_BYTES = 4096
"""The login form holds one token: a longer body is refused unread (the server's own cap is REQUEST_MAX_BYTES)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def build_dashboard_app(
    *,
    settings: Settings,
    db: Database,
    serving: ModelServing,
    retrainer: Retrainer | None,
    clock: Clock = _utcnow,
) -> web.Application:
    """The dashboard as an aiohttp sub-application. Raises `ConfigError` without DASHBOARD_TOKEN: a dashboard
    that anyone could open must never be mounted."""
    if settings.dashboard_token is None:
        raise ConfigError("DASHBOARD_TOKEN is not set: the dashboard stays off (see .env.example).")
    dashboard = Dashboard(settings=settings, db=db, serving=serving, retrainer=retrainer, clock=clock)
    app = web.Application(middlewares=[_security_headers, _browser_language])
    app.router.add_get("/", dashboard.page, name="page")
    app.router.add_post("/login", dashboard.login, name="login")
    app.router.add_post("/logout", dashboard.logout, name="logout")
    app.router.add_post("/retrain", dashboard.retrain, name="retrain")
    app.router.add_post("/rollback", dashboard.rollback, name="rollback")
    app.router.add_get("/plots/{name}.svg", dashboard.plot, name="plot")
    app.router.add_get("/dashboard.css", dashboard.stylesheet, name="css")
    return app


@web.middleware
async def _security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    return response


@web.middleware
async def _browser_language(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Everything a request gets (the page, its plots, a refusal, an action's answer) is in the browser's language;
    a plot drawn in a worker thread keeps it, as `asyncio.to_thread` carries the context along."""
    language = accepted_language(request.headers.get("Accept-Language"))
    headers = {"Content-Language": language, "Vary": "Accept-Language"}
    with speaking(language):
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(headers)
            raise
    response.headers.update(headers)
    return response


class Dashboard:
    """The page's handlers; dependencies come in through `__init__` (the composition root builds them)."""

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        serving: ModelServing,
        retrainer: Retrainer | None,
        clock: Clock,
    ) -> None:
        assert settings.dashboard_token is not None
        self._settings = settings
        self._db = db
        self._serving = serving
        self._retrainer = retrainer
        self._clock = clock
        self._sessions = Sessions(settings.dashboard_token, clock=clock)
        self._throttle = Throttle(clock=clock)
        self._overviews: dict[int, tuple[float, Overview]] = {}
        self._templates = jinja2.Environment(
            loader=jinja2.PackageLoader("bot.web", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._templates.filters["commands"] = commands_as_code

    # --- who is asking ----------------------------------------------------------------------------------------

    def _session(self, request: web.Request) -> Session | None:
        return self._sessions.get(request.cookies.get(COOKIE))

    def _authorized(self, request: web.Request) -> bool:
        return self._bearer_matches(request) or self._session(request) is not None

    def _bearer_matches(self, request: web.Request) -> bool:
        """Whether the request carries the right bearer token. A wrong one counts against the client's address,
        and an address that must wait is answered 429 before its token is even compared."""
        header = request.headers.get("Authorization")
        if header is None:
            return False
        address = _address(request)
        self._refuse_while_throttled(request, address)
        if self._sessions.bearer_matches(header):
            self._throttle.succeeded(address)
            return True
        self._throttle.failed(address, "bearer token")
        return False

    def _refuse_while_throttled(self, request: web.Request, address: str) -> None:
        if (wait := self._throttle.retry_after(address)) is not None:
            raise self._login_page(request, texts.dashboard_throttled(wait), status=429, retry_after=wait)

    async def _checked_post(self, request: web.Request) -> tuple[dict[str, Any], Session | None]:
        """The form of a POST that changes something, once it is known to come from the operator: a bearer token,
        or a session whose CSRF token the form carries. Raises 401 (no credentials) or 403 (a forged form).

        Who is asking is settled before the body is read: nobody else's form is ever parsed."""
        if self._bearer_matches(request):
            return dict(await request.post()), None
        session = self._session(request)
        if session is None:
            raise self._login_page(request, _(texts.DASHBOARD_LOGIN_NEEDED), status=401)
        form = dict(await request.post())
        if not csrf_matches(session, form.get("csrf")):
            log.warning("dashboard: refused a %s without a valid CSRF token from %s", request.path, request.remote)
            raise web.HTTPForbidden(text=_(texts.DASHBOARD_STALE_FORM))
        return form, session

    async def _overview(self, days: int) -> Overview:
        read_at, overview = self._overviews.get(days, (-OVERVIEW_TTL_S, None))
        if overview is None or time.monotonic() - read_at >= OVERVIEW_TTL_S:
            overview = await load_overview(self._db, now=self._clock(), days=days)
            self._overviews[days] = (time.monotonic(), overview)
        return overview

    # --- pages ------------------------------------------------------------------------------------------------

    def _render(self, template: str, **context: Any) -> str:
        """Templates word everything through `t` (`core.texts`), showing its constants as `_(t.NAME)`."""
        return self._templates.get_template(template).render(t=texts, _=_, lang=current_language(), **context)

    def _login_page(
        self, request: web.Request, notice: str | None, *, status: int, retry_after: int = 0
    ) -> web.HTTPException:
        html = self._render("login.html", notice=notice, urls=_urls(request, days=DEFAULT_DAYS))
        if status == 401:
            return web.HTTPUnauthorized(text=html, content_type="text/html", headers=CHALLENGE)
        if status == 429:
            headers = {"Retry-After": str(retry_after)}
            return web.HTTPTooManyRequests(text=html, content_type="text/html", headers=headers)
        return web.HTTPForbidden(text=html, content_type="text/html")

    async def page(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            raise self._login_page(request, None, status=401)
        session = self._session(request)
        days = _days(request)
        overview = await self._overview(days)
        notice, csrf = (session.notice, session.csrf) if session is not None else (None, "")
        if session is not None:
            session.notice = None
        latencies = overview.replies.latencies if overview.replies is not None else []
        html = self._render(
            "dashboard.html",
            o=overview,
            days=days,
            reply_days=REPLY_DAYS,
            p50=percentile(latencies, 0.5),
            p95=percentile(latencies, 0.95),
            csrf=csrf,
            notice=notice,
            can_retrain=self._retrainer is not None,
            base_model=self._settings.base_model,
            urls=_urls(request, days=days),
        )
        return web.Response(text=html, content_type="text/html")

    async def plot(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            raise web.HTTPUnauthorized(text=_(texts.DASHBOARD_LOGIN_NEEDED), headers=CHALLENGE)
        draw = dashboard_plots.PLOTS.get(request.match_info["name"])
        if draw is None:
            raise web.HTTPNotFound()
        overview = await self._overview(_days(request))
        svg = await asyncio.to_thread(dashboard_plots.drawn, draw, overview)
        return web.Response(body=svg, content_type="image/svg+xml")

    async def stylesheet(self, request: web.Request) -> web.Response:
        """Served here, not inline: the page's Content-Security-Policy allows no inline style."""
        source = self._templates.loader.get_source(self._templates, "dashboard.css")[0]  # type: ignore[union-attr]
        return web.Response(text=source, content_type="text/css")

    # --- logging in and out -----------------------------------------------------------------------------------

    async def login(self, request: web.Request) -> web.Response:
        """The one form read before anyone is known (it carries the token): an address that must wait is refused
        before it is read, and a form longer than LOGIN_MAX_BYTES is not read at all."""
        address = _address(request)
        self._refuse_while_throttled(request, address)
        if (request.content_length or 0) > LOGIN_MAX_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=LOGIN_MAX_BYTES, actual_size=request.content_length or 0)
        form = await request.post()
        offered = form.get("token")
        if not isinstance(offered, str) or not self._sessions.token_matches(offered):
            self._throttle.failed(address, "token in the login form")
            raise self._login_page(request, _(texts.DASHBOARD_WRONG_TOKEN), status=403)
        self._throttle.succeeded(address)
        session_id, _expires = self._sessions.open()
        page = _urls(request, days=DEFAULT_DAYS)["page"]
        response = _see_other(page)
        response.set_cookie(
            COOKIE,
            session_id,
            path=page,
            max_age=int(SESSION_TTL.total_seconds()),
            httponly=True,
            samesite="Strict",
            # Behind an HTTPS proxy the request arrives as plain HTTP: the proxy's header says the browser used HTTPS.
            # (Trusting it can only make the cookie stricter.)
            secure=request.secure or request.headers.get("X-Forwarded-Proto") == "https",
        )
        return response

    async def logout(self, request: web.Request) -> web.Response:
        await self._checked_post(request)
        self._sessions.close(request.cookies.get(COOKIE))
        page = _urls(request, days=DEFAULT_DAYS)["page"]
        response = _see_other(page)
        response.del_cookie(COOKIE, path=page)
        return response

    # --- actions ----------------------------------------------------------------------------------------------

    async def retrain(self, request: web.Request) -> web.Response:
        _form, session = await self._checked_post(request)
        if self._retrainer is None:
            return self._answer(request, session, _(texts.RETRAIN_UNAVAILABLE), status=501)
        result = await self._retrainer.request(triggered_by=TRIGGERED_BY, notify_platform=None, notify_chat_id=None)
        status, headers = run_request_status(result)
        return self._answer(request, session, texts.run_request(result), status=status, headers=headers)

    async def rollback(self, request: web.Request) -> web.Response:
        """To the named version (a row's button), or with none to the one that served before (the main button)."""
        form, session = await self._checked_post(request)
        name = form.get("version")
        version = name.strip()[:64] if isinstance(name, str) and name.strip() else None
        result = await self._serving.rollback(version=version, triggered_by=TRIGGERED_BY)
        return self._answer(request, session, texts.switch(result), status=switch_status(result))

    def _answer(
        self,
        request: web.Request,
        session: Session | None,
        text: str,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        """A browser goes back to the page, which shows `text` once; a script (bearer token) gets `text` itself,
        with the status code that tells a refusal from success (`run_request_status`, `switch_status`)."""
        self._overviews.clear()  # the page after an action shows its effect
        if session is None:
            return web.Response(text=text, status=status, headers=headers)
        session.notice = text
        return _see_other(_urls(request, days=DEFAULT_DAYS)["page"])


def run_request_status(result: RunRequest) -> tuple[int, dict[str, str]]:
    """The HTTP status (and headers) of an answer to a retrain request, for scripts: 202 started in the
    background (a run per community with VOICE_SCOPE=community), 409 a run is going (or no community has
    enough new data), 429 with Retry-After in the cooldown, 503 no training process could start."""
    match result:
        case RunStarted():
            return 202, {}
        case AlreadyRunning():
            return 409, {}
        case CoolingDown(minutes_left=left):
            return 429, {"Retry-After": str(max(1, left) * 60)}
        case CouldNotStart():
            return 503, {}
        case VoicesQueued(communities=()):
            return 409, {}  # no community has enough new data
        case VoicesQueued():
            return 202, {}


_SWITCH_NOT_FOUND = frozenset({SwitchRefusal.UNKNOWN_VERSION, SwitchRefusal.PRUNED})
"""Refusals about a version that is not there to switch to (404); the others refuse given the state (409)."""


def switch_status(result: Switch) -> int:
    """The HTTP status of an answer to a rollback: 200 switched, 404 no such version (or its files were pruned),
    409 refused as things stand (nothing active, nothing earlier, already active, files missing)."""
    if not isinstance(result, SwitchRefused):
        return 200
    return 404 if result.why in _SWITCH_NOT_FOUND else 409


_COMMAND = re.compile(r"`([^`]+)`")


def commands_as_code(text: str) -> Markup:
    """The catalogue's texts mark commands and settings with backticks (chat platforms show them as code); on the
    page they become `<code>`, never literal backticks. `text` is escaped first: it is text, not markup."""
    return Markup(_COMMAND.sub(r"<code>\1</code>", str(escape(text))))


def _address(request: web.Request) -> str:
    """The client's address, as the throttle counts it (behind a proxy: the proxy's, see `bot.web.dashboard_auth`)."""
    return request.remote or "unknown"


def _see_other(location: str) -> web.Response:
    """Post/redirect/get: after a form, the browser loads the page again (a reload then repeats nothing)."""
    return web.Response(status=303, headers={"Location": location})


def _days(request: web.Request) -> int:
    """`?days=N` widens the messages plot; anything that is not a number in 1..MAX_DAYS means the default."""
    raw = request.query.get("days", "")
    return int(raw) if raw.isdigit() and 1 <= int(raw) <= MAX_DAYS else DEFAULT_DAYS


def _urls(request: web.Request, *, days: int) -> dict[str, str]:
    """Every link and form target of the page, with the sub-application's prefix."""
    router = request.app.router
    urls = {name: str(router[name].url_for()) for name in ("page", "login", "logout", "retrain", "rollback", "css")}
    for plot in dashboard_plots.PLOTS:
        urls[f"plot:{plot}"] = str(router["plot"].url_for(name=plot).with_query(days=days))
    return urls
