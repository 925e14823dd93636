"""consent: the groups that turned learning off

(Which group a chat belongs to, `chats.community`, came with revision "voices": `telegram:<group id>`,
`discord:<guild id>`; ALLOWED_CHATS and `/learning` are about that community.)

- `learning_pauses`: each `/learning off` of a group, until its `/learning on` (bounded by the log ids of those two
  commands); the dataset leaves out everything said in the group's chats in between (and all of it while one is
  open).

Revision ID: 0006_consent
Revises: voices
Create Date: 2026-12-06 08:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_consent"
down_revision: str | None = "voices"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "learning_pauses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("platform", sa.String(length=16), nullable=False),
        sa.Column("community", sa.String(length=80), nullable=False),
        sa.Column("paused_after_id", sa.Integer(), nullable=False),
        sa.Column("paused_by", sa.String(length=128), nullable=False),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resumed_at_id", sa.Integer(), nullable=True),
        sa.Column("resumed_by", sa.String(length=128), nullable=True),
        sa.Column("resumed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_learning_pauses_community", "learning_pauses", ["platform", "community"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_learning_pauses_community", table_name="learning_pauses")
    op.drop_table("learning_pauses")
