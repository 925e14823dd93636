"""What the fake platform servers (`fake_telegram.py`, `fake_discord.py`) share, so both are driven the same way.

- Lifecycle: an aiohttp server on 127.0.0.1 (a free port), started and closed by `async with` (or `start` and
  `close`); `refuse_connections`/`accept_connections` take it off the network and back on the same port.
- Records: every request is a `RecordedCall` in `calls`, with the status it was answered; `calls_to(endpoint)`
  finds them by a regular expression over the call's `endpoint` (Telegram: the method, "sendMessage"; Discord:
  the HTTP method and path, "POST /channels/123/messages").
- Waits: `wait_until(condition, within)` awaits a condition on the fake's state on a condition variable that
  every request notifies; no polling, no sleeps.
- Faults: `fail_next(endpoint, times, after=, status=, retry_after=, **options)` answers the next matching calls
  with an error in the platform's own shape (each fake says which `options` it knows, and refuses others);
  `hold(endpoint)` keeps calls waiting, unanswered, until `release` carries them out or loses them on the way.

A fake supplies its routes (`_add_routes`), the error body of a fault (`_fault_response`), what a client sees of
a request lost on the way (`_lost_response`) and anything to tidy at close (`_on_close`).
"""

from __future__ import annotations

import asyncio
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Generic, Self, TypeVar

from aiohttp import web

WAIT_S = 20.0
"""How long the wait helpers wait for the client before failing the test."""


@dataclass(kw_only=True)
class RecordedCall(ABC):
    """One request as the fake saw it, and the status it answered (0 while unanswered)."""

    status: int = 0
    at: float = field(default_factory=time.monotonic)

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """What `calls_to` matches: the method name for Telegram, "VERB /path" for Discord."""


C = TypeVar("C", bound=RecordedCall)


@dataclass(frozen=True)
class Fault:
    """An injected failure: the status, how long a 429 asks to wait, and the fake's own variants (`options`)."""

    status: int
    retry_after: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Scheduled:
    pattern: re.Pattern[str]
    fault: Fault
    times: int
    passing: int


@dataclass
class _Held(Generic[C]):
    call: C
    outcome: asyncio.Future[bool]


