"""The words people read in chat, in one place: replies, command texts, and what the learning side reports.

The chat service and the training orchestrator hand typed results (`core.outcomes`) to the functions here, which
return the text; nothing else in Magpie writes chat wording. Every text is English written as a gettext msgid and
comes out in the language being spoken (`core.i18n`: the person's, set by the core for each message), from the one
catalogue `core/locale/<language>/LC_MESSAGES/magpie.po`. Functions translate as they word; a constant is only
marked (`N_`), and the code that sends it says `_(CONSTANT)` when it knows whom it speaks to.

Adding a text: write it here as `_("English {name}").format(name=...)` (or `N_` for a constant), then add its
Korean to `core/locale/ko/LC_MESSAGES/magpie.po`; `tests/test_i18n.py` fails until every msgid has a translation.
(The command list's one-line descriptions live in the command registry, `core.chat.commands.COMMANDS`, marked the same
way.) Texts never contain exception text or secrets: a reason shown here is one Magpie wrote itself (a run's
recorded reason, a version's files problem).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from core.chat.commands import visible_commands
from core.errors import EngineBusyError
from core.i18n import N_, _, ngettext
from core.outcomes import (
    DATA_WITHDRAWN,
    NOT_ENOUGH_DATA,
    RECALL_PROBE,
    AlreadyRunning,
    CoolingDown,
    CouldNotStart,
    DiskUse,
    RunEndReason,
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
    VoicesQueued,
    Withdrawal,
    recorded_reason,
)
from core.perplexity import perplexity_text
from core.storage.chat_log import Stats
from core.storage.models import RunStatus, VersionStatus

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

# --- Discord's slash-command texts beyond the command registry (`core.chat.commands.COMMANDS`) ----------------------

CHAT_COMMAND_DESCRIPTION = N_("Say something to the bot")
CHAT_TEXT_DESCRIPTION = N_("What you want to say")


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
    lines.extend(f"/{command.name} — {_(command.help)}" for command in visible_commands(admin=is_admin))
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


def status_text(
    stats: Stats, *, model_name: str, queue_depth: int, active_problem: str | None, community: str | None = None
) -> str:
    """What an admin sees for `/status`. `active_problem` is why the active version's files cannot serve (None
    when they can), asked for only when another model serves. With `community` (a group with VOICE_SCOPE=community)
    the numbers, the model and the last run are that community's voice's."""
    version = stats.active_version
    metrics = version.metrics if version is not None and version.name == model_name else {}
    lines = [voice_label(community)] if community is not None else []
    lines += [_("Model: {name}").format(name=model_name) + _not_serving(stats, model_name, active_problem)]
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


def forgotten(
    count: int, *, trained_on: Sequence[str], training_now: bool, withdrawal: Withdrawal | None = None
) -> str:
    """`/forget`'s answer: how many messages went, which versions had learned from them and what became of those
    (`withdrawal`), a run in progress."""
    text = ngettext(
        "Done: I deleted {count} message you sent me, in every chat (this /forget included).",
        "Done: I deleted {count} messages you sent me, in every chat (this /forget included).",
        count,
    ).format(count=count)
    if trained_on:
        text += _(
            " Your messages were part of the training data of versions {versions}; they will not be in future versions."
        ).format(versions=", ".join(trained_on))
    if withdrawal is not None:
        text += withdrawn_text(withdrawal)
    if training_now:
        text += _(" A training run is in progress: the version it trains will not be used with your messages in it.")
    return text


def withdrawn_text(withdrawal: Withdrawal) -> str:
    """What a /forget or /optout did to the models that had learned from the person (in both scopes)."""
    if not withdrawal.marked:
        return ""
    text = _(
        " Versions {versions} will never answer anyone again, and their files are deleted; /rollback cannot bring "
        "them back."
    ).format(versions=", ".join(withdrawal.marked))
    for replaced in withdrawal.replaced:
        if replaced.now_serving is None:
            text += _(" {voice} now answers with the untrained base model, from this message on.").format(
                voice=voice_label(replaced.community)
            )
        else:
            text += _(" {voice} now answers with {version}, which never saw your messages.").format(
                voice=voice_label(replaced.community), version=replaced.now_serving
            )
    if withdrawal.retrain_queued:
        text += _(" A new version is being trained without your messages.")
    return text


def voice_label(community: str | None) -> str:
    """A voice as people read it: a community's id, or the shared voice."""
    if community is None:
        return _("The shared voice")
    return _("The voice of {community}").format(community=community)


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
        case CouldNotStart(queue_unreachable=True):
            return _(
                "Sorry, the training queue is not answering (the broker of CELERY_BROKER_URL is down or unreachable), "
                "so no run was started. Send /retrain again once it is back."
            )
        case CouldNotStart():
            return _("Sorry, I could not start the training process; the bot's log says why.")
        case VoicesQueued(communities=()):
            return _("No community has enough new messages to train its voice (RETRAIN_MIN_NEW_MESSAGES).")
        case VoicesQueued(communities=names, reports_here=here):
            where = _(" I'll report progress here, and sum up at the end.") if here else ""
            return (
                ngettext(
                    "Training the voice of {count} community: {names}.",
                    "Training the voices of {count} communities, one after another: {names}.",
                    len(names),
                ).format(count=len(names), names=", ".join(names))
                + where
            )


