"""The dashboard's plots drawn from typed data, for 0, 1 and many points: what the gate compared, the loss curve,
replies per hour and their latency, messages per day. Axes span what was measured or the window shown (never
years around one point), and matplotlib is shown a Hangul font its cached font list does not know."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest
from matplotlib import font_manager
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bot.web import dashboard_plots
from core.ops.dashboard_data import GateScore, ReplyStats, RunCurve
from core.storage.models import RunStatus
from tests.dashboard_support import NOW

DAY = timedelta(days=1)


def _axes(figure: Figure) -> Axes:
    figure.draw_without_rendering()  # tick labels are chosen when drawn
    (axes,) = figure.axes
    return axes


def _labels(axes: Axes) -> list[str]:
    return [tick.get_text() for tick in axes.get_xticklabels() if tick.get_text()]


def _texts(axes: Axes) -> list[str]:
    return [text.get_text() for text in axes.texts]


def _span_days(axes: Axes) -> float:
    low, high = axes.get_xlim()
    return high - low


def _years(labels: list[str]) -> set[str]:
    return set(re.findall(r"\b(?:19|20)\d\d\b", " ".join(labels)))


def _gate(run_id: int, before: float | None, after: float, status: RunStatus = RunStatus.PROMOTED) -> GateScore:
    return GateScore(run_id, status, f"v{run_id}", NOW, before, after, 40)


def _replies(latencies: dict[int, float]) -> ReplyStats:
    """Replies logged `hours ago: seconds taken`, over the 7 days up to NOW."""
    hours = tuple(NOW - timedelta(hours=ago) for ago in range(7 * 24 - 1, -1, -1))
    per_hour = tuple(sum(1 for ago in latencies if NOW - timedelta(hours=ago) == hour) for hour in hours)
    by_day: dict[date, list[float]] = {}
    for ago, seconds in latencies.items():
        by_day.setdefault((NOW - timedelta(hours=ago)).date(), []).append(seconds)
    return ReplyStats(hours, per_hour, {day: sorted(values) for day, values in by_day.items()})


def test_the_gate_plot_places_each_runs_comparison_side_by_side() -> None:
    empty = _axes(dashboard_plots.gate_figure([]))
    assert _texts(empty) == ["no data yet"] and not _labels(empty)

    one = _axes(dashboard_plots.gate_figure([_gate(7, 5.919, 5.849)]))
    assert _labels(one) == ["#7"] and one.get_xlim() == (-0.6, 0.6), "one run: one slot, not a time axis"
    low, high = one.get_ylim()
    assert low < 5.849 and high > 5.919 and high - low < 0.2, "the axis fits the two losses compared"

    # The issue's history: each promotion improved on its own held-out set, while the versions' losses rose.
    history = [_gate(1, 5.95, 5.849), _gate(2, 5.99, 5.911), _gate(3, 5.97, 5.919)]
    history.append(_gate(4, 5.90, 6.1, RunStatus.REJECTED))
    many = _axes(dashboard_plots.gate_figure(history))
    assert _labels(many) == ["#1", "#2", "#3", "#4"]
    legend = many.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == [
        "the version it started from",
        "new version, promoted",
        "new version, rejected",
    ]
    lots = _axes(dashboard_plots.gate_figure([_gate(i, 4.0, 3.9) for i in range(1, 41)]))
    assert len(_labels(lots)) <= 12, "a year of daily runs stays readable"
    assert _axes(dashboard_plots.gate_figure([_gate(9, None, 4.0)])).collections, "from BASE_MODEL: one point"


def test_a_loss_curve_needs_two_points() -> None:
    assert _texts(_axes(dashboard_plots.loss_curve_figure(None))) == ["no data yet"]
    single = RunCurve(3, RunStatus.PROMOTED, "v3", NOW, ((1, 1.0),), 1.2)
    one = _axes(dashboard_plots.loss_curve_figure(single))
    assert _texts(one) == ["one logged step: not a curve yet"] and not one.lines, "no curve on a 0.96-1.04 axis"
    curve = RunCurve(3, RunStatus.PROMOTED, "v3", NOW, ((1, 6.0), (10, 4.0), (20, 3.5)), 3.7)
    many = _axes(dashboard_plots.loss_curve_figure(curve))
    low, high = many.get_xlim()
    assert low <= 1 and 20 <= high < 22 and len(many.lines) == 2, "the curve and the held-out line"


@pytest.mark.parametrize("points", [0, 1, 30])
def test_messages_per_day_span_the_window_shown(points: int) -> None:
    days = [NOW.date() - timedelta(days=ago) for ago in range(29, -1, -1)]
    per_chat = {"telegram:1": {day: 3 for day in days[-points:]}} if points else {}
    axes = _axes(dashboard_plots.messages_figure(days, per_chat))
    if not points:
        assert _texts(axes) == ["no data yet"]
        return
    assert _span_days(axes) == pytest.approx(30), "the 30 days shown, whatever the data's extent"
    assert _years(_labels(axes)) <= {"2026"}


@pytest.mark.parametrize("points", [0, 1, 60])
def test_replies_per_hour_and_their_latency_span_the_last_week(points: int) -> None:
    replies = _replies({ago * 2: 0.5 + ago % 5 for ago in range(points)})
    hourly = _axes(dashboard_plots.replies_figure(replies))
    latency = _axes(dashboard_plots.latency_figure(replies))
    if not points:
        assert _texts(hourly) == _texts(latency) == ["no replies in this window"]
        return
    assert _span_days(hourly) == pytest.approx(7), "the week, hour by hour"
    assert 7 <= _span_days(latency) <= 8, "the week's days, whole"
    for axes in (hourly, latency):
        assert _years(_labels(axes)) <= {"2026"} and len(_labels(axes)) >= 3
    assert latency.get_ylim()[0] == 0 and latency.get_ylabel() == "seconds"
    p50, p95 = latency.lines
    assert all(low <= high for low, high in zip(p50.get_ydata(), p95.get_ydata(), strict=True))  # type: ignore[arg-type]
    assert sum(bar.get_height() for bar in hourly.patches) == points


def test_no_axis_pads_one_point_by_years() -> None:
    """matplotlib's default for a time axis over one instant is years either side (the issue's 2025-2029)."""
    one_day = [NOW.date()]
    axes = _axes(dashboard_plots.messages_figure(one_day, {"telegram:1": {NOW.date(): 1}}))
    assert _span_days(axes) == pytest.approx(1) and _years(_labels(axes)) <= {"2026"}
    one_reply = _axes(dashboard_plots.replies_figure(_replies({0: 1.0})))
    assert _span_days(one_reply) == pytest.approx(7)


# --- Hangul -------------------------------------------------------------------------------------------------


def _nanum_files() -> list[Path]:
    root = Path("/usr/share/fonts")
    return sorted(root.rglob("NanumGothic*.ttf")) if root.is_dir() else []


@pytest.fixture
def stale_font_list(monkeypatch: pytest.MonkeyPatch) -> Iterator[font_manager.FontManager]:
    """matplotlib's font list as cached before fonts-nanum was installed: every font but Nanum's."""
    if not _nanum_files():
        reason = "fonts-nanum is not installed (apt-get install fonts-nanum; .ci/run installs it)"
        if os.environ.get("MAGPIE_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (MAGPIE_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    stale = copy.copy(font_manager.fontManager)
    stale.ttflist = [entry for entry in font_manager.fontManager.ttflist if "Nanum" not in entry.fname]
    monkeypatch.setattr(font_manager, "fontManager", stale)
    monkeypatch.setattr(font_manager, "findfont", stale.findfont)  # the module's shortcut to the process's list
    yield stale


def test_a_hangul_font_installed_after_matplotlib_cached_its_fonts_is_found(
    stale_font_list: font_manager.FontManager,
) -> None:
    with pytest.raises(ValueError, match="NanumGothic"):
        stale_font_list.findfont(font_manager.FontProperties(family="NanumGothic"), fallback_to_default=False)

    assert dashboard_plots.hangul_font.__wrapped__() == "NanumGothic"

    found = stale_font_list.findfont(font_manager.FontProperties(family="NanumGothic"), fallback_to_default=False)
    assert Path(found).name.startswith("NanumGothic") and str(Path(found).parent).startswith("/usr/share/fonts")
    assert any("Nanum" in entry.fname for entry in stale_font_list.ttflist)


def test_the_docker_image_installs_a_hangul_font() -> None:
    dockerfile = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
    assert re.search(r"apt-get install[^\n]*(?:\\\n[^\n]*)*fonts-nanum", dockerfile), "Debian's Hangul font"
