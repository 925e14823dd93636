"""The words people read in chat, in one place: replies, command texts, and what the learning side reports.

The chat service and the training orchestrator hand typed results (`core.outcomes`) to the functions here, which
return the text; nothing else in Magpie writes chat wording. Every text is English written as a gettext msgid and
comes out in the language being spoken (`core.i18n`: the person's, set by the core for each message), from the one
catalogue `core/locale/<language>/LC_MESSAGES/magpie.po`. Functions translate as they word; a constant is only
marked (`N_`), and the code that sends it says `_(CONSTANT)` when it knows whom it speaks to.

Adding a text: write it here as `_("English {name}").format(name=...)` (or `N_` for a constant), then add its
Korean to `core/locale/ko/LC_MESSAGES/magpie.po`; `tests/test_i18n.py` fails until every msgid has a translation.
(The command list's one-line descriptions live beside the command set in `core.messages.COMMANDS`, marked the same
way.) Texts never contain exception text or secrets: a reason shown here is one Magpie wrote itself (a run's
recorded reason, a version's files problem).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from core.errors import EngineBusyError
from core.i18n import N_, _, ngettext
from core.messages import ADMIN_COMMANDS, COMMANDS
from core.metrics import perplexity_text
from core.models import RunStatus, VersionStatus
from core.outcomes import (
    NOT_ENOUGH_DATA,
    RECALL_PROBE,
    AlreadyRunning,
    CoolingDown,
    CouldNotStart,
    DiskUse,
    RunOutcome,
    RunRequest,
    RunStarted,
    SwapOutcome,
    SwapState,
    Switch,
    SwitchRefusal,
    SwitchRefused,
    TrainingAgain,
    VersionList,
    VersionSummary,
)
from core.storage import Stats

# --- the chat service's fixed replies (English msgids: send them as `_(NAME)`) --------------------------------

NOT_TEXT = N_("I can only read text messages for now.")
EMPTY = N_("Send me some text and I'll answer.")
GENERIC_FAILURE = N_("Sorry, something went wrong on my side. Please try again.")
BUSY = EngineBusyError.user_message
"""Replies already queue for the platform (its calls a second are spent): the same words as a full engine queue,
since to the person it is the same situation."""
NOT_LOGGED = N_("Sorry, I can't take messages right now (my database is not answering). Please try again in a minute.")
EXPORT_SENT_PRIVATELY = N_("I sent your export to you privately: only you can see it.")
EXPORT_UNREACHABLE = N_(
    "I can't send you your export privately (you haven't started a private chat with me, or you don't accept "
    "private messages), and I won't post it here. Start a private chat with me and send /export there."
)
EXPORT_AFTER_RESTART = N_("I was restarted before I could send your export. Please send /export again.")
ADMINS_ONLY = N_("Sorry, only the bot's admins can use that command.")
RESET_DONE = N_("Okay — fresh start. I've set our earlier conversation aside.")
OPTED_OUT = N_("Got it: I'll keep chatting, but your messages won't be used for training. /optin undoes it.")
OPTED_IN = N_("Thanks! Your messages can help me learn again.")
RETRAIN_UNAVAILABLE = N_("Retraining is not available in this setup.")
MODELS_UNAVAILABLE = N_("Model versions are not available in this setup.")
ROLLBACK_UNAVAILABLE = N_("Rollback is not available in this setup.")

# --- Discord's slash-command texts beyond `COMMANDS` -----------------------------------------------------------

CHAT_COMMAND_DESCRIPTION = N_("Say something to the bot")
CHAT_TEXT_DESCRIPTION = N_("What you want to say")
ROLLBACK_VERSION_DESCRIPTION = N_("The version to switch to (default: the previous one)")


# --- the console's own lines ---------------------------------------------------------------------------------


def console_greeting(bot_name: str) -> str:
    return _("Chatting with {bot_name}. Type /help for commands, Ctrl-D to quit.").format(bot_name=bot_name)


def export_saved(filename: str, path: str) -> str:
    return _("(saved {filename} to {path})").format(filename=filename, path=path)


def answering_earlier(bot_name: str) -> str:
    """The console's label for an answer to a line typed before a restart."""
    return _("[{bot_name}, answering an earlier message] ").format(bot_name=bot_name)


# --- refusals -------------------------------------------------------------------------------------------------


