"""The dashboard's plots as SVG, drawn by matplotlib on the server (no JavaScript, nothing fetched from a CDN).

Figures are built with matplotlib's object API (`Figure`), never `pyplot`: pyplot keeps global state, and these
functions run in worker threads (`asyncio.to_thread`) so that drawing never blocks the bot's event loop. Every
plot renders something, with a "no data yet" note when there is nothing to draw, so the page's layout is stable.

Labels are in the language being spoken (the browser's) when a font with Hangul is installed (`HANGUL_FONTS`,
e.g. Debian's fonts-nanum, which the Docker image has, or fonts-noto-cjk); matplotlib is shown its files even when
its own font cache predates them (`hangul_font`). Without one, Korean labels would be drawn as empty boxes, so the
plots stay English.

Every time axis spans the window shown (not the data's extent, which for one point is a single instant that
matplotlib would pad by years); plots that compare versions show only what was measured on the same samples.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from functools import cache
from pathlib import Path

from matplotlib import dates as mdates
from matplotlib import font_manager, rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from core import texts
from core.i18n import SOURCE_LANGUAGE, _, current_language, speaking
from core.ops.dashboard_data import GateScore, Overview, ReplyStats, RunCurve, percentile
from core.storage.models import RunStatus, VersionStatus

log = logging.getLogger(__name__)

FIGSIZE = (7.0, 3.0)
MAX_CHATS = 8
"""Chats drawn as their own line; the rest are summed into one, so the legend stays readable."""
STATUS_COLOURS = {
    VersionStatus.ACTIVE: "#2b8a3e",
    VersionStatus.RETIRED: "#1c7ed6",
    VersionStatus.ROLLED_BACK: "#e8590c",
    VersionStatus.REJECTED: "#868e96",
    VersionStatus.CANDIDATE: "#ae3ec9",
}


def _new_axes() -> tuple[Figure, Axes]:
    figure = Figure(figsize=FIGSIZE, layout="constrained")
    axes = figure.add_subplot()
    axes.grid(True, alpha=0.3)
    return figure, axes


def _svg(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


def _when(moment: date) -> float:
    """matplotlib's number for a date or a datetime (days since its epoch), for a time axis."""
    return float(mdates.date2num(moment))  # type: ignore[no-untyped-call]


def _date_axis(axes: Axes, label: str, start: date, end: date) -> None:
    """A time axis over exactly the window shown, `start` to `end` (whatever the data: one point must not get
    matplotlib's default of years either side), with ticks that fit it, labelled without repeating the year."""
    axes.set_xlim(_when(start), _when(end))
    locator = mdates.AutoDateLocator(minticks=3, maxticks=8)  # type: ignore[no-untyped-call]
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    axes.set_xlabel(label)


def _empty(axes: Axes, note: str | None = None) -> None:
    axes.text(0.5, 0.5, note or _(texts.DASHBOARD_NO_DATA), ha="center", va="center", transform=axes.transAxes,
              color="#868e96")  # fmt: skip
    axes.set_xticks([])
    axes.set_yticks([])


def gate_figure(scores: Sequence[GateScore]) -> Figure:
    """Per run, what its promotion gate compared: the version it started from and the new one, scored on that
    run's own held-out samples, joined by a line; the new one green when promoted, orange when rejected. Runs sit
    side by side in order (not on a time axis), and the note says why points of different runs do not compare."""
    figure, axes = _new_axes()
    if not scores:
        _empty(axes)
        return figure
    positions = range(len(scores))
    for x, score in zip(positions, scores, strict=True):
        if score.active_loss is not None:
            axes.plot([x, x], [score.active_loss, score.new_loss], color="#adb5bd", zorder=1)
    before = [(x, s.active_loss) for x, s in zip(positions, scores, strict=True) if s.active_loss is not None]
    if before:
        axes.scatter([x for x, _y in before], [y for _x, y in before], color="#868e96", marker="s", s=28,
                     label=_(texts.DASHBOARD_LEGEND_STARTED_FROM), zorder=2)  # fmt: skip
    for status, colour, label in (
        (RunStatus.PROMOTED, STATUS_COLOURS[VersionStatus.ACTIVE], texts.DASHBOARD_LEGEND_PROMOTED),
        (RunStatus.REJECTED, STATUS_COLOURS[VersionStatus.ROLLED_BACK], texts.DASHBOARD_LEGEND_REJECTED),
    ):
        group = [(x, s.new_loss) for x, s in zip(positions, scores, strict=True) if s.status is status]
        if group:
            axes.scatter([x for x, _y in group], [y for _x, y in group], color=colour, s=40, label=_(label), zorder=3)
    axes.set_xlim(-0.6, len(scores) - 0.4)
    step = max(1, math.ceil(len(scores) / 12))  # at most a dozen run numbers under the axis
    axes.set_xticks(list(positions)[::step], [f"#{s.run_id}" for s in scores][::step])
    axes.set_xlabel(_(texts.DASHBOARD_AXIS_RUN))
    axes.set_ylabel(_(texts.DASHBOARD_AXIS_GATE_LOSS))
    axes.legend(fontsize=7, loc="best")
    return figure


