"""A small fake of the Telegram Bot API for driving the real python-telegram-bot client in tests.

Longer than other modules on purpose: it models the Bot API's rules (chats, per-chat message ids, entities, reply
targets, forums, migrations, who may be written to first, limits and error shapes) in one place so that its
strictness is reviewed as a whole; what it shares with the fake Discord is in `tests/fake_base.py`.

It speaks the real wire format on 127.0.0.1 (`/bot<TOKEN>/<method>`, JSON, form-encoded and multipart bodies,
`{"ok": ..., "result"|"description": ...}` answers), keeps chats and messages like the real server does (per-chat
message ids, entities computed from the text, replies that must point at an existing message), long-polls
`getUpdates` on a condition instead of sleeping, and delivers updates to a registered webhook with the secret header
as Telegram does. Webhooks are as strict as Telegram's: `setWebhook` wants an HTTPS URL on port 443, 80, 88 or 8443
whose host resolves, and a secret of 1-256 characters from A-Z, a-z, 0-9, _ and -. The public internet is
`public_host(url, upstreams)`: what the test says sits behind a public address (a load balancer that hands each
request to the next of its upstreams in turn, which are the webhook servers on 127.0.0.1), and
`deliver_next_to_every_upstream` posts the next update to all of them at once (Telegram re-sending an update whose
answer was slow, and the load balancer choosing another replica). Lifecycle, call records, waits and fault injection
come from `fake_base.FakeServer` (an endpoint is the method name); the faults in Telegram's shapes: 429 with
`retry_after`, a 5xx page from Telegram's front (HTML, the API never saw the request) or a 5xx the API explained
(`explained=True`: JSON), an answer that comes too late (`answer_late`: the request was carried out, the client
timed out waiting), requests held until the test releases them (carried out or lost), and refused connections. Like
Telegram, a bot cannot write first to a person: a private chat exists only once the person opened it
(`private_chat`, i.e. pressed Start), and a send to someone the fake has seen but who never did is refused with 403
"Forbidden: bot can't initiate conversation with a user". Groups have members: `getChatMember` answers each one's
status (`make_admin` names the administrators and the creator), `bot_added` sends the `my_chat_member` update of
the bot joining, and after `leaveChat` the bot gets nothing more from the group and may not write there (403).

    async with FakeTelegram() as telegram:
        settings = Settings(telegram_bot_token=telegram.token, telegram_base_url=telegram.base_url)
        alice = telegram.user(1001, "Alice")
        telegram.user_says(telegram.private_chat(alice), alice, "hello")
        [answer] = await telegram.wait_for_messages(alice.id, 1)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from tests.fake_base import WAIT_S, FakeServer, Fault, RecordedCall, front_page
from tests.fake_flood import FloodControl

TEXT_LIMIT = 4096
"""Telegram's limit for one message, in UTF-16 code units."""

CHAT_ACTIONS = frozenset(
    {
        "typing",
        "upload_photo",
        "record_video",
        "upload_video",
        "record_voice",
        "upload_voice",
        "upload_document",
        "choose_sticker",
        "find_location",
        "record_video_note",
        "upload_video_note",
    }
)
_INT_FIELDS = frozenset({"chat_id", "user_id", "offset", "limit", "timeout", "message_id", "max_connections"})
_JSON_FIELDS = frozenset(
    {"reply_parameters", "commands", "scope", "entities", "allowed_updates", "reply_markup", "link_preview_options"}
)
_COMMAND = re.compile(r"^/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?")
_MENTION = re.compile(r"(?<![\w@])@[A-Za-z0-9_]{3,32}")
_WEBHOOK_SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
_WEBHOOK_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")
WEBHOOK_PORTS = frozenset({443, 80, 88, 8443})
"""The only ports Telegram posts webhooks to."""


def utf16_length(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


@dataclass(frozen=True)
class Person:
    """A Telegram user."""

    id: int
    first_name: str
    username: str | None = None
    is_bot: bool = False
    language_code: str | None = None
    """The IETF tag of the user's app language (`ko`, `en`); Telegram leaves it out when it does not know."""

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "is_bot": self.is_bot, "first_name": self.first_name}
        if self.username:
            data["username"] = self.username
        if self.language_code:
            data["language_code"] = self.language_code
        return data