def rate_limited(per_minute: int, wait_s: int) -> str:
    return _("Whoa, that's a lot of messages! I answer up to {per_minute} a minute — try again in {wait_s} s.").format(
        per_minute=per_minute, wait_s=wait_s
    )


def too_long(length: int, limit: int) -> str:
    return _(
        "That message is too long for me ({length} characters; I read up to {limit}). Could you say it in fewer words?"
    ).format(length=length, limit=limit)


def unknown_command(name: str) -> str:
    return _("I don't know /{name}. Try /help.").format(name=name)


# --- help, start and status -----------------------------------------------------------------------------------


def help_text(bot_name: str, *, is_admin: bool, private_chats_learned: bool) -> str:
    """The command list, preceded by which chats the bot learns from: people should know before they talk."""
    lines = [
        _("I'm {bot_name}, a chatbot that learns to talk like this community. Just talk to me!").format(
            bot_name=bot_name
        ),
        learning_note(private_chats_learned=private_chats_learned),
        "",
    ]
    for name, description in COMMANDS.items():
        if name in ADMIN_COMMANDS and not is_admin:
            continue
        lines.append(f"/{name} — {_(description)}")
    return "\n".join(lines)


def learning_note(*, private_chats_learned: bool) -> str:
    """Which chats become training data (`Settings.learns_from_private_chats`)."""
    if private_chats_learned:
        return _("I learn from what people write in group chats and in private chats with me.")
    return _("I learn from what people write in group chats; what you tell me in a private chat is never trained on.")


def start_text(bot_name: str, *, is_admin: bool, private_chats_learned: bool) -> str:
    commands = help_text(bot_name, is_admin=is_admin, private_chats_learned=private_chats_learned)
    return _(
        "Hi! {help}\n\n"
        "I keep a log of our conversations so I can follow them. /optout keeps your messages out of training, "
        "/forget deletes them."
    ).format(help=commands)


def status_text(stats: Stats, *, model_name: str, queue_depth: int, active_problem: str | None) -> str:
    """What an admin sees for `/status`. `active_problem` is why the active version's files cannot serve (None
    when they can), asked for only when another model serves."""
    version = stats.active_version
    metrics = version.metrics if version is not None and version.name == model_name else {}
    lines = [_("Model: {name}").format(name=model_name) + _not_serving(stats, model_name, active_problem)]
    if "eval_loss" in metrics:
        loss = metrics["eval_loss"]
        lines.append(_("  eval loss {loss:.3f}, perplexity {perplexity}").format(loss=loss, perplexity=_ppl(loss)))
    lines += [
        _("Messages logged: {total} ({people} from people, {bot} from me)").format(
            total=stats.messages, people=stats.user_messages, bot=stats.bot_messages
        ),
        _("People: {users}, chats: {chats}").format(users=stats.users, chats=stats.chats),
        _("New messages since the last training run: {count}").format(count=stats.since_last_training),
        _("Requests waiting for the model: {count}").format(count=queue_depth),
    ]
    run = stats.last_run
    if run is None:
        lines.append(_("Last training run: none yet"))
    else:
        lines.append(
            _("Last training run: #{run_id} {status} (started {when} by {who})").format(
                run_id=run.id, status=run_status_word(run.status), when=_when(run.started_at), who=run.triggered_by
            )
        )
    return "\n".join(lines)


def _not_serving(stats: Stats, model_name: str, problem: str | None) -> str:
    """Why the active version is not the one serving (it could not be loaded), or "" when it is."""
    active = stats.active_version
    if active is None or active.name == model_name:
        return ""
    if problem is None:
        return _(" ({name} is active but not loaded yet, or it failed to load: the log says which)").format(
            name=active.name
        )
    return _(" ({name} is active but could not be loaded: {problem})").format(name=active.name, problem=problem)


# --- the user's own data --------------------------------------------------------------------------------------


def export_ready(count: int) -> str:
    return ngettext(
        "Here is the {count} message I have from you.", "Here are the {count} messages I have from you.", count
    ).format(count=count)


