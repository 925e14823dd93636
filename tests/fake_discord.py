"""A fake Discord — REST API and gateway websocket — on 127.0.0.1, for driving the real discord.py client in tests.

Longer than other modules on purpose: it is a protocol model (REST routes with Discord's error shapes and limits,
the gateway's handshake, heartbeats and dispatches, interactions and webhooks) kept in one place so that its
strictness is reviewed as a whole; the lifecycle, call records, waits and fault injection it shares with the fake
Telegram are in `tests/fake_base.py`.

It speaks what discord.py 2.x actually uses (see `discord/http.py`, `discord/gateway.py`, `discord/webhook/`):

REST (under `/api/v10`, every call recorded in `calls`):
    GET  /users/@me, /oauth2/applications/@me, /gateway, /gateway/bot
    PUT  /applications/{app}/commands, /applications/{app}/guilds/{guild}/commands   (slash-command sync; names,
                                        descriptions and their per-locale localizations checked like Discord's)
    POST /channels/{id}/messages        JSON or multipart; >2,000 characters → 400 with Discord's error shape;
                                        into the DM of a user who closed their DMs → 403, code 50007
    POST /channels/{id}/typing
    POST /users/@me/channels            open (or get) the DM channel with `recipient_id`
    DELETE /users/@me/guilds/{guild}    the bot leaves a guild: nothing more from it, 403 50001 on posts there
    POST /interactions/{id}/{token}/callback                                          (defer / respond, once)
    POST /webhooks/{app}/{token}, PATCH|DELETE /webhooks/{app}/{token}/messages/@original   (follow-ups)

Ephemeral answers (flag 64) are kept in `posts` with `flags: 64` and left out of `visible_posts_in`: the first
follow-up after a defer is as ephemeral as the defer was, whatever its own flags say, as on Discord.

Lifecycle, call records, waits and fault injection come from `fake_base.FakeServer`; an endpoint is the HTTP
method and the path without the prefix ("POST /channels/123/messages"). Faults in Discord's shapes (`fail_next`):
a 429 carries JSON `retry_after`, `X-RateLimit-*` headers and `Via: 1.1 google`; without `Via` (`via=False`) it is
Cloudflare's ban page (text, error 1015), which discord.py gives up on, reproduced on purpose. Other statuses carry
Discord's JSON error with a real code (`code=`, default: 403 → 50013 Missing Permissions, 404 → 10003 Unknown
Channel, 400 → 50035 Invalid Form Body); a 5xx is the Cloudflare front's HTML page.

Gateway (`/gateway`, and `/resume` as READY's `resume_gateway_url`): `compress=zlib-stream` with one compressor
per connection, every payload flushed with Z_SYNC_FLUSH; HELLO → IDENTIFY → READY + GUILD_CREATE; heartbeats are
ACKed; RESUME replays the events the client missed (by `s`) and then sends RESUMED; an unknown session gets
INVALID_SESSION.

Shards, as Discord does them: IDENTIFY's `shard` is `[shard_id, shard_count]` (absent: `[0, 1]`), checked strictly
(two integers, 0 <= id < count; else close 4010 Invalid shard); with `sharding_required`, a count below the
recommended one closes with 4011 Sharding required. Each shard is a session of its own (own sequence, own RESUME).
A guild's events go to the session(s) whose shard is `(guild_id >> 22) % shard_count`; DMs go to shard 0; READY
lists and GUILD_CREATEs only the shard's guilds and echoes `shard`. GET /gateway/bot answers the recommended
`shards` and `session_start_limit` (`max_concurrency`). `add_guild(shard=, of=)` makes a guild that lands on a
given shard. Like Discord, it delivers events only for the intents asked for, blanks the content of guild
messages that do not mention the bot unless MESSAGE_CONTENT was asked for, and closes with 4014 when that
privileged intent was asked for but is not enabled (`message_content_enabled=False`).

Guilds have roles like Discord's: @everyone may not manage the server, the "Managers" role (`make_manager`) may,
the owner may do anything; a message carries its author's roles and an interaction the member's computed
`permissions`, and a guild command with `default_member_permissions` cannot be run by a member who lacks them (the
client does not show it). `bot_added` is the bot joining a new guild (GUILD_CREATE on the live session, with its
`system_channel_id` and `preferred_locale`; `bot_may_write=False` denies it SEND_MESSAGES there).

Everything runs on the test's event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import BodyPartReader, WSMsgType, web

from tests.fake_base import WAIT_S, FakeServer, Fault, RecordedCall, front_page

__all__ = ["WAIT_S", "FakeDiscord", "Json", "RestCall"]

API_PREFIX = "/api/v10"
DISCORD_EPOCH_MS = 1_420_070_400_000
MESSAGE_LIMIT = 2000
EPHEMERAL = 1 << 6  # message flag: only the user who ran the interaction sees it

# Gateway intents (https://discord.com/developers/docs/events/gateway#gateway-intents)
GUILDS = 1 << 0
GUILD_MESSAGES = 1 << 9
DIRECT_MESSAGES = 1 << 12
MESSAGE_CONTENT = 1 << 15

Json = dict[str, Any]

# Permission bits (https://discord.com/developers/docs/topics/permissions)
MANAGE_GUILD = 1 << 5
SEND_MESSAGES = 1 << 11
ALL_PERMISSIONS = (1 << 41) - 1
EVERYONE_PERMISSIONS = (1 << 0) | (1 << 6) | (1 << 10) | SEND_MESSAGES | (1 << 14) | (1 << 15) | (1 << 16) | (1 << 31)
"""What @everyone may do in a new server (invite, react, view, send, embed, attach, read history, use commands):
not manage it."""


@dataclass
class RestCall(RecordedCall):
    """One REST request as the fake saw it (path without the `/api/v10` prefix) and the status it answered."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    files: list[tuple[str, bytes]]
    authorization: str | None

    @property
    def endpoint(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class Session:
    """A gateway session: what IDENTIFY asked for (intents, shard) and every event sent in it, for RESUME."""

    session_id: str
    intents: int
    shard: tuple[int, int] = (0, 1)
    events: list[Json] = field(default_factory=list)

    def next_seq(self) -> int:
        return len(self.events) + 1


@dataclass(eq=False)
class Connection:
    request: web.Request
    ws: web.WebSocketResponse
    compressor: Any | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, payload: Json) -> None:
        """Compress-and-send under one lock: the zlib stream must reach the client in the order it was made."""
        data = json.dumps(payload)
        async with self.lock:
            if self.ws.closed:
                return
            if self.compressor is None:
                await self.ws.send_str(data)
            else:
                chunk = self.compressor.compress(data.encode()) + self.compressor.flush(zlib.Z_SYNC_FLUSH)
                await self.ws.send_bytes(chunk)


