"""The dashboard in a real headless browser (Debian's chromium through selenium): log in, see the plots rendered,
roll back with a button, and the database and the engine follow. A screenshot is kept in test-artifacts/.

Skipped, with the reason, where chromium or its driver is not installed (`.ci/run` installs both).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from core.db import Database
from core.engine import Engine
from core.serving import ModelServing
from core.settings import Settings
from core.versions import get_active_version
from tests.dashboard_support import TOKEN, dashboard_app, dashboard_settings, seed_history, serve
from trainer.orchestrator import TrainingOrchestrator

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WAIT_S = 30.0

T = TypeVar("T")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless chromium at a size that shows the whole page; the Debian driver, so nothing is downloaded.
    Without them the tests skip, unless MAGPIE_REQUIRE_BROWSER=1 (as in CI)."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        reason = "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("MAGPIE_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (MAGPIE_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,2200"):
        options.add_argument(argument)
    # The page speaks the browser's language (Accept-Language), which chromium takes from the locale: pin English.
    options.add_experimental_option("prefs", {"intl.accept_languages": "en-US,en"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
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
        assert set(sizes) == {"plot-eval-loss", "plot-loss-curve", "plot-messages"}
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
