"""How Magpie talks to the Telegram Bot API: the PTB Application built from settings, start-up, and retries.

Kept apart from `bot/telegram.py` (which translates and sends) because it answers questions of its own: how
patient to be with a Bot API that is not there yet (start-up retries `getMe`, which PTB tries once, and
bootstraps polling or the webhook with retries, so a bot started during a network blip comes up when the network
does), and when it is safe to send a request again: a read timeout may come after Telegram delivered the
message, so only what provably never reached the API (`never_arrived`) is repeated; 429s are waited out by
AIORateLimiter underneath. Whatever is logged here is redacted first: the token is inside every request URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from telegram import BotCommand, BotCommandScopeChat, Update
from telegram.error import BadRequest, InvalidToken, NetworkError, RetryAfter, TelegramError, TimedOut
from telegram.ext import AIORateLimiter, Application, ApplicationBuilder, ContextTypes, ExtBot
from telegram.request import HTTPXRequest, RequestData
from telegram.request._requestparameter import RequestParameter

from core.chat.commands import visible_commands
from core.chat.settling import when_settled
from core.errors import ConfigError, MagpieError
from core.i18n import LANGUAGES, SOURCE_LANGUAGE, translate
from core.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
App = Application[ExtBot[int], ContextTypes.DEFAULT_TYPE, dict[Any, Any], dict[Any, Any], dict[Any, Any], None]

POLL_TIMEOUT_S = 30
"""Long-poll duration of one `getUpdates`; the HTTP read timeout is a little longer."""
SEND_ATTEMPTS = 5
STARTUP_ATTEMPTS = 8
BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 8.0
RATE_LIMIT_RETRIES = 3
READ_TIMEOUT_S = 30.0
"""How long a request waits for Telegram's answer; past it, the request may or may not have been carried out."""


def build_application(settings: Settings, token: str) -> App:
    """The one place settings become a PTB Application: where it connects and how patient it is, and how it
    confirms the updates it fetched (`UpdateGate`)."""
    gate = UpdateGate()
    updates_request = GatedUpdatesRequest(
        gate, connection_pool_size=1, connect_timeout=10.0, read_timeout=POLL_TIMEOUT_S + 10.0,
        write_timeout=30.0, pool_timeout=30.0,
    )  # fmt: skip
    return (
        ApplicationBuilder()
        .application_class(SettlingApplication, {"gate": gate})
        .token(token)
        .base_url(settings.telegram_base_url)
        .base_file_url(settings.telegram_base_file_url)
        .rate_limiter(AIORateLimiter(max_retries=RATE_LIMIT_RETRIES))
        .concurrent_updates(True)
        .connect_timeout(10.0)
        .read_timeout(READ_TIMEOUT_S)
        .write_timeout(30.0)
        .pool_timeout(30.0)
        .get_updates_request(updates_request)
        .job_queue(None)
        .build()
    )


# --- confirming only what is logged ----------------------------------------------------------------------------


class UpdateGate:
    """The updates fetched but not yet settled (`core.chat.service.when_settled`: logged, or given up on).

    Telegram forgets the updates below the `offset` of the next getUpdates call, so that call is the confirmation.
    PTB makes it as soon as the last batch is queued; here it waits until every update of that batch is settled
    (normally a few milliseconds: the time to log them). While the database is away, messages wait to be logged
    (`core.storage.db_retry`), so polling pauses and nothing unlogged is confirmed: what people write meanwhile waits at
    Telegram. At a stop, PTB's last call (timeout 0) confirms only up to the first unsettled update; Telegram
    delivers it and the ones after it again on the next start (those already logged are recognised, not answered
    twice)."""

    def __init__(self) -> None:
        self._unsettled: set[int] = set()
        self._settled = asyncio.Event()
        self._settled.set()

    def fetched(self, update_ids: Iterable[int]) -> None:
        self._unsettled.update(update_ids)
        if self._unsettled:
            self._settled.clear()

    def settle(self, update_id: int) -> None:
        self._unsettled.discard(update_id)
        if not self._unsettled:
            self._settled.set()

    async def wait(self) -> None:
        await self._settled.wait()

    def confirmable(self, offset: int) -> int:
        """The highest offset that confirms no unsettled update."""
        return min(offset, *self._unsettled) if self._unsettled else offset