def loss_curve_figure(curve: RunCurve | None) -> Figure:
    """The last run's training loss per logged step, with its held-out loss as a dashed line for scale; a run
    that logged one step has no curve (one point on an axis of its own rounding is noise), and says so."""
    figure, axes = _new_axes()
    if curve is None or len(curve.points) < 2:
        _empty(axes, _(texts.DASHBOARD_ONE_STEP) if curve is not None else None)
        return figure
    steps = [step for step, _loss in curve.points]
    axes.plot(steps, [loss for _step, loss in curve.points], marker="." if len(steps) < 50 else None,
              label=_(texts.DASHBOARD_AXIS_TRAIN_LOSS))  # fmt: skip
    if curve.eval_loss is not None:
        axes.axhline(curve.eval_loss, linestyle="--", color="#2b8a3e", label=_(texts.DASHBOARD_AXIS_EVAL_LOSS))
    axes.set_xlabel(_(texts.DASHBOARD_AXIS_STEP))
    axes.set_ylabel(_(texts.DASHBOARD_AXIS_TRAIN_LOSS))
    axes.legend(fontsize=8, loc="best")
    return figure


def messages_figure(days: Sequence[date], per_chat: Mapping[str, Mapping[date, int]]) -> Figure:
    """A bar per day, stacked by chat: the MAX_CHATS busiest chats over the window each have a colour, the rest
    are summed as "other chats"."""
    figure, axes = _new_axes()
    if not per_chat or not days:
        _empty(axes)
        return figure
    busiest = sorted(per_chat, key=lambda chat: (-sum(per_chat[chat].values()), chat))
    series = {chat: per_chat[chat] for chat in busiest[:MAX_CHATS]}
    if len(busiest) > MAX_CHATS:
        rest = busiest[MAX_CHATS:]
        series[_(texts.DASHBOARD_OTHER_CHATS)] = {day: sum(per_chat[c].get(day, 0) for c in rest) for day in days}
    xs = [_when(day) for day in days]
    below = [0] * len(days)
    for chat, counts in series.items():
        heights = [counts.get(day, 0) for day in days]
        axes.bar(xs, heights, bottom=below, width=0.8, label=chat)
        below = [low + height for low, height in zip(below, heights, strict=True)]
    _date_axis(axes, _(texts.DASHBOARD_AXIS_DAY), *_day_window(days))
    axes.set_ylim(0, max(below) * 1.1 + 0.5)  # headroom above the busiest day
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.5 of a message
    axes.set_ylabel(_(texts.DASHBOARD_AXIS_MESSAGES))
    axes.legend(fontsize=7, loc="upper left")
    return figure


def _day_window(days: Sequence[date]) -> tuple[datetime, datetime]:
    """From the first day's start to the last day's end: a day's bar sits at its noon, whole."""
    first, last = min(days), max(days)
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    return start, datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1)


def replies_figure(replies: ReplyStats | None) -> Figure:
    """The model's replies per UTC hour over the window (every hour drawn, zeros included)."""
    figure, axes = _new_axes()
    if replies is None or not replies.hours or replies.total == 0:
        _empty(axes, _(texts.DASHBOARD_NO_REPLIES))
        return figure
    centres = [_when(hour + timedelta(minutes=30)) for hour in replies.hours]
    axes.bar(centres, replies.per_hour, width=1 / 24 * 0.9, color="#1c7ed6")
    _date_axis(axes, _(texts.DASHBOARD_AXIS_HOUR), replies.hours[0], replies.hours[-1] + timedelta(hours=1))
    axes.set_ylim(0, max(replies.per_hour) * 1.1 + 0.5)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(_(texts.DASHBOARD_AXIS_REPLIES))
    return figure