@dataclass
class Interaction:
    payload: Json
    responded: int | None = None  # callback type, once acknowledged
    original_id: int | None = None
    ephemeral: bool = False  # what the callback (a defer, or the answer itself) asked for


class FakeDiscord(FakeServer[RestCall]):
    """The fake server. Start it with `async with`, point the client at `api_base_url` / `gateway_url`.

    Fault options (`fail_next`): `via` (a 429 through Discord's Google front, default True) and `code` (Discord's
    error code for another status)."""

    fault_options = frozenset({"via", "code"})

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        guild_count: int = 1,
        message_content_enabled: bool = True,
        heartbeat_interval_ms: int = 41_250,
        shards: int = 1,
        max_concurrency: int = 1,
        sharding_required: bool = False,
        preferred_locale: str = "en-US",
    ) -> None:
        """`shards` is what GET /gateway/bot recommends (and, with `sharding_required`, the fewest it accepts)."""
        super().__init__()
        self.preferred_locale = preferred_locale
        """Every guild's community language (`preferred_locale`), also an interaction's `guild_locale`."""
        self.token = token
        self.recommended_shards = shards
        self.max_concurrency = max_concurrency
        self.sharding_required = sharding_required
        self.message_content_enabled = message_content_enabled
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self._ids = itertools.count(1)
        self.users: dict[str, Json] = {}  # everyone the fake knows, by id, for computing mentions
        self.app_id = self.new_id()
        self.bot_user = self.add_user("Magpie", bot=True)
        self.owner = self.add_user("owner")
        self.guilds: dict[int, Json] = {}
        for _ in range(guild_count):
            self.add_guild()
        self.posts: list[Json] = []  # every message the bot created (channel sends and interaction follow-ups)
        self.commands: dict[int | None, list[Json]] = {}  # synced commands per guild (None = global)
        self.interactions: dict[int, Interaction] = {}
        self.connections: list[str] = []  # path and query of every gateway connection
        self.identifies = 0
        self.resumes = 0
        self.heartbeats = 0
        self.identified_shards: list[tuple[int, int]] = []  # the `shard` of every accepted IDENTIFY, in order
        self.sessions: dict[tuple[int, int], Session] = {}  # by (shard id, shard count)
        self._dm_channels: dict[int, int] = {}  # user id -> DM channel id
        self._closed_dms: set[int] = set()  # users who do not accept DMs from the bot
        self._threads: dict[int, int] = {}  # thread id -> guild id
        self.left_guilds: list[int] = []  # the guilds the bot left (DELETE /users/@me/guilds/{id}), in order
        self._conns: dict[tuple[int, int], Connection] = {}  # the live connection of each shard's session
        self._open: set[Connection] = set()

    # --- lifecycle -----------------------------------------------------------------------------------------
    def _add_routes(self, app: web.Application) -> None:
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/resume", self._gateway)
        app.router.add_route("*", API_PREFIX + "/{tail:.*}", self._rest)

    async def _on_close(self) -> None:
        for conn in list(self._open):
            if conn.request.transport is not None:
                conn.request.transport.abort()

    @property
    def session(self) -> Session | None:
        """Shard 0's session (the only one of an unsharded bot)."""
        return next((session for (shard, _), session in self.sessions.items() if shard == 0), None)

    api_base_url = property(lambda self: self.url(API_PREFIX))
    gateway_url = property(lambda self: self.url("/gateway", scheme="ws"))
    resume_gateway_url = property(lambda self: self.url("/resume", scheme="ws"))

    # --- ids, users, channels ------------------------------------------------------------------------------
    def new_id(self) -> int:
        """A snowflake: time-based like Discord's, so `created_at` is now and ids grow."""
        return ((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | (next(self._ids) & 0x3FFFFF)

    def add_user(self, name: str, *, bot: bool = False) -> Json:
        user: Json = {"id": str(self.new_id()), "username": name, "global_name": name, "discriminator": "0"}
        user.update({"avatar": None, "bot": bot, "public_flags": 0, "flags": 0})
        self.users[user["id"]] = user
        return user

    def add_guild(self, *, shard: int = 0, of: int = 1, locale: str | None = None, bot_may_write: bool = True) -> int:
        """A guild (with one text channel, also its system channel) whose id puts it on shard `shard` of `of`:
        `(id >> 22) % of == shard`. `locale`: its preferred locale (default: the fake's); `bot_may_write=False`
        denies the bot SEND_MESSAGES in the channel (a member overwrite)."""
        millis = int(time.time() * 1000) - DISCORD_EPOCH_MS
        millis += (shard - millis) % of
        guild_id = (millis << 22) | (next(self._ids) & 0x3FFFFF)
        self.guilds[guild_id] = {"id": guild_id, "channel_id": self.new_id(), "name": f"guild-{len(self.guilds)}"}
        self.guilds[guild_id].update(locale=locale or self.preferred_locale, bot_may_write=bot_may_write)
        self.guilds[guild_id].update(managers_role=self.new_id(), managers=set())
        return guild_id

    def make_manager(self, user: Json, guild_id: int | None = None) -> None:
        """`user` gets the guild's "Managers" role, which has Manage Server."""
        self.guilds[guild_id or self.guild_id]["managers"].add(user["id"])

    def permissions(self, user: Json, guild_id: int) -> int:
        """A member's permissions in the guild, as Discord computes them from the roles: the owner has all."""
        guild = self.guilds[guild_id]
        if user["id"] == self.owner["id"]:
            return ALL_PERMISSIONS
        return EVERYONE_PERMISSIONS | (MANAGE_GUILD if user["id"] in guild["managers"] else 0)

    def _member(self, user: Json, guild_id: int, *, with_user: bool = True) -> Json:
        """A guild member object (without `user` when it rides on a message, as Discord sends it)."""
        guild = self.guilds[guild_id]
        roles = [str(guild["managers_role"])] if user["id"] in guild["managers"] else []
        member: Json = {"roles": roles, "joined_at": _timestamp(), "deaf": False, "mute": False, "flags": 0}
        return {**member, "user": user} if with_user else member

    async def bot_added(self, *, locale: str | None = None, bot_may_write: bool = True) -> int:
        """Someone adds the bot to a new guild: Discord sends GUILD_CREATE for it on the live session (which
        discord.py turns into `on_guild_join`)."""
        guild_id = self.add_guild(locale=locale, bot_may_write=bot_may_write)
        joined = self._guild_payload(guild_id)
        del joined["unavailable"]  # only a guild coming back from an outage says `unavailable: false`
        await self.dispatch("GUILD_CREATE", joined)
        return guild_id

    def dm_channel(self, user: Json) -> int:
        return self._dm_channels.setdefault(int(user["id"]), self.new_id())

    def close_dms(self, user: Json) -> None:
        """`user` turns off DMs from server members: the bot may open the channel but not send into it."""
        self._closed_dms.add(int(user["id"]))

    @property
    def guild_id(self) -> int:
        return next(iter(self.guilds))

    @property
    def channel_id(self) -> int:
        """The text channel of the first guild."""
        return int(self.guilds[self.guild_id]["channel_id"])

    def add_thread(self) -> int:
        """A thread in the first guild's channel. No THREAD_CREATE is sent, so the client has not cached it and
        sees its messages in an uncached guild channel, as after a restart."""
        thread_id = self.new_id()
        self._threads[thread_id] = self.guild_id
        return thread_id

    def _guild_of_channel(self, channel_id: int) -> int | None:
        if channel_id in self._threads:
            return self._threads[channel_id]
        return next((gid for gid, guild in self.guilds.items() if guild["channel_id"] == channel_id), None)

    def _known_channel(self, channel_id: int) -> bool:
        return self._guild_of_channel(channel_id) is not None or channel_id in self._dm_channels.values()

    # --- what the bot did ----------------------------------------------------------------------------------
    def posts_in(self, channel_id: int) -> list[Json]:
        return [post for post in self.posts if int(post["channel_id"]) == channel_id]

    def visible_posts_in(self, channel_id: int) -> list[Json]:
        """What everyone in the channel sees: its posts without the ephemeral ones."""
        return [post for post in self.posts_in(channel_id) if not int(post.get("flags") or 0) & EPHEMERAL]

    async def wait_for_posts(self, channel_id: int, count: int, within: float = WAIT_S) -> list[Json]:
        """Awaits at least `count` bot messages in `channel_id` and returns them all."""
        await self.wait_until(lambda: len(self.posts_in(channel_id)) >= count, within)
        return self.posts_in(channel_id)

    # --- REST ----------------------------------------------------------------------------------------------
    async def _rest(self, request: web.Request) -> web.StreamResponse:
        body, files = await _read_body(request)
        call = RestCall(
            method=request.method,
            path="/" + request.match_info["tail"],
            query=dict(request.query),
            body=body,
            files=files,
            authorization=request.headers.get("Authorization"),
        )

        async def respond() -> web.Response:
            return self._route(call)

        return await self._answer(call, respond)

    def _route(self, call: RestCall) -> web.Response:
        webhook = call.path.startswith(("/webhooks/", "/interactions/"))
        if not webhook and call.authorization != f"Bot {self.token}":
            return _error(401, 0, "401: Unauthorized")
        fault = self._take_fault(call.endpoint)
        if fault is not None:
            return _fault_response(fault)
        routes: list[tuple[str, str, Callable[..., web.Response]]] = [
            ("GET", r"/users/@me", lambda: _json(self.bot_user)),
            ("GET", r"/oauth2/applications/@me", self._application),
            ("GET", r"/gateway", lambda: _json({"url": self.gateway_url})),
            ("GET", r"/gateway/bot", self._gateway_bot),
            ("PUT", r"/applications/(\d+)/commands", lambda app: self._sync_commands(call, app, None)),
            ("PUT", r"/applications/(\d+)/guilds/(\d+)/commands", lambda app, g: self._sync_commands(call, app, g)),
            ("POST", r"/channels/(\d+)/messages", lambda channel: self._create_message(call, channel)),
            ("POST", r"/channels/(\d+)/typing", self._typing),
            ("POST", r"/users/@me/channels", lambda: self._open_dm(call)),
            ("DELETE", r"/users/@me/guilds/(\d+)", self._leave_guild),
            ("POST", r"/interactions/(\d+)/([^/]+)/callback", lambda i, t: self._callback(call, i, t)),
            ("POST", r"/webhooks/(\d+)/([^/]+)", lambda app, token: self._followup(call, app, token)),
            ("PATCH", r"/webhooks/(\d+)/([^/]+)/messages/@original", lambda a, t: self._edit_original(call, t)),
            ("DELETE", r"/webhooks/(\d+)/([^/]+)/messages/@original", lambda a, t: self._delete_original(t)),
        ]
        for method, pattern, handler in routes:
            match = re.fullmatch(pattern, call.path)
            if method == call.method and match:
                return handler(*match.groups())
        return _error(404, 0, "404: Not Found")

    def _application(self) -> web.Response:
        return _json(
            {
                "id": str(self.app_id),
                "name": "Magpie",
                "icon": None,
                "description": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": "0" * 64,
                "owner": self.owner,
                "flags": 0,
                "bot": self.bot_user,
            }
        )

    def _gateway_bot(self) -> web.Response:
        limit = {"total": 1000, "remaining": 1000 - self.identifies, "reset_after": 86_400_000}
        limit["max_concurrency"] = self.max_concurrency
        return _json({"url": self.gateway_url, "shards": self.recommended_shards, "session_start_limit": limit})

    def _sync_commands(self, call: RestCall, app: str, guild: str | None) -> web.Response:
        if int(app) != self.app_id:
            return _error(403, 50001, "Missing Access")
        synced = []
        problem = next((p for p in map(_invalid_command, call.body or []) if p), None)
        if problem is not None:
            errors = {"_errors": [{"code": "INVALID_FORM_BODY", "message": problem}]}
            return _error(400, 50035, "Invalid Form Body", errors)
        for command in call.body:
            entry = {**command, "id": str(self.new_id()), "application_id": app, "version": str(self.new_id())}
            entry.setdefault("type", 1)
            if guild is not None:
                entry["guild_id"] = guild
            synced.append(entry)
        self.commands[None if guild is None else int(guild)] = synced
        return _json(synced)

    def _leave_guild(self, guild: str) -> web.Response:
        if int(guild) not in self.guilds or int(guild) in self.left_guilds:
            return _error(404, 10004, "Unknown Guild")
        self.left_guilds.append(int(guild))
        return web.Response(status=204)

    def _typing(self, channel: str) -> web.Response:
        if not self._known_channel(int(channel)):
            return _error(404, 10003, "Unknown Channel")
        return web.Response(status=204)

    def _open_dm(self, call: RestCall) -> web.Response:
        recipient = self.users.get(str((call.body or {}).get("recipient_id")))
        if recipient is None:
            return _error(400, 50035, "Invalid Form Body")
        channel = {"id": str(self.dm_channel(recipient)), "type": 1, "last_message_id": None, "flags": 0}
        return _json({**channel, "recipients": [recipient]})

    def _create_message(self, call: RestCall, channel: str) -> web.Response:
        channel_id = int(channel)
        if not self._known_channel(channel_id):
            return _error(404, 10003, "Unknown Channel")
        if any(self._dm_channels.get(user) == channel_id for user in self._closed_dms):
            return _error(403, 50007, "Cannot send messages to this user")
        guild_id = self._guild_of_channel(channel_id)
        if guild_id in self.left_guilds:
            return _error(403, 50001, "Missing Access")
        if guild_id is not None and not self.guilds[guild_id]["bot_may_write"]:
            return _error(403, 50013, "Missing Permissions")
        problem = _invalid_message(call.body, call.files)
        if problem is not None:
            return problem
        return _json(self._post(call, channel_id, self._guild_of_channel(channel_id)))

    def _post(self, call: RestCall, channel_id: int, guild_id: int | None, **extra: Any) -> Json:
        body: Json = call.body or {}
        content = str(body.get("content") or "")
        reference = body.get("message_reference")
        replied = self._find_message(int(reference["message_id"])) if reference else None
        mention_everyone, mentions = self._mentions(content, body.get("allowed_mentions"), replied)
        post = self._message(
            channel_id=channel_id, guild_id=guild_id, author=self.bot_user, content=content, reply_to=replied
        )
        post.update(mention_everyone=mention_everyone, mentions=mentions, **extra)
        post["attachments"] = [_attachment(self.new_id(), name, data) for name, data in call.files]
        post["allowed_mentions"] = body.get("allowed_mentions")  # not Discord's, kept for assertions
        self.posts.append(post)
        return post

    def _mentions(self, content: str, allowed: Json | None, replied: Json | None) -> tuple[bool, list[Json]]:
        """Who Discord would ping: without `allowed_mentions` it parses everything in the content."""
        parse = set(allowed["parse"]) if allowed is not None else {"everyone", "users", "roles"}
        allowed_users = {str(user) for user in (allowed or {}).get("users", [])}
        everyone = "everyone" in parse and ("@everyone" in content or "@here" in content)
        ids = {match for match in re.findall(r"<@!?(\d+)>", content) if "users" in parse or match in allowed_users}
        if replied is not None and (allowed is None or allowed.get("replied_user")):
            ids.add(str(replied["author"]["id"]))
        return everyone, [user for user_id, user in self.users.items() if user_id in ids]

    def _session_messages(self) -> Iterable[Json]:
        events = itertools.chain.from_iterable(session.events for session in self.sessions.values())
        yield from (event["d"] for event in events if event["t"] == "MESSAGE_CREATE")

    def _find_message(self, message_id: int) -> Json | None:
        candidates = itertools.chain(self.posts, self._session_messages())
        return next((message for message in candidates if int(message["id"]) == message_id), None)

    def _callback(self, call: RestCall, interaction_id: str, token: str) -> web.Response:
        interaction = self.interactions.get(int(interaction_id))
        if interaction is None or interaction.payload["token"] != token:
            return _error(404, 10062, "Unknown interaction")
        if interaction.responded is not None:
            return _error(400, 40060, "Interaction has already been acknowledged.")
        kind = int(call.body["type"])
        interaction.responded = kind
        flags = int((call.body.get("data") or {}).get("flags") or 0)
        interaction.ephemeral = bool(flags & EPHEMERAL)
        result: Json = {
            "interaction": {
                "id": interaction_id,
                "type": interaction.payload["type"],
                "response_message_loading": kind == 5,
                "response_message_ephemeral": bool(flags & 64),
            },
            "resource": {"type": kind},
        }
        if kind == 4:
            post = self._interaction_post(call, interaction, ephemeral=interaction.ephemeral)
            interaction.original_id = int(post["id"])
            result["resource"]["message"] = post
        if call.query.get("with_response") in ("1", "true", "True"):
            return _json(result)
        return web.Response(status=204)

    def _interaction_by_token(self, token: str) -> Interaction | None:
        return next((i for i in self.interactions.values() if i.payload["token"] == token), None)

    def _interaction_post(self, call: RestCall, interaction: Interaction, *, ephemeral: bool = False) -> Json:
        payload = interaction.payload
        guild = payload.get("guild_id")
        extra: Json = {"webhook_id": str(self.app_id), "interaction_id": payload["id"]}
        extra["flags"] = EPHEMERAL if ephemeral else 0
        return self._post(call, int(payload["channel_id"]), int(guild) if guild else None, **extra)

    def _followup(self, call: RestCall, app: str, token: str) -> web.Response:
        interaction = self._interaction_by_token(token)
        if int(app) != self.app_id or interaction is None or interaction.responded is None:
            return _error(404, 10015, "Unknown Webhook")
        problem = _invalid_message(call.body, call.files)
        if problem is not None:
            return problem
        first = interaction.original_id is None  # the first follow-up replaces the "thinking…" message
        flags = int((call.body or {}).get("flags") or 0)
        ephemeral = interaction.ephemeral if first else bool(flags & EPHEMERAL)
        post = self._interaction_post(call, interaction, ephemeral=ephemeral)
        if first:
            interaction.original_id = int(post["id"])
        return _json(post) if call.query.get("wait") in ("1", "true", "True") else web.Response(status=204)

    def _edit_original(self, call: RestCall, token: str) -> web.Response:
        interaction = self._interaction_by_token(token)
        if interaction is None or interaction.responded is None:
            return _error(404, 10015, "Unknown Webhook")
        post = self._interaction_post(call, interaction, ephemeral=interaction.ephemeral)
        interaction.original_id = int(post["id"])
        return _json(post)

    def _delete_original(self, token: str) -> web.Response:
        interaction = self._interaction_by_token(token)
        if interaction is None or interaction.responded is None:
            return _error(404, 10015, "Unknown Webhook")
        interaction.original_id = None
        return web.Response(status=204)

    # --- gateway -------------------------------------------------------------------------------------------
    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self.connections.append(request.path_qs)
        if request.query.get("v") != "10" or request.query.get("encoding") != "json":
            await ws.close(code=4012, message=b"Invalid API version")
            return ws
        compress = request.query.get("compress")
        conn = Connection(request, ws, zlib.compressobj() if compress == "zlib-stream" else None)
        self._open.add(conn)
        await conn.send({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}, "s": None, "t": None})
        try:
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    await self._on_client_payload(conn, json.loads(message.data))
        finally:
            self._open.discard(conn)
            for shard, live in list(self._conns.items()):
                if live is conn:
                    del self._conns[shard]
            await self._notify()
        return ws

    async def _bind(self, shard: tuple[int, int], conn: Connection) -> None:
        """`conn` now carries `shard`'s session; a connection that carried it before is closed (4009)."""
        old = self._conns.get(shard)
        self._conns[shard] = conn
        if old is not None and old is not conn:
            await old.ws.close(code=4009, message=b"Session timed out")

    async def _on_client_payload(self, conn: Connection, payload: Json) -> None:
        op, data = payload.get("op"), payload.get("d") or {}
        if op == 1:
            self.heartbeats += 1
            await conn.send({"op": 11, "d": None, "s": None, "t": None})
        elif op == 2:
            await self._identify(conn, data)
        elif op == 6:
            await self._resume(conn, data)
        await self._notify()

    async def _identify(self, conn: Connection, data: Json) -> None:
        if data.get("token") != self.token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        shard = _valid_shard(data.get("shard", [0, 1]))
        if shard is None:
            await conn.ws.close(code=4010, message=b"Invalid shard.")
            return
        if self.sharding_required and shard[1] < self.recommended_shards:
            await conn.ws.close(code=4011, message=b"Sharding required.")
            return
        intents = int(data.get("intents", 0))
        if intents & MESSAGE_CONTENT and not self.message_content_enabled:
            await conn.ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        self.identifies += 1
        self.identified_shards.append(shard)
        session = self.sessions[shard] = Session(uuid.uuid4().hex, intents, shard)
        await self._bind(shard, conn)
        guilds = [guild_id for guild_id in self.guilds if _shard_of(guild_id, shard[1]) == shard[0]]
        ready = {
            "v": 10,
            "user": self.bot_user,
            "guilds": [{"id": str(guild_id), "unavailable": True} for guild_id in guilds],
            "session_id": session.session_id,
            "resume_gateway_url": self.resume_gateway_url,
            "application": {"id": str(self.app_id), "flags": 0},
        }
        if "shard" in data:
            ready["shard"] = list(shard)
        await self.dispatch("READY", ready, shard=shard)
        for guild_id in guilds:
            await self.dispatch("GUILD_CREATE", self._guild_payload(guild_id), shard=shard)

    async def _resume(self, conn: Connection, data: Json) -> None:
        if data.get("token") != self.token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        found = [(shard, s) for shard, s in self.sessions.items() if s.session_id == data.get("session_id")]
        if not found:
            await conn.send({"op": 9, "d": False, "s": None, "t": None})
            return
        shard, session = found[0]
        self.resumes += 1
        await self._bind(shard, conn)
        for event in session.events[int(data.get("seq") or 0) :]:
            await conn.send(event)
        await self.dispatch("RESUMED", {}, shard=shard)

    def _guild_payload(self, guild_id: int) -> Json:
        guild = self.guilds[guild_id]
        channel = {"id": str(guild["channel_id"]), "type": 0, "name": "general", "position": 0}
        overwrites = []
        if not guild["bot_may_write"]:
            overwrites.append({"id": self.bot_user["id"], "type": 1, "allow": "0", "deny": str(SEND_MESSAGES)})
        channel.update(guild_id=str(guild_id), permission_overwrites=overwrites, nsfw=False, topic=None)
        everyone = {"id": str(guild_id), "name": "@everyone", "permissions": str(EVERYONE_PERMISSIONS), "position": 0}
        everyone.update(color=0, hoist=False, managed=False, mentionable=False, flags=0)
        managers = {"id": str(guild["managers_role"]), "name": "Managers", "permissions": str(MANAGE_GUILD)}
        managers.update(position=1, color=0, hoist=False, managed=False, mentionable=False, flags=0)
        me = {"user": self.bot_user, "roles": [], "joined_at": _timestamp(), "deaf": False, "mute": False, "flags": 0}
        return {
            "id": str(guild_id),
            "name": guild["name"],
            "unavailable": False,
            "owner_id": self.owner["id"],
            "member_count": 2,
            "large": False,
            "joined_at": _timestamp(),
            "channels": [channel],
            "threads": [],
            "members": [me],
            "roles": [everyone, managers],
            "system_channel_id": str(guild["channel_id"]),
            "emojis": [],
            "stickers": [],
            "features": [],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "premium_tier": 0,
            "preferred_locale": guild["locale"],
        }

    def _wanted(self, session: Session, event: str, data: Json) -> bool:
        """Discord sends an event only when the session asked for its intent."""
        intents = session.intents
        if event in ("MESSAGE_CREATE", "MESSAGE_UPDATE", "MESSAGE_DELETE"):
            return bool(intents & (GUILD_MESSAGES if data.get("guild_id") else DIRECT_MESSAGES))
        if event == "GUILD_CREATE":
            return bool(intents & GUILDS)
        return True

    async def dispatch(
        self, event: str, data: Json, *, deliver: bool = True, shard: tuple[int, int] | None = None
    ) -> int | None:
        """Sends a DISPATCH with the next sequence number to the shard the event belongs to (its guild's; a DM's:
        shard 0), or to `shard`, and keeps it there for RESUME to replay.

        `deliver=False` records the event without sending it, as if the connection dropped on the way: a client
        that then RESUMEs must receive it. Returns the sequence number, or None when the intents filter it out.
        """
        targets = [shard] if shard is not None else self._shards_for(data)
        if not targets:
            raise RuntimeError("no gateway session for this event's shard yet: start the client first")
        sequences = [await self._send_event(target, event, data, deliver=deliver) for target in targets]
        await self._notify()
        return sequences[0]

    def _shards_for(self, data: Json) -> list[tuple[int, int]]:
        """The sessions an event goes to: those of the shard its guild hashes to, or shard 0 for a DM."""
        guild = data.get("guild_id")
        return [
            (shard, count) for shard, count in self.sessions if shard == (_shard_of(int(guild), count) if guild else 0)
        ]

    async def _send_event(self, shard: tuple[int, int], event: str, data: Json, *, deliver: bool) -> int | None:
        session = self.sessions[shard]
        if not self._wanted(session, event, data):
            return None
        if event in ("MESSAGE_CREATE", "MESSAGE_UPDATE"):
            data = self._apply_content_intent(session, data)
        seq = session.next_seq()
        payload = {"op": 0, "t": event, "s": seq, "d": data}
        session.events.append(payload)
        conn = self._conns.get(shard)
        if deliver and conn is not None:
            await conn.send(payload)
        return seq

    def _apply_content_intent(self, session: Session, data: Json) -> Json:
        """Without MESSAGE_CONTENT, guild messages that do not mention the bot arrive with their content blanked."""
        if session.intents & MESSAGE_CONTENT or not data.get("guild_id"):
            return data
        if any(user["id"] == self.bot_user["id"] for user in data["mentions"]):
            return data
        if data["author"]["id"] == self.bot_user["id"]:
            return data
        return {**data, "content": "", "embeds": [], "attachments": [], "components": []}

    async def drop_connection(self, code: int | None = 4000, *, shard: tuple[int, int] = (0, 1)) -> None:
        """Ends a shard's gateway connection: a close frame with `code`, or (None) a dead TCP connection."""
        conn = self._conns.pop(shard, None)
        if conn is None:
            raise RuntimeError("no gateway connection to drop")
        if code is None:
            assert conn.request.transport is not None
            conn.request.transport.abort()
        else:
            await conn.ws.close(code=code, message=b"dropped by the test")

    def forget_session(self, shard: tuple[int, int] = (0, 1)) -> None:
        """Makes the shard's next RESUME fail with INVALID_SESSION, so the client must IDENTIFY again."""
        old = self.sessions.get(shard)
        self.sessions[shard] = Session("forgotten", 0, shard, list(old.events) if old else [])

    # --- events the tests send -----------------------------------------------------------------------------
    def _message(
        self,
        *,
        channel_id: int,
        guild_id: int | None,
        author: Json,
        content: str,
        reply_to: Json | None = None,
        message_id: int | None = None,
    ) -> Json:
        message: Json = {
            "id": str(message_id or self.new_id()),
            "channel_id": str(channel_id),
            "author": author,
            "content": content,
            "timestamp": _timestamp(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
        }
        if guild_id is not None:
            message["guild_id"] = str(guild_id)
        if reply_to is not None:
            message["type"] = 19
            reference = {"message_id": reply_to["id"], "channel_id": str(channel_id), "type": 0}
            if guild_id is not None:
                reference["guild_id"] = str(guild_id)
            message["message_reference"] = reference
            message["referenced_message"] = reply_to
        return message

    async def send_message(
        self,
        author: Json,
        content: str,
        *,
        channel_id: int | None = None,
        guild: bool = False,
        reply_to: Json | None = None,
        ping_reply: bool = True,
        attachments: Iterable[tuple[str, bytes]] = (),
        sticker: bool = False,
        message_id: int | None = None,
        deliver: bool = True,
    ) -> Json:
        """A user's MESSAGE_CREATE: a DM from `author` unless `guild` (or a guild `channel_id`) is given.

        Mentions are computed from `<@id>` in `content` like Discord does; a reply that pings (the default) also
        mentions the replied-to author. Returns the message payload (before any content-intent blanking).
        """
        if channel_id is None:
            channel_id = self.channel_id if guild else self.dm_channel(author)
        guild_id = self._guild_of_channel(channel_id)
        message = self._message(
            channel_id=channel_id,
            guild_id=guild_id,
            author=author,
            content=content,
            reply_to=reply_to,
            message_id=message_id,
        )
        if guild_id is not None:
            message["member"] = self._member(author, guild_id, with_user=False)
        ids = set(re.findall(r"<@!?(\d+)>", content))
        if reply_to is not None and ping_reply:
            ids.add(str(reply_to["author"]["id"]))
        message["mentions"] = [self.users[i] for i in sorted(ids) if i in self.users]
        message["attachments"] = [_attachment(self.new_id(), name, data) for name, data in attachments]
        if sticker:
            message["sticker_items"] = [{"id": str(self.new_id()), "name": "wave", "format_type": 1}]
        if guild_id not in self.left_guilds:  # a bot that left a guild hears nothing more from it
            await self.dispatch("MESSAGE_CREATE", message, deliver=deliver)
        return message

    async def edit_message(self, message: Json, content: str) -> Json:
        """A user's MESSAGE_UPDATE: the whole message with its new content, as Discord sends it."""
        edited = {**message, "content": content, "edited_timestamp": _timestamp()}
        await self.dispatch("MESSAGE_UPDATE", edited)
        return edited

    async def delete_message(self, message: Json) -> None:
        """A user's MESSAGE_DELETE: only the ids, as Discord sends it."""
        data = {"id": message["id"], "channel_id": message["channel_id"]}
        if "guild_id" in message:
            data["guild_id"] = message["guild_id"]
        await self.dispatch("MESSAGE_DELETE", data)

    async def send_command(
        self,
        user: Json,
        name: str,
        options: dict[str, str] | None = None,
        *,
        guild: bool = False,
        guild_id: int | None = None,
        interaction_id: int | None = None,
        locale: str = "en-US",
    ) -> Json:
        """An INTERACTION_CREATE for the synced slash command `name`, in a guild's channel (`guild_id`, or with
        `guild` the first guild) or a DM."""
        guild_id = guild_id or (self.guild_id if guild else None)
        registered = self.commands.get(guild_id) or self.commands.get(None) or []
        command = next((c for c in registered if c["name"] == name), None)
        if command is None:
            raise LookupError(f"/{name} was never synced to {'the guild' if guild_id else 'global commands'}")
        needed = int(command.get("default_member_permissions") or 0)
        if guild_id and needed & ~self.permissions(user, guild_id):
            raise PermissionError(f"Discord does not show /{name} to a member without permissions {needed}")
        channel_id = int(self.guilds[guild_id]["channel_id"]) if guild_id else self.dm_channel(user)
        data: Json = {"id": command["id"], "name": name, "type": 1}
        if options:
            data["options"] = [{"name": key, "type": 3, "value": value} for key, value in options.items()]
        if "guild_id" in command:
            data["guild_id"] = command["guild_id"]
        payload: Json = {
            "id": str(interaction_id or self.new_id()),
            "application_id": str(self.app_id),
            "type": 2,
            "token": "interaction-token-" + uuid.uuid4().hex,
            "version": 1,
            "channel_id": str(channel_id),
            "data": data,
            "locale": locale,
            "app_permissions": str((1 << 41) - 1),
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild_id)} if guild_id else {"1": user["id"]},
            "context": 0 if guild_id else 1,
            "attachment_size_limit": 10 * 1024 * 1024,
        }
        if guild_id is not None:
            payload["guild_id"] = str(guild_id)
            payload["guild_locale"] = self.preferred_locale
            payload["channel"] = {"id": str(channel_id), "type": 0, "guild_id": str(guild_id), "name": "general"}
            payload["member"] = self._member(user, guild_id) | {"permissions": str(self.permissions(user, guild_id))}
        else:
            payload["channel"] = {"id": str(channel_id), "type": 1, "recipients": [user]}
            payload["user"] = user
        self.interactions[int(payload["id"])] = Interaction(payload)
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload


# --- helpers -----------------------------------------------------------------------------------------------------
def _shard_of(guild_id: int, shard_count: int) -> int:
    """Discord's routing rule: which shard of `shard_count` receives a guild's events."""
    return (guild_id >> 22) % shard_count


def _valid_shard(shard: Any) -> tuple[int, int] | None:
    """IDENTIFY's `shard` as Discord accepts it, `[shard_id, shard_count]` with 0 <= id < count; else None."""
    if not isinstance(shard, list) or len(shard) != 2:
        return None
    if not all(isinstance(part, int) and not isinstance(part, bool) for part in shard):
        return None
    shard_id, count = shard
    return (shard_id, count) if 0 <= shard_id < count else None


def _timestamp() -> str:
    return datetime.now(UTC).isoformat()


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """discord.py parses a body as JSON only when Content-Type is exactly `application/json` (no charset)."""
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json", **(headers or {})}
    )


LOCALES = frozenset(
    {"id", "da", "de", "en-GB", "en-US", "es-ES", "es-419", "fr", "hr", "it", "lt", "hu", "nl", "no", "pl", "pt-BR"}
    | {"ro", "fi", "sv-SE", "vi", "tr", "cs", "el", "bg", "ru", "uk", "hi", "th", "zh-CN", "ja", "zh-TW", "ko"}
)
"""Discord's locales: the only keys `name_localizations` and `description_localizations` may have."""
_COMMAND_NAME = re.compile(r"[-_\w\u0900-\u097F\u0E00-\u0E7F]{1,32}")