def run_progress(run_id: int, fraction: float) -> str:
    return _("Training run #{run_id}: {percent}% done.").format(run_id=run_id, percent=math.floor(fraction * 100))


_RUN_END_REASONS = {
    RunEndReason.WORSE_THAN_ACTIVE: N_("it did worse than the active version on the same held-out conversations"),
    RunEndReason.DIVERGED: N_("training diverged (its eval loss is not a number)"),
    RunEndReason.ACTIVE_CHANGED: N_("the active version changed while it trained"),
    RunEndReason.TRAINING_DATA_WITHDRAWN: N_(
        "training data changed during the run: messages it trained on were deleted or withdrawn (/forget or "
        "/optout), so the version it trained was discarded"
    ),
    RunEndReason.NOT_ENOUGH_DATA: N_(
        "not enough conversation to train on yet. A run needs at least two usable messages: the most recent ones "
        "(with several conversations, whole conversations) are held out to judge the new version"
    ),
    RunEndReason.MODEL_LOAD_FAILED: N_("the model to train from could not be loaded; the trainer's log says why"),
    RunEndReason.TRAINING_ERROR: N_("training failed with an unexpected error; the trainer's log has the details"),
    RunEndReason.SEVERAL_PROCESSES: N_(
        "TRAIN_LAUNCHER=accelerate with several processes is not supported yet: set num_processes: 1 in "
        "ACCELERATE_CONFIG"
    ),
    RunEndReason.COULD_NOT_START: N_("the training process could not start; the log says why"),
    RunEndReason.QUEUE_UNREACHABLE: N_("the training queue did not take it (is the CELERY_BROKER_URL broker running?)"),
    RunEndReason.KILLED: N_("the training process was killed"),
    RunEndReason.EXITED: N_("the training process exited unexpectedly"),
    RunEndReason.INTERRUPTED: N_(
        "interrupted: the training process stopped without recording an outcome (restart or crash)"
    ),
    RunEndReason.TIMED_OUT: N_("it ran longer than RETRAIN_TIMEOUT_MINUTES and was stopped"),
    RunEndReason.NO_WORKER: N_(
        "no training worker took it within RETRAIN_TIMEOUT_MINUTES: is a magpie worker running?"
    ),
    RunEndReason.CLEARED: N_("cleared before any worker took it (magpie retrain --force)"),
    RunEndReason.STOPPED: N_("stopped with magpie retrain --stop-running"),
    RunEndReason.STOPPED_WITH_BOT: N_("stopped with the bot"),
    RunEndReason.INTERRUPTED_FROM_SHELL: N_("interrupted from the shell"),
    RunEndReason.ENDED_ELSEWHERE: N_("ended by another process"),
    RunEndReason.LOST_TRACK: N_("the bot lost track of it (see the bot's log)"),
    RunEndReason.RECORD_GONE: N_("its record disappeared"),
}
"""Every `RunEndReason` in words (`tests/test_i18n.py` checks that none is missing)."""


