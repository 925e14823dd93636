"""The READMEs tell a new operator what the first hour needs (issue #18, item 9), and CI walks the same path.

What they describe is tested where it is built (the console, the settings, the CLI); these checks keep the words
from drifting away from it: a fact the READMEs must state, in English and Korean.
"""

from __future__ import annotations

import re
from pathlib import Path

from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
README_KO = (ROOT / "README.ko.md").read_text()


def _section(text: str, heading: str) -> str:
    """The text under a `## heading` up to the next heading of the same level."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_the_configuration_table_names_each_group_once_and_every_row_has_words() -> None:
    rows = [line.split("|")[1:-1] for line in _section(README, "Configuration").splitlines() if line.startswith("| ")]
    groups = [cells[0].strip() for cells in rows[1:]]  # the header row first
    assert len(groups) == len(set(groups)), f"a group appears twice: {groups}"
    assert all(cells[2].strip() for cells in rows), "a row says nothing"
    assert "`CONSOLE`" in README and "`HTTP_LISTEN`" in README
    assert "empty = off" not in README and "empty turns the server off" not in README  # empty means unset


def test_the_readmes_say_how_long_the_tests_take_and_how_to_run_a_part() -> None:
    for text in (README, README_KO):
        assert re.search(r"make test PYTEST_ARGS=\"tests/\S+", text)
        assert "13" in _section(text, "Development" if text is README else "개발")


def test_the_readmes_say_how_to_serve_the_dashboard_without_a_platform_or_a_console() -> None:
    for text in (README, README_KO):
        assert re.search(r"CONSOLE=off DASHBOARD_TOKEN=.+ \S*magpie run", text)
    assert Settings(_env_file=None, console="off").console == "off"  # type: ignore[call-arg]


def test_the_korean_readme_has_the_time_budget_the_dashboard_and_operating() -> None:
    assert "STARTER_BUDGET_MINUTES" in README_KO and "magpie bootstrap --minutes" in README_KO
    dashboard = _section(README_KO, "운영자 대시보드")
    assert "DASHBOARD_TOKEN" in dashboard and "/dashboard/retrain" in dashboard
    operating = _section(README_KO, "운영")
    assert all(word in operating for word in ("/healthz", "/metrics", "LOG_FORMAT=json", "SHUTDOWN_GRACE_SECONDS"))


def test_ci_copies_env_example_before_the_readmes_two_commands() -> None:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert lines.index("cp .env.example .env") < lines.index("make install") < lines.index("make test")
