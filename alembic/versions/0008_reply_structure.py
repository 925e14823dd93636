"""reply structure: what a message replies to, and which message came before it

- `messages.replies_to_platform_id`: the platform id of the message a person's message replies to (a Telegram
  reply, a Discord reference); the dataset trains a reply as the answer to that line;
- `messages.follows_id`: the message logged just before it in its chat (no foreign key: when that one is deleted,
  the dangling id is how the dataset knows a line was withdrawn there and does not join its neighbours);
- `chats.last_message_id`: the newest message logged in the chat, kept when that message is deleted, so a message
  logged after a deletion still follows the deleted one.

Rows logged before this revision have neither (NULL): they are read as before.

Revision ID: 0006_reply_structure
Revises: 0006_consent
Create Date: 2026-12-06 07:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_reply_structure"
down_revision: str | None = "0006_consent"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("replies_to_platform_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("follows_id", sa.Integer(), nullable=True))
    with op.batch_alter_table("chats", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_message_id", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("chats", schema=None) as batch_op:
        batch_op.drop_column("last_message_id")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("follows_id")
        batch_op.drop_column("replies_to_platform_id")