def run_end_reason(reason: RunEndReason | str | None, metrics: Mapping[str, Any] | None = None) -> str:
    """Why a run was not promoted, in the reader's language. Free text (a row recorded before reasons were typed)
    is shown as it is. `metrics` (the run's) gives the count of withdrawn messages where there is one."""
    if reason is None:
        return _("no reason recorded")
    if not isinstance(reason, RunEndReason):
        return reason
    count = (metrics or {}).get(DATA_WITHDRAWN)
    if reason is RunEndReason.TRAINING_DATA_WITHDRAWN and isinstance(count, int):
        return ngettext(
            "training data changed during the run: {count} message was deleted or withdrawn (/forget or /optout), "
            "so the version it trained was discarded",
            "training data changed during the run: {count} messages were deleted or withdrawn (/forget or "
            "/optout), so the version it trained was discarded",
            count,
        ).format(count=count)
    return _(_RUN_END_REASONS[reason])


def version_note(status: VersionStatus, note: str | None) -> str:
    """A version's note as people read it: a rejected version's note is why the gate refused it (a
    `RunEndReason` value, or free text in versions recorded before reasons were typed)."""
    if not note:
        return ""
    return run_end_reason(recorded_reason(note)) if status is VersionStatus.REJECTED else note


def run_outcome(outcome: RunOutcome) -> str:
    """How a run ended, in the words the requester reads (with old vs new eval loss when it was scored)."""
    reason = run_end_reason(outcome.reason, outcome.metrics).rstrip(". ")
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


def voices_progress(community: str, position: int, total: int, fraction: float) -> str:
    """A retrain of every community, on its way: which community trains now and how far its run is."""
    return _("{voice} ({position} of {total}): {percent}% done.").format(
        voice=voice_label(community), position=position, total=total, percent=math.floor(fraction * 100)
    )


