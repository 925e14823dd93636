"""The dashboard in the browser's language: Korean for a browser whose Accept-Language prefers it, else English;
over real HTTP, with the fixtures of `tests/test_dashboard.py`. Plots speak Korean only where matplotlib has a font
with Hangul (this machine may have none, so that path is checked through `drawn` itself)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import matplotlib
import pytest
from matplotlib.figure import Figure

from bot.web import dashboard_plots
from core.i18n import accepted_language, current_language, speaking
from core.ops.dashboard_data import Overview, load_overview
from core.serving.model_serving import ModelServing
from core.storage.db import Database
from tests.dashboard_support import NOW, TOKEN, dashboard_app, dashboard_settings, seed_history, serve

KOREAN_BROWSER = {"Accept-Language": "ko-KR,ko;q=0.9,en-US;q=0.8,en;q=0.7"}
ENGLISH_BROWSER = {"Accept-Language": "en-US,en;q=0.9,ko;q=0.8"}
BEARER = {"Authorization": f"Bearer {TOKEN}"}
HANGUL = re.compile(r"[\uac00-\ud7a3]")


@pytest.fixture
async def base_url(db: Database, tmp_path: Path, database_url: str, tiny_model_dir: Path) -> AsyncIterator[str]:
    """The dashboard over the seeded history (v5 active), without a retrainer."""
    settings = dashboard_settings(tmp_path, database_url)
    await seed_history(db, tiny_model_dir)
    async with serve(dashboard_app(settings, db, ModelServing(settings=settings, db=db))) as url:
        yield url


def _browser(headers: dict[str, str]) -> aiohttp.ClientSession:
    # unsafe: the jar keeps cookies for an IP address (127.0.0.1), which the default jar does not
    return aiohttp.ClientSession(headers=headers, cookie_jar=aiohttp.CookieJar(unsafe=True))


@pytest.mark.parametrize(
    ("header", "language"),
    [
        ("ko-KR", "ko"),
        ("ko-KR,ko;q=0.9,en-US;q=0.8", "ko"),
        ("en-US,en;q=0.9,ko;q=0.8", "en"),
        ("fr-FR,fr;q=0.9,ko;q=0.8,en;q=0.5", "ko"),  # French first, but of what Magpie speaks Korean is preferred
        ("en;q=0.5, ko;q=0.7", "ko"),
        ("ko;q=0, en", "en"),  # q=0: "not Korean"
        ("ko;q=abc", "en"),
        ("*", "en"),
        ("", "en"),
        (None, "en"),
    ],
)
def test_the_browsers_accept_language_picks_korean_or_english(header: str | None, language: str) -> None:
    assert accepted_language(header) == language


async def test_a_korean_browser_reads_the_page_its_refusals_and_its_answers_in_korean(base_url: str) -> None:
    async with _browser(KOREAN_BROWSER) as browser:
        async with browser.get(f"{base_url}/") as response:
            assert response.status == 401 and response.headers["Content-Language"] == "ko"
            assert "대시보드 토큰을 입력하세요(봇 설정의 DASHBOARD_TOKEN)." in await response.text()
        async with browser.post(f"{base_url}/login", data={"token": "wrong-token-of-some-length"}) as response:
            assert response.status == 403 and "대시보드 토큰이 아니에요." in await response.text()
        async with browser.post(f"{base_url}/login", data={"token": TOKEN}) as response:
            assert response.status == 200
            page = await response.text()
        assert '<html lang="ko">' in page and "<title>Magpie 대시보드</title>" in page
        for words in (
            "<h2>활성 모델</h2>",
            "<th>평가 손실</th>",
            ">이전 버전으로 롤백<",
            "승격 심사가 비교한 것",
            "한 사람의 데이터 몫을 넘는 것(TRAIN_USER_SHARE_CAP)",
            "시간당 답장 수",
            "모델이 보낸 답장",
        ):
            assert words in page
        assert re.search(r'id="version-v5">\s*<td>v5</td><td class="status">활성</td>', page)
        assert re.search(r'id="excluded-command"><td>명령과 /reset</td><td class="num">37<', page)
        assert re.search(r"학습 #\d+\(v6, 거부됨\)\.", page)
        assert "학습용 샘플 1630개와 평가용 샘플 171개가 남았어요." in page
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf is not None
        async with browser.post(f"{base_url}/rollback", data={"csrf": csrf.group(1)}) as response:
            assert "v4(으)로 바꿨어요. v5은(는) 롤백됨으로 표시했어요." in await response.text()
        async with browser.post(f"{base_url}/retrain", headers=BEARER) as response:
            assert await response.text() == "이 설정에서는 재학습을 할 수 없어요."
            assert response.status == 501, 'a script tells "not in this setup" from success'


async def test_a_browser_that_prefers_english_reads_no_korean(base_url: str) -> None:
    async with _browser(ENGLISH_BROWSER) as browser, browser.get(f"{base_url}/", headers=BEARER) as response:
        page = await response.text()
    assert response.headers["Content-Language"] == "en" and response.headers["Vary"] == "Accept-Language"
    assert '<html lang="en">' in page and "<h2>Active model</h2>" in page
    assert not HANGUL.search(page), HANGUL.findall(page)


async def test_without_a_hangul_font_the_plots_stay_english(base_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Korean labels in a font without Hangul would be empty boxes: the same plot as an English browser's."""
    monkeypatch.setattr(dashboard_plots, "hangul_font", lambda: None)
    drawn: dict[str, bytes] = {}
    with matplotlib.rc_context({"svg.hashsalt": "magpie"}):  # element ids from the content, not at random
        for name, headers in (("ko", KOREAN_BROWSER), ("en", ENGLISH_BROWSER)):
            async with _browser(headers | BEARER) as browser, browser.get(f"{base_url}/plots/gate.svg") as r:
                assert r.status == 200 and r.headers["Content-Language"] == name
                drawn[name] = await r.read()
    assert drawn["ko"] == drawn["en"]


async def test_with_a_hangul_font_plots_are_drawn_in_the_language_spoken(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    overview = await load_overview(db, now=NOW, days=1)

    seen: list[str] = []

    def language_and_fonts(_overview: Overview) -> Figure:
        seen.append(f"{current_language()} {matplotlib.rcParams['font.family']}")
        return Figure()

    with speaking("ko"):  # the page's worker thread keeps the request's language
        monkeypatch.setattr(dashboard_plots, "hangul_font", lambda: "NanumGothic")
        await asyncio.to_thread(dashboard_plots.drawn, language_and_fonts, overview)
        monkeypatch.setattr(dashboard_plots, "hangul_font", lambda: None)
        await asyncio.to_thread(dashboard_plots.drawn, language_and_fonts, overview)
    assert seen == ["ko ['DejaVu Sans', 'NanumGothic']", "en ['sans-serif']"]


def test_the_hangul_font_is_the_first_installed_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashboard_plots, "HANGUL_FONTS", ("No Such Font Family", "DejaVu Sans", "Liberation Sans"))
    assert dashboard_plots.hangul_font.__wrapped__() == "DejaVu Sans"
    monkeypatch.setattr(dashboard_plots, "HANGUL_FONTS", ("No Such Font Family",))
    assert dashboard_plots.hangul_font.__wrapped__() is None
