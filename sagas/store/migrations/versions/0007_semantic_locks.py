"""semantic locks: the key each saga holds, and the sagas waiting for a key in arrival order

Revision ID: sagas_0007
Revises: sagas_0006
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

from sagas.store.schema import Id, db_now

revision = "sagas_0007"
down_revision = "sagas_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "saga_locks",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("saga_id", sa.String(64), nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=True), server_default=db_now(),
                  nullable=False),
    )
    op.create_index("ix_saga_locks_saga_id", "saga_locks", ["saga_id"])
    op.create_table(
        "saga_lock_waits",
        sa.Column("seq", Id, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("saga_id", sa.String(64), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), server_default=db_now(), nullable=False),
    )
    op.create_index("ix_saga_lock_waits_key_seq", "saga_lock_waits", ["key", "seq"])
    op.create_index("ix_saga_lock_waits_saga_id", "saga_lock_waits", ["saga_id"])


def downgrade() -> None:
    op.drop_table("saga_lock_waits")
    op.drop_table("saga_locks")