def forgotten(count: int, *, trained_on: Sequence[str], training_now: bool) -> str:
    """`/forget`'s answer: how many messages went, which versions had learned from them, a run in progress."""
    text = ngettext(
        "Done: I deleted {count} message you sent me, in every chat (this /forget included).",
        "Done: I deleted {count} messages you sent me, in every chat (this /forget included).",
        count,
    ).format(count=count)
    if trained_on:
        text += _(
            " Your messages were part of the training data of versions {versions}; they will not be in future versions."
        ).format(versions=", ".join(trained_on))
    if training_now:
        text += _(" A training run is in progress: the version it trains will not be used with your messages in it.")
    return text


# --- training runs --------------------------------------------------------------------------------------------


def run_request(result: RunRequest) -> str:
    """The immediate answer to a request for a training run."""
    match result:
        case RunStarted(run_id=run_id, reports_here=here):
            where = _(" I'll report progress here.") if here else ""
            return _("Training run #{run_id} started. I keep answering while it trains.").format(run_id=run_id) + where
        case AlreadyRunning(run_id=run_id, progress=progress, live_pid=pid):
            text = _("A training run (#{run_id}) is already running, {percent}% done.").format(
                run_id=run_id, percent=math.floor(progress * 100)
            )
            if pid is not None:
                text += _(
                    " Its process ({pid}) is alive; `magpie retrain --stop-running` stops it and starts a new one."
                ).format(pid=pid)
            return text
        case CoolingDown(cooldown_minutes=cooldown, minutes_left=left):
            return _(
                "The last training run finished less than {cooldown:g} minutes ago (RETRAIN_COOLDOWN_MINUTES). "
                "Try again in {left} min."
            ).format(cooldown=cooldown, left=left)
        case CouldNotStart():
            return _("Sorry, I could not start the training process; the bot's log says why.")


def run_progress(run_id: int, fraction: float) -> str:
    return _("Training run #{run_id}: {percent}% done.").format(run_id=run_id, percent=math.floor(fraction * 100))


def run_outcome(outcome: RunOutcome) -> str:
    """How a run ended, in the words the requester reads (with old vs new eval loss when it was scored)."""
    reason = (outcome.reason or _("no reason recorded")).rstrip(". ")
    run_id = outcome.run_id
    if outcome.status is RunStatus.PROMOTED:
        text = _("Training run #{run_id} finished: {version} is now the active model.").format(
            run_id=run_id, version=outcome.version
        )
    elif outcome.status is RunStatus.REJECTED:
        version = outcome.version or _("the new version")
        text = _(
            "Training run #{run_id} finished, but {version} was not promoted: {reason}. The active model stays."
        ).format(run_id=run_id, version=version, reason=reason)
    else:
        facts = outcome.metrics.get(NOT_ENOUGH_DATA)
        if isinstance(facts, dict):  # worded here, in the reader's language, from what the trainer recorded
            reason = not_enough_data(**facts).rstrip(". ")
        failed = _("Training run #{run_id} failed: {reason}. The active model stays.")
        return failed.format(run_id=run_id, reason=reason)
    notes = _scores(outcome)
    if not outcome.data_withdrawn:  # a discarded version's numbers mean nothing to anyone now
        notes += _recall(outcome.metrics) + _made_of(outcome.metrics)
    if outcome.again is not None:
        notes += _training_again(outcome.again)
    if outcome.swap is not None:
        notes += _swap_note(outcome.swap)
    return text + notes


def _scores(outcome: RunOutcome) -> str:
    metrics = outcome.metrics
    if outcome.data_withdrawn:
        return ""  # the version was discarded: its scores mean nothing to anyone now
    before, after = metrics.get("active_eval_loss"), metrics.get("eval_loss")
    if not isinstance(before, float) or not isinstance(after, float):
        return ""
    held_out = metrics.get("eval_samples", "?")
    return ngettext(
        " Eval loss {before:.3f} → {after:.3f} (perplexity {ppl_before} → {ppl_after}) on {held_out} held-out "
        "sample; trained on {trained}.",
        " Eval loss {before:.3f} → {after:.3f} (perplexity {ppl_before} → {ppl_after}) on {held_out} held-out "
        "samples; trained on {trained}.",
        held_out if isinstance(held_out, int) else 2,
    ).format(
        before=before,
        after=after,
        ppl_before=_ppl(before),
        ppl_after=_ppl(after),
        held_out=held_out,
        trained=metrics.get("train_samples", "?"),
    )


