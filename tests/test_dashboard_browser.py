"""The dashboard in a real headless browser (Debian's chromium through selenium): log in, see the plots rendered,
roll back with a button, and the database and the engine follow; every plot over a history of 0, 1 and many
points, in English and in Korean, with axes that fit what is shown and Hangul drawn as glyphs, not boxes.
Screenshots are kept in test-artifacts/ (`dashboard.png` is the one in docs/).

Skipped, with the reason, where chromium, its driver or a Hangul font is not installed (`.ci/run` installs them).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from matplotlib import rc_context
from matplotlib.figure import Figure
from sqlalchemy import delete

from bot.web import dashboard_plots
from core.serving.engine import Engine
from core.serving.model_serving import ModelServing
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import Chat, Delivery, Message, ModelVersion, Role, RunStatus, TrainingRun, User
from core.storage.versions import activate_version, get_active_version, register_version
from tests.dashboard_support import NOW, TOKEN, dashboard_app, dashboard_settings, seed_history, serve
from trainer.orchestrator import TrainingOrchestrator

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WAIT_S = 30.0
HANGUL = re.compile(r"[\uac00-\ud7a3]")

T = TypeVar("T")


def _required(reason: str) -> None:
    """Skips, unless MAGPIE_REQUIRE_BROWSER=1 (as in CI) makes a missing browser or font a failure."""
    if os.environ.get("MAGPIE_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + " (MAGPIE_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


def _chromium(accept_languages: str) -> Any:
    """Headless chromium at a size that shows the whole page; the Debian driver, so nothing is downloaded. The page
    speaks the browser's language (Accept-Language), which chromium takes from its preferences: pinned here."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        _required("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,3100"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"intl.accept_languages": accept_languages})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = _chromium("en-US,en")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def korean_browser() -> Iterator[Any]:
    driver = _chromium("ko-KR,ko")
    try:
        yield driver
    finally:
        driver.quit()


async def _in_thread(call: Callable[..., T], *args: Any) -> T:
    """Selenium blocks; the dashboard answers in this test's event loop, so the browser is driven from a thread."""
    return await asyncio.to_thread(call, *args)


def _plot_sizes(driver: Any) -> dict[str, int]:
    """Each plot's rendered width, once every image has loaded (0 = broken or empty)."""
    images = driver.find_elements(By.CSS_SELECTOR, "#plots img")
    WebDriverWait(driver, WAIT_S).until(
        lambda d: all(d.execute_script("return arguments[0].complete", i) for i in images)
    )
    return {
        image.get_attribute("id"): driver.execute_script("return arguments[0].naturalWidth", image) for image in images
    }


def _log_in(driver: Any, url: str) -> str:
    driver.get(url)
    assert driver.find_elements(By.ID, "login") and not driver.find_elements(By.ID, "versions")
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.CSS_SELECTOR, "#login button").click()
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.ID, "active-version"))
    return str(driver.find_element(By.ID, "active-version").text)


def _roll_back_to(driver: Any, version: str) -> str:
    driver.find_element(By.ID, f"rollback-{version}").click()
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.ID, "notice"))
    return str(driver.find_element(By.ID, "notice").text)


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """One backend is enough in the browser: the HTTP tests run every query of the page on both."""
    return sqlite_url


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return dashboard_settings(tmp_path, database_url)


async def test_log_in_see_the_plots_and_roll_back(
    browser: Any, db: Database, engine: Engine, settings: Settings, tiny_model_dir: Path
) -> None:
    await seed_history(db, tiny_model_dir)
    serving = ModelServing(settings=settings, db=db, engine=engine)
    await serving.follow_active()
    assert engine.model_ref is not None and engine.model_ref.name == "v5"

    retrainer = TrainingOrchestrator(settings=settings, db=db)
    async with serve(dashboard_app(settings, db, serving, retrainer)) as url:
        assert await _in_thread(_log_in, browser, f"{url}/") == "v5"
        sizes = await _in_thread(_plot_sizes, browser)
        assert set(sizes) == {f"plot-{name}" for name in dashboard_plots.PLOTS}
        assert all(width > 0 for width in sizes.values()), f"a plot did not render: {sizes}"
        ARTIFACTS.mkdir(exist_ok=True)
        await _in_thread(browser.save_screenshot, str(ARTIFACTS / "dashboard.png"))

        notice = await _in_thread(_roll_back_to, browser, "v4")

    assert notice.startswith("Switched to v4. v5 is marked rolled back")
    assert browser.find_element(By.ID, "active-version").text == "v4"
    async with db.sessions() as session:
        active = await get_active_version(session)
    assert active is not None and active.name == "v4"
    assert engine.model_ref is not None and engine.model_ref.name == "v4", "the engine serves the version rolled to"