def voices_summary(outcomes: Sequence[tuple[str, RunOutcome | RunRequest]]) -> str:
    """The one closing summary of a retrain of every community: each community's outcome."""
    lines = [_("Retraining the communities' voices is done:")]
    for community, outcome in outcomes:
        said = run_outcome(outcome) if isinstance(outcome, RunOutcome) else run_request(outcome)
        lines.append(f"- {voice_label(community)}: {said}")
    return "\n".join(lines)


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
    needed = max(1, 2 - targets)
    text += ngettext(
        " A run needs at least two distinct lines (the most recent are held out to judge the new version): "
        "{needed} more distinct line needed.",
        " A run needs at least two distinct lines (the most recent are held out to judge the new version): "
        "{needed} more distinct lines needed.",
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
        case SwitchRefusal.HOLDS_WITHDRAWN:
            return _(
                "{name} learned from messages whose authors withdrew them (/forget or /optout), so it can never "
                "serve again."
            ).format(name=name)
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
    voices = list(dict.fromkeys(version.community for version in listing.versions))
    if voices == [None]:
        lines += [_version_line(version) for version in listing.versions]
    for voice in [] if voices == [None] else voices:  # grouped by voice once any community has one
        lines.append(voice_label(voice) + ":")
        lines += [_version_line(version) for version in listing.versions if version.community == voice]
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
        line += f" ({version_note(version.status, version.note)})"
    if version.holds_withdrawn:
        line += _(" (learned from withdrawn messages: never serves again)")
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
    """A perplexity for people: a number, or `core.perplexity`' word for one too large to mean anything."""
    return _(perplexity_text(loss))  # numbers are never msgids, so only the word is translated


def _when(moment: datetime) -> str:
    return _("{moment:%Y-%m-%d %H:%M} UTC").format(moment=moment)


# --- the operator's dashboard (bot/web/dashboard.py; the page's language is the browser's Accept-Language) ----------
# The constants are msgids: the templates and plots show them as `_(t.NAME)`.

DASHBOARD_TITLE = N_("Magpie dashboard")
DASHBOARD_LOGIN_PROMPT = N_("Enter the dashboard token (DASHBOARD_TOKEN in the bot's settings).")
DASHBOARD_TOKEN_LABEL = N_("Token")
DASHBOARD_LOGIN_BUTTON = N_("Open the dashboard")
DASHBOARD_LOGOUT_BUTTON = N_("Log out")
DASHBOARD_WRONG_TOKEN = N_("That is not the dashboard token.")
DASHBOARD_LOGIN_NEEDED = N_("Log in with the dashboard token first.")


def dashboard_throttled(seconds: int) -> str:
    """Why a token was not even checked: its address offered too many wrong ones."""
    return ngettext(
        "Too many wrong tokens came from your address: try again in {seconds} second.",
        "Too many wrong tokens came from your address: try again in {seconds} seconds.",
        seconds,
    ).format(seconds=seconds)


DASHBOARD_STALE_FORM = N_(
    "This form is out of date or did not come from the dashboard, so nothing was done. Reload the page and try again."
)
DASHBOARD_ACTIVE = N_("Active model")
DASHBOARD_VERSIONS = N_("Model versions")
DASHBOARD_COMMUNITIES = N_("Communities")
DASHBOARD_COMMUNITY_COLUMNS = (
    N_("community"), N_("active version"), N_("last run"), N_("learned from withdrawn messages"),
)  # fmt: skip
DASHBOARD_BASE_MODEL = N_("the base model")
DASHBOARD_WITHDRAWN_YES = N_("yes: that version never serves again")
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
DASHBOARD_AXIS_EVAL_LOSS = N_("held-out loss")
DASHBOARD_AXIS_STEP = N_("step")
DASHBOARD_AXIS_TRAIN_LOSS = N_("training loss")
DASHBOARD_AXIS_DAY = N_("day (UTC)")
DASHBOARD_AXIS_MESSAGES = N_("messages")
DASHBOARD_OTHER_CHATS = N_("other chats")
DASHBOARD_GATE_PLOT = N_("What each training run's promotion gate compared")
DASHBOARD_GATE_NOTE = N_(
    "Each run scores the version it started from and its new version on the same held-out conversations, its own: "
    "compare the two points of one run, not points of different runs."
)
DASHBOARD_VERSIONS_NOTE = N_(
    "A version's held-out loss was measured on the held-out conversations of the run that trained it, so the "
    "losses of different versions do not compare; the plot above shows what each promotion compared."
)
DASHBOARD_AXIS_RUN = N_("training run")
DASHBOARD_AXIS_GATE_LOSS = N_("held-out loss (that run's samples)")
DASHBOARD_LEGEND_STARTED_FROM = N_("the version it started from")
DASHBOARD_LEGEND_PROMOTED = N_("new version, promoted")
DASHBOARD_LEGEND_REJECTED = N_("new version, rejected")
DASHBOARD_ONE_STEP = N_("one logged step: not a curve yet")
DASHBOARD_REPLIES_PLOT = N_("Replies per hour")
DASHBOARD_LATENCY_PLOT = N_("Reply latency per day")
DASHBOARD_AXIS_HOUR = N_("hour (UTC)")
DASHBOARD_AXIS_REPLIES = N_("replies")
DASHBOARD_AXIS_SECONDS = N_("seconds")
DASHBOARD_LEGEND_P50 = N_("median (p50)")
DASHBOARD_LEGEND_P95 = N_("p95")
DASHBOARD_NO_REPLIES = N_("no replies in this window")
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
    near_duplicate_target=N_("near-duplicates of a line already kept"),
    user_share_cap=N_("over one person's share of the data (TRAIN_USER_SHARE_CAP)"),
    learning_off=N_("groups that turned learning off (/learning off)"),
)
"""What each reason counted by `trainer.dataset` means."""


def dashboard_exclusion_reason(reason: str) -> str:
    """A reason `trainer.dataset` counted, in words; one not listed in `_EXCLUSION_REASONS` (a newer trainer's)
    is shown by its name, in words rather than as a key."""
    return _(_EXCLUSION_REASONS[reason]) if reason in _EXCLUSION_REASONS else reason.replace("_", " ")


_DASHBOARD_VERSION_STATUS_WORDS = {**_VERSION_STATUS_WORDS, VersionStatus.ROLLED_BACK: N_("rolled back")}
"""The dashboard words a version's state for people (the shell shows the database's names)."""