def not_enough_data(*, messages_read: int, targets: int, conversations: int, repeats: int, over_share: int) -> str:
    """Why a run had nothing to train on, in numbers an admin can act on (issue #19: "two people repeating the
    same lines count once each")."""
    text = ngettext(
        "not enough conversation to train on yet: {targets} distinct line to learn from, out of {read} logged "
        "messages, in {conversations} conversation(s).",
        "not enough conversation to train on yet: {targets} distinct lines to learn from, out of {read} logged "
        "messages, in {conversations} conversation(s).",
        targets,
    ).format(targets=targets, read=messages_read, conversations=conversations)
    if repeats:
        text += ngettext(
            " A person repeating a line counts once: {count} repeat was left out.",
            " A person repeating a line counts once: {count} repeats were left out.",
            repeats,
        ).format(count=repeats)
    if over_share:
        text += ngettext(
            " {count} line was over one person's share of the data.",
            " {count} lines were over one person's share of the data.",
            over_share,
        ).format(count=over_share)
    needed = max(1, 2 - conversations)
    text += ngettext(
        " A run needs usable messages in at least two conversations (one is held out to judge the new version): "
        "{needed} more distinct line needed, in a conversation of its own (a /reset or a long silence starts one).",
        " A run needs usable messages in at least two conversations (one is held out to judge the new version): "
        "{needed} more distinct lines needed, in a conversation of their own (a /reset or a long silence starts "
        "one).",
        needed,
    ).format(needed=needed)
    return text


def _recall(metrics: dict[str, Any]) -> str:
    """The recall probe (`trainer.recall_probe`): what the loss does not show."""
    probe = metrics.get(RECALL_PROBE)
    if not isinstance(probe, dict) or not probe.get("prompts"):
        return ""
    return ngettext(
        " Recurring exchange of held-out conversations answered as the community does: {new} of {prompts} "
        "(active version: {active}).",
        " Recurring exchanges of held-out conversations answered as the community does: {new} of {prompts} "
        "(active version: {active}).",
        probe["prompts"],
    ).format(new=probe.get("new"), prompts=probe["prompts"], active=probe.get("active"))


def _made_of(metrics: dict[str, Any]) -> str:
    """What the training targets were (`trainer.exchanges.TargetKind`), when the run recorded it."""
    targets = metrics.get("targets")
    if not isinstance(targets, dict) or not targets:
        return ""
    return _(
        " Targets: {replies} platform replies, {follow_ups} follow-ups, {openings} opening lines; "
        "{exchanges} short exchange samples."
    ).format(
        replies=targets.get("reply", 0),
        follow_ups=targets.get("follow_up", 0),
        openings=targets.get("opening", 0),
        exchanges=targets.get("exchange_samples", 0),
    )


def _training_again(again: TrainingAgain) -> str:
    if again.run_id is not None:
        return _(" Training again without them: run #{run_id} started.").format(run_id=again.run_id)
    if again.refused is not None:
        return _(" Not training again now: {why}").format(why=run_request(again.refused))
    return _(" The next training run will train without them.")


# --- model versions -------------------------------------------------------------------------------------------


def switch(result: Switch) -> str:
    """The answer to `/rollback` (and `magpie models activate / rollback`)."""
    if isinstance(result, SwitchRefused):
        return _switch_refused(result)
    text = _("Switched to {version}.").format(version=result.version)
    if result.rolled_back is not None:
        if result.replies_excluded:
            note = _(" {version} is marked rolled back; its replies will not be used for training.")
        else:
            note = _(" {version} is marked rolled back.")
        text += note.format(version=result.rolled_back)
    return text + _swap_note(result.swap)


def _switch_refused(refused: SwitchRefused) -> str:
    name = refused.version
    match refused.why:
        case SwitchRefusal.UNKNOWN_VERSION:
            return _('I don\'t know a model version called "{name}". /models lists them.').format(name=name)
        case SwitchRefusal.NOTHING_ACTIVE:
            return _("No trained version is active (serving BASE_MODEL), so there is nothing to roll back.")
        case SwitchRefusal.NO_EARLIER_VERSION:
            return _("There is no earlier version to go back to from {name}. /models lists them.").format(name=name)
        case SwitchRefusal.ALREADY_ACTIVE:
            return _("{name} is already the active model.").format(name=name)
        case SwitchRefusal.FILES_MISSING:
            return _("{name}'s files are missing from {path}, so I can't switch to it.").format(
                name=name, path=refused.path
            )
        case SwitchRefusal.PRUNED:
            return _("{name}'s files were deleted to save disk space (MODELS_KEEP), so I can't switch to it.").format(
                name=name
            )


