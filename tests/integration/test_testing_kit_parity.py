"""sagas.testing pinned to production: the same scenarios in-process and on real workers.

Each scenario runs once through ``SagaRunner`` (no broker, the runner's in-memory store) and once
on a real Celery worker (Redis, the backend's database), with the same participants: the order
saga's services and ``testsvc.act``/``testsvc.undo``, whose faults are planned in the input.
Final states, step states, step errors, participant calls and histories must match, times and
task ids aside. Where branches run in parallel their interleaving may differ: each step's own
sequence must match, and the whole history as a multiset.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from sagas import Saga
from sagas.testing import RunResult, SagaRunner
from tests.conftest import Backend, wait_for_saga
from tests.support import test_sagas as ts
from tests.support.engine import start_saga

pytestmark = pytest.mark.integration

Event = tuple[str | None, str | None, str, int, str | None]


@dataclass(frozen=True)
class Shape:
    """What must be equal: no times, no ids."""

    state: str
    steps: dict[str, tuple[str, int, int, str | None]]  # state, attempts, comp. attempts, error
    events: list[Event]


def _of_view(view: dict[str, Any]) -> Shape:
    return Shape(
        view["state"],
        {s["name"]: (s["state"], s["attempts"], s["compensation_attempts"], s["error"])
         for s in view["steps"]},
        [(e["step"], e["from_state"], e["to_state"], e["attempt"], e["error"])
         for e in view["events"]],
    )


def _of_result(result: RunResult) -> Shape:
    return Shape(
        str(result.state),
        {n: (str(s.state), s.attempts, s.compensation_attempts, s.error)
         for n, s in result.steps.items()},
        [(e.step, e.from_state, e.to_state, e.attempt, e.error) for e in result.history],
    )


def _order(price: float, quantity: int = 1) -> dict[str, Any]:
    return {"customer_id": "parity", "item": "book", "quantity": quantity, "price": price}


def _plan(**plan: dict[str, Any]) -> dict[str, Any]:
    return {"plan": plan}


# (saga, input, whether branches run in parallel)
SCENARIOS = {
    "order-happy": ("order", _order(20.0, 2), False),
    "order-declined": ("order", _order(600.0), False),
    "diamond-happy-with-a-transient-branch": (ts.diamond, _plan(c={"transient": 2}), True),
    "diamond-branch-fails-other-branch-undone": (ts.diamond, _plan(b={"fail": True}), True),
    "diamond-join-fails-a-compensation-fails-for-good": (
        ts.diamond, _plan(d={"fail": True}, b={"undo_fail": True}), True),
    "pivot-failure-before-the-pivot": (ts.pivoted, _plan(a={"fail": True}), False),
    "pivot-itself-refuses": (ts.pivoted, _plan(p={"fail": True}), False),
    "pivot-failure-after-the-pivot-goes-forward": (ts.pivoted, _plan(z={"transient": 4}), False),
    # The participant really sleeps past its 1 s time limit: cut off, undone, not retried.
    "time-limit-cuts-a-slow-step-off": (ts.timed, _plan(slow={"sleep": 1.3}), False),
}


@pytest.fixture
def runner(engine_backend: Backend) -> Iterator[SagaRunner]:
    """In-process: the same definitions and participants; the participants' own databases
    (the order tables, the Redis ledger) are the backend's, as for the worker."""
    from tasks.order_saga import order_saga

    with SagaRunner(order_saga, ts.diamond, ts.pivoted, ts.timed) as r:
        yield r


def _calls(saga_id: str, saga: Saga) -> dict[tuple[str, str], int]:
    return {
        (step, phase): int(ts.ledger().get(f"calls:{saga_id}:{step}:{phase}") or 0)
        for step in saga.steps for phase in ("action", "compensation")
    }


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_in_process_and_real_workers_agree(
    scenario: str, runner: SagaRunner, engine_backend: Backend
):
    saga, data, parallel = SCENARIOS[scenario]
    local = runner.run(saga, data)
    real_id = start_saga(saga, data)
    real = wait_for_saga(real_id, timeout=60)
    mine, theirs = _of_result(local), _of_view(real)

    assert mine.state == theirs.state
    assert mine.steps == theirs.steps
    if parallel:
        for step in [None, *mine.steps]:
            assert [e for e in mine.events if e[0] == step] == [
                e for e in theirs.events if e[0] == step
            ], f"history of {step or 'the saga'}"
        assert Counter(mine.events) == Counter(theirs.events)
    else:
        assert mine.events == theirs.events
    if isinstance(saga, Saga):  # testsvc participants count their calls in Redis
        assert _calls(local.id, saga) == _calls(real_id, saga)
