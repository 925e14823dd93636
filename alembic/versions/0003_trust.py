"""trust: outbox fields, the reply_to index, a training run's process token

- `messages.awaits_reply`: the incoming message expects an answer (recovery after a crash answers those that have
  no delivered reply);
- `messages.parts_sent`: how many parts of a split reply reached the platform;
- `ix_messages_reply_to`: ON DELETE CASCADE on the self-reference scanned the whole table per deleted row;
- `training_runs.process_start`: the trainer process's start time (from /proc), so a reused pid is not mistaken
  for a live run.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 06:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("awaits_reply", sa.Boolean(), server_default=sa.text("false"), nullable=False))
        batch_op.add_column(sa.Column("parts_sent", sa.Integer(), nullable=True))
        batch_op.create_index("ix_messages_reply_to", ["reply_to_id"], unique=False)
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("process_start", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_column("process_start")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_reply_to")
        batch_op.drop_column("parts_sent")
        batch_op.drop_column("awaits_reply")
