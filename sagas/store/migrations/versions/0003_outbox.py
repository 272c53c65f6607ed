"""saga outbox: lifecycle events for the relay

Revision ID: sagas_0003
Revises: sagas_0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

from sagas.store.schema import Id, db_now

revision = "sagas_0003"
# The current head when this was written; the lead re-chains it if sagas_0002 lands first.
down_revision = "sagas_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "saga_outbox",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("saga_id", sa.String(64), nullable=False),
        sa.Column("saga", sa.String(100), nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("routing_key", sa.String(255), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("available_at", sa.DateTime(timezone=True), server_default=db_now(),
                  nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=db_now(),
                  nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.UniqueConstraint("event_id", name="uq_saga_outbox_event_id"),
    )
    op.create_index(
        "ix_saga_outbox_status_available", "saga_outbox", ["status", "available_at", "id"]
    )


def downgrade() -> None:
    op.drop_table("saga_outbox")