def _invalid_command(command: Json) -> str | None:
    """Why Discord would refuse an application command (or one of its options) in a sync, or None."""
    name, description = command.get("name", ""), command.get("description", "")
    if not _COMMAND_NAME.fullmatch(name) or name != name.lower():
        return f"name {name!r}: APPLICATION_COMMAND_INVALID_NAME"
    if not 1 <= len(description) <= 100:
        return f"{name}.description: must be between 1 and 100 in length"
    for field_name, limit in (("name_localizations", 32), ("description_localizations", 100)):
        localized = command.get(field_name) or {}
        if not isinstance(localized, dict):
            return f"{name}.{field_name}: must be an object or null"
        for locale, text in localized.items():
            if locale not in LOCALES:
                return f"{name}.{field_name}.{locale}: not a valid locale"
            if not isinstance(text, str) or not 1 <= len(text) <= limit:
                return f"{name}.{field_name}.{locale}: must be between 1 and {limit} in length"
            if field_name == "name_localizations" and (not _COMMAND_NAME.fullmatch(text) or text != text.lower()):
                return f"{name}.{field_name}.{locale}: APPLICATION_COMMAND_INVALID_NAME"
    return next((p for p in map(_invalid_command, command.get("options") or []) if p), None)


def _error(status: int, code: int, message: str, errors: Json | None = None) -> web.Response:
    body: Json = {"message": message, "code": code}
    if errors is not None:
        body["errors"] = errors
    return _json(body, status)


