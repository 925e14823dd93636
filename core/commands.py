"""Parsing chat commands.

The command set and its help texts live in `core.messages.COMMANDS`; the replies that do not need the model (help,
start, status) are worded in `core.texts`, so every platform says the same thing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_COMMAND = re.compile(r"^/([A-Za-z0-9_]{1,32})(?:@(\S+))?(?:\s+(.*))?$", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ParsedCommand:
    """`/name@target args`; `target` is set when the command names a bot explicitly."""

    name: str
    args: str
    target: str | None


def parse_command(text: str | None) -> ParsedCommand | None:
    """A command is text that starts with `/name`; anything else is conversation."""
    if not text:
        return None
    match = _COMMAND.match(text.strip())
    if match is None:
        return None
    name, target, args = match.groups()
    return ParsedCommand(name=name.lower(), args=(args or "").strip(), target=target)