def dashboard_version_status(status: VersionStatus) -> str:
    return _(_DASHBOARD_VERSION_STATUS_WORDS[status])


def dashboard_replies_caption(days: int, total: int, p50: float | None, p95: float | None) -> str:
    """What the replies and latency plots sum up: the model's replies over the window, and how long they took."""
    text = ngettext(
        "{count} reply by the model in the last {days} days", "{count} replies by the model in the last {days} days",
        total,
    ).format(count=total, days=days)  # fmt: skip
    if p50 is None or p95 is None:
        return text + "."
    return text + _("; from message to reply, half took {p50} s or less, 95% took {p95} s or less.").format(
        p50=f"{p50:.1f}", p95=f"{p95:.1f}"
    )


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
    recipe_steps: int | None,
    budget_minutes: float | None,
    best_step: int | None,
    activated: bool,
) -> str:
    """The one plain line that ends a starter build: what was built, how much of the recipe fitted, the held-out
    perplexity of the checkpoint kept (the best one, the one registered), and how to build a better one."""
    where = _("now the active model") if activated else _("not active: magpie models activate {name}")
    built = _("Built {name} in {path} ({where}).").format(name=name, path=path, where=where.format(name=name))
    cut = recipe_steps is not None and budget_minutes is not None and steps < recipe_steps
    if cut:
        fitted = _("It trained {steps} of the recipe's {recipe_steps} steps in a {budget:g}-minute budget").format(
            steps=steps, recipe_steps=recipe_steps, budget=budget_minutes
        )
    else:
        fitted = _("It trained the whole recipe ({steps} steps)").format(steps=steps)
    if eval_loss is None:
        score = _("no held-out score")
    elif best_step is not None:
        score = _("held-out perplexity {perplexity} (its best checkpoint, step {step})").format(
            perplexity=_ppl(eval_loss), step=best_step
        )
    else:
        score = _("held-out perplexity {perplexity}").format(perplexity=_ppl(eval_loss))
    if cut:
        assert recipe_steps is not None and budget_minutes is not None
        minutes = math.ceil(budget_minutes * recipe_steps / max(steps, 1))
        better = _("For a better one: magpie bootstrap --minutes {minutes}").format(minutes=minutes)
    else:
        better = _("It gets better from your own chats: retrain once people have talked to it (/retrain)")
    return f"{built} {fitted}; {score}. {better}."


# --- consent: the groups Magpie may be in, /learning, and what it says when added to a group --------------------

NOT_ALLOWED_HERE = N_(
    "{bot_name} works only in the groups its operator allowed, and this is not one of them: I don't log or answer "
    "anything here, and I'm leaving. Ask the bot's operator to add this group to ALLOWED_CHATS if you want me here."
)
NOT_AS_CHAT = N_(
    "You're writing as the group, not as yourself, so I can't tell whose messages that is about. Send the command "
    "from your own account (in a private chat with me if you like)."
)
LEARNING_GROUPS_ONLY = N_("/learning is for groups. In a private chat, /optout keeps your messages out of training.")
LEARNING_ADMINS_ONLY = N_("Only this group's admins can turn learning off or on.")
LEARNING_IS_ON = N_(
    "Learning is on in this group: what is said here may be used to train me. A group admin can send /learning off."
)
LEARNING_IS_OFF = N_(
    "Learning is off in this group: nothing said here is used to train me. A group admin can send /learning on."
)
LEARNING_OFF_DONE = N_(
    "Learning is now off in this group: while it stays off, nothing said here is used to train me, neither as "
    "something to learn nor as context. I still read the conversation to answer. /learning on turns it back on."
)
LEARNING_ON_DONE = N_(
    "Learning is on again in this group: what is said from now on may be used to train me. What was said while it "
    "was off stays out."
)


def welcome_text(bot_name: str) -> str:
    """What the bot says when added to a group: people should know it logs them, and how to say no, before they
    talk."""
    return _(
        "Hi, I'm {bot_name}. I keep a log of what is said in this group and learn from it to talk like you.\n"
        "/optout keeps your messages out of training, /forget deletes everything you sent me, /export sends you "
        "your logged messages.\n"
        "Group admins: /learning off stops me learning from this group."
    ).format(bot_name=bot_name)
