"""the saga log: one row per decision replaces step rows, event rows and outbox rows

Revision ID: sagas_0005
Revises: sagas_0004
Create Date: 2026-12-06

Existing history is carried over: every old event row becomes one log row (cause ``Migrated``)
with its transition, and a step's result rides on its SUCCEEDED row, so sagas in flight go on
after the upgrade and finished ones keep their history. The relay's cursor starts after the
carried-over rows: run the old relay until its outbox is empty before upgrading, since outbox
rows not yet published are not carried over.
"""

import sqlalchemy as sa
from alembic import op

from sagas.store.schema import Id

revision = "sagas_0005"
down_revision = "sagas_0004"
branch_labels = None
depends_on = None

BATCH = 2000


def upgrade() -> None:
    bind = op.get_bind()
    log = op.create_table(
        "saga_log",
        sa.Column("seq", Id, primary_key=True, autoincrement=True),
        sa.Column("saga_id", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cause", sa.String(32), nullable=False),
        sa.Column("step", sa.String(100), nullable=True),
        sa.Column("saga_state", sa.String(32), nullable=False),
        sa.Column("transitions", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("dedupe", sa.String(120), nullable=True),
        sa.Column("txid", sa.BigInteger(), nullable=True),
    )
    op.create_index("uq_saga_log_saga_id_dedupe", "saga_log", ["saga_id", "dedupe"], unique=True)
    if bind.dialect.name == "postgresql":
        op.create_index("ix_saga_log_txid_seq", "saga_log", ["txid", "seq"])
    cursor = op.create_table(
        "saga_relay_cursor",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("position", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("position_txid", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("owner", sa.String(100), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
    )
    inspector = sa.inspect(bind)
    if inspector.has_table("saga_events"):
        _carry_over(bind, log)
    newest = bind.execute(sa.select(sa.func.max(log.c.seq))).scalar()
    txid = bind.execute(sa.select(sa.func.max(log.c.txid))).scalar()
    bind.execute(sa.insert(cursor).values(name="default", position=newest or 0,
                                          position_txid=txid or 0))
    for table in ("saga_outbox", "saga_events", "saga_steps"):
        if inspector.has_table(table):
            op.drop_table(table)


def _carry_over(bind: sa.Connection, log: sa.Table) -> None:
    meta = sa.MetaData()
    events = sa.Table("saga_events", meta, autoload_with=bind)
    steps = sa.Table("saga_steps", meta, autoload_with=bind)
    sagas = sa.Table("saga_instances", meta, autoload_with=bind)
    results = {
        (r.saga_id, r.name): r.result
        for r in bind.execute(sa.select(steps.c.saga_id, steps.c.name, steps.c.result))
    }
    states: dict[str, str] = {}
    created: dict[str, object] = {}
    for r in bind.execute(sa.select(sagas.c.id, sagas.c.state, sagas.c.created_at)):
        states[r.id], created[r.id] = r.state, r.created_at
    txid = None
    if bind.dialect.name == "postgresql":
        txid = bind.execute(sa.text("SELECT pg_current_xact_id()::text::bigint")).scalar()
    named: dict[str, list[str]] = {}
    for r in bind.execute(sa.select(steps.c.saga_id, steps.c.name).order_by(steps.c.name)):
        named.setdefault(r.saga_id, []).append(r.name)
    # First, per saga, a row naming its steps (the graph it was started with).
    for chunk in range(0, len(named), BATCH):
        bind.execute(sa.insert(log), [
            {"saga_id": saga_id, "at": created.get(saga_id), "cause": "Migrated",
             "step": None, "saga_state": states.get(saga_id, "RUNNING"), "transitions": [],
             "result": {"steps": names}, "dedupe": "started", "txid": txid}
            for saga_id, names in list(named.items())[chunk:chunk + BATCH]
        ])
    last = 0
    while True:
        rows = bind.execute(
            sa.select(events).where(events.c.id > last).order_by(events.c.id).limit(BATCH)
        ).all()
        if not rows:
            return
        bind.execute(sa.insert(log), [
            {
                "saga_id": r.saga_id, "at": r.at, "cause": "Migrated", "step": r.step,
                "saga_state": states.get(r.saga_id, "RUNNING"),
                "transitions": [[r.step, r.from_state, r.to_state, r.attempt]
                                + ([r.error] if r.error else [])],
                "result": results.get((r.saga_id, r.step)) if r.to_state == "SUCCEEDED" else None,
                "dedupe": None, "txid": txid,
            }
            for r in rows
        ])
        last = rows[-1].id


def downgrade() -> None:
    raise NotImplementedError(
        "the saga log cannot be turned back into step and outbox rows: restore a backup taken "
        "before upgrading to sagas_0005"
    )
