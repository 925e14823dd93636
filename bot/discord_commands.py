"""Magpie's Discord slash commands (the app-command tree), and where a Discord reply goes: a channel or an
interaction's follow-ups (`Destination`).

The commands carry no logic: each turns its arguments back into the text a user would have typed (`/rollback v2`)
and hands it to one runner (`MagpieClient.run_command`), so slash commands and typed commands reach the core the
same way. `/chat` exists because without the message-content intent a slash command is the one way to talk to the
bot in a server without mentioning it; its text reaches the core as an ordinary message.

Descriptions come from the message catalogue: `CatalogueTranslator` gives Discord each one's localizations (Korean
for the `ko` locale) when the tree syncs. Names stay the same in every language: /help lists them, and Telegram's
commands (which must be Latin) and typed commands use the same ones.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Protocol

import discord
from discord import app_commands

from bot.backend import Part
from core.chat.commands import Command, visible_commands
from core.chat.messages import Attachment
from core.errors import MagpieError
from core.i18n import SOURCE_LANGUAGE, supported_language, translate
from core.texts import CHAT_COMMAND_DESCRIPTION, CHAT_TEXT_DESCRIPTION

log = logging.getLogger(__name__)

CommandRunner = Callable[[discord.Interaction, str], Awaitable[None]]
"""Receives the interaction and the text it stands for (`/reset`, `/rollback v2`, or plain chat text)."""

MANAGERS = discord.Permissions(manage_guild=True)
"""Who sees the admin commands in a server by default (Discord's `default_member_permissions`)."""
NO_MENTIONS = discord.AllowedMentions.none()
SAFE_MENTIONS = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=True)
"""Generated text can never ping anyone; only the user the bot replies to is notified, as for a human reply."""


class Destination(Protocol):
    """Where the parts of a Discord reply go."""

    @property
    def channel(self) -> discord.abc.Messageable | None:
        """Where "typing…" can show; None for an interaction's follow-ups (Discord shows "thinking…" there)."""
        ...

    async def send(self, part: Part, quote: str | None) -> int:
        """Sends one part (as a reply to message `quote` where that applies); the id of the message it created."""
        ...


@dataclass(frozen=True, slots=True)
class ChannelDestination:
    """A channel, a DM channel, or a user (discord.py opens the DM); with `quotes`, a reply's first part is a
    reply to the message it answers in channel `channel_id` (still sent if that message is gone)."""

    channel: discord.abc.Messageable
    channel_id: int | None = None
    quotes: bool = False
    mentions: discord.AllowedMentions = SAFE_MENTIONS

    async def send(self, part: Part, quote: str | None) -> int:
        kwargs: dict[str, Any] = {"allowed_mentions": self.mentions}
        if part.attachment is not None:
            kwargs["file"] = as_file(part.attachment)
        if self.quotes and self.channel_id is not None and quote is not None and quote.isdigit():
            kwargs["reference"] = discord.MessageReference(
                message_id=int(quote), channel_id=self.channel_id, fail_if_not_exists=False
            )
        message = await self.channel.send(part.text or None, **kwargs)
        return message.id


@dataclass(frozen=True, slots=True)
class Followups:
    """Answers a deferred interaction: the first follow-up replaces "thinking…", later ones add messages. The
    first is as ephemeral as the defer was, whatever it asks; `ephemeral` keeps the later ones so."""

    interaction: discord.Interaction
    ephemeral: bool = False

    @property
    def channel(self) -> None:
        return None

    async def send(self, part: Part, quote: str | None) -> int:
        kwargs: dict[str, Any] = {"allowed_mentions": NO_MENTIONS, "wait": True, "ephemeral": self.ephemeral}
        if part.attachment is not None:
            kwargs["file"] = as_file(part.attachment)
        message = await self.interaction.followup.send(part.text, **kwargs)
        return int(message.id)


class CatalogueTranslator(app_commands.Translator):
    """Localizes the tree's descriptions from the message catalogue for each Discord locale Magpie has one for."""

    _LOCALIZED = frozenset(
        {
            app_commands.TranslationContextLocation.command_description,
            app_commands.TranslationContextLocation.parameter_description,
        }
    )

    async def translate(
        self, string: app_commands.locale_str, locale: discord.Locale, context: app_commands.TranslationContextTypes
    ) -> str | None:
        """None (no localization) for names, for English and for locales without a catalogue."""
        language = supported_language(locale.value)
        if context.location not in self._LOCALIZED or language == SOURCE_LANGUAGE:
            return None
        return translate(string.message, language)


def build_command_tree(client: discord.Client, run: CommandRunner) -> app_commands.CommandTree[Any]:
    """The tree discord.py dispatches INTERACTION_CREATE to; the client syncs it to Discord in `setup_hook`, after
    setting `CatalogueTranslator` as its translator."""
    tree: app_commands.CommandTree[Any] = app_commands.CommandTree(client)
    tree.on_error = _report_error  # type: ignore[method-assign]
    tree.add_command(_chat_command(run))
    for command in visible_commands(admin=True):  # the core checks ADMIN_IDS or the member's own permissions
        slash = _command(command, run)
        if command.for_managers:
            # Hidden from members who cannot manage the server (a server's admins may change that in its
            # integration settings).
            slash.default_permissions = MANAGERS
        tree.add_command(slash)
    return tree


def _chat_command(run: CommandRunner) -> app_commands.Command[Any, ..., None]:
    @app_commands.describe(text=CHAT_TEXT_DESCRIPTION)
    async def chat(interaction: discord.Interaction, text: app_commands.Range[str, 1, 2000]) -> None:
        """Chat with the bot without mentioning it."""
        await run(interaction, text)

    return app_commands.Command(name="chat", description=CHAT_COMMAND_DESCRIPTION, callback=chat)


def _command(command: Command, run: CommandRunner) -> app_commands.Command[Any, ..., None]:
    """The slash command for a registry entry: an optional text option when the entry takes an argument (shown
    under the argument's name), none otherwise."""
    name, argument = command.name, command.argument
    if argument is not None:

        @app_commands.rename(value=argument.name)
        @app_commands.describe(value=argument.description)
        async def with_argument(interaction: discord.Interaction, value: str | None = None) -> None:
            """Runs `/name [argument]`."""
            value = (value or "").strip()
            await run(interaction, f"/{name} {value}" if value else f"/{name}")

        return app_commands.Command(name=name, description=command.help, callback=with_argument)

    async def plain(interaction: discord.Interaction) -> None:
        """Runs a command without arguments."""
        await run(interaction, f"/{name}")

    return app_commands.Command(name=name, description=command.help, callback=plain)


def as_file(attachment: Attachment) -> discord.File:
    return discord.File(io.BytesIO(attachment.content), filename=attachment.filename)


async def _report_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
    """The tree's error handler: log it, and tell the user something went wrong (never what)."""
    name = interaction.command.name if interaction.command else "?"
    log.error("Discord slash command /%s failed", name, exc_info=error)
    apology = translate(MagpieError.user_message, interaction.locale.value)
    with suppress(discord.HTTPException):
        if interaction.response.is_done():
            await interaction.followup.send(apology, allowed_mentions=NO_MENTIONS)
        else:
            await interaction.response.send_message(apology, allowed_mentions=NO_MENTIONS)
