"""The transactional outbox is the saga log itself: which of its transitions are events, and how
each is published.

A log row commits with its decision, so an event exists if and only if its transition committed,
with no second row to write. ``sagas.runtime.relay`` reads the log by sequence and publishes
each lifecycle transition (saga started, step succeeded or failed, compensation done, saga
completed, compensated or parked) to the kombu topic exchange ``sagas.events`` with routing key
``<saga>.<event>`` (``order.step.succeeded``). The event id is ``<log seq>.<index>``: stable
across re-sends, so consumers drop duplicates by it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table

from sagas.store.log import LogEntry
from sagas.store.schema import RelayCursor

EXCHANGE = "sagas.events"

cursor_t: Table = RelayCursor.__table__  # type: ignore[assignment]

_SAGA_EVENTS = {
    "COMPLETED": "saga.completed",
    "COMPENSATED": "saga.compensated",
    "COMPENSATION_FAILED": "saga.parked",
    "FORWARD_FAILED": "saga.parked",
}
_STEP_EVENTS = {
    "SUCCEEDED": "step.succeeded",
    "FAILED": "step.failed",
    "COMPENSATED": "step.compensated",
    "COMPENSATION_FAILED": "step.compensation_failed",
}
EVENTS = ("saga.started", *_SAGA_EVENTS.values(), *_STEP_EVENTS.values())

def lifecycle_event(step: str | None, from_state: Any, to_state: Any) -> str | None:
    """The event name of a transition, or None when it is bookkeeping (a retry, a dispatch)."""
    if step is None:
        if from_state == "PENDING" and to_state == "RUNNING":
            return "saga.started"
        return _SAGA_EVENTS.get(str(to_state))
    return _STEP_EVENTS.get(str(to_state))


def events_of(
    entry: LogEntry, saga_id: str, saga: str, saga_input: Any
) -> list[dict[str, Any]]:
    """The messages one log row publishes (none for bookkeeping decisions)."""
    out: list[dict[str, Any]] = []
    for index, t in enumerate(entry.transitions):
        name = lifecycle_event(t.step, t.from_state, t.to_state)
        if name is None:
            continue
        event_id = f"{entry.seq}.{index}"
        payload: dict[str, Any] = {
            "id": event_id, "event": name, "saga_id": saga_id, "saga": saga, "step": t.step,
            "from_state": t.from_state, "to_state": str(t.to_state), "attempt": t.attempt,
            "error": t.error, "saga_state": entry.saga_state,
            "occurred_at": entry.at.isoformat(),
        }
        if name == "saga.started":
            payload["input"] = saga_input
        elif name == "step.succeeded" and t.step == entry.step:
            payload["result"] = entry.result
        out.append({
            "event_id": event_id, "saga_id": saga_id, "routing_key": f"{saga}.{name}",
            "payload": payload,
        })
    return out
