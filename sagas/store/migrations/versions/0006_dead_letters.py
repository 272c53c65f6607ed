"""dead letters: messages workers refused as poison, for `sagas dead`

Revision ID: sagas_0006
Revises: sagas_0005
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

from sagas.store.schema import Id, db_now

revision = "sagas_0006"
down_revision = "sagas_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "saga_dead_letters",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), server_default=db_now(), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("queue", sa.String(200), nullable=True),
        sa.Column("task", sa.String(200), nullable=True),
        sa.Column("task_id", sa.String(200), nullable=True),
        sa.Column("saga_id", sa.String(64), nullable=True),
        sa.Column("step", sa.String(100), nullable=True),
        sa.Column("size", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("content_type", sa.String(100), nullable=True),
        sa.Column("headers", sa.JSON(), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(200), nullable=True),
    )
    op.create_index("ix_saga_dead_letters_reason_id", "saga_dead_letters", ["reason", "id"])


def downgrade() -> None:
    op.drop_table("saga_dead_letters")
