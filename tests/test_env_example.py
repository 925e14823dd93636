"""`cp .env.example .env`, as the README, docs/telegram.md and docker-compose.yml tell a new operator to do, changes
nothing: an empty value means "not set" for every setting, from every source (issue #18, item 1).

The copy started as `magpie run`, in a directory of its own and under the Docker image's environment, is in
`tests/test_console.py` and `tests/test_deploy.py`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydantic import SecretStr

from core.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only the `.env` a test writes is read, and no setting comes from this process's environment (conftest's
    HTTP_LISTEN, the machine's LANG)."""
    monkeypatch.chdir(tmp_path)
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def _comparable(settings: Settings) -> dict[str, object]:
    values = settings.model_dump()
    return {key: value.get_secret_value() if isinstance(value, SecretStr) else value for key, value in values.items()}


def test_an_unedited_copy_of_env_example_is_exactly_the_defaults(tmp_path: Path) -> None:
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    assert _comparable(load_settings()) == _comparable(Settings(_env_file=None))  # type: ignore[call-arg]


def test_an_empty_value_is_unset_for_every_setting_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = _comparable(Settings(_env_file=None))  # type: ignore[call-arg]
    for name in Settings.model_fields:
        monkeypatch.setenv(name.upper(), "")
    assert _comparable(load_settings()) == defaults
    for name in Settings.model_fields:
        monkeypatch.setenv(name.upper(), "  ")
    assert _comparable(load_settings()) == defaults


def test_an_empty_value_is_unset_for_every_setting_in_dotenv_and_as_a_keyword(tmp_path: Path) -> None:
    defaults = _comparable(Settings(_env_file=None))  # type: ignore[call-arg]
    (tmp_path / ".env").write_text("".join(f"{name.upper()}=\n" for name in Settings.model_fields))
    assert _comparable(load_settings()) == defaults
    blank = {name: "" for name in Settings.model_fields}
    assert _comparable(load_settings(**blank)) == defaults


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("SEED", None),
        ("TORCH_THREADS", None),
        ("TELEGRAM_BOT_TOKEN", None),
        ("TELEGRAM_WEBHOOK_SECRET", None),
        ("DISCORD_BOT_TOKEN", None),
        ("HTTP_LISTEN", ("127.0.0.1", 8080)),
    ],
)
def test_the_settings_the_issue_found_broken_by_an_empty_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, expected: object
) -> None:
    (tmp_path / ".env").write_text(f"{name}=\n")
    settings = load_settings()
    value = settings.http_address if name == "HTTP_LISTEN" else getattr(settings, name.lower())
    assert value == expected


def test_http_listen_is_turned_off_by_a_word_not_by_an_empty_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_LISTEN", "off")
    assert load_settings().http_address is None
    monkeypatch.setenv("HTTP_LISTEN", "")
    assert load_settings().http_address == ("127.0.0.1", 8080)