def _swap_note(swap: SwapOutcome) -> str:
    """What the requester should know about the engine after the registry switched versions."""
    match swap.state:
        case SwapState.SERVING:
            return ""
        case SwapState.ELSEWHERE:
            return _(" A running bot switches to it within a few seconds.")
        case SwapState.ENGINE_DOWN:
            return _(" The model engine is not running; it will load it at the next start.")
        case SwapState.LOAD_FAILED:
            return _(" But it could not be loaded ({problem}); still serving {serving}.").format(
                problem=swap.problem, serving=swap.still_serving or _("nothing")
            )


def version_list(listing: VersionList) -> str:
    """Newest first, with status, eval loss and perplexity; the active one is marked with `*`."""
    if not listing.versions:
        return _("No trained model versions yet: serving BASE_MODEL ({base_model}).").format(
            base_model=listing.base_model
        )
    lines = [_("Model versions, newest first (* = active):")]
    lines += [_version_line(version) for version in listing.versions]
    if listing.older:
        lines.append(_("  … and {count} older").format(count=listing.older))
    if listing.disk is not None:
        lines.append(_disk_line(listing.disk))
    return "\n".join(lines)


def _disk_line(disk: DiskUse) -> str:
    size = disk_size_text(disk.models_dir_bytes)
    if disk.keep == 0:
        return _("Model files take {size} on disk (MODELS_KEEP=0: every version's files are kept).").format(size=size)
    return _(
        "Model files take {size} on disk (MODELS_KEEP={keep}: after each promotion only the {keep} newest versions, "
        "the active one and the rollback target keep their files)."
    ).format(size=size, keep=disk.keep)


def disk_size_text(size: int) -> str:
    """Bytes as people read them: 980 B, 12.3 MB, 1.5 GB (powers of 1,000, like file managers)."""
    if size < 1000:
        return _("{size} B").format(size=size)
    value = size / 1000
    for unit in (_("{size:.1f} KB"), _("{size:.1f} MB")):
        if value < 1000:
            return unit.format(size=value)
        value /= 1000
    return _("{size:.1f} GB").format(size=value)


def _version_line(version: VersionSummary) -> str:
    marker = "*" if version.status is VersionStatus.ACTIVE else " "
    line = f"{marker} {version.name}: {version_status_word(version.status)}"
    if version.eval_loss is not None:
        line += _(", eval loss {loss:.3f} (perplexity {perplexity})").format(
            loss=version.eval_loss, perplexity=_ppl(version.eval_loss)
        )
    line += f", {version.created_at:%Y-%m-%d %H:%M}"
    if version.pruned:
        line += _(", files deleted (MODELS_KEEP)")
    elif version.disk_bytes is not None:
        line += f", {disk_size_text(version.disk_bytes)}"
    if version.status is VersionStatus.REJECTED and version.note:
        line += f" ({version.note})"
    return line


# --- `magpie models check` and `magpie models prune` (the terminal's language) ---------------------------------

MODELS_REMOVE_HINT = N_("`magpie models check --remove` deletes the stray directories.")
MODELS_KEEP_ALL = N_("MODELS_KEEP is 0: every version's files are kept. `--keep N` prunes down to N versions.")


def models_stray(path: str) -> str:
    return _("stray directory (no version row): {path}").format(path=path)


def models_broken(name: str, problem: str, where: str) -> str:
    """A version whose files cannot serve; `problem` is the check's own (English) wording."""
    return _("version {name}: {problem} ({where})").format(name=name, problem=problem, where=where)


def models_removed(count: int) -> str:
    return ngettext("Removed {count} stray directory.", "Removed {count} stray directories.", count).format(count=count)


def models_agree(models_dir: str) -> str:
    return _("The registry and {models_dir} agree.").format(models_dir=models_dir)


def models_pruned(name: str, size: int, path: str, *, dry_run: bool) -> str:
    line = _("would delete {name} ({size}, {path})") if dry_run else _("deleted {name} ({size}, {path})")
    return line.format(name=name, size=disk_size_text(size), path=path)


def models_left_outside(name: str, models_dir: str) -> str:
    return _("left {name}: its directory is outside {models_dir}").format(name=name, models_dir=models_dir)


