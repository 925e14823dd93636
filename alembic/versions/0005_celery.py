"""celery: training runs carried out by a worker on another machine, and one running run at a time

- `training_runs.worker_host`: the machine whose `magpie worker` took the run;
- `training_runs.heartbeat_at`: set when the run is queued and renewed by the worker, so a run whose worker died
  on another machine is recognised by its age;
- `uq_training_runs_one_running`: at most one `running` row, so two processes (bots, `magpie retrain`, workers)
  can never start two runs at once. Older `running` rows are failed first (only the newest can still be live).

Revision ID: celery
Revises: retention
Create Date: 2026-11-30 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "celery"
down_revision: str | None = "retention"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RUNNING = sa.text("status = 'running'")


def upgrade() -> None:
    op.execute(
        "UPDATE training_runs SET status = 'failed', "
        "error = 'interrupted: the training process stopped without recording an outcome (restart or crash)' "
        "WHERE status = 'running' AND id < (SELECT max(id) FROM training_runs WHERE status = 'running')"
    )
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("worker_host", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            "uq_training_runs_one_running", ["status"], unique=True, sqlite_where=_RUNNING, postgresql_where=_RUNNING
        )


def downgrade() -> None:
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_index("uq_training_runs_one_running", sqlite_where=_RUNNING, postgresql_where=_RUNNING)
        batch_op.drop_column("heartbeat_at")
        batch_op.drop_column("worker_host")
