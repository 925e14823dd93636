"""The chat commands: one registry every list derives from, and the fixed texts every platform shows (/help and
/start say which chats the bot learns from)."""

from __future__ import annotations

import discord
import pytest
from discord import app_commands

from bot.discord_commands import build_command_tree
from core.chat import chat_commands, commands
from core.chat.commands import COMMANDS, Command, CommandArgument
from core.chat.messages import ChatKind, IncomingMessage
from core.chat.service import ChatService
from core.serving.engine import Engine
from core.settings import Settings
from core.storage.db import Database
from core.texts import help_text


@pytest.mark.parametrize(
    ("platform", "opted_in", "private_learned"),
    [("telegram", False, False), ("discord", False, False), ("telegram", True, True), ("console", False, True)],
)
async def test_help_and_start_say_which_chats_are_learned_from(
    db: Database, platform: str, opted_in: bool, private_learned: bool
) -> None:
    """Private chats are learned from only with TRAIN_ON_PRIVATE_CHATS; the console is the operator's own."""
    settings = Settings(_env_file=None, train_on_private_chats=opted_in)  # type: ignore[call-arg]
    engine = Engine.from_settings(settings)  # never started: commands need no model
    service = ChatService(settings=settings, db=db, engine=engine)
    for index, command in enumerate(("/help", "/start")):
        incoming = IncomingMessage(
            platform=platform,
            chat_id="7",
            chat_kind=ChatKind.PRIVATE,
            author_id="7",
            author_name="someone",
            text=command,
            message_id=f"m{index}",
        )
        reply = await service.handle(incoming)
        assert reply is not None
        assert "I learn from what people write in group chats" in reply.text
        if private_learned:
            assert "and in private chats with me" in reply.text
        else:
            assert "what you tell me in a private chat is never trained on" in reply.text


# --- the command registry: every list of commands is derived from it --------------------------------------------

DIGEST = Command("digest", "Summarise the day", admin=True, argument=CommandArgument("day", "which day"))


def test_every_registry_entry_has_exactly_one_handler() -> None:
    assert set(chat_commands._HANDLERS) == {command.name for command in COMMANDS}
    assert len({command.name for command in COMMANDS}) == len(COMMANDS)
    assert all(command.name == command.name.lower() for command in COMMANDS)


def test_a_new_registry_entry_reaches_help_the_menus_and_the_handler_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a command is one registry entry (plus its handler): /help, Discord's slash tree and the admin check
    follow it, and the service refuses to start while the entry has no handler."""
    monkeypatch.setattr(commands, "COMMANDS", (*COMMANDS, DIGEST))
    assert "/digest — Summarise the day" in help_text("Magpie", is_admin=True, private_chats_learned=False)
    assert "/digest" not in help_text("Magpie", is_admin=False, private_chats_learned=False)
    assert commands.command_named("digest") == DIGEST
    parsed = commands.parse_command("/digest monday")
    assert parsed is not None and parsed.spec == DIGEST and parsed.args == "monday"
    tree = build_command_tree(discord.Client(intents=discord.Intents.none()), _never_run)
    slash = tree.get_command("digest")
    assert isinstance(slash, app_commands.Command)
    assert [parameter.display_name for parameter in slash.parameters] == ["day"]
    with pytest.raises(TypeError, match="without a handler: \\['digest'\\]"):
        chat_commands._handlers()


async def _never_run(_interaction: discord.Interaction, _text: str) -> None:
    raise AssertionError("no slash command runs in this test")