class GatedUpdatesRequest(HTTPXRequest):
    """PTB's request for getUpdates, through the `UpdateGate`: a polling call waits until the updates it would
    confirm are settled; the stop's last call (timeout 0, it must not wait) confirms no unsettled one."""

    def __init__(self, gate: UpdateGate, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._gate = gate

    async def do_request(
        self, url: str, method: str, request_data: RequestData | None = None, *args: Any, **kwargs: Any
    ) -> tuple[int, bytes]:
        if request_data is not None and url.endswith("/getUpdates"):
            request_data = await self._through_gate(request_data)
        status, payload = await super().do_request(url, method, request_data, *args, **kwargs)
        with contextlib.suppress(ValueError, TypeError, KeyError):  # an error's body: PTB reports it
            result = json.loads(payload)["result"]
            self._gate.fetched(int(item["update_id"]) for item in result if isinstance(item, dict))
        return status, payload

    async def _through_gate(self, request_data: RequestData) -> RequestData:
        parameters = request_data.parameters
        if parameters.get("timeout"):
            await self._gate.wait()
            return request_data
        offset = parameters.get("offset")
        if not isinstance(offset, int) or self._gate.confirmable(offset) == offset:
            return request_data
        parameters = {**parameters, "offset": self._gate.confirmable(offset)}
        return RequestData([RequestParameter.from_input(key, value) for key, value in parameters.items()])


class SettlingApplication(
    Application[ExtBot[int], ContextTypes.DEFAULT_TYPE, dict[Any, Any], dict[Any, Any], dict[Any, Any], None]
):
    """PTB's Application, telling the `UpdateGate` when each update is settled: as soon as the core has logged its
    message (`when_settled`), else when its handlers are done (an edit, a service message, nothing to log)."""

    def __init__(self, *, gate: UpdateGate, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._gate = gate

    async def process_update(self, update: object) -> None:
        if not isinstance(update, Update):
            await super().process_update(update)
            return
        settle = partial(self._gate.settle, update.update_id)
        try:
            with when_settled(settle):
                await super().process_update(update)
        except asyncio.CancelledError:  # cut off by a stop before it was settled: Telegram delivers it again
            raise
        except BaseException:
            settle()  # a failure is not a reason to stop polling (PTB's error handler has reported it)
            raise
        settle()


async def connect(app: App, settings: Settings, redact: Callable[[str], str]) -> None:
    """Initializes the Application (`getMe`) with retries: PTB itself tries once."""
    rejected, failure = False, ""
    try:
        await retrying(app.initialize, redact, STARTUP_ATTEMPTS, repeatable=True)
        return
    except InvalidToken:  # its message contains the token: raised below, so not even chained
        rejected = True
    except NetworkError as exc:
        failure = redact(str(exc))
    await app.bot.shutdown()
    if rejected:
        raise ConfigError("Telegram rejected TELEGRAM_BOT_TOKEN: check it with @BotFather.")
    host = urlsplit(settings.telegram_base_url).netloc
    raise MagpieError(f"Cannot reach the Telegram Bot API at {host}: {failure}")


async def register_commands(app: App, settings: Settings, redact: Callable[[str], str]) -> None:
    """Fills Telegram's "/" menu: user commands for everyone, and all commands in each admin's private chat. Each
    menu is set in English for everyone and again per other language Magpie speaks (`language_code`), which
    Telegram shows to users whose app is set to that language."""
    admin_ids = sorted(int(item.partition(":")[2]) for item in settings.admin_ids if item.startswith("telegram:"))
    scopes: list[BotCommandScopeChat | None] = [None, *(BotCommandScopeChat(ident) for ident in admin_ids)]
    for language in LANGUAGES:
        code = None if language == SOURCE_LANGUAGE else language
        for scope in scopes:
            shown = visible_commands(admin=scope is not None)
            commands = [BotCommand(command.name, translate(command.help, language)) for command in shown]
            call = partial(app.bot.set_my_commands, commands, scope=scope, language_code=code)
            try:
                await retrying(call, redact, repeatable=True)
            except TelegramError as exc:  # the menu is a convenience: never a reason not to start
                where = f"admin chat {scope.chat_id}" if scope else "everyone"
                log.warning("Telegram: %s command menu for %s not set: %s", language, where, redact(str(exc)))


async def start_fetching(app: App, settings: Settings, on_polling_error: Callable[[TelegramError], None]) -> None:
    """Long polling by default; a webhook when TELEGRAM_WEBHOOK_URL is set (it serves that URL's path)."""
    updater = app.updater
    url, secret = settings.telegram_webhook_url, settings.telegram_webhook_secret
    assert updater is not None
    if url:
        assert secret is not None  # Settings refuses a webhook without one
        cap_webhook_requests()
        await updater.start_webhook(
            listen=settings.telegram_webhook_listen,
            port=settings.telegram_webhook_port,
            url_path=urlsplit(url).path,
            webhook_url=url,
            secret_token=secret.get_secret_value(),
            bootstrap_retries=STARTUP_ATTEMPTS,
        )
    else:
        await updater.start_polling(
            timeout=POLL_TIMEOUT_S, bootstrap_retries=STARTUP_ATTEMPTS, error_callback=on_polling_error
        )
    mode = f"webhook on port {settings.telegram_webhook_port}" if url else "long polling"
    log.info("Telegram: @%s is up (%s)", app.bot.username, mode)


WEBHOOK_MAX_BODY_BYTES = 1 << 20
"""Telegram's updates are small: a 4,096-character message with its entities, the message it replies to and a
poll or a location stay far below 100 KB. PTB's webhook server (tornado) would read up to 100 MiB, and parse it,
before it checks the secret header; with this cap a larger request is refused (400) as soon as its headers say so,
and a chunked one after its first MiB, before any of it is parsed."""
WEBHOOK_BODY_TIMEOUT_S = 30.0
"""Telegram sends an update in one go: a client trickling a body (slowloris) loses its connection."""


def cap_webhook_requests() -> None:
    """Caps what PTB's webhook server reads per request, through tornado's public `Configurable.configure`: the
    keyword arguments become the defaults of every `HTTPServer` built afterwards, and PTB builds its server (the
    only tornado server in Magpie) inside `start_webhook`."""
    from tornado.httpserver import HTTPServer

    HTTPServer.configure(
        None,
        max_body_size=WEBHOOK_MAX_BODY_BYTES,
        max_buffer_size=2 * WEBHOOK_MAX_BODY_BYTES,
        body_timeout=WEBHOOK_BODY_TIMEOUT_S,
    )


async def retrying(
    call: Callable[[], Awaitable[T]],
    redact: Callable[[str], str],
    attempts: int | None = None,
    *,
    repeatable: bool = False,
) -> T:
    """Retries failed requests with capped, jittered backoff: any network error or 5xx for a `repeatable`
    call (one that does the same thing twice, such as getMe), otherwise only what provably never reached
    Telegram, so that a retry can never post a message twice. 429s rarely get here (AIORateLimiter waits them
    out underneath), and a 400 is final: retrying can't fix it."""
    attempts = SEND_ATTEMPTS if attempts is None else attempts
    delay = BACKOFF_FIRST_S
    for attempt in range(1, attempts):
        try:
            return await call()
        except BadRequest:
            raise
        except (NetworkError, RetryAfter) as exc:
            if not repeatable and not never_arrived(exc):
                raise
            log.warning("Telegram: request failed (%s), retry %d of %d", redact(str(exc)), attempt, attempts)
        await asyncio.sleep(delay * random.uniform(0.75, 1.0))
        delay = min(delay * 2, BACKOFF_CAP_S)
    return await call()


def failure_reason(error: BaseException, redact: Callable[[str], str]) -> str:
    """Why a request failed, redacted; a failure that may have come after delivery says so (it is not repeated)."""
    reason = redact(f"{type(error).__name__}: {error}")
    if isinstance(error, NetworkError) and not isinstance(error, BadRequest) and not never_arrived(error):
        return f"unconfirmed, may have arrived, so not sent again ({reason})"
    return reason


def never_arrived(exc: BaseException) -> bool:
    """Whether a failed request provably never reached Telegram's API, so that sending it again cannot post it twice.

    PTB raises `NetworkError` (`TimedOut` for timeouts) for transport failures and bad HTTP statuses alike; what
    tells them apart is the exception it chains as `__cause__`:

    - `httpx.ConnectError`, `ConnectTimeout`, `PoolTimeout`: no connection, so nothing was sent;
    - `RetryAfter` (429): Telegram refused the request without carrying it out;
    - a `TelegramError` cause: PTB could not parse the body of an error status, so the answer came from Telegram's
      front-end proxy (a 502/503 page), not from the Bot API: the request was not processed.

    Everything else is in doubt: a read or write timeout, a connection dropped before the answer, or a 5xx that the
    Bot API itself explained may all come after the message was delivered.
    """
    if isinstance(exc, RetryAfter):
        return True
    cause = exc.__cause__
    if isinstance(exc, TimedOut):
        return isinstance(cause, httpx.ConnectTimeout | httpx.PoolTimeout)
    if isinstance(exc, NetworkError):
        return isinstance(cause, httpx.ConnectError | TelegramError)
    return False
