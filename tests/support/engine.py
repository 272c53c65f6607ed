"""The sample app's engine as the tests drive it in-process: thin names over ``config.engine``.

Most tests use the public ``Sagas`` API; the few that feed events to the runtime by hand (to
play a late callback, a racing reconciler) use ``apply_event`` here, the runtime's own entry.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from config import engine
from sagas import Decision, Saga
from sagas.coordinator import Event
from sagas.runtime import transitions
from sagas.runtime.recovery import RecoveryReport
from sagas.runtime.recovery import recover_stalled as _recover_stalled
from sagas.store.sql import Store


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