ANONYMOUS_ADMIN = Person(1087968824, "Group", "GroupAnonymousBot", is_bot=True)
"""Who Telegram says sent a message that a group admin posted anonymously, as the group."""


@dataclass(frozen=True)
class ChatRef:
    """A chat: `private` (id = the user's id), `group`, `supergroup` or `channel`."""

    id: int
    type: str
    title: str | None = None
    first_name: str | None = None
    is_forum: bool = False

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "type": self.type}
        if self.is_forum:
            data["is_forum"] = True
        if self.title:
            data["title"] = self.title
        if self.first_name:
            data["first_name"] = self.first_name
        return data


@dataclass
class Call(RecordedCall):
    """One request the client made: the method, its decoded parameters and what the server answered."""

    method: str
    params: dict[str, Any]
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return self.method


class FakeTelegram(FakeServer[Call]):
    """The fake server. Start it with `async with`, point `TELEGRAM_BASE_URL` at `base_url`.

    Fault options (`fail_next`): `explained` (a 5xx with the Bot API's JSON body: it saw the request, instead of
    the front's HTML page) and `late_s` (not an error: the call is carried out, but its answer waits this long)."""

    fault_options = frozenset({"explained", "late_s"})

    def __init__(self, token: str = "123456789:AAFakeTokenForTestsOnly-xyz", bot_username: str = "MagpieTestBot"):
        super().__init__()
        self.token = token
        self.bot = Person(int(token.split(":", maxsplit=1)[0]), "Magpie", bot_username, is_bot=True)
        self.commands: dict[str, list[dict[str, str]]] = {}
        """`setMyCommands` results without a `language_code` (for every language), by scope (`default`, `chat:<id>`)."""
        self.localized_commands: dict[str, dict[str, list[dict[str, str]]]] = {}
        """`setMyCommands` results for one `language_code`: language code -> scope -> commands."""
        self.webhook_url = ""
        self.webhook_secret: str | None = None
        self.webhook_deliveries: list[int] = []
        """The status each webhook delivery was answered with, in order."""
        self.delivered_to: list[str] = []
        """The upstream each webhook delivery went to, in the same order."""
        self._hosts: dict[str, _LoadBalancer] = {}
        """Public host name -> what answers there (`public_host`)."""
        self._fan_out_next = False
        self._chats: dict[int, ChatRef] = {}
        self._people: dict[int, Person] = {}
        """Everyone seen writing anywhere: the ids a bot may try (and fail) to write to privately."""
        self._messages: dict[tuple[int, int], dict[str, Any]] = {}
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._upgraded: dict[int, int] = {}
        """Groups that became supergroups: old chat id -> new chat id."""
        self._statuses: dict[tuple[int, int], str] = {}
        """(chat id, user id) -> a member's status there (`creator`, `administrator`); anyone else seen writing in
        a group is a `member`, and a known person who never wrote there has `left` it, as getChatMember says."""
        self.left_chats: list[int] = []
        """The groups the bot left (`leaveChat`), in order: from then on it can neither write nor ask there."""
        self._background: set[asyncio.Task[None]] = set()
        self._seq = itertools.count()
        self._client: aiohttp.ClientSession | None = None
        self.flood = FloodControl()
        """Telegram's flood limits (`tests/fake_flood.py`): a test may replace it, e.g. to turn them off."""

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_post("/bot{token}/{method}", self._dispatch)
        app.router.add_get("/bot{token}/{method}", self._dispatch)

    async def start(self) -> None:
        await super().start()
        self._client = aiohttp.ClientSession()

    async def _on_close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._client is not None:
            await self._client.close()

    base_url = property(lambda self: self.url("/bot"))
    """What `TELEGRAM_BASE_URL` should be: the client appends the token."""
    base_file_url = property(lambda self: self.url("/file/bot"))

    # --- people, chats and what they say ----------------------------------------------------------------------

    @staticmethod
    def user(user_id: int, first_name: str, username: str | None = None, *, language_code: str | None = None) -> Person:
        return Person(user_id, first_name, username, language_code=language_code)

    def private_chat(self, person: Person) -> ChatRef:
        """`person` opened a private chat with the bot (pressed Start): from now on the bot may write to them."""
        self._people[person.id] = person
        return self._remember(ChatRef(person.id, "private", first_name=person.first_name))

    def group(self, chat_id: int, title: str = "Test group", kind: str = "supergroup", forum: bool = False) -> ChatRef:
        return self._remember(ChatRef(chat_id, kind, title=title, is_forum=forum))

    def user_says(
        self,
        chat: ChatRef,
        person: Person,
        text: str,
        *,
        reply_to: dict[str, Any] | None = None,
        entities: list[dict[str, Any]] | None = None,
        topic: int | None = None,
    ) -> dict[str, Any]:
        """A new text message (in forum topic `topic`, if given); entities (commands, @mentions) are computed from
        the text like Telegram does."""
        found = _entities(text) if entities is None else entities
        extra: dict[str, Any] = {"text": text}
        if topic is not None:
            extra.update(message_thread_id=topic, is_topic_message=True)
        if found:
            extra["entities"] = found
        return self._new_message(chat, person, extra, reply_to)

    def anonymous_admin_says(self, chat: ChatRef, text: str) -> dict[str, Any]:
        """A group admin writing anonymously, as the group itself: `from` is Telegram's GroupAnonymousBot and
        `sender_chat` the group."""
        extra: dict[str, Any] = {"text": text, "sender_chat": chat.as_dict()}
        if found := _entities(text):
            extra["entities"] = found
        return self._new_message(chat, ANONYMOUS_ADMIN, extra, None)

    def user_sends_sticker(self, chat: ChatRef, person: Person, *, reply_to: dict[str, Any] | None = None) -> Any:
        sticker = {
            "file_id": "CAACAgIAAxkBAAEFake",
            "file_unique_id": "AgADFake",
            "type": "regular",
            "width": 512,
            "height": 512,
            "is_animated": False,
            "is_video": False,
            "emoji": "🙂",
        }
        return self._new_message(chat, person, {"sticker": sticker}, reply_to)

    def user_sends_photo(self, chat: ChatRef, person: Person, caption: str | None = None) -> dict[str, Any]:
        photo = [{"file_id": "AgACFakePhoto", "file_unique_id": "AQADFake", "width": 90, "height": 90}]
        extra: dict[str, Any] = {"photo": photo}
        if caption:
            extra["caption"] = caption
        return self._new_message(chat, person, extra, None)

    def user_sends_voice(self, chat: ChatRef, person: Person) -> dict[str, Any]:
        voice = {"file_id": "AwACFakeVoice", "file_unique_id": "AgADFakeV", "duration": 2}
        return self._new_message(chat, person, {"voice": voice}, None)

    def member_joins(self, chat: ChatRef, person: Person) -> dict[str, Any]:
        """A service message (no text, no attachment)."""
        return self._new_message(chat, person, {"new_chat_members": [person.as_dict()]}, None)

    def make_admin(self, chat: ChatRef, person: Person, status: str = "administrator") -> None:
        """`person` becomes an `administrator` (or the `creator`) of the group, or (`member`) is demoted."""
        assert status in ("creator", "administrator", "member")
        self._people.setdefault(person.id, person)
        self._statuses[chat.id, person.id] = status

    def bot_added(self, chat: ChatRef, by: Person) -> dict[str, Any]:
        """`by` adds the bot to a group: Telegram sends the `my_chat_member` update (left -> member) and the
        service message listing the new member."""
        self._remember(chat)
        self._people.setdefault(by.id, by)
        if chat.id in self.left_chats:
            self.left_chats.remove(chat.id)
        self._new_message(chat, by, {"new_chat_members": [self.bot.as_dict()]}, None)
        return self.push_update("my_chat_member", self._membership(chat, by, "left", "member"))

    def _membership(self, chat: ChatRef, by: Person, old: str, new: str) -> dict[str, Any]:
        return {
            "chat": chat.as_dict(),
            "from": by.as_dict(),
            "date": int(time.time()),
            "old_chat_member": {"status": old, "user": self.bot.as_dict()},
            "new_chat_member": {"status": new, "user": self.bot.as_dict()},
        }

    def upgrade_group(self, chat: ChatRef, new_id: int) -> ChatRef:
        """The group becomes a supergroup with a new id, as Telegram does it: from now on a send to the old id
        fails with `migrate_to_chat_id`. The notices in both chats come with `announce_upgrade`."""
        supergroup = self._remember(ChatRef(new_id, "supergroup", title=chat.title))
        self._upgraded[chat.id] = new_id
        return supergroup

    def announce_upgrade(self, chat: ChatRef, supergroup: ChatRef, person: Person) -> None:
        """The service messages of an upgrade: `migrate_to_chat_id` in the old chat, `migrate_from_chat_id` in
        the new one."""
        self._new_message(chat, person, {"migrate_to_chat_id": supergroup.id}, None)
        self._new_message(supergroup, person, {"migrate_from_chat_id": chat.id}, None)

    def user_edits(self, message: dict[str, Any], text: str) -> dict[str, Any]:
        edited = {**message, "text": text, "edit_date": int(time.time())}
        edited.pop("entities", None)
        if found := _entities(text):
            edited["entities"] = found
        self._messages[message["chat"]["id"], message["message_id"]] = edited
        self.push_update("edited_message", edited)
        return edited

    def channel_post(self, chat: ChatRef, text: str) -> dict[str, Any]:
        post = {
            "message_id": next(self._ids_for(chat.id)),
            "date": int(time.time()),
            "chat": chat.as_dict(),
            "sender_chat": chat.as_dict(),
            "text": text,
        }
        self._remember(chat)
        self.push_update("channel_post", post)
        return post

    def push_update(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Queues an update for `getUpdates`, or posts it to the webhook when one is set (as Telegram does)."""
        update = {"update_id": next(self._update_ids), kind: payload}
        if self.webhook_url:
            everywhere, self._fan_out_next = self._fan_out_next, False
            self._in_background(self._deliver_everywhere(update) if everywhere else self._deliver(update))
        else:
            self._updates.append(update)
            self._in_background(self._notify())
        return update

    # --- the public internet, as far as webhooks go -------------------------------------------------------------

    def public_host(self, url: str, upstreams: list[str]) -> None:
        """Makes the host of `url` (e.g. "https://bot.example.org") resolve to a load balancer that forwards each
        request, path unchanged, to the next of `upstreams` ("http://127.0.0.1:<port>") in turn."""
        self._hosts[_host_key(url)] = _LoadBalancer(list(upstreams))

    def deliver_next_to_every_upstream(self) -> None:
        """The next update is posted to every upstream of the webhook's host at once, instead of to one."""
        self._fan_out_next = True

    async def post_to_webhook(self, update: dict[str, Any], secret: str | None, *, upstream: int | None = None) -> int:
        """Posts `update` to the registered webhook with `secret` in the header (None: no header), through the
        load balancer (or straight to its upstream number `upstream`)."""
        assert self._client is not None and self.webhook_url, "no webhook registered"
        balancer = self._hosts[_host_key(self.webhook_url)]
        target = balancer.next() if upstream is None else balancer.upstreams[upstream]
        headers = {_WEBHOOK_SECRET_HEADER: secret} if secret is not None else {}
        self.delivered_to.append(target)
        async with self._client.post(target + _path(self.webhook_url), json=update, headers=headers) as response:
            await response.read()
            return response.status

    # --- what the bot did -------------------------------------------------------------------------------------

    def sent_messages(self, chat_id: int | None = None) -> list[dict[str, Any]]:
        """Messages the bot sent successfully, in order (documents included)."""
        sent = [m for m in self._messages.values() if m.get("from", {}).get("id") == self.bot.id]
        sent.sort(key=lambda m: m["_seq"])
        return [m for m in sent if chat_id is None or m["chat"]["id"] == chat_id]

    async def wait_for_messages(self, chat_id: int, count: int, within: float = WAIT_S) -> list[dict[str, Any]]:
        """Waits until the bot sent at least `count` messages to `chat_id`; returns them all."""
        await self.wait_until(lambda: len(self.sent_messages(chat_id)) >= count, within)
        return self.sent_messages(chat_id)

    # --- faults in Telegram's own shapes ---------------------------------------------------------------------------

    def pending_update_ids(self) -> list[int]:
        """The updates not yet confirmed by a getUpdates offset past them: Telegram delivers them again."""
        return [int(update["update_id"]) for update in self._updates]

    def answer_late(self, method: str, seconds: float, times: int = 1) -> None:
        """The next `times` calls of `method` are carried out (a message is stored) but answered only after
        `seconds`: a client with a shorter read timeout gives up on a request that did arrive."""
        self.fail_next(method, times, status=200, late_s=seconds)

    # --- the server -------------------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            params, files = await _read_params(request)
        except ConnectionResetError:  # the client gave up while sending (a stop cancelling getUpdates): no call
            return web.Response(status=499)
        call = Call(method=request.match_info["method"], params=params, files=files)
        return await self._answer(call, lambda: self._respond(call, request.match_info["token"]))

    async def _respond(self, call: Call, token: str) -> web.Response:
        if token != self.token:
            return _error_response(401, "Unauthorized")
        fault = self._take_fault(call.method)
        late_s = float(fault.options.get("late_s", 0.0)) if fault is not None else 0.0
        if fault is not None and late_s <= 0:
            return _fault_response(fault)
        if (retry_after := self.flood.retry_after(call.method, call.params)) is not None:
            return _fault_response(Fault(429, retry_after))
        if (new_id := self._upgraded.get(_chat_id(call.params))) is not None:
            body = _error_body(400, "Bad Request: group chat was upgraded to a supergroup chat")
            body["parameters"] = {"migrate_to_chat_id": new_id}
            return web.json_response(body, status=400)
        handler = getattr(self, f"_api_{call.method.lower()}", None)
        if handler is None:
            return _error_response(404, "Not Found")
        result = await handler(call.params, call.files)
        if late_s > 0:  # carried out; the answer is late
            await self._notify()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(late_s), self._changed:
                    await self._changed.wait_for(lambda: self._closing)
        if isinstance(result, web.Response):
            return result
        return web.json_response({"ok": True, "result": result})

    async def _api_getme(self, params: dict[str, Any], files: Any) -> Any:
        return {**self.bot.as_dict(), "can_join_groups": True, "can_read_all_group_messages": False}

    async def _api_getupdates(self, params: dict[str, Any], files: Any) -> Any:
        if self.webhook_url:
            return web.json_response(
                _error_body(409, "Conflict: can't use getUpdates method while webhook is active"), status=409
            )
        offset = int(params.get("offset") or 0)
        if offset:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        limit = int(params.get("limit") or 100)
        timeout = float(params.get("timeout") or 0)
        if not self._updates and timeout > 0 and not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout), self._changed:
                    await self._changed.wait_for(lambda: bool(self._updates) or self._closing)
        return self._updates[:limit]

    async def _api_sendmessage(self, params: dict[str, Any], files: Any) -> Any:
        chat = self._writable(params)
        text = str(params.get("text", ""))
        if isinstance(chat, web.Response):
            return chat
        if not text.strip():
            return _error_response(400, "Bad Request: message text is empty")
        if utf16_length(text) > TEXT_LIMIT:
            return _error_response(400, "Bad Request: message is too long")
        return self._bot_message(chat, {"text": text}, params)

    async def _api_senddocument(self, params: dict[str, Any], files: dict[str, tuple[str, bytes]]) -> Any:
        chat = self._writable(params)
        if isinstance(chat, web.Response):
            return chat
        if "document" not in files:
            return _error_response(400, "Bad Request: there is no document in the request")
        filename, content = files["document"]
        document = {"file_id": f"BQACFake{len(content)}", "file_unique_id": "AgADDoc", "file_name": filename}
        return self._bot_message(chat, {"document": document}, params, hidden={"_content": content})

    async def _api_sendchataction(self, params: dict[str, Any], files: Any) -> Any:
        if isinstance(chat := self._writable(params), web.Response):
            return chat
        if params.get("action") not in CHAT_ACTIONS:
            return _error_response(400, "Bad Request: wrong parameter action in request")
        return True

    async def _api_setmycommands(self, params: dict[str, Any], files: Any) -> Any:
        commands = params.get("commands") or []
        for command in commands:
            if not re.fullmatch(r"[a-z0-9_]{1,32}", command.get("command", "")):
                return _error_response(400, "Bad Request: BOT_COMMAND_INVALID")
            if not 1 <= len(command.get("description", "")) <= 256:
                return _error_response(400, "Bad Request: BOT_COMMAND_DESCRIPTION_INVALID")
        found = self._command_list(params)
        if isinstance(found, web.Response):
            return found
        found[self._command_scope(params)] = commands
        return True

    async def _api_getmycommands(self, params: dict[str, Any], files: Any) -> Any:
        found = self._command_list(params)
        if isinstance(found, web.Response):
            return found
        return found.get(self._command_scope(params), [])

    def _command_list(self, params: dict[str, Any]) -> dict[str, list[dict[str, str]]] | web.Response:
        """The command lists (by scope) of the request's `language_code`: a two-letter ISO 639-1 code, or empty for
        users of every language without a list of their own; a scope's chat must exist."""
        scope = params.get("scope") or {"type": "default"}
        if "chat_id" in scope and int(scope["chat_id"]) not in self._chats:
            return _error_response(400, "Bad Request: chat not found")
        code = params.get("language_code") or ""
        if not code:
            return self.commands
        if not re.fullmatch(r"[a-z]{2}", code):
            return _error_response(400, "Bad Request: invalid language code specified")
        return self.localized_commands.setdefault(code, {})

    @staticmethod
    def _command_scope(params: dict[str, Any]) -> str:
        scope = params.get("scope") or {"type": "default"}
        return f"chat:{scope['chat_id']}" if "chat_id" in scope else str(scope["type"])

    async def _api_deletewebhook(self, params: dict[str, Any], files: Any) -> Any:
        self.webhook_url, self.webhook_secret = "", None
        if params.get("drop_pending_updates") in (True, "true", "True"):
            self._updates.clear()
        return True

    async def _api_setwebhook(self, params: dict[str, Any], files: Any) -> Any:
        url = str(params.get("url", ""))
        secret = params.get("secret_token")
        if url and (problem := self._webhook_problem(url, secret, params.get("max_connections"))) is not None:
            return _error_response(400, f"Bad Request: {problem}")
        self.webhook_url, self.webhook_secret = url, secret
        return True

    def _webhook_problem(self, url: str, secret: Any, max_connections: Any) -> str | None:
        """What Telegram would refuse in a `setWebhook`, in its words."""
        parts = urlsplit(url)
        if parts.scheme != "https":
            return "bad webhook: An HTTPS URL must be provided for webhook"
        if (parts.port or 443) not in WEBHOOK_PORTS:
            return "bad webhook: Webhook can be set up only on ports 80, 88, 443 or 8443"
        if _host_key(url) not in self._hosts:
            return "bad webhook: Failed to resolve host: Name or service not known"
        if secret is not None and not _WEBHOOK_SECRET.fullmatch(str(secret)):
            return "secret token contains unallowed characters"
        if max_connections is not None and not 1 <= int(max_connections) <= 100:
            return "bad webhook: max_connections must be between 1 and 100"
        return None

    async def _api_getchatmember(self, params: dict[str, Any], files: Any) -> Any:
        """A member's status in a group, with the fields python-telegram-bot requires for each kind of member."""
        chat = self._member_of(params)
        if isinstance(chat, web.Response):
            return chat
        person = self._people.get(int(params.get("user_id", 0)))
        if person is None:
            return _error_response(400, "Bad Request: PARTICIPANT_ID_INVALID")
        wrote_there = any(
            m.get("from", {}).get("id") == person.id for (c, _), m in self._messages.items() if c == chat.id
        )
        status = self._statuses.get((chat.id, person.id), "member" if wrote_there else "left")
        member: dict[str, Any] = {"status": status, "user": person.as_dict()}
        if status == "creator":
            member["is_anonymous"] = False
        elif status == "administrator":
            member.update(can_be_edited=False, is_anonymous=False, can_manage_chat=True, can_delete_messages=True)
            member.update(can_manage_video_chats=True, can_restrict_members=True, can_promote_members=False)
            member.update(can_change_info=True, can_invite_users=True, can_post_stories=False)
            member.update(can_edit_stories=False, can_delete_stories=False)
        return member

    async def _api_leavechat(self, params: dict[str, Any], files: Any) -> Any:
        """The bot leaves a group; Telegram then sends its own `my_chat_member` (member -> left)."""
        chat = self._member_of(params)
        if isinstance(chat, web.Response):
            return chat
        self.left_chats.append(chat.id)
        self.push_update("my_chat_member", self._membership(chat, self.bot, "member", "left"))
        return True

    def _member_of(self, params: dict[str, Any]) -> ChatRef | web.Response:
        """A group the bot is in, or Telegram's refusal (private chats have no members to ask about or leave)."""
        chat = self._chats.get(_chat_id(params))
        if chat is None:
            return _error_response(400, "Bad Request: chat not found")
        if chat.type == "private":
            return _error_response(400, "Bad Request: chat member status can't be changed in private chats")
        if chat.id in self.left_chats:
            return _error_response(403, f"Forbidden: bot is not a member of the {chat.type} chat")
        return chat

    async def _api_getwebhookinfo(self, params: dict[str, Any], files: Any) -> Any:
        return {"url": self.webhook_url, "has_custom_certificate": False, "pending_update_count": len(self._updates)}

    async def _api_close(self, params: dict[str, Any], files: Any) -> Any:
        return True

    async def _api_logout(self, params: dict[str, Any], files: Any) -> Any:
        return True

    # --- bookkeeping ------------------------------------------------------------------------------------------

    def _writable(self, params: dict[str, Any]) -> ChatRef | web.Response:
        """The chat a send goes to, or Telegram's refusal: a person who never started the bot cannot be written
        to first (403); an id that is nobody's chat is not found (400)."""
        chat_id = _chat_id(params)
        chat = self._chats.get(chat_id)
        if chat is not None and chat.id in self.left_chats:
            return _error_response(403, f"Forbidden: bot is not a member of the {chat.type} chat")
        if chat is not None:
            return chat
        if chat_id in self._people:
            return _error_response(403, "Forbidden: bot can't initiate conversation with a user")
        return _error_response(400, "Bad Request: chat not found")

    def _remember(self, chat: ChatRef) -> ChatRef:
        self._chats.setdefault(chat.id, chat)
        return chat

    def _ids_for(self, chat_id: int) -> itertools.count[int]:
        return self._message_ids.setdefault(chat_id, itertools.count(1))

    def _new_message(
        self, chat: ChatRef, person: Person, extra: dict[str, Any], reply_to: dict[str, Any] | None
    ) -> dict[str, Any]:
        self._remember(chat)
        self._people.setdefault(person.id, person)
        message: dict[str, Any] = {
            "message_id": next(self._ids_for(chat.id)),
            "date": int(time.time()),
            "chat": chat.as_dict(),
            "from": person.as_dict(),
            **extra,
        }
        if reply_to is not None:
            message["reply_to_message"] = _public(reply_to)
        self._messages[chat.id, message["message_id"]] = message
        if chat.id not in self.left_chats:  # a bot that left a group hears nothing more from it
            self.push_update("message", message)
        return message

    def _bot_message(
        self, chat: ChatRef, extra: dict[str, Any], params: dict[str, Any], hidden: dict[str, Any] | None = None
    ) -> Any:
        message: dict[str, Any] = {
            "message_id": next(self._ids_for(chat.id)),
            "date": int(time.time()),
            "chat": chat.as_dict(),
            "from": self.bot.as_dict(),
            **extra,
        }
        if params.get("message_thread_id") is not None:
            if not chat.is_forum:
                return _error_response(400, "Bad Request: message thread not found")
            message.update(message_thread_id=int(params["message_thread_id"]), is_topic_message=True)
        reply = params.get("reply_parameters") or (
            {"message_id": params["reply_to_message_id"]} if "reply_to_message_id" in params else None
        )
        if reply:
            original = self._messages.get((chat.id, int(reply["message_id"])))
            if original is not None:
                message["reply_to_message"] = _public(original)
            elif not reply.get("allow_sending_without_reply"):
                return _error_response(400, "Bad Request: message to be replied not found")
        self._messages[chat.id, message["message_id"]] = {**message, **(hidden or {}), "_seq": next(self._seq)}
        return message

    async def _notify(self) -> None:
        """Wakes every waiter: long polls and `wait_until`."""
        async with self._changed:
            self._changed.notify_all()

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _deliver(self, update: dict[str, Any], upstream: int | None = None) -> None:
        status = await self.post_to_webhook(update, self.webhook_secret, upstream=upstream)
        self.webhook_deliveries.append(status)
        await self._notify()

    async def _deliver_everywhere(self, update: dict[str, Any]) -> None:
        upstreams = self._hosts[_host_key(self.webhook_url)].upstreams
        await asyncio.gather(*(self._deliver(update, index) for index in range(len(upstreams))))


