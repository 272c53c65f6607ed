"""The sample app's engine as the tests drive it in-process: thin names over ``config.engine``.

Most tests use the public ``Sagas`` API; the few that feed events to the runtime by hand (to
play a late callback, a racing reconciler) use ``apply_event`` here, the runtime's own entry.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update

from config import engine
from sagas import Decision, Saga
from sagas.coordinator import Event
from sagas.runtime import transitions
from sagas.runtime.recovery import RecoveryReport
from sagas.runtime.recovery import recover_stalled as _recover_stalled
from sagas.store.sql import Store, log_t, sagas_t, utcnow


def get_store() -> Store:
    return engine.store


def start_saga(saga: Saga | str, data: Any, **options: Any) -> str:
    return engine.start(saga, data, **options).id


def apply_event(saga_id: str, event: Event, **options: Any) -> Decision:
    return transitions.apply_event(engine._binding, saga_id, event, **options)


def cancel_saga(saga_id: str, reason: str = "cancelled by operator") -> Decision:
    return engine.cancel(saga_id, reason)


def recover_stalled(now: datetime | None = None, limit: int | None = None, *,
                    dry_run: bool = False) -> RecoveryReport:
    return _recover_stalled(engine._binding, now, limit, dry_run=dry_run)


def make_stale(saga_id: str, seconds: float = 60, *, store: Store | None = None) -> None:
    """Age a saga as if its work in flight had made no progress for a long while.

    Its log moves back an hour plus ``seconds`` (so every step in flight is past its time limit
    by at least ``seconds``), and its row's stall deadline to ``seconds`` ago, where the
    reconciler's query finds it.
    """
    store = store or get_store()
    with store.begin() as conn:
        conn.execute(
            update(sagas_t).where(sagas_t.c.id == saga_id)
            .values(stall_deadline=utcnow() - timedelta(seconds=seconds))
        )
        for row in conn.execute(log_t.select().where(log_t.c.saga_id == saga_id)).all():
            at = row.at if row.at.tzinfo else row.at.replace(tzinfo=utcnow().tzinfo)
            conn.execute(update(log_t).where(log_t.c.seq == row.seq)
                         .values(at=at - timedelta(seconds=3600 + seconds)))
