"""Every knob Magpie has, read once from the environment and `.env`.

This class is the single source of truth for configuration: no other module reads `os.environ`. Each field is
mirrored, with a comment, in `.env.example`; `tests/test_settings.py` checks the two stay in step.

An empty value means "not set", for every setting and from every source (the environment, `.env`, a keyword): an
unedited copy of `.env.example`, or Docker Compose's `env_file` of it, writes `SEED=` and `TELEGRAM_BOT_TOKEN=`,
and those must behave as if the lines were absent. A setting that can be switched off says so with a word
(`HTTP_LISTEN=off`), never with an empty value.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.errors import ConfigError

PLATFORMS = ("telegram", "discord", "console")
DASHBOARD_TOKEN_MIN_LENGTH = 16
DASHBOARD_TOKEN_MIN_BITS = 64
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp")
HTTP_OFF = "off"
"""HTTP_LISTEN's off switch: an empty value means "the default" like every other setting's."""


class Settings(BaseSettings):
    """Magpie's configuration; field names are the upper-cased environment variables."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False, env_ignore_empty=True
    )

    # --- platforms -------------------------------------------------------------------------------------------
    telegram_bot_token: SecretStr | None = None
    telegram_base_url: str = "https://api.telegram.org/bot"
    telegram_base_file_url: str = "https://api.telegram.org/file/bot"
    telegram_webhook_url: str | None = None
    telegram_webhook_listen: str = "127.0.0.1"
    """Where the webhook server listens: behind a TLS-terminating reverse proxy on this machine (docs/security.md)."""
    telegram_webhook_port: int = Field(8443, ge=1, le=65535)
    telegram_webhook_secret: SecretStr | None = None
    discord_bot_token: SecretStr | None = None
    discord_api_base_url: str = "https://discord.com/api/v10"
    discord_gateway_url: str = "wss://gateway.discord.gg/"
    discord_guild_ids: Annotated[tuple[int, ...], NoDecode] = ()
    discord_message_content: bool = True
    admin_ids: Annotated[frozenset[str], NoDecode] = frozenset()
    allowed_chats: Annotated[frozenset[str], NoDecode] = frozenset()
    """The groups Magpie may log and answer in (`platform:id`: Telegram chat ids, Discord guild ids); empty: all."""

    # --- Discord sharding ------------------------------------------------------------------------------------
    discord_shard_count: int | Literal["auto"] = 0
    """0: one unsharded connection; N: N shards; auto: as many as Discord recommends (GET /gateway/bot)."""
    discord_shard_ids: Annotated[tuple[int, ...], NoDecode] = ()
    """The shards this process runs (default: all of them); disjoint ranges let several processes share a bot."""

    # --- storage and models ----------------------------------------------------------------------------------
    database_url: str = "sqlite+aiosqlite:///./data/magpie.db"
    base_model: str = "gpt2"
    models_dir: Path = Path("./models")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # --- model version retention -----------------------------------------------------------------------------
    models_keep: int = Field(5, ge=0)
    """How many of the newest versions keep their files (plus the active one and the rollback target); 0 = all."""

    # --- generation ------------------------------------------------------------------------------------------
    max_new_tokens: int = Field(64, ge=1, le=1024)
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.2, ge=1.0, le=5.0)
    history_turns: int = Field(10, ge=0, le=200)
    seed: int | None = None

    # --- engine ----------------------------------------------------------------------------------------------
    engine_max_batch_size: int = Field(16, ge=1, le=256)
    engine_queue_size: int = Field(64, ge=1)
    engine_batch_wait_ms: float = Field(5.0, ge=0.0, le=1000.0)
    engine_timeout_s: float = Field(60.0, gt=0.0)
    torch_threads: int | None = Field(None, ge=1)
    serve_precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    serve_fp32_packed: bool = True

    # --- chat service ----------------------------------------------------------------------------------------
    bot_name: str = "Magpie"
    rate_limit_per_minute: int = Field(10, ge=1)
    max_input_chars: int = Field(2000, ge=1)
    group_context: Literal["shared", "user"] = "shared"
    log_retention_days: float = Field(0.0, ge=0.0)
    recovery_window_minutes: float = Field(10.0, ge=0.0)
    shutdown_grace_seconds: float = Field(15.0, ge=0.0)
    typing_after_ms: float = Field(1000.0, ge=0.0)
    send_queue_limit: int = Field(200, ge=1)
    database_retry_seconds: float = Field(120.0, ge=0.0)
    """How long a message waits for a database that went away before its author is asked to send it again."""

    # --- retraining (defaults are the seed notebook's) ---------------------------------------------------------
    train_epochs: float = Field(3.0, gt=0.0)
    train_min_steps: int | None = Field(None, ge=0)
    """A run trains at least this many steps: more epochs for a small log (`trainer.train.with_min_steps`). None:
    the base model's own (`trainer.train.fine_tune_min_steps`)."""
    train_batch_size: int = Field(2, ge=1)
    train_learning_rate: float | None = Field(None, gt=0.0)
    """None: the base model's own fine-tuning rate (`trainer.train.fine_tune_rate`)."""
    train_warmup_steps: int = Field(100, ge=0)
    train_weight_decay: float = Field(0.01, ge=0.0)
    train_logging_steps: int = Field(10, ge=1)
    train_max_length: int = Field(512, ge=16)
    train_threads: int = Field(1, ge=1)
    train_precision: Literal["auto", "fp32", "bf16"] = "auto"
    train_on_bot_replies: bool = False
    train_on_private_chats: bool = False
    train_loss_on_response_only: bool = False
    train_rehearsal_share: float = Field(0.25, ge=0.0)
    """Corpus samples trained per community sample, for a base that names its corpus (`trainer.rehearsal`)."""
    train_eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    train_conversation_gap_minutes: float = Field(60.0, ge=0.0)
    train_user_share_cap: float = Field(0.2, gt=0.0, le=1.0)
    train_redact_pii: bool = True
    train_blocklist: Annotated[tuple[str, ...], NoDecode] = ()
    train_exclude_rolled_back: bool = True
    promotion_margin: float = Field(0.0, ge=0.0)
    retrain_interval_hours: float = Field(24.0, ge=0.0)
    retrain_min_new_messages: int = Field(200, ge=0)
    retrain_cooldown_minutes: float = Field(30.0, ge=0.0)
    retrain_timeout_minutes: float = Field(180.0, ge=0.0)

    # --- voices: one per community (docs/learning-loop.md, "Voices") ------------------------------------------
    voice_scope: Literal["shared", "community"] = "shared"
    train_method: Literal["full", "lora"] = "full"
    lora_rank: int = Field(8, ge=1, le=256)
    lora_alpha: int = Field(16, ge=1)
    lora_learning_rate: float = Field(1e-3, gt=0.0)
    lora_targets: Annotated[tuple[str, ...], NoDecode] = ("c_attn", "c_proj")

    # --- replicas: several serving processes on one database (docs/scaling.md) --------------------------------
    redis_url: str | None = None
    redis_key_prefix: str = Field("magpie", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    model_watch_interval_s: float = Field(5.0, gt=0.0, le=3600.0)

    # --- operator dashboard ----------------------------------------------------------------------------------
    dashboard_token: SecretStr | None = None

    # --- offline starter model ---------------------------------------------------------------------------------
    starter_budget_minutes: float = Field(5.0, ge=0.0)

    # --- training on another machine (Celery) -------------------------------------------------------------------
    retrain_backend: Literal["local", "celery"] = "local"
    celery_broker_url: SecretStr | None = None
    """May hold the broker's password, so it is a secret: never logged, never handed to the training process."""
    celery_queue: str = Field("magpie-training", min_length=1, max_length=200)
    train_launcher: Literal["local", "accelerate"] = "local"
    accelerate_config: Path | None = None

    # --- language (the console's; Telegram and Discord users get the language their own app reports) ----------
    lc_all: str | None = None
    lc_messages: str | None = None
    lang: str | None = None

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # --- operating: health, metrics and logs ---------------------------------------------------------------------
    http_listen: str = "127.0.0.1:8080"
    log_format: Literal["text", "json"] = "text"
    console: Literal["auto", "off"] = "auto"
    """auto: chat in the terminal when no platform token is set; off: never (a service with only its HTTP server,
    e.g. the dashboard, under Docker or systemd where stdin is closed and the console would stop at once)."""

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, values: object) -> object:
        """Drops blank values wherever they come from (`env_ignore_empty` covers only empty ones, and only the
        environment and `.env`), so each such setting takes its default."""
        if not isinstance(values, dict):
            return values
        return {key: value for key, value in values.items() if not _blank(value)}

    @field_validator("admin_ids", "allowed_chats", mode="before")
    @classmethod
    def _parse_platform_ids(cls, value: object) -> frozenset[str]:
        """Admins and allowed chats are `platform:numeric-id` pairs; display names are never trusted."""
        items = _split_list(value)
        parsed = set()
        for item in items:
            platform, sep, ident = item.partition(":")
            platform = platform.strip().lower()
            ident = ident.strip()
            if not sep or platform not in PLATFORMS or not ident.lstrip("-").isdigit():
                raise ValueError(f"{item!r} is not platform:numeric_id (e.g. telegram:123456,discord:987654)")
            parsed.add(f"{platform}:{int(ident)}")
        return frozenset(parsed)

    @field_validator("discord_guild_ids", mode="before")
    @classmethod
    def _parse_guild_ids(cls, value: object) -> tuple[int, ...]:
        items = _split_list(value)
        if not all(item.isdigit() for item in items):
            raise ValueError("expected comma-separated numeric guild ids")
        return tuple(int(item) for item in items)

    @field_validator("discord_shard_count", mode="before")
    @classmethod
    def _parse_shard_count(cls, value: object) -> int | str:
        text = str(value).strip().lower() if value is not None else ""
        if text in ("", "0"):
            return 0
        if text == "auto" or (text.isdigit() and int(text) > 0):
            return text if text == "auto" else int(text)
        raise ValueError("expected a number of shards (0 = no sharding) or auto")

    @field_validator("discord_shard_ids", mode="before")
    @classmethod
    def _parse_shard_ids(cls, value: object) -> tuple[int, ...]:
        """`0,1,2` or ranges like `0-3,8`."""
        ids: list[int] = []
        for item in _split_list(value):
            first, dash, last = item.partition("-")
            if not first.strip().isdigit() or (dash and not last.strip().isdigit()):
                raise ValueError(f"{item!r} is not a shard id or a range of them (e.g. 0-3,8)")
            end = int(last if dash else first)
            if end < int(first):
                raise ValueError(f"{item!r} is an empty range")
            ids.extend(range(int(first), end + 1))
        if len(set(ids)) != len(ids):
            raise ValueError("a shard id is listed twice")
        return tuple(sorted(ids))

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _lora_targets(cls, value: object) -> tuple[str, ...]:
        targets = tuple(_split_list(value))
        if not targets:
            raise ValueError("name at least one module to adapt (GPT-2: c_attn, c_proj, c_fc)")
        return targets

    @field_validator("train_blocklist", mode="before")
    @classmethod
    def _parse_blocklist(cls, value: object) -> tuple[str, ...]:
        return tuple(item.lower() for item in _split_list(value))

    @field_validator("http_listen")
    @classmethod
    def _check_http_listen(cls, value: str) -> str:
        """`host:port` (`[::1]:8080` for IPv6) or `off`; checked at start, not when the server first binds."""
        value = value.strip()
        if value.lower() == HTTP_OFF:
            return HTTP_OFF
        parse_listen(value)
        return value

    @model_validator(mode="after")
    def _check_shards(self) -> Settings:
        """Shard ids name shards of a known count; Discord closes the connection (4010) otherwise."""
        count, ids = self.discord_shard_count, self.discord_shard_ids
        if not ids:
            return self
        if not isinstance(count, int) or count == 0:
            raise ValueError("DISCORD_SHARD_IDS needs DISCORD_SHARD_COUNT set to the total number of shards")
        if ids[-1] >= count:
            raise ValueError(f"DISCORD_SHARD_IDS must be below DISCORD_SHARD_COUNT ({count}): shards are 0-{count - 1}")
        return self

    @field_validator("redis_url", mode="before")
    @classmethod
    def _check_redis_url(cls, value: object) -> object:
        """Empty means "no Redis" (one process); anything else must be a URL redis-py understands."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str) or not value.strip().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected redis://host:6379/0 (or rediss://, unix://), or empty for one process")
        return value.strip()

    @field_validator("dashboard_token", mode="before")
    @classmethod
    def _check_dashboard_token(cls, value: object) -> object:
        """Empty turns the dashboard off; a short token could be guessed, and it guards retrain and rollback."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        if not isinstance(raw, str) or len(raw.strip()) < DASHBOARD_TOKEN_MIN_LENGTH:
            raise ValueError(
                f"must be at least {DASHBOARD_TOKEN_MIN_LENGTH} characters (e.g. the output of "
                "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`), or empty to turn the dashboard off"
            )
        if (bits := token_strength_bits(raw.strip())) < DASHBOARD_TOKEN_MIN_BITS:
            raise ValueError(
                f"is too easy to guess (about {bits:.0f} bits; at least {DASHBOARD_TOKEN_MIN_BITS} needed: more "
                "different characters, of more kinds): use e.g. the output of "
                "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`"
            )
        return raw.strip()

    @model_validator(mode="after")
    def _check_webhook(self) -> Settings:
        if self.telegram_webhook_url and not self.telegram_webhook_secret:
            raise ValueError(
                "TELEGRAM_WEBHOOK_SECRET must be set when TELEGRAM_WEBHOOK_URL is: "
                "without it anyone could post fake updates"
            )
        return self

    @model_validator(mode="after")
    def _check_retrain_backend(self) -> Settings:
        if self.retrain_backend == "celery" and self.celery_broker_url is None:
            raise ValueError(
                "CELERY_BROKER_URL must be set when RETRAIN_BACKEND=celery "
                "(e.g. redis://127.0.0.1:6379/0 or amqp://guest:guest@127.0.0.1:5672//)"
            )
        if self.celery_broker_url is not None:
            scheme = self.celery_broker_url.get_secret_value().partition("://")[0]
            if scheme not in BROKER_SCHEMES:
                raise ValueError(f"CELERY_BROKER_URL must start with one of {', '.join(BROKER_SCHEMES)}://")
        return self

    @cached_property
    def resolved_device(self) -> str:
        """`auto` picks CUDA when torch sees a GPU."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def http_address(self) -> tuple[str, int] | None:
        """HTTP_LISTEN as (host, port), or None when the server is off."""
        return None if self.http_listen == HTTP_OFF else parse_listen(self.http_listen)

    @property
    def console_language(self) -> str | None:
        """The console's language tag: the first of LC_ALL, LC_MESSAGES and LANG that is set (POSIX's order for
        messages); `core.i18n` speaks it when it has a catalogue for it (`ko_KR.UTF-8`), else English."""
        return next((tag for tag in (self.lc_all, self.lc_messages, self.lang) if tag), None)

    def is_admin(self, platform: str, user_id: str) -> bool:
        """Admin rights come from numeric platform ids only (console users are local, hence trusted)."""
        if platform == "console":
            return True
        ident = user_id.strip()
        if not ident.lstrip("-").isdigit():
            return False
        return f"{platform}:{int(ident)}" in self.admin_ids

    def allows_group(self, community: str) -> bool:
        """Whether Magpie may log and answer in the group `community` (`IncomingMessage.community`:
        `telegram:<chat id>`, `discord:<guild id>`, `console`): ALLOWED_CHATS empty allows every group, as before
        it existed; the local console is always allowed; private chats are never asked about."""
        platform, _, ident = community.partition(":")
        if not self.allowed_chats or platform == "console":
            return True
        return ident.lstrip("-").isdigit() and f"{platform}:{int(ident)}" in self.allowed_chats

    @property
    def discord_sharded(self) -> bool:
        """Whether Discord connects as shards (DISCORD_SHARD_COUNT set) rather than one plain connection."""
        return self.discord_shard_count != 0

    @property
    def community_voices(self) -> bool:
        """VOICE_SCOPE=community: each community has its own voice (a LoRA adapter), private chats the base."""
        return self.voice_scope == "community"

    def learns_from_private_chats(self, platform: str) -> bool:
        """Whether one-to-one chats on `platform` are training data.

        Off by default: what someone tells the bot privately must not be learned and repeated to others. The
        console's chat is the operator's own (the same reason it is trusted as an admin), so it always is.
        """
        return self.train_on_private_chats or platform == "console"


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` as a pair; the brackets of an IPv6 host are dropped. Port 0 means any free port."""
    host, sep, port = value.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:8080, 0.0.0.0:8080; off turns it off)")
    return host, int(port)


