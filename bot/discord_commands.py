"""Magpie's Discord slash commands: the app-command tree, and the follow-up path that answers an interaction.

The commands carry no logic: each turns its arguments back into the text a user would have typed (`/rollback v2`)
and hands it to one runner (`MagpieClient.run_command`), so slash commands and typed commands reach the core the
same way. `/chat` exists because without the message-content intent a slash command is the one way to talk to the
bot in a server without mentioning it; its text reaches the core as an ordinary message.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

import discord
from discord import app_commands

from core.errors import MagpieError
from core.messages import COMMANDS, Attachment

log = logging.getLogger(__name__)

CommandRunner = Callable[[discord.Interaction, str], Awaitable[None]]
"""Receives the interaction and the text it stands for (`/reset`, `/rollback v2`, or plain chat text)."""

Sender = Callable[[str, Attachment | None], Awaitable[int]]
"""Sends one chunk of a reply (with the attachment, if any) and returns the id of the message it created."""

NO_MENTIONS = discord.AllowedMentions.none()


def build_command_tree(client: discord.Client, run: CommandRunner) -> app_commands.CommandTree[Any]:
    """The tree discord.py dispatches INTERACTION_CREATE to; the client syncs it to Discord in `setup_hook`."""
    tree: app_commands.CommandTree[Any] = app_commands.CommandTree(client)
    tree.on_error = _report_error  # type: ignore[method-assign]
    tree.add_command(_chat_command(run))
    for name, description in COMMANDS.items():
        tree.add_command(_command(name, description, run))
    return tree


def _chat_command(run: CommandRunner) -> app_commands.Command[Any, ..., None]:
    @app_commands.describe(text="What you want to say")
    async def chat(interaction: discord.Interaction, text: app_commands.Range[str, 1, 2000]) -> None:
        """Chat with the bot without mentioning it."""
        await run(interaction, text)

    return app_commands.Command(name="chat", description="Say something to the bot", callback=chat)


def _command(name: str, description: str, run: CommandRunner) -> app_commands.Command[Any, ..., None]:
    if name == "rollback":

        @app_commands.describe(version="The version to switch to (default: the previous one)")
        async def with_version(interaction: discord.Interaction, version: str | None = None) -> None:
            """Runs `/rollback [version]`."""
            version = (version or "").strip()
            await run(interaction, f"/{name} {version}" if version else f"/{name}")

        return app_commands.Command(name=name, description=description, callback=with_version)

    async def plain(interaction: discord.Interaction) -> None:
        """Runs a command without arguments."""
        await run(interaction, f"/{name}")

    return app_commands.Command(name=name, description=description, callback=plain)


def as_file(attachment: Attachment) -> discord.File:
    return discord.File(io.BytesIO(attachment.content), filename=attachment.filename)


def followup_sender(interaction: discord.Interaction, *, ephemeral: bool = False) -> Sender:
    """Answers a deferred interaction: the first follow-up replaces "thinking…", later ones add messages.

    The first follow-up is as ephemeral as the defer was, whatever it asks; `ephemeral` keeps the later ones so.
    """

    async def send(text: str, attachment: Attachment | None) -> int:
        kwargs: dict[str, Any] = {"allowed_mentions": NO_MENTIONS, "wait": True, "ephemeral": ephemeral}
        if attachment is not None:
            kwargs["file"] = as_file(attachment)
        message = await interaction.followup.send(text, **kwargs)
        return int(message.id)

    return send


async def _report_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
    """The tree's error handler: log it, and tell the user something went wrong (never what)."""
    name = interaction.command.name if interaction.command else "?"
    log.error("Discord slash command /%s failed", name, exc_info=error)
    with suppress(discord.HTTPException):
        if interaction.response.is_done():
            await interaction.followup.send(MagpieError.user_message, allowed_mentions=NO_MENTIONS)
        else:
            await interaction.response.send_message(MagpieError.user_message, allowed_mentions=NO_MENTIONS)