_ERROR_CODES = {400: (50035, "Invalid Form Body"), 403: (50013, "Missing Permissions"), 404: (10003, "Unknown Channel")}
"""What Discord answers with each status, when the test names no other code."""


def _fault_response(fault: Fault) -> web.Response:
    if fault.status >= 500:
        return front_page(fault.status)
    if fault.status != 429:
        code, message = _ERROR_CODES.get(fault.status, (0, f"{fault.status}: error"))
        return _error(fault.status, int(fault.options.get("code", code)), message)
    if not fault.options.get("via", True):  # Cloudflare's ban, not Discord's rate limiter: no JSON, no headers
        return web.Response(status=429, text="error code: 1015", content_type="text/plain")
    headers = {
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": f"{time.time() + fault.retry_after:.3f}",
        "X-RateLimit-Reset-After": f"{fault.retry_after:.3f}",
        "X-RateLimit-Bucket": "fake-bucket",
        "X-RateLimit-Scope": "user",
        "Retry-After": str(max(1, round(fault.retry_after))),
        "Via": "1.1 google",
    }
    body = {"message": "You are being rate limited.", "retry_after": fault.retry_after, "global": False}
    return _json(body, 429, headers)


def _invalid_message(body: Json | None, files: list[tuple[str, bytes]]) -> web.Response | None:
    """Discord's checks on a new message: not empty, content at most 2,000 characters."""
    content = str((body or {}).get("content") or "")
    if len(content) > MESSAGE_LIMIT:
        detail = {"code": "BASE_TYPE_MAX_LENGTH", "message": f"Must be {MESSAGE_LIMIT} or fewer in length."}
        return _error(400, 50035, "Invalid Form Body", {"content": {"_errors": [detail]}})
    if not content and not files and not (body or {}).get("embeds"):
        return _error(400, 50006, "Cannot send an empty message")
    return None


def _attachment(attachment_id: int, filename: str, data: bytes) -> Json:
    url = f"https://cdn.invalid/attachments/{attachment_id}/{filename}"
    return {"id": str(attachment_id), "filename": filename, "size": len(data), "url": url, "proxy_url": url}


async def _read_body(request: web.Request) -> tuple[Any, list[tuple[str, bytes]]]:
    """JSON bodies, or discord.py's multipart form (`payload_json` plus `files[n]`)."""
    if request.content_type == "multipart/form-data":
        body: Any = None
        files: list[tuple[str, bytes]] = []
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "payload_json":
                body = json.loads(await part.text())
            else:
                files.append((part.filename or "", bytes(await part.read())))
        return body, files
    raw = await request.read()
    return (json.loads(raw) if raw else None), []
