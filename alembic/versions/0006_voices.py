"""voices: a voice per community (LoRA adapters), and versions that hold withdrawn data

- `chats.community`: the community a chat belongs to (None: a private chat); kept when a chat moves to a new id;
- `model_versions.community`: which voice a version is (None: the shared voice); one active version per voice;
- `model_versions.holds_withdrawn_at`: set when someone in the version's manifest sent /forget or /optout;
- `training_runs.community`: the voice a run trains.

Revision ID: voices
Revises: celery
Create Date: 2026-12-06 07:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "voices"
down_revision: str | None = "celery"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ACTIVE = sa.text("status = 'active'")
_SHARED_ACTIVE = sa.text("status = 'active' AND community IS NULL")
_COMMUNITY_ACTIVE = sa.text("status = 'active' AND community IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("chats", schema=None) as batch_op:
        batch_op.add_column(sa.Column("community", sa.String(length=80), nullable=True))
        batch_op.create_index("ix_chats_community", ["community"], unique=False)
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("community", sa.String(length=80), nullable=True))
        batch_op.add_column(sa.Column("holds_withdrawn_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.drop_index("uq_model_versions_one_active", sqlite_where=_ACTIVE, postgresql_where=_ACTIVE)
        batch_op.create_index(
            "uq_model_versions_one_active", ["status"], unique=True,
            sqlite_where=_SHARED_ACTIVE, postgresql_where=_SHARED_ACTIVE,
        )  # fmt: skip
        batch_op.create_index(
            "uq_model_versions_one_active_per_community", ["community"], unique=True,
            sqlite_where=_COMMUNITY_ACTIVE, postgresql_where=_COMMUNITY_ACTIVE,
        )  # fmt: skip
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("community", sa.String(length=80), nullable=True))


def downgrade() -> None:
    op.execute("UPDATE model_versions SET status = 'retired' WHERE status = 'active' AND community IS NOT NULL")
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_column("community")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_model_versions_one_active_per_community",
            sqlite_where=_COMMUNITY_ACTIVE, postgresql_where=_COMMUNITY_ACTIVE,
        )  # fmt: skip
        batch_op.drop_index("uq_model_versions_one_active", sqlite_where=_SHARED_ACTIVE, postgresql_where=_SHARED_ACTIVE)
        batch_op.create_index(
            "uq_model_versions_one_active", ["status"], unique=True, sqlite_where=_ACTIVE, postgresql_where=_ACTIVE
        )
        batch_op.drop_column("holds_withdrawn_at")
        batch_op.drop_column("community")
    with op.batch_alter_table("chats", schema=None) as batch_op:
        batch_op.drop_index("ix_chats_community")
        batch_op.drop_column("community")