@dataclass
class _LoadBalancer:
    """What answers at a public host: a round-robin over webhook servers."""

    upstreams: list[str]
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    def next(self) -> str:
        return self.upstreams[next(self._turn) % len(self.upstreams)]


def _host_key(url: str) -> str:
    """What a name resolves by: the host alone (the load balancer answers on every port)."""
    return (urlsplit(url).hostname or "").lower()


def _path(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _public(message: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in message.items() if not key.startswith("_")}


def _entities(text: str) -> list[dict[str, Any]]:
    """Bot commands at the start and @mentions anywhere, with offsets in UTF-16 units like Telegram's."""
    found = []
    if command := _COMMAND.match(text):
        found.append({"type": "bot_command", "offset": 0, "length": utf16_length(command.group())})
    for mention in _MENTION.finditer(text):
        offset = utf16_length(text[: mention.start()])
        found.append({"type": "mention", "offset": offset, "length": utf16_length(mention.group())})
    return found


async def _read_params(request: web.Request) -> tuple[dict[str, Any], dict[str, tuple[str, bytes]]]:
    """Decodes a JSON, form-encoded, multipart or query-string body into typed parameters."""
    raw: dict[str, Any] = dict(request.query)
    files: dict[str, tuple[str, bytes]] = {}
    if request.content_type == "application/json":
        raw.update(await request.json())
        return raw, files
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        async for part in _parts(reader):
            if isinstance(part, aiohttp.BodyPartReader) and part.name:
                if part.filename:
                    files[part.name] = (part.filename, await part.read())
                else:
                    raw[part.name] = await part.text()
    elif request.can_read_body:
        raw.update(await request.post())
    return {key: _typed(key, value) for key, value in raw.items()}, files


async def _parts(reader: aiohttp.MultipartReader) -> AsyncIterator[Any]:
    while (part := await reader.next()) is not None:
        yield part


def _typed(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if key in _INT_FIELDS:
        with contextlib.suppress(ValueError):
            return int(value)
    if key in _JSON_FIELDS:
        return json.loads(value)
    return value


def _chat_id(params: dict[str, Any]) -> int:
    try:
        return int(params.get("chat_id") or 0)
    except (TypeError, ValueError):
        return 0


def _error_body(code: int, description: str) -> dict[str, Any]:
    return {"ok": False, "error_code": code, "description": description}


def _error_response(code: int, description: str) -> web.Response:
    return web.json_response(_error_body(code, description), status=code)


def _fault_response(fault: Fault) -> web.Response:
    if fault.status == 429:
        body = _error_body(429, f"Too Many Requests: retry after {fault.retry_after:g}")
        body["parameters"] = {"retry_after": int(fault.retry_after)}
        return web.json_response(body, status=429)
    if fault.options.get("explained"):
        return _error_response(fault.status, "Internal Server Error")
    return front_page(fault.status)  # Telegram's 5xx come from its nginx front, as HTML
