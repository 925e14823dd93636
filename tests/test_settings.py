from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings must not pick up a developer's own .env during tests."""
    monkeypatch.chdir(tmp_path)


def test_defaults_are_sane() -> None:
    settings = load_settings()
    assert settings.database_url.startswith("sqlite+aiosqlite:///")
    assert settings.base_model == "gpt2"
    assert (settings.train_epochs, settings.train_batch_size, settings.train_warmup_steps) == (3, 2, 100)
    assert (settings.train_weight_decay, settings.train_logging_steps, settings.train_max_length) == (
        0.01,
        10,
        512,
    )


def test_admin_ids_are_platform_qualified_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADMIN_IDS", "telegram:123, discord:456789012345678901")
    settings = load_settings()
    assert settings.is_admin("telegram", "123")
    assert settings.is_admin("discord", "456789012345678901")
    assert not settings.is_admin("discord", "123")
    assert not settings.is_admin("telegram", "alice")
    assert settings.is_admin("console", "local")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("DEVICE", "gpu", "DEVICE"),
        ("ADMIN_IDS", "alice", "ADMIN_IDS"),
        ("ADMIN_IDS", "myspace:1", "ADMIN_IDS"),
        ("TEMPERATURE", "hot", "TEMPERATURE"),
        ("TELEGRAM_WEBHOOK_URL", "https://example.org/hook", "TELEGRAM_WEBHOOK_SECRET"),
    ],
)
def test_bad_settings_fail_with_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert ".env" in message


def test_secrets_are_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "123456:SECRET-TOKEN")
    monkeypatch.setenv("DISCORD_BOT_TOKEN", "discord-secret")
    settings = load_settings()
    assert "SECRET-TOKEN" not in repr(settings) and "SECRET-TOKEN" not in str(settings)
    assert "discord-secret" not in repr(settings)
    assert settings.telegram_bot_token is not None
    assert settings.telegram_bot_token.get_secret_value() == "123456:SECRET-TOKEN"


def test_env_example_lists_every_setting_with_a_comment() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    listed = {}
    for index, line in enumerate(lines):
        match = re.match(r"^(?:# )?([A-Z][A-Z0-9_]*)=", line)  # commented out: the lines the Docker image sets
        if match:
            listed[match.group(1)] = index
    fields = {name.upper() for name in Settings.model_fields}
    assert fields == set(listed), f"missing: {fields - set(listed)}, unknown: {set(listed) - fields}"
    for name, index in listed.items():
        above = [line for line in lines[max(0, index - 6) : index] if line.startswith("#")]
        assert above, f"{name} has no comment above it in .env.example"


def test_private_chats_are_training_data_only_when_opted_in_but_the_console_always(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings()
    assert not settings.train_on_private_chats
    assert not settings.learns_from_private_chats("telegram") and not settings.learns_from_private_chats("discord")
    assert settings.learns_from_private_chats("console")
    monkeypatch.setenv("TRAIN_ON_PRIVATE_CHATS", "true")
    assert load_settings().learns_from_private_chats("telegram")
