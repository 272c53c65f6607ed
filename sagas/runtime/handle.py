"""A started saga as its caller holds it: the id, the current state, and a wait for the outcome."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sagas.errors import SagaNotFoundError, SagaTimeoutError
from sagas.runtime.binding import Binding
from sagas.states import SAGA_SETTLED, SagaState, StepState


@dataclass(frozen=True)
class StepOutcome:
    name: str
    state: StepState
    result: Any
    error: str | None
    attempts: int
    compensation_attempts: int


@dataclass(frozen=True)
class SagaOutcome:
    """A saga as it stands: settled (``settled``) or not yet, each step's state and result."""

    id: str
    name: str
    state: SagaState
    error: str | None
    steps: dict[str, StepOutcome] = field(default_factory=dict)

    @property
    def settled(self) -> bool:
        return self.state in SAGA_SETTLED

    @property
    def succeeded(self) -> bool:
        return self.state is SagaState.COMPLETED

    @property
    def results(self) -> dict[str, Any]:
        return {n: s.result for n, s in self.steps.items() if s.result is not None}


class SagaHandle:
    """Returned by ``Sagas.start`` and ``Sagas.handle``; every read is a read-only transaction."""

    def __init__(self, binding: Binding, saga_id: str) -> None:
        self._binding = binding
        self.id = saga_id

    def __repr__(self) -> str:
        return f"SagaHandle({self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SagaHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def state(self) -> SagaState:
        """The saga's state now; raises ``SagaNotFoundError`` for an id never recorded."""
        states = self._binding.store.saga_states([self.id])
        if self.id not in states:
            raise SagaNotFoundError(f"no saga with id {self.id!r}")
        return SagaState(states[self.id])

    def outcome(self) -> SagaOutcome:
        """The saga and its steps as they stand (settled or not)."""
        view = self._binding.store.get_view(self.id)
        return SagaOutcome(
            id=view["id"], name=view["name"], state=SagaState(view["state"]),
            error=view["error"],
            steps={
                s["name"]: StepOutcome(
                    s["name"], StepState(s["state"]), s["result"], s["error"], s["attempts"],
                    s["compensation_attempts"],
                )
                for s in view["steps"]
            },
        )

    def wait(self, timeout: float = 60.0, *, poll: float = 0.02, poll_max: float = 0.5
             ) -> SagaOutcome:
        """Block until the saga settles (COMPLETED, COMPENSATED, or parked: COMPENSATION_FAILED,
        FORWARD_FAILED).

        Polls the store with a growing interval (``poll`` up to ``poll_max``); raises
        ``SagaTimeoutError`` after ``timeout`` seconds (the saga goes on) and
        ``SagaNotFoundError`` when the id was never recorded once ``timeout`` has passed (a
        start still queued in the broker is written when a worker takes it).
        """
        deadline = time.monotonic() + timeout
        interval = poll
        last: SagaState | None = None
        while True:
            states = self._binding.store.saga_states([self.id])
            if self.id in states:
                last = SagaState(states[self.id])
                if last in SAGA_SETTLED:
                    return self.outcome()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if last is None:
                    raise SagaNotFoundError(
                        f"no saga with id {self.id!r} after waiting {timeout:g}s"
                    )
                raise SagaTimeoutError(
                    f"saga {self.id} is still {last} after {timeout:g}s; it goes on"
                )
            time.sleep(min(interval, remaining))
            interval = min(poll_max, interval * 1.5)


def read_outcomes(binding: Binding, saga_ids: Sequence[str]) -> dict[str, SagaOutcome]:
    """The outcomes of many sagas in two queries; ids never recorded are absent."""
    store = binding.store
    out: dict[str, SagaOutcome] = {}
    for saga_id, snap in store.read_outcomes(saga_ids).items():
        order = store.ordered_steps(snap.name, snap.version, list(snap.steps))
        out[saga_id] = SagaOutcome(
            id=saga_id, name=snap.name, state=snap.state, error=snap.error,
            steps={
                n: StepOutcome(n, snap.steps[n].state, snap.steps[n].result, snap.steps[n].error,
                               snap.steps[n].attempts, snap.steps[n].compensation_attempts)
                for n in order
            },
        )
    return out
