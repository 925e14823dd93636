"""The schema as SQLAlchemy models. Alembic migrations are the source of truth for the database itself;
`tests/test_migrations.py` checks these models and the migrations agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy import (
    text as sql,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite hands back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Role(StrEnum):
    USER = "user"
    BOT = "bot"


class Delivery(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class VersionStatus(StrEnum):
    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"


class RunStatus(StrEnum):
    RUNNING = "running"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    FAILED = "failed"


def _enum(enum: type[StrEnum], name: str) -> Enum:
    return Enum(enum, name=name, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("platform", "platform_user_id", name="uq_users_platform_user"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(16))
    platform_user_id: Mapped[str] = mapped_column(String(64))
    display_name: Mapped[str] = mapped_column(String(256), default="")
    opted_out: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sql("false"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Chat(Base):
    __tablename__ = "chats"
    __table_args__ = (UniqueConstraint("platform", "platform_chat_id", name="uq_chats_platform_chat"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(16))
    platform_chat_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    community: Mapped[str | None] = mapped_column(String(80), index=True)
    """The community the chat belongs to (None: a private chat), recorded when the chat is first seen and kept
    when the platform moves the chat to a new id (a Telegram group that became a supergroup keeps its voice)."""
    last_message_id: Mapped[int | None] = mapped_column(Integer)
    """The newest message logged in the chat, kept when that message is deleted: the next message's `follows_id`
    then names a message that is gone, which is how the dataset knows a line was withdrawn there."""


class Message(Base):
    """A logged message. A `/reset` is itself a message with `resets_context` set: history starts after it."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("chat_id", "platform_message_id", name="uq_messages_chat_platform_message"),
        Index("ix_messages_chat_created", "chat_id", "id"),
        Index("ix_messages_author", "author_id"),
        Index("ix_messages_reply_to", "reply_to_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chat_id: Mapped[int] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"))
    author_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    role: Mapped[Role] = mapped_column(_enum(Role, "message_role"))
    text: Mapped[str] = mapped_column(Text)
    platform_message_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    is_command: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sql("false"))
    resets_context: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sql("false"))
    reply_to_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    delivery: Mapped[Delivery | None] = mapped_column(_enum(Delivery, "message_delivery"))
    delivery_error: Mapped[str | None] = mapped_column(Text)
    awaits_reply: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sql("false"))
    """An incoming message the bot should answer: crash recovery answers those without a delivered reply."""
    parts_sent: Mapped[int | None] = mapped_column(Integer)
    """How many parts of a split reply reached the platform (a send that failed part-way says how far it got)."""
    replies_to_platform_id: Mapped[str | None] = mapped_column(String(64))
    """The platform id of the message a person's message replies to (Telegram reply, Discord reference): the
    dataset trains it as the answer to that line."""
    follows_id: Mapped[int | None] = mapped_column(Integer)
    """The id of the message logged just before it in its chat (`Chat.last_message_id`), with no foreign key on
    purpose: when that message is deleted (`/forget`, a platform deletion) the dangling id tells the dataset that a
    line was withdrawn here, so the lines on either side are never trained as each other's context."""


_SHARED_ACTIVE = sql("status = 'active' AND community IS NULL")
_COMMUNITY_ACTIVE = sql("status = 'active' AND community IS NOT NULL")


class ModelVersion(Base):
    """A trained model on disk: a full model (the shared voice) or a LoRA adapter (a community's voice). At most
    one row per voice is `active` (two partial unique indexes enforce it: the shared voice, and per community)."""

    __tablename__ = "model_versions"
    __table_args__ = (
        Index("uq_model_versions_one_active", "status", unique=True, sqlite_where=_SHARED_ACTIVE,
              postgresql_where=_SHARED_ACTIVE),
        Index("uq_model_versions_one_active_per_community", "community", unique=True,
              sqlite_where=_COMMUNITY_ACTIVE, postgresql_where=_COMMUNITY_ACTIVE),
    )  # fmt: skip

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[VersionStatus] = mapped_column(_enum(VersionStatus, "model_version_status"))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column()
    pruned_at: Mapped[datetime | None] = mapped_column()
    """When MODELS_KEEP deleted its directory (None: its files are kept). The row stays, for the history."""
    community: Mapped[str | None] = mapped_column(String(80))
    """The voice it is: a community's adapter, or None for the shared voice."""
    holds_withdrawn_at: Mapped[datetime | None] = mapped_column()
    """When someone in its manifest sent /forget or /optout: it never serves, is never trained on, and is never
    rolled back to again; its files go once nothing serves it."""

    parent: Mapped[ModelVersion | None] = relationship(remote_side=[id])


class TrainingRun(Base):
    """One training run. At most one row is `running` (a partial unique index): one run at a time, cluster-wide."""

    __tablename__ = "training_runs"
    __table_args__ = (
        Index(
            "uq_training_runs_one_running",
            "status",
            unique=True,
            sqlite_where=sql("status = 'running'"),
            postgresql_where=sql("status = 'running'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[RunStatus] = mapped_column(_enum(RunStatus, "training_run_status"))
    triggered_by: Mapped[str] = mapped_column(String(128))
    notify_platform: Mapped[str | None] = mapped_column(String(16))
    notify_chat_id: Mapped[str | None] = mapped_column(String(64))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    pid: Mapped[int | None] = mapped_column(Integer)
    process_start: Mapped[str | None] = mapped_column(String(32))
    """The trainer process's start time (/proc/<pid>/stat), so a pid the kernel reused is not taken for the run."""
    parent_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()
    worker_host: Mapped[str | None] = mapped_column(String(255))
    """The machine whose `magpie worker` took the run (RETRAIN_BACKEND=celery); None for a local child process."""
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    """Set when the run is queued and renewed by its worker while it trains (None: a local run, which has none)."""
    community: Mapped[str | None] = mapped_column(String(80))
    """The voice it trains: a community's (VOICE_SCOPE=community), or None for the shared voice."""


class ModelVersionMessage(Base):
    """The training manifest: which messages (and whose) a model version was trained on.

    `message_id` deliberately has no foreign key: `/forget` deletes messages, and the manifest must still say
    which versions contained that user's data (looked up by `user_id`, also without a key for the same reason).
    """

    __tablename__ = "model_version_messages"
    __table_args__ = (Index("ix_model_version_messages_user", "user_id"),)

    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True)
    message_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    user_id: Mapped[int | None] = mapped_column(Integer)


class LearningPause(Base):
    """A group's `/learning off`: nothing said in its chats after the message that turned learning off
    (`paused_after_id`) and before the one that turned it on again (`resumed_at_id`; None: still off) is training
    data, neither a target nor context. Rows are kept when learning is turned on again: what was said while it was
    off stays out of every later dataset too. Bounded by log ids, not times: platforms date messages to the second.
    Plain integers, not foreign keys: the messages may be deleted since."""

    __tablename__ = "learning_pauses"
    __table_args__ = (Index("ix_learning_pauses_community", "platform", "community"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(16))
    community: Mapped[str] = mapped_column(String(80))
    """`Chat.community` of the group's chats (`telegram:<group id>`, `discord:<guild id>`)."""
    paused_after_id: Mapped[int] = mapped_column(Integer)
    paused_by: Mapped[str] = mapped_column(String(128))
    paused_at: Mapped[datetime] = mapped_column(default=utcnow)
    resumed_at_id: Mapped[int | None] = mapped_column(Integer)
    resumed_by: Mapped[str | None] = mapped_column(String(128))
    resumed_at: Mapped[datetime | None] = mapped_column()