def latency_figure(replies: ReplyStats | None) -> Figure:
    """The median and 95th-percentile time from a message to the model's reply, per UTC day of the window."""
    figure, axes = _new_axes()
    if replies is None or not replies.hours or not replies.latency_by_day:
        _empty(axes, _(texts.DASHBOARD_NO_REPLIES))
        return figure
    days = sorted(replies.latency_by_day)
    xs = [_when(datetime(d.year, d.month, d.day, 12, tzinfo=UTC)) for d in days]
    for fraction, colour, label in ((0.5, "#1c7ed6", texts.DASHBOARD_LEGEND_P50),
                                    (0.95, "#e8590c", texts.DASHBOARD_LEGEND_P95)):  # fmt: skip
        values = [percentile(replies.latency_by_day[day], fraction) or 0.0 for day in days]
        axes.plot(xs, values, marker="o", color=colour, label=_(label), zorder=3 if fraction == 0.5 else 2)
    first = replies.hours[0].date()
    _date_axis(axes, _(texts.DASHBOARD_AXIS_DAY), *_day_window([first, replies.hours[-1].date()]))
    axes.set_ylim(bottom=0)
    axes.set_ylabel(_(texts.DASHBOARD_AXIS_SECONDS))
    axes.legend(fontsize=8, loc="upper left")
    return figure


PLOTS: dict[str, Callable[[Overview], Figure]] = {
    "gate": lambda overview: gate_figure(overview.gate_scores),
    "loss-curve": lambda overview: loss_curve_figure(overview.last_curve),
    "messages": lambda overview: messages_figure(overview.days, overview.messages_per_day),
    "replies": lambda overview: replies_figure(overview.replies),
    "latency": lambda overview: latency_figure(overview.replies),
}
"""The page's plots by the name in their URL (`plots/<name>.svg`)."""

HANGUL_FONTS = ("NanumGothic", "Noto Sans CJK KR", "Noto Sans KR", "Source Han Sans KR", "Malgun Gothic",
                "Apple SD Gothic Neo", "UnDotum")  # fmt: skip
"""Font families with Hangul that matplotlib may find installed (Linux, Windows, macOS), in order of preference."""
HANGUL_FONT_FILES = ("NanumGothic*", "NotoSansCJK*", "NotoSansKR*", "SourceHanSans*", "malgun*", "AppleSDGothicNeo*",
                     "UnDotum*")  # fmt: skip
"""The file names of `HANGUL_FONTS` (Debian's fonts-nanum and fonts-noto-cjk, Windows, macOS)."""
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts", "/Library/Fonts",
             "/System/Library/Fonts", "~/Library/Fonts", "C:/Windows/Fonts")  # fmt: skip
"""Where fonts are installed, searched for `HANGUL_FONT_FILES` when matplotlib's font list knows none of them."""
FONT_SUFFIXES = frozenset({".ttf", ".otf", ".ttc"})
_DRAWING = threading.Lock()


@cache
def hangul_font() -> str | None:
    """The first of `HANGUL_FONTS` matplotlib can draw with on this machine, or None (looked up once per process).

    matplotlib lists the system's fonts once and keeps the list on disk, so a font installed after that (the
    Docker image's fonts-nanum, when the list came with an earlier layer; a package added later) stays unknown
    to it, and Korean labels would come out as boxes. When none of `HANGUL_FONTS` is listed, their files are
    looked for in `FONT_DIRS` and added to the list of this process: no cache to delete by hand."""
    family = _listed_hangul_font()
    if family is None and _add_hangul_font_files():
        family = _listed_hangul_font()
    if family is None:
        log.warning("no font with Hangul found (e.g. apt-get install fonts-nanum): the dashboard's plots stay English")
    else:
        log.info("the dashboard's plots draw Hangul with %s", family)
    return family


def _listed_hangul_font() -> str | None:
    for family in HANGUL_FONTS:
        try:
            font_manager.fontManager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
        except ValueError:
            continue
        return family
    return None


def _add_hangul_font_files() -> int:
    """Adds the files of `HANGUL_FONT_FILES` under `FONT_DIRS` to matplotlib's font list; returns how many."""
    listed = {entry.fname for entry in font_manager.fontManager.ttflist}
    added = 0
    for directory in FONT_DIRS:
        root = Path(directory).expanduser()
        if not root.is_dir():
            continue
        for pattern in HANGUL_FONT_FILES:
            for path in root.rglob(pattern):
                if path.suffix.lower() not in FONT_SUFFIXES or str(path) in listed:
                    continue
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    log.debug("matplotlib cannot read the font %s", path, exc_info=True)
                    continue
                listed.add(str(path))
                added += 1
    return added


def drawn(draw: Callable[[Overview], Figure], overview: Overview) -> bytes:
    """Draws one plot at a time (matplotlib's font and text caches, and `rc_context`, are shared by every thread),
    in the language being spoken when a Hangul font can draw it, else in English. DejaVu Sans draws what it can
    and each glyph it lacks falls back to the Hangul font (matplotlib's per-glyph font fallback)."""
    font = hangul_font()
    language = current_language() if font is not None else SOURCE_LANGUAGE
    families = ["DejaVu Sans", font] if font is not None else ["sans-serif"]
    with _DRAWING, speaking(language), rc_context({"font.family": families}):
        return _svg(draw(overview))
