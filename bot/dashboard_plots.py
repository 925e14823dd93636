"""The dashboard's plots as SVG, drawn by matplotlib on the server (no JavaScript, nothing fetched from a CDN).

Figures are built with matplotlib's object API (`Figure`), never `pyplot`: pyplot keeps global state, and these
functions run in worker threads (`asyncio.to_thread`) so that drawing never blocks the bot's event loop. Every
plot renders something, with a "no data yet" note when there is nothing to draw, so the page's layout is stable.

Labels are in the language being spoken (the browser's) when matplotlib knows a font with Hangul (`HANGUL_FONTS`,
e.g. Debian's fonts-nanum or fonts-noto-cjk); without one, Korean labels would be drawn as empty boxes, so the plots
stay English.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import date
from functools import cache

from matplotlib import dates as mdates
from matplotlib import font_manager, rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from core import texts
from core.dashboard_data import Overview, RunCurve, VersionRow
from core.i18n import SOURCE_LANGUAGE, _, current_language, speaking
from core.models import VersionStatus

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


def _date_axis(axes: Axes, label: str) -> None:
    """Ticks that fit the range shown (hours to years), labelled without repeating the year on every tick."""
    locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    axes.set_xlabel(label)


def _empty(axes: Axes) -> None:
    axes.text(0.5, 0.5, _(texts.DASHBOARD_NO_DATA), ha="center", va="center", transform=axes.transAxes, color="#868e96")
    axes.set_xticks([])
    axes.set_yticks([])


def eval_loss_svg(versions: Sequence[VersionRow]) -> bytes:
    """Held-out loss of each version over its creation time, coloured by status; the versions that served (active,
    retired, rolled back) are joined by a line, so the trend of what users actually talked to stands out."""
    figure, axes = _new_axes()
    scored = sorted(((v, v.eval_loss) for v in versions if v.eval_loss is not None), key=lambda p: p[0].created_at)
    if not scored:
        _empty(axes)
        return _svg(figure)
    served = [(_when(v.created_at), loss) for v, loss in scored if v.activated_at is not None]
    if len(served) > 1:
        axes.plot([x for x, _y in served], [y for _x, y in served], color="#adb5bd", zorder=1)
    for status, colour in STATUS_COLOURS.items():
        group = [(_when(v.created_at), loss) for v, loss in scored if v.status is status]
        if group:
            size = 64 if status is VersionStatus.ACTIVE else 28
            word = texts.version_status_word(status)
            axes.scatter([x for x, _y in group], [y for _x, y in group], color=colour, label=word, s=size)
    for version, loss in scored[-12:]:  # names of the newest only: a year of daily runs would be unreadable
        axes.annotate(version.name, (_when(version.created_at), loss), textcoords="offset points", xytext=(4, 4),
                      fontsize=7)  # fmt: skip
    _date_axis(axes, _(texts.DASHBOARD_AXIS_CREATED))
    axes.set_ylabel(_(texts.DASHBOARD_AXIS_EVAL_LOSS))
    axes.legend(fontsize=8, loc="best")
    return _svg(figure)


def loss_curve_svg(curve: RunCurve | None) -> bytes:
    """The last run's training loss per logged step, with its held-out loss as a dashed line for scale."""
    figure, axes = _new_axes()
    if curve is None:
        _empty(axes)
        return _svg(figure)
    steps = [step for step, _loss in curve.points]
    axes.plot(steps, [loss for _step, loss in curve.points], marker="." if len(steps) < 50 else None,
              label=_(texts.DASHBOARD_AXIS_TRAIN_LOSS))  # fmt: skip
    if curve.eval_loss is not None:
        axes.axhline(curve.eval_loss, linestyle="--", color="#2b8a3e", label=_(texts.DASHBOARD_AXIS_EVAL_LOSS))
    axes.set_xlabel(_(texts.DASHBOARD_AXIS_STEP))
    axes.set_ylabel(_(texts.DASHBOARD_AXIS_TRAIN_LOSS))
    axes.legend(fontsize=8, loc="best")
    return _svg(figure)


def messages_svg(days: Sequence[date], per_chat: Mapping[str, Mapping[date, int]]) -> bytes:
    """A bar per day, stacked by chat: the MAX_CHATS busiest chats over the window each have a colour, the rest
    are summed as "other chats"."""
    figure, axes = _new_axes()
    if not per_chat:
        _empty(axes)
        return _svg(figure)
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
    _date_axis(axes, _(texts.DASHBOARD_AXIS_DAY))
    axes.set_ylim(0, max(below) * 1.1 + 0.5)  # headroom above the busiest day
    axes.set_ylabel(_(texts.DASHBOARD_AXIS_MESSAGES))
    axes.legend(fontsize=7, loc="upper left")
    return _svg(figure)


PLOTS: dict[str, Callable[[Overview], bytes]] = {
    "eval-loss": lambda overview: eval_loss_svg(overview.versions),
    "loss-curve": lambda overview: loss_curve_svg(overview.last_curve),
    "messages": lambda overview: messages_svg(overview.days, overview.messages_per_day),
}
"""The page's plots by the name in their URL (`plots/<name>.svg`)."""

HANGUL_FONTS = ("NanumGothic", "Noto Sans CJK KR", "Noto Sans KR", "Source Han Sans KR", "Malgun Gothic",
                "Apple SD Gothic Neo", "UnDotum")  # fmt: skip
"""Font families with Hangul that matplotlib may find installed (Linux, Windows, macOS), in order of preference."""
_DRAWING = threading.Lock()


@cache
def hangul_font() -> str | None:
    """The first of `HANGUL_FONTS` matplotlib finds on this machine, or None (looked up once per process)."""
    for family in HANGUL_FONTS:
        try:
            font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
        except ValueError:
            continue
        return family
    return None


def drawn(draw: Callable[[Overview], bytes], overview: Overview) -> bytes:
    """Draws one plot at a time (matplotlib's font and text caches, and `rc_context`, are shared by every thread),
    in the language being spoken when a Hangul font can draw it, else in English."""
    font = hangul_font()
    language = current_language() if font is not None else SOURCE_LANGUAGE
    families = ["DejaVu Sans", font] if font is not None else ["sans-serif"]  # what DejaVu lacks comes from `font`
    with _DRAWING, speaking(language), rc_context({"font.family": families}):
        return draw(overview)
