"""training manifest: the messages each model version was trained on

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 13:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_version_messages",
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_versions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_version_id", "message_id"),
    )
    with op.batch_alter_table("model_version_messages", schema=None) as batch_op:
        batch_op.create_index("ix_model_version_messages_user", ["user_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("model_version_messages", schema=None) as batch_op:
        batch_op.drop_index("ix_model_version_messages_user")

    op.drop_table("model_version_messages")
