"""The chat commands: the one registry (`COMMANDS`) and the parser.

Every fact about a command is written once, in its `Command` entry: its name, its one-line help, whether only admins
may run it, whether its answer is the author's own data, and the argument it takes. `/help`, Telegram's "/" menu,
Discord's slash tree, the admin check and the choice of where a personal answer goes are all derived from this
registry; the chat service (`core.chat.chat_commands`) runs entry `name` with its handler method `_cmd_<name>`, and
refuses to import if an entry has none. Adding a command is one entry here plus its handler. The replies that do
not need the model (help, start, status) are worded in `core.texts`, so every platform says the same thing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.i18n import N_

_COMMAND = re.compile(r"^/([A-Za-z0-9_]{1,32})(?:@(\S+))?(?:\s+(.*))?$", re.DOTALL)


@dataclass(frozen=True, slots=True)
class CommandArgument:
    """The one optional free-text argument a command takes (`/rollback v2`); `description` is a msgid."""

    name: str
    description: str


@dataclass(frozen=True, slots=True)
class Command:
    """One chat command. `help` is an English msgid of the catalogue (`core.i18n`): whoever shows it translates it.
    `admin`: only ids in ADMIN_IDS may run it (and only admins see it in menus). `private`: its answer is the
    author's own data, so outside a private chat it reaches the author alone (`core.chat.messages.Private`), adapters
    that choose up front where an answer appears (a Discord slash command's ephemeral flag) hide it, and crash
    recovery never sends it unasked. `chat_admin`: a group's own admins may run it too (the platform says who:
    `IncomingMessage.chat_admin`), besides ADMIN_IDS; Discord, like for `admin`, shows it only to members who may
    manage the server (`default_permissions`). `personal`: it acts on its author's own data, so it is refused from a
    chat identity (`IncomingMessage.as_chat`: an anonymous admin), which many people share."""

    name: str
    help: str
    admin: bool = False
    private: bool = False
    argument: CommandArgument | None = None
    chat_admin: bool = False
    personal: bool = False

    @property
    def for_managers(self) -> bool:
        """Shown only to those who may manage a group (Discord's `default_permissions`): admin-only or chat-admin."""
        return self.admin or self.chat_admin


COMMANDS: tuple[Command, ...] = (
    Command("start", N_("Say hello and see what I can do")),
    Command("help", N_("List the commands")),
    Command("reset", N_("Start a fresh conversation context in this chat")),
    Command("forget", N_("Delete every message you ever sent me, in every chat"), personal=True),
    Command("export", N_("Get your own logged messages as a JSON file"), private=True),
    Command("optout", N_("Keep chatting, but keep your messages out of training"), personal=True),
    Command("optin", N_("Let your messages be used for training again"), personal=True),
    Command("retrain", N_("(admin) Retrain the model on the logged conversations"), admin=True),
    Command("status", N_("(admin) Show the model, data and training status"), admin=True),
    Command("models", N_("(admin) List the model versions"), admin=True),
    Command(
        "rollback",
        N_("(admin) Switch back to the previous (or a given) model version"),
        admin=True,
        argument=CommandArgument("version", N_("The version to switch to (default: the previous one)")),
    ),
    Command(
        "learning",
        N_("(group admins) Turn learning from this group off or on: /learning off, /learning on"),
        chat_admin=True,
        argument=CommandArgument(
            "setting", N_("off: stop learning from this server; on: learn again (default: show the setting)")
        ),
    ),
)
"""Every command, in the order menus and `/help` list them."""


def command_named(name: str) -> Command | None:
    """The registry's entry for `name` (lower case, as `parse_command` gives it); None for an unknown command."""
    return next((command for command in COMMANDS if command.name == name), None)


def visible_commands(*, admin: bool) -> list[Command]:
    """The commands a person sees listed: all of them for an admin, the others without the admin-only ones."""
    return [command for command in COMMANDS if admin or not command.admin]


@dataclass(frozen=True, slots=True)
class ParsedCommand:
    """`/name@target args`; `target` is set when the command names a bot explicitly."""

    name: str
    args: str
    target: str | None

    @property
    def spec(self) -> Command | None:
        """The registry's entry for this command; None when Magpie has no such command."""
        return command_named(self.name)


def parse_command(text: str | None) -> ParsedCommand | None:
    """A command is text that starts with `/name`; anything else is conversation."""
    if not text:
        return None
    match = _COMMAND.match(text.strip())
    if match is None:
        return None
    name, target, args = match.groups()
    return ParsedCommand(name=name.lower(), args=(args or "").strip(), target=target)