def models_freed(size: int, kept: Sequence[str], *, dry_run: bool) -> str:
    total = (
        _("Would free {size}; versions with files: {kept}.")
        if dry_run
        else _("Freed {size}; versions with files: {kept}.")
    )
    return total.format(size=disk_size_text(size), kept=", ".join(kept) or _("none"))


# --- words for states -----------------------------------------------------------------------------------------

_RUN_STATUS_WORDS = {
    RunStatus.RUNNING: N_("running"),
    RunStatus.PROMOTED: N_("promoted"),
    RunStatus.REJECTED: N_("rejected"),
    RunStatus.FAILED: N_("failed"),
}
# English shows the states' own names (what `magpie models` and the database say), so the msgids are those names.
_VERSION_STATUS_WORDS = {
    VersionStatus.CANDIDATE: N_("candidate"),
    VersionStatus.ACTIVE: N_("active"),
    VersionStatus.RETIRED: N_("retired"),
    VersionStatus.REJECTED: N_("rejected"),
    VersionStatus.ROLLED_BACK: N_("rolled_back"),
}


def run_status_word(status: RunStatus) -> str:
    return _(_RUN_STATUS_WORDS[status])


def version_status_word(status: VersionStatus) -> str:
    return _(_VERSION_STATUS_WORDS[status])


def _ppl(loss: float) -> str:
    """A perplexity for people: a number, or `core.metrics`' word for one too large to mean anything."""
    return _(perplexity_text(loss))  # numbers are never msgids, so only the word is translated


def _when(moment: datetime) -> str:
    return _("{moment:%Y-%m-%d %H:%M} UTC").format(moment=moment)


# --- the operator's dashboard (bot/dashboard.py; the page's language is the browser's Accept-Language) ----------
# The constants are msgids: the templates and plots show them as `_(t.NAME)`.

DASHBOARD_TITLE = N_("Magpie dashboard")
DASHBOARD_LOGIN_PROMPT = N_("Enter the dashboard token (DASHBOARD_TOKEN in the bot's settings).")
DASHBOARD_TOKEN_LABEL = N_("Token")
DASHBOARD_LOGIN_BUTTON = N_("Open the dashboard")
DASHBOARD_LOGOUT_BUTTON = N_("Log out")
DASHBOARD_WRONG_TOKEN = N_("That is not the dashboard token.")
DASHBOARD_LOGIN_NEEDED = N_("Log in with the dashboard token first.")
DASHBOARD_STALE_FORM = N_(
    "This form is out of date or did not come from the dashboard, so nothing was done. Reload the page and try again."
)
DASHBOARD_ACTIVE = N_("Active model")
DASHBOARD_VERSIONS = N_("Model versions")
DASHBOARD_EVAL_LOSS_PLOT = N_("Held-out loss per version")
DASHBOARD_LOSS_CURVE_PLOT = N_("Training loss of the last run")
DASHBOARD_MESSAGES_PLOT = N_("Messages per day per chat")
DASHBOARD_EXCLUSIONS = N_("Training data left out, by reason")
DASHBOARD_ACTIONS = N_("Actions")
DASHBOARD_RETRAIN_BUTTON = N_("Retrain now")
DASHBOARD_ROLLBACK_BUTTON = N_("Roll back to the previous version")
DASHBOARD_ROLLBACK_TO_BUTTON = N_("Roll back to this one")
DASHBOARD_COLUMNS = (N_("version"), N_("status"), N_("eval loss"), N_("perplexity"), N_("created (UTC)"), N_("note"))
DASHBOARD_NO_VERSIONS = N_("No trained model versions yet.")
DASHBOARD_NO_CURVE = N_("No training run has recorded a loss curve yet.")
DASHBOARD_NO_DATA = N_("no data yet")
DASHBOARD_AXIS_CREATED = N_("created (UTC)")
DASHBOARD_AXIS_EVAL_LOSS = N_("held-out loss")
DASHBOARD_AXIS_STEP = N_("step")
DASHBOARD_AXIS_TRAIN_LOSS = N_("training loss")
DASHBOARD_AXIS_DAY = N_("day (UTC)")
DASHBOARD_AXIS_MESSAGES = N_("messages")
DASHBOARD_OTHER_CHATS = N_("other chats")
_EXCLUSION_REASONS = dict(  # keywords: the reason names are not texts
    command=N_("commands and /reset"),
    opted_out=N_("from people who sent /optout"),
    private_chat=N_("private chats (TRAIN_ON_PRIVATE_CHATS is off)"),
    reply_to_opted_out=N_("bot replies to people who opted out"),
    undelivered_bot_reply=N_("bot replies that were not delivered"),
    rolled_back_bot_reply=N_("replies of rolled-back versions"),
    empty=N_("empty after cleaning"),
    repeated_line=N_("a person repeating their last line"),
    bot_reply_context_only=N_("bot replies (context only)"),
    blocklisted_context_only=N_("TRAIN_BLOCKLIST matches (context only)"),
    repetitive_context_only=N_("repetitive lines (context only)"),
)
"""What each reason counted by `trainer.dataset` means."""


