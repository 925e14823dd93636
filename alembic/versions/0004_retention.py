"""retention: a model version whose files MODELS_KEEP deleted keeps its row, marked pruned

- `model_versions.pruned_at`: when its directory was deleted. The row stays so the history (`/models`), the
  training manifest and `/forget`'s "these versions learned from you" stay true after the files are gone.

Revision ID: retention
Revises: 0003
Create Date: 2026-11-30 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "retention"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pruned_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_column("pruned_at")
