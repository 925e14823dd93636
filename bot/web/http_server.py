"""The HTTP server inside `magpie run`: `GET /healthz`, `GET /metrics`, and the sub-apps others mount on it.

`build_http_app` makes the aiohttp application from what it serves (a `core.ops.health.HealthCheck`, a
`core.ops.telemetry.Telemetry`) plus any sub-apps by path prefix (the operator dashboard mounts at `/dashboard`), so
the one port serves them all; `HttpServer` runs it on HTTP_LISTEN for as long as the bot runs. Both endpoints
answer from memory or one `SELECT 1`, never block the event loop, and need no authentication: they say nothing
a user wrote and no secret, so HTTP_LISTEN binds to localhost unless the operator opens it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiohttp import web

from core.errors import ConfigError
from core.ops.health import HealthCheck
from core.ops.telemetry import Telemetry

log = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"


class _Endpoints:
    """The two handlers, over the health check and the registry they read."""

    def __init__(self, health: HealthCheck, telemetry: Telemetry) -> None:
        self._health = health
        self._telemetry = telemetry

    async def healthz(self, request: web.Request) -> web.Response:
        """200 with every part when all are well, else 503 naming the failing parts (`failing`)."""
        health = await self._health.check()
        if not health.ok:
            log.debug("health check failing: %s", ", ".join(health.failing))
        return web.json_response(health.as_json(), status=200 if health.ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        """The metrics in Prometheus' text format (or OpenMetrics, when the scraper asks for it)."""
        body, content_type = self._telemetry.exposition(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})


REQUEST_MAX_BYTES = 64 * 1024
"""The largest request body the server reads (aiohttp's default is 1 MiB): /healthz and /metrics take none, the
dashboard's forms a few hundred bytes; a longer body is answered 413 as it is read, never parsed."""


def build_http_app(
    *, health: HealthCheck, telemetry: Telemetry, extra: Mapping[str, web.Application] | None = None
) -> web.Application:
    """The application: /healthz and /metrics, and each of `extra`'s sub-apps mounted at its prefix (e.g.
    `{"/dashboard": dashboard_app}`; a prefix starts with "/" and does not end with one)."""
    app = web.Application(client_max_size=REQUEST_MAX_BYTES)
    endpoints = _Endpoints(health, telemetry)
    app.router.add_get(HEALTH_PATH, endpoints.healthz)
    app.router.add_get(METRICS_PATH, endpoints.metrics)
    for prefix, sub_app in (extra or {}).items():
        app.add_subapp(prefix, sub_app)
    return app


class HttpServer:
    """Runs an aiohttp application on one address until `stop`; port 0 binds a free port (see `port`)."""

    def __init__(self, app: web.Application, *, host: str, port: int) -> None:
        self._runner = web.AppRunner(app, access_log=None)  # Prometheus' scrapes every 15 s are no news
        self._host = host
        self._requested_port = port
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one the system picked, for port 0)."""
        if self._port is None:
            raise RuntimeError("the HTTP server is not running")
        return self._port

    async def start(self) -> None:
        """Binds and serves; an address that cannot be bound stops Magpie with HTTP_LISTEN named."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._requested_port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(
                f"HTTP_LISTEN {self._host}:{self._requested_port} cannot be used ({exc.strerror or exc}): "
                "choose another address, or set HTTP_LISTEN=off to turn the server off."
            ) from None
        self._port = _bound_port(self._runner, self._requested_port)
        log.info("HTTP server on http://%s:%d (%s, %s)", self._host, self._port, HEALTH_PATH, METRICS_PATH)
        for prefix in mounted_prefixes(self._runner.app):
            log.info("%s on http://%s:%d%s/", prefix.strip("/").capitalize(), self._host, self._port, prefix)

    async def stop(self) -> None:
        """Stops listening and closes open connections; harmless when it never started."""
        await self._runner.cleanup()
        self._port = None


def mounted_prefixes(app: web.Application) -> list[str]:
    """The prefixes of the sub-apps mounted on `app` (e.g. "/dashboard"), so the start-up log names their URLs."""
    return [
        resource.canonical for resource in app.router.resources() if isinstance(resource, web.PrefixedSubAppResource)
    ]


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested
