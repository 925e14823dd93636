"""Parsing chat commands and the replies that do not need the model.

The command set and its help texts live in `core.messages.COMMANDS`; this module turns text into a command and
renders the fixed texts (help, status) so every platform says the same thing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.messages import ADMIN_COMMANDS, COMMANDS
from core.storage import Stats
from core.versions import version_files_problem

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


def help_text(bot_name: str, *, is_admin: bool, private_chats_learned: bool) -> str:
    """The command list, preceded by which chats the bot learns from: people should know before they talk."""
    lines = [
        f"I'm {bot_name}, a chatbot that learns to talk like this community. Just talk to me!",
        learning_note(private_chats_learned=private_chats_learned),
        "",
    ]
    for name, description in COMMANDS.items():
        if name in ADMIN_COMMANDS and not is_admin:
            continue
        lines.append(f"/{name} — {description}")
    return "\n".join(lines)


def learning_note(*, private_chats_learned: bool) -> str:
    """Which chats become training data (`Settings.learns_from_private_chats`)."""
    if private_chats_learned:
        return "I learn from what people write in group chats and in private chats with me."
    return "I learn from what people write in group chats; what you tell me in a private chat is never trained on."


def start_text(bot_name: str, *, is_admin: bool, private_chats_learned: bool) -> str:
    return (
        f"Hi! {help_text(bot_name, is_admin=is_admin, private_chats_learned=private_chats_learned)}\n\n"
        "I keep a log of our conversations so I can follow them. /optout keeps your messages out of training, "
        "/forget deletes them."
    )


def status_text(stats: Stats, *, model_name: str, queue_depth: int) -> str:
    """What an admin sees for `/status`."""
    version = stats.active_version
    metrics = version.metrics if version is not None and version.name == model_name else {}
    lines = [f"Model: {model_name}{_not_serving(stats, model_name)}"]
    if "eval_loss" in metrics:
        lines.append(f"  eval loss {metrics['eval_loss']:.3f}, perplexity {metrics.get('perplexity', 0.0):.1f}")
    lines += [
        f"Messages logged: {stats.messages} ({stats.user_messages} from people, {stats.bot_messages} from me)",
        f"People: {stats.users}, chats: {stats.chats}",
        f"New messages since the last training run: {stats.since_last_training}",
        f"Requests waiting for the model: {queue_depth}",
    ]
    run = stats.last_run
    if run is None:
        lines.append("Last training run: none yet")
    else:
        when = run.started_at.strftime("%Y-%m-%d %H:%M UTC")
        lines.append(f"Last training run: #{run.id} {run.status.value} (started {when} by {run.triggered_by})")
    return "\n".join(lines)


def _not_serving(stats: Stats, model_name: str) -> str:
    """Why the active version is not the one serving (it could not be loaded), or "" when it is."""
    active = stats.active_version
    if active is None or active.name == model_name:
        return ""
    problem = version_files_problem(active.path)
    if problem is None:
        return f" ({active.name} is active but not loaded yet, or it failed to load: the log says which)"
    return f" ({active.name} is active but could not be loaded: {problem})"