# --- every plot, for 0, 1 and many points, in English and Korean ----------------------------------------------

SVG_TEXTS = """
const texts = [];
for (const group of document.querySelectorAll('g[id^="text_"]')) {
  const comment = [...group.childNodes].find((node) => node.nodeType === Node.COMMENT_NODE);
  if (!comment) continue;
  const tick = group.closest('g[id^="xtick_"]');
  const glyphs = [...group.querySelectorAll('use')].map((use) => use.getAttribute('xlink:href'));
  texts.push({text: comment.textContent.trim(), xtick: tick !== null, width: group.getBBox().width, glyphs: glyphs});
}
return texts;
"""
"""Each text matplotlib drew into an SVG (the text is in a comment before its glyphs): whether it labels an x tick,
its rendered width, and the glyphs it is made of."""
YEAR = re.compile(r"\b(?:19|20)\d\d\b")
HISTORIES = ("none", "one", "many")


async def _seed_one(db: Database, model_dir: Path) -> None:
    """A bot's first hour: one version from one run (which logged one step), one exchange in one chat."""
    async with db.sessions.begin() as session:
        version = await register_version(session, name="v1", path=str(model_dir), metrics={"eval_loss": 3.62})
        await activate_version(session, version_id=version.id, now=NOW - timedelta(hours=3))
        metrics = {"version": "v1", "active_eval_loss": 4.95, "eval_loss": 3.62, "loss_curve": [[1, 6.2]]}
        session.add(TrainingRun(status=RunStatus.PROMOTED, triggered_by="console", started_at=NOW - timedelta(hours=4),
                                finished_at=NOW - timedelta(hours=3), metrics=metrics, progress=1.0))  # fmt: skip
        user = User(platform="console", platform_user_id="1", display_name="ann")
        chat = Chat(platform="console", platform_chat_id="console", kind="private")
        session.add_all([user, chat])
        await session.flush()
        asked_at = NOW - timedelta(hours=2)
        asked = Message(chat_id=chat.id, author_id=user.id, role=Role.USER, text="hi", created_at=asked_at)
        session.add(asked)
        await session.flush()
        session.add(Message(chat_id=chat.id, role=Role.BOT, text="hello", reply_to_id=asked.id,
                            created_at=asked_at + timedelta(seconds=1.2), delivery=Delivery.SENT))  # fmt: skip


def _svg_texts(driver: Any, url: str) -> list[dict[str, Any]]:
    driver.get(url)
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script("return document.readyState") == "complete")
    return list(driver.execute_script(SVG_TEXTS))


def _page_and_plots(driver: Any, url: str, screenshot: Path) -> tuple[dict[str, int], dict[str, list[dict[str, Any]]]]:
    """Logs in, waits for the page's plots, keeps a screenshot, then opens each plot on its own (the session's
    cookie goes along) and reads the texts it drew."""
    driver.delete_all_cookies()
    _log_in(driver, url)
    sizes = _plot_sizes(driver)
    driver.save_screenshot(str(screenshot))
    shown = str(driver.find_element(By.TAG_NAME, "body").text)
    assert "`" not in shown and not re.search(r"\b[a-z]+(?:_[a-z]+)+\b", shown), "commands as code, no raw keys"
    sources = {
        image.get_attribute("id"): image.get_attribute("src")
        for image in driver.find_elements(By.CSS_SELECTOR, "#plots img")
    }
    return sizes, {name: _svg_texts(driver, source) for name, source in sources.items()}