class FakeServer(ABC, Generic[C]):
    """The shared part of a fake platform server; see the module docstring."""

    fault_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self) -> None:
        self.calls: list[C] = []
        self.port = 0
        self._changed = asyncio.Condition()
        self._closing = False
        self._faults: list[_Scheduled] = []
        self._holding: dict[re.Pattern[str], int] = {}
        """Endpoints whose calls wait for `release`, with how many calls may still pass first."""
        self._held: list[_Held[C]] = []
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self._add_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await self._site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        """Loses every held call, wakes every waiter, and stops serving."""
        self._closing = True
        self.release(arrived=0)
        await self._notify()
        await self._on_close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def url(self, path: str, *, scheme: str = "http") -> str:
        """The address of `path` on the fake (once started)."""
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def refuse_connections(self) -> None:
        """Stops listening and drops open connections: every request fails to connect until `accept_connections`."""
        assert self._runner is not None and self._site is not None
        await self._site.stop()
        server = self._runner.server
        for connection in server.connections if server is not None else []:
            connection.force_close()

    async def accept_connections(self) -> None:
        """Listens again, on the same port."""
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await self._site.start()

    # --- records and waiting -------------------------------------------------------------------------------------

    def calls_to(self, endpoint: str) -> list[C]:
        """The calls whose endpoint fully matches the regular expression `endpoint`, in order."""
        pattern = re.compile(endpoint)
        return [call for call in self.calls if pattern.fullmatch(call.endpoint)]

    async def wait_until(self, condition: Callable[[], bool], within: float = WAIT_S) -> None:
        """Awaits `condition()` becoming true as the fake's state changes; TimeoutError after `within` seconds."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(condition)

    async def _notify(self) -> None:
        """Wakes every waiter (and a fake's long polls)."""
        async with self._changed:
            self._changed.notify_all()

    async def _answer(self, call: C, respond: Callable[[], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Records `call`, holds it if asked to, answers it with `respond` and notes the status it answered.

        Waiters are woken when a call arrives as well as when it is answered: a long poll is answered only much
        later, and a test waiting for it to be made must not depend on some other call waking it."""
        self.calls.append(call)
        await self._notify()
        try:
            response = await respond() if await self._arrives(call) else self._lost_response()
            call.status = response.status
            return response
        finally:
            await self._notify()

    # --- faults --------------------------------------------------------------------------------------------------

    def fail_next(
        self,
        endpoint: str,
        times: int = 1,
        *,
        status: int = 429,
        after: int = 0,
        retry_after: float = 1.0,
        **options: Any,
    ) -> None:
        """After `after` matching calls that pass, the next `times` calls whose endpoint fully matches the regular
        expression `endpoint` answer `status` (in the order faults were asked for)."""
        unknown = set(options) - self.fault_options
        if unknown:
            raise TypeError(f"{type(self).__name__} knows no fault options {sorted(unknown)}")
        fault = Fault(status, retry_after, options)
        self._faults.append(_Scheduled(re.compile(endpoint), fault, times, after))

    def _take_fault(self, endpoint: str) -> Fault | None:
        for scheduled in self._faults:
            if scheduled.times > 0 and scheduled.pattern.fullmatch(endpoint):
                if scheduled.passing > 0:
                    scheduled.passing -= 1
                    return None
                scheduled.times -= 1
                return scheduled.fault
        return None

    def hold(self, endpoint: str, *, after: int = 0) -> None:
        """Calls matching `endpoint` (after the next `after`) wait, unanswered, until `release` decides their fate:
        a request hanging on the network."""
        self._holding[re.compile(endpoint)] = after

    def held_calls(self, endpoint: str | None = None) -> list[C]:
        """The calls waiting now (those matching `endpoint`, if given)."""
        pattern = re.compile(endpoint) if endpoint is not None else None
        waiting = [held.call for held in self._held if not held.outcome.done()]
        return [call for call in waiting if pattern is None or pattern.fullmatch(call.endpoint)]

    def release(self, *, arrived: int | None = None, count: int | None = None) -> None:
        """Decides the first `count` (default: all) held calls: the first `arrived` of them (default: all) are
        carried out as if they had just arrived, the others are lost on the way (answered with what a client sees
        of a request that never arrived, which a client killed meanwhile never reads). Releasing them all stops
        holding."""
        waiting = [held for held in self._held if not held.outcome.done()]
        chosen = waiting if count is None else waiting[:count]
        for index, held in enumerate(chosen):
            held.outcome.set_result(arrived is None or index < arrived)
        if count is None:
            self._holding.clear()

    async def _arrives(self, call: C) -> bool:
        """False when the call was held and then lost on the way; True for every call not held."""
        pattern = next((p for p in self._holding if p.fullmatch(call.endpoint)), None)
        if pattern is None:
            return True
        if self._holding[pattern] > 0:
            self._holding[pattern] -= 1
            return True
        held = _Held(call, asyncio.get_running_loop().create_future())
        self._held.append(held)
        await self._notify()
        return await held.outcome

    # --- what a fake supplies ------------------------------------------------------------------------------------

    @abstractmethod
    def _add_routes(self, app: web.Application) -> None:
        """The fake's endpoints."""

    def _lost_response(self) -> web.Response:
        """What the client sees of a request lost on the way: the platform front's 502 page."""
        return front_page(502)

    async def _on_close(self) -> None:
        """Tidies what the fake keeps besides the server (background tasks, open websockets)."""


def front_page(status: int) -> web.Response:
    """An error page from the platform's HTTP front (nginx, Cloudflare): HTML, not the API's JSON, as the real
    platforms answer when the request never reached their API."""
    html = f"<html><head><title>{status}</title></head><body><center><h1>{status}</h1></center></body></html>"
    return web.Response(status=status, text=html, content_type="text/html")
