"""The chat commands (`/start`, `/help`, `/forget`, `/export`, `/retrain`…): what each does and answers.

The registry (`core.chat.commands.COMMANDS`) says which commands exist and who may run them; here each entry `name` has
its handler, the method `_cmd_<name>` (checked when this module is imported, so an entry without a handler, or a
handler without an entry, cannot ship).

Admin rights come from numeric platform ids in ADMIN_IDS (`Settings.is_admin`), never from display names. Every
answer is a logged system reply (`ReplyLog`), worded in `core.texts`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import TypeAlias

from core.chat import commands as registry
from core.chat.commands import ParsedCommand
from core.chat.consent import community_of, learning_paused, set_learning
from core.chat.messages import Attachment, ChatKind, Private, Reply
from core.i18n import _
from core.outcomes import Withdrawal
from core.retraining import Retrainer
from core.serving.engine import Engine
from core.serving.model_serving import ModelServing
from core.settings import Settings
from core.storage.chat_log import collect_stats, export_user, forget_user
from core.storage.db import Database
from core.storage.models import User
from core.storage.reply_log import Logged, ReplyLog
from core.storage.versions import (
    mark_holding_withdrawn,
    runs_in_progress,
    version_files_problem,
    versions_trained_on_user,
)
from core.texts import (
    ADMINS_ONLY,
    EXPORT_SENT_PRIVATELY,
    EXPORT_UNREACHABLE,
    LEARNING_ADMINS_ONLY,
    LEARNING_GROUPS_ONLY,
    LEARNING_IS_OFF,
    LEARNING_IS_ON,
    LEARNING_OFF_DONE,
    LEARNING_ON_DONE,
    MODELS_UNAVAILABLE,
    NOT_AS_CHAT,
    OPTED_IN,
    OPTED_OUT,
    RESET_DONE,
    RETRAIN_UNAVAILABLE,
    ROLLBACK_UNAVAILABLE,
    export_ready,
    forgotten,
    help_text,
    run_request,
    start_text,
    status_text,
    switch,
    unknown_command,
    version_list,
    withdrawn_text,
)

log = logging.getLogger("core.chat.service")

Handler: TypeAlias = "Callable[[ChatCommands, Logged, ParsedCommand], Awaitable[Reply]]"


class ChatCommands:
    """Runs one parsed command for the chat service. `retrainer` answers `/retrain`, `serving` `/models` and
    `/rollback`; without them those commands say they are not available in this setup."""

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        engine: Engine,
        replies: ReplyLog,
        retrainer: Retrainer | None,
        serving: ModelServing | None,
    ) -> None:
        self._settings = settings
        self._db = db
        self._engine = engine
        self._replies = replies
        self._retrainer = retrainer
        self._serving = serving

    async def run(self, logged: Logged, command: ParsedCommand) -> Reply:
        message = logged.message
        spec = command.spec
        if spec is None:
            return await self._replies.system_reply(logged, unknown_command(command.name))
        if spec.admin and not self._is_admin(logged):
            log.warning(
                "Refused admin command /%s from %s:%s (not in ADMIN_IDS)",
                command.name,
                message.platform,
                message.author_id,
            )
            return await self._replies.system_reply(logged, _(ADMINS_ONLY))
        if spec.personal and message.as_chat:
            log.info("Refused /%s sent as chat %s:%s", command.name, message.platform, message.author_id)
            return await self._replies.system_reply(logged, _(NOT_AS_CHAT))
        handler: Handler = _HANDLERS[spec.name]
        return await handler(self, logged, command)

    def _voice(self, logged: Logged) -> str | None:
        """The voice a command in this chat is about: its community's with VOICE_SCOPE=community (None in a private
        chat: every community for /retrain, the shared voice otherwise), else the shared voice."""
        return logged.community if self._settings.community_voices else None

    def _is_admin(self, logged: Logged) -> bool:
        return self._settings.is_admin(logged.message.platform, logged.message.author_id)

    async def _cmd_start(self, logged: Logged, _command: ParsedCommand) -> Reply:
        learned = self._settings.learns_from_private_chats(logged.message.platform)
        text = start_text(self._settings.bot_name, is_admin=self._is_admin(logged), private_chats_learned=learned)
        return await self._replies.system_reply(logged, text)

    async def _cmd_help(self, logged: Logged, _command: ParsedCommand) -> Reply:
        learned = self._settings.learns_from_private_chats(logged.message.platform)
        text = help_text(self._settings.bot_name, is_admin=self._is_admin(logged), private_chats_learned=learned)
        return await self._replies.system_reply(logged, text)

    async def _cmd_reset(self, logged: Logged, _command: ParsedCommand) -> Reply:
        return await self._replies.system_reply(logged, _(RESET_DONE))

    async def _cmd_forget(self, logged: Logged, _command: ParsedCommand) -> Reply:
        async with self._db.sessions.begin() as session:
            count = await forget_user(session, user_id=logged.user_row_id)
            trained_on = await versions_trained_on_user(session, user_id=logged.user_row_id)
            training = bool(await runs_in_progress(session))
        log.info("Forgot %d messages of user row %d", count, logged.user_row_id)
        withdrawal = await self._withdraw(logged)
        names = [version.name for version in trained_on]
        text = forgotten(count, trained_on=names, training_now=training, withdrawal=withdrawal)
        return await self._replies.log_reply(logged, text, model_version_id=None, system=True, answers_logged=False)

    async def _withdraw(self, logged: Logged) -> Withdrawal | None:
        """The models' side of /forget and /optout (in both scopes): the versions that learned from this person
        stop serving and are deleted, and each voice that lost its active version is retrained without them.
        None where this process has no serving side (its replies then say only what happened to the data)."""
        if self._serving is None:
            async with self._db.sessions.begin() as session:  # still never trained on, nor rolled back to
                await mark_holding_withdrawn(session, user_id=logged.user_row_id, now=datetime.now(UTC))
            return None
        withdrawal = await self._serving.withdraw(user_id=logged.user_row_id)
        voices = [replaced.community for replaced in withdrawal.replaced]
        if self._settings.community_voices:
            voices = [community for community in voices if community is not None]  # the base is never trained
        if not voices or self._retrainer is None:
            return withdrawal
        message = logged.message
        await self._retrainer.retrain_voices(
            voices, triggered_by=f"withdrawal by {message.platform}:{message.author_id}"
        )
        return replace(withdrawal, retrain_queued=True)

    async def _cmd_export(self, logged: Logged, _command: ParsedCommand) -> Reply:
        async with self._db.sessions() as session:
            rows = await export_user(session, user_id=logged.user_row_id)
        content = json.dumps({"messages": rows}, ensure_ascii=False, indent=2).encode()
        attachment = Attachment(filename="magpie-export.json", content=content)
        text = export_ready(len(rows))
        if logged.message.chat_kind is ChatKind.PRIVATE:
            return await self._replies.system_reply(logged, text, attachment)
        # Everything the user ever sent, private chats included: never for the eyes of a group.
        private = Private(text, attachment, unreachable=_(EXPORT_UNREACHABLE))
        return await self._replies.log_reply(
            logged, _(EXPORT_SENT_PRIVATELY), model_version_id=None, system=True, private=private
        )

    async def _set_opt_out(self, logged: Logged, opted_out: bool) -> None:
        async with self._db.sessions.begin() as session:
            user = await session.get(User, logged.user_row_id)
            if user is not None:
                user.opted_out = opted_out

    async def _cmd_optout(self, logged: Logged, _command: ParsedCommand) -> Reply:
        await self._set_opt_out(logged, True)
        withdrawal = await self._withdraw(logged)
        said = withdrawn_text(withdrawal) if withdrawal is not None else ""
        return await self._replies.system_reply(logged, _(OPTED_OUT) + said)

    async def _cmd_optin(self, logged: Logged, _command: ParsedCommand) -> Reply:
        await self._set_opt_out(logged, False)
        return await self._replies.system_reply(logged, _(OPTED_IN))

    async def _cmd_retrain(self, logged: Logged, _command: ParsedCommand) -> Reply:
        if self._retrainer is None:
            return await self._replies.system_reply(logged, _(RETRAIN_UNAVAILABLE))
        message = logged.message
        result = await self._retrainer.request(
            triggered_by=f"{message.platform}:{message.author_id}",
            notify_platform=message.platform,
            notify_chat_id=message.chat_id,
            community=self._voice(logged),
        )
        return await self._replies.system_reply(logged, run_request(result))

    async def _cmd_status(self, logged: Logged, _command: ParsedCommand) -> Reply:
        community = self._voice(logged)
        async with self._db.sessions() as session:
            stats = await collect_stats(session, community=community)
        ref = self._engine.model_ref
        model_name = ref.name if ref is not None else "none loaded"
        if self._serving is not None:
            model_name = self._serving.serving_name(community)
        active = stats.active_version
        problem = version_files_problem(active.path) if active is not None and active.name != model_name else None
        text = status_text(
            stats, model_name=model_name, queue_depth=self._engine.queue_depth, active_problem=problem,
            community=community,
        )  # fmt: skip
        if await self._learning_is_off(logged):
            text += "\n" + _(LEARNING_IS_OFF)
        return await self._replies.system_reply(logged, text)

    async def _cmd_models(self, logged: Logged, _command: ParsedCommand) -> Reply:
        if self._serving is None:
            return await self._replies.system_reply(logged, _(MODELS_UNAVAILABLE))
        listing = await self._serving.list_versions(community=self._voice(logged))
        return await self._replies.system_reply(logged, version_list(listing))

    async def _cmd_rollback(self, logged: Logged, command: ParsedCommand) -> Reply:
        if self._serving is None:
            return await self._replies.system_reply(logged, _(ROLLBACK_UNAVAILABLE))
        message = logged.message
        result = await self._serving.rollback(
            version=command.args or None,
            triggered_by=f"{message.platform}:{message.author_id}",
            community=self._voice(logged),
        )
        return await self._replies.system_reply(logged, switch(result))

    @staticmethod
    def _group(logged: Logged) -> str | None:
        """The group `/learning` is about: the chat's community as recorded (a group that moved to a new id keeps
        its own, like its voice); None in a private chat."""
        own = community_of(logged.message)
        return None if own is None else logged.community or own

    async def _learning_is_off(self, logged: Logged) -> bool:
        community = self._group(logged)
        if community is None:
            return False
        async with self._db.sessions() as session:
            return await learning_paused(session, platform=logged.message.platform, community=community) is not None

    async def _cmd_learning(self, logged: Logged, command: ParsedCommand) -> Reply:
        """`/learning [off|on]`: a group's own admins (the platform says who: `IncomingMessage.chat_admin`) or
        ADMIN_IDS decide whether Magpie learns from that group (`core.chat.consent`); without an argument, the state."""
        message = logged.message
        community = self._group(logged)
        wanted = command.args.lower()
        if community is None:
            return await self._replies.system_reply(logged, _(LEARNING_GROUPS_ONLY))
        if wanted not in ("on", "off"):
            state = LEARNING_IS_OFF if await self._learning_is_off(logged) else LEARNING_IS_ON
            return await self._replies.system_reply(logged, _(state))
        who = f"{message.platform}:{message.author_id}"
        if not (message.chat_admin or self._is_admin(logged)):
            log.warning(
                "Refused /learning %s in %s group %s from %s (not an admin)", wanted, message.platform, community, who
            )
            return await self._replies.system_reply(logged, _(LEARNING_ADMINS_ONLY))
        async with self._db.sessions.begin() as session:
            await set_learning(
                session, platform=message.platform, community=community, on=wanted == "on", by=who,
                at_message_id=logged.row_id,
            )  # fmt: skip
        log.info("Learning turned %s in %s group %s by %s", wanted, message.platform, community, who)
        done = LEARNING_ON_DONE if wanted == "on" else LEARNING_OFF_DONE
        return await self._replies.system_reply(logged, _(done))


def _handlers() -> dict[str, Handler]:
    """Each registry entry's handler; raises at import when the registry and the handlers disagree."""
    prefix = "_cmd_"
    methods = {name.removeprefix(prefix) for name in vars(ChatCommands) if name.startswith(prefix)}
    names = {command.name for command in registry.COMMANDS}
    if methods != names:
        raise TypeError(
            f"Commands without a handler: {sorted(names - methods)}; handlers without a registry "
            f"entry: {sorted(methods - names)}"
        )
    return {name: getattr(ChatCommands, prefix + name) for name in names}


_HANDLERS = _handlers()