def _check_axes(history: str, plots: dict[str, list[dict[str, Any]]]) -> None:
    """Axes that fit what is shown: run numbers under the gate plot, the window's dates (never another year)
    under the time plots, and no tick at all where a plot only says there is nothing (yet) to draw."""
    ticks = {name: [t["text"] for t in texts if t["xtick"]] for name, texts in plots.items()}
    for name, labels in ticks.items():
        assert set(YEAR.findall(" ".join(labels))) <= {"2026"}, f"{history}: {name} spans years: {labels}"
    if history == "none":
        assert not any(ticks.values()), f"plots with nothing to draw have no axes: {ticks}"
        return
    assert ticks["plot-gate"] == (["#1"] if history == "one" else [f"#{n}" for n in range(1, 7)]), ticks["plot-gate"]
    assert (not ticks["plot-loss-curve"]) == (history == "one"), "one logged step is not a curve"
    for name in ("plot-messages", "plot-replies", "plot-latency"):
        assert 3 <= len(ticks[name]) <= 12, f"{history}: {name}: {ticks[name]}"


def _box_run_width(driver: Any, label: str) -> tuple[float, int]:
    """The width and glyph count of `label` drawn as a font without Hangul draws it (a box per letter), in the
    same figure size and font size as the dashboard's axis labels, rendered by the same browser."""
    figure = Figure(figsize=dashboard_plots.FIGSIZE, layout="constrained")
    figure.add_subplot().set_xlabel(label)
    path = ARTIFACTS / "hangul-as-boxes.svg"  # kept beside the screenshots, for a look
    with warnings.catch_warnings(), rc_context({"font.family": ["DejaVu Sans"]}):
        warnings.simplefilter("ignore")  # "Glyph … missing from font(s) DejaVu Sans": the point of this run
        figure.savefig(path, format="svg")
    (boxes,) = [t for t in _svg_texts(driver, path.as_uri()) if t["text"] == label]
    return float(boxes["width"]), len(set(boxes["glyphs"]))


async def test_every_plot_for_none_one_and_many_points_in_english_and_korean(
    browser: Any, korean_browser: Any, db: Database, settings: Settings, tiny_model_dir: Path
) -> None:
    if dashboard_plots.hangul_font() is None:
        _required("no font with Hangul is installed (apt-get install fonts-nanum)")
    serving = ModelServing(settings=settings, db=db)
    ARTIFACTS.mkdir(exist_ok=True)
    korean_label = ""
    for history in HISTORIES:
        if history == "one":
            await _seed_one(db, tiny_model_dir)
        elif history == "many":
            async with db.sessions.begin() as session:  # the first hour's rows make way for four weeks
                for table in (Message, TrainingRun, Chat, User, ModelVersion):
                    await session.execute(delete(table))
            await seed_history(db, tiny_model_dir)
        async with serve(dashboard_app(settings, db, serving)) as url:
            for language, driver in (("en", browser), ("ko", korean_browser)):
                screenshot = ARTIFACTS / f"dashboard-{history}-{language}.png"
                sizes, plots = await _in_thread(_page_and_plots, driver, f"{url}/", screenshot)
                assert all(width > 0 for width in sizes.values()), f"{history}, {language}: {sizes}"
                _check_axes(history, plots)
                drawn = " ".join(t["text"] for texts in plots.values() for t in texts)
                assert bool(HANGUL.search(drawn)) == (language == "ko"), f"{history}, {language}: {drawn}"
                if language == "ko" and history == "many":
                    (label,) = [t for t in plots["plot-gate"] if t["text"] == "학습 실행"]
                    korean_label = label["text"]
                    width, glyphs = float(label["width"]), len(set(label["glyphs"]))
    box_width, box_glyphs = await _in_thread(_box_run_width, browser, korean_label)
    distinct = len(set(korean_label))  # the letters, and the space between the words
    assert box_glyphs == 2 and glyphs == distinct, f"{glyphs} glyphs for {distinct} letters (boxes: {box_glyphs})"
    assert abs(width - box_width) > 0.15 * box_width, f"Hangul {width:.1f} px wide, a run of boxes {box_width:.1f}"