def dashboard_exclusion_reason(reason: str) -> str:
    """A reason `trainer.dataset` counted, in words; one not listed in `_EXCLUSION_REASONS` is shown by its name."""
    return _(_EXCLUSION_REASONS[reason]) if reason in _EXCLUSION_REASONS else reason


def dashboard_active(name: str | None, base_model: str) -> str:
    return name if name is not None else _("none: serving BASE_MODEL ({base_model})").format(base_model=base_model)


def dashboard_running(run_id: int, progress: float, started: str, by: str) -> str:
    return _("Training run #{run_id} is running: {percent}% done (started {started} by {by}).").format(
        run_id=run_id, percent=math.floor(progress * 100), started=started, by=by
    )


def dashboard_curve_caption(run_id: int, version: str | None, status: RunStatus) -> str:
    return _("Run #{run_id} ({version}, {status}).").format(
        run_id=run_id, version=version or _("no version"), status=run_status_word(status)
    )


def dashboard_exclusions_caption(run_id: int, train: int | None, held_out: int | None) -> str:
    return _(
        "Counted when run #{run_id} built its data: {train} training and {held_out} held-out samples remained."
    ).format(
        run_id=run_id, train=train if train is not None else "?", held_out=held_out if held_out is not None else "?"
    )


def dashboard_no_exclusions() -> str:
    return _("No training run has recorded its data yet; `magpie dataset export` counts them now.")


def dashboard_no_messages(days: int) -> str:
    return _("No messages in the last {days} days.").format(days=days)


# --- the offline starter model (`magpie bootstrap`) --------------------------------------------------------------


def starter_explanation(minutes: float) -> str:
    """What is about to happen, before the progress bar: `minutes` is the budget (0: the full recipe)."""
    if minutes > 0:
        duration = _("up to about {minutes:g} minutes").format(minutes=minutes)
    else:
        duration = _("as long as the full recipe needs")
    return _(
        "Building the offline starter model: a small GPT-2 trained here, from scratch, on the English and Korean "
        "dialogues of chatterbot-corpus (not OpenAI's pretrained GPT-2). It takes {duration}."
    ).format(duration=duration)


def starter_built(
    name: str,
    path: str,
    *,
    eval_loss: float | None,
    steps: int,
    evaluations: int,
    recipe_steps: int | None,
    budget_minutes: float | None,
    activated: bool,
) -> str:
    """What `magpie bootstrap` saved, how good it is, and whether a longer budget would train more."""
    if evaluations > 1:
        kept = _("the best of {evaluations} checkpoints over {steps} training steps")
    else:
        kept = _("after {steps} training steps")
    kept = kept.format(evaluations=evaluations, steps=steps)
    if eval_loss is not None:
        saved = _("Saved {name} to {path} (held-out perplexity {perplexity}; {kept}).")
    else:
        saved = _("Saved {name} to {path} (no held-out score; {kept}).")
    text = saved.format(name=name, path=path, perplexity=_ppl(eval_loss) if eval_loss is not None else "", kept=kept)
    if recipe_steps is not None and budget_minutes is not None and steps < recipe_steps:
        text += _(
            " The {budget:g}-minute budget fitted {steps} of the recipe's {recipe_steps} steps on this machine; a "
            "longer `magpie bootstrap --minutes N` trains more of them (0 = all)."
        ).format(budget=budget_minutes, steps=steps, recipe_steps=recipe_steps)
    if activated:
        return text + _(" It is now the active model.")
    return text + _(" Another version is active; `magpie models activate {name}` switches to it.").format(name=name)