def _blank(value: object) -> bool:
    """An empty or whitespace-only string (a secret's too): a setting given that way is not set."""
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    return isinstance(raw, str) and not raw.strip()


def token_strength_bits(token: str) -> float:
    """A pessimistic estimate of a token's entropy in bits: the larger of two lower bounds that each see through
    repetition. One is the token's number of DIFFERENT characters times the bits of one character of the kinds it
    uses (lower case 26, upper case 26, digits 10, anything else 32); the other its length times the Shannon entropy
    of its own character frequencies (what a long hex token, few kinds of many characters, is worth).

    `aaaaaaaaaaaaaaaa` scores 4.7 and `abababababababab` 16; 16 characters of `secrets.token_urlsafe` about 80,
    32 of them (`token_urlsafe(24)`) about 150, and `secrets.token_hex(16)` about 120. It knows no dictionary:
    a passphrase of words scores as its letters do."""
    pool = sum(
        size
        for size, present in (
            (26, any(c.islower() for c in token)),
            (26, any(c.isupper() for c in token)),
            (10, any(c.isdigit() for c in token)),
            (32, any(not c.isalnum() for c in token)),
        )
        if present
    )
    by_kinds = len(set(token)) * math.log2(pool) if pool > 1 else 0.0
    counts = [token.count(c) for c in set(token)]
    by_frequencies = -sum(n * math.log2(n / len(token)) for n in counts)
    return max(by_kinds, by_frequencies)


def _split_list(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple | set | frozenset):
        return [str(part).strip() for part in value if str(part).strip()]
    raise ValueError("expected a comma-separated list")


def load_settings(settings_class: type[Settings] = Settings, /, **overrides: object) -> Settings:
    """Builds settings (of `settings_class`: the trainer's leave secrets out), turning pydantic's report into one
    clear line per bad variable."""
    try:
        return settings_class(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = "_".join(str(part) for part in error["loc"]).upper() or "settings"
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{name}: {message}")
        raise ConfigError(
            "Bad setting " + "; ".join(problems) + " — fix it in .env or the environment (see .env.example)."
        ) from None
