"""saga store: instances, steps, events

Revision ID: sagas_0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

from sagas.store.schema import Id, db_now

revision = "sagas_0001"
down_revision = None
branch_labels = ("sagas",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "saga_instances",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("input", sa.JSON(), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("input_digest", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=db_now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=db_now(), nullable=False),
        sa.Column("stall_deadline", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False, server_default="0"),
        sa.UniqueConstraint("idempotency_key", name="uq_saga_instances_idempotency_key"),
    )
    op.create_index("ix_saga_instances_state_stall", "saga_instances", ["state", "stall_deadline"])
    op.create_index("ix_saga_instances_name_created", "saga_instances", ["name", "created_at"])
    op.create_table(
        "saga_steps",
        sa.Column("saga_id", sa.String(64), sa.ForeignKey("saga_instances.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("compensation_attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "saga_events",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("saga_id", sa.String(64), sa.ForeignKey("saga_instances.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("step", sa.String(100), nullable=True),
        sa.Column("from_state", sa.String(32), nullable=True),
        sa.Column("to_state", sa.String(32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), server_default=db_now(), nullable=False),
    )
    op.create_index("ix_saga_events_saga_id", "saga_events", ["saga_id"])


def downgrade() -> None:
    op.drop_table("saga_events")
    op.drop_table("saga_steps")
    op.drop_table("saga_instances")
