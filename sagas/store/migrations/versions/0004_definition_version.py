"""saga definition versions: each instance records its definition's version and fingerprint

Revision ID: sagas_0004
Revises: sagas_0003
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "sagas_0004"
down_revision = "sagas_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("saga_instances") as batch:
        batch.add_column(sa.Column("definition_version", sa.Integer(), nullable=False,
                                   server_default="1"))
        batch.add_column(sa.Column("definition_fingerprint", sa.String(16), nullable=True))
        batch.create_index("ix_saga_instances_name_definition_version",
                           ["name", "definition_version"])


def downgrade() -> None:
    with op.batch_alter_table("saga_instances") as batch:
        batch.drop_index("ix_saga_instances_name_definition_version")
        batch.drop_column("definition_fingerprint")
        batch.drop_column("definition_version")
