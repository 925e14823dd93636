"""consent: which group a chat belongs to, and the groups that turned learning off

- `chats.community`: the group a chat belongs to (a Telegram group for all its forum topics, a Discord guild for
  its channels), which ALLOWED_CHATS and `/learning` are about. Telegram's is filled in here from the chat id;
  a Discord channel's with its next message (the guild was never stored).
- `learning_pauses`: each `/learning off` of a group, until its `/learning on` (bounded by the log ids of those two
  commands); the dataset leaves out everything said in the group's chats in between (and all of it while one is
  open).

Revision ID: 0006_consent
Revises: celery
Create Date: 2026-12-06 08:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_consent"
down_revision: str | None = "celery"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("chats", schema=None) as batch_op:
        batch_op.add_column(sa.Column("community", sa.String(length=64), nullable=True))
    chats = sa.table("chats", sa.column("id"), sa.column("platform"), sa.column("kind"), sa.column("platform_chat_id"))
    telegram_groups = sa.select(chats.c.id, chats.c.platform_chat_id).where(
        chats.c.platform == "telegram", chats.c.kind == "group"
    )
    bind = op.get_bind()
    for chat_id, platform_chat_id in bind.execute(telegram_groups).all():
        community = str(platform_chat_id).partition(":")[0]  # "<chat>:<topic>" belongs to <chat>
        bind.execute(sa.update(chats).where(chats.c.id == chat_id).values(community=community))
    op.create_table(
        "learning_pauses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("platform", sa.String(length=16), nullable=False),
        sa.Column("community", sa.String(length=64), nullable=False),
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
    with op.batch_alter_table("chats", schema=None) as batch_op:
        batch_op.drop_column("community")
