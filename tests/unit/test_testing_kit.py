"""sagas.testing: a saga run in-process through the production engine, on a virtual clock.

Every scenario here goes through ``Sagas.start``, ``apply_event`` and the SQL store, with the
engine's own step wrapper classifying each participant's failure; only the broker is replaced.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from sagas import BusinessError, RetryPolicy, Saga, SagaState, Step, StepContext, StepState
from sagas.errors import DefinitionError
from sagas.store import sql
from sagas.testing import Fault, SagaDidNotSettle, SagaRunner

NO_JITTER = RetryPolicy(attempts=3, backoff=1.0, backoff_max=30.0, jitter=False)


class Ledger:
    """Participants by task name that record every call and keep their effects idempotent."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self.effects: dict[str, str] = {}  # idempotency key -> step, while applied

    def act(self, ctx: dict[str, Any]) -> dict[str, Any]:
        step = StepContext.model_validate(ctx)
        self.calls.append((step.phase, step.step, step.attempt))
        self.effects.setdefault(step.idempotency_key, step.step)
        return {"step": step.step, "seen": sorted(step.results)}

    def undo(self, ctx: dict[str, Any]) -> dict[str, Any]:
        step = StepContext.model_validate(ctx)
        self.calls.append((step.phase, step.step, step.attempt))
        self.effects.pop(step.idempotency_key, None)
        return {"undone": step.step}

    def participants(self, *steps: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in steps:
            out[f"svc.{name}"] = self.act
            out[f"svc.undo_{name}"] = self.undo
        return out


def step(name: str, *, undo: bool = True, **kw: Any) -> Step:
    kw.setdefault("retry", NO_JITTER)
    kw.setdefault("compensation_retry", NO_JITTER)
    return Step(name, f"svc.{name}", f"svc.undo_{name}" if undo else None, **kw)


LINEAR = Saga("k_linear", [step("a"), step("b"), step("c")])
# Parallel roots, a join, the pivot, then a step that can only go forward.
GRAPH = Saga("k_graph", [
    step("left", depends_on=()),
    step("right", depends_on=()),
    step("join", depends_on=("left", "right")),
    step("pivot", undo=False, pivot=True, depends_on="join"),
    step("after", undo=False, depends_on="pivot"),
])


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
def runner(ledger: Ledger) -> Iterator[SagaRunner]:
    names = ("a", "b", "c", "left", "right", "join", "pivot", "after")
    with SagaRunner(LINEAR, GRAPH, participants=ledger.participants(*names)) as r:
        yield r


# --- the happy path and the step context --------------------------------------------------
def test_a_saga_completes_with_every_step_given_the_production_step_context(
    runner: SagaRunner, ledger: Ledger
):
    result = runner.run(LINEAR, {"order": 7})
    assert result.state is SagaState.COMPLETED
    assert result.step_states() == dict.fromkeys("abc", StepState.SUCCEEDED)
    assert result.results["c"] == {"step": "c", "seen": ["a", "b"]}
    assert result.history_tuples() == [
        (None, "PENDING", "RUNNING", 0),
        ("a", "PENDING", "RUNNING", 1), ("a", "RUNNING", "SUCCEEDED", 1),
        ("b", "PENDING", "RUNNING", 1), ("b", "RUNNING", "SUCCEEDED", 1),
        ("c", "PENDING", "RUNNING", 1), ("c", "RUNNING", "SUCCEEDED", 1),
        (None, "RUNNING", "COMPLETED", 0),
    ]
    assert result.elapsed == 0.0
    assert ledger.calls == [("action", "a", 1), ("action", "b", 1), ("action", "c", 1)]


def test_the_context_is_exactly_what_a_worker_receives():
    seen: list[dict[str, Any]] = []
    saga = Saga("k_ctx", [Step("only", "ctx.only", queue="q", time_limit=5)])
    with SagaRunner(saga, participants={"ctx.only": lambda ctx: seen.append(ctx)}) as r:
        result = r.run(saga, {"x": 1})
    (ctx,) = seen
    assert set(ctx) == {"saga_id", "saga", "step", "phase", "attempt", "version",
                        "idempotency_key", "after_pivot", "inline", "sent", "input", "results"}
    assert ctx["idempotency_key"] == f"{result.id}:only"
    assert (ctx["input"], ctx["results"], ctx["version"], ctx["attempt"]) == ({"x": 1}, {}, 1, 1)
    assert result.steps["only"].result == {}, "None is stored as {} (normalize_result)"


def test_celery_task_objects_run_as_their_plain_function():
    app = Celery("kit-own-tasks", set_as_current=False)

    @app.task(name="own.hello", shared=False)  # type: ignore[untyped-decorator]
    def hello(ctx: dict[str, Any]) -> dict[str, Any]:
        return {"hello": ctx["input"]["who"]}

    saga = Saga("k_tasks", [Step("hello", hello)])
    with SagaRunner(saga) as r:
        result = r.run(saga, {"who": "ada"})
    assert result.state is SagaState.COMPLETED
    assert result.results == {"hello": {"hello": "ada"}}


def test_a_step_given_by_name_needs_a_function():
    with pytest.raises(DefinitionError, match=r"svc\.a.*participants="):
        SagaRunner(LINEAR)


def test_a_fault_for_a_step_the_saga_lacks_is_refused(runner: SagaRunner):
    with pytest.raises(ValueError, match="no step 'nope'"):
        runner.run(LINEAR, {}, faults={"nope": Fault.business()})


# --- faults -------------------------------------------------------------------------------
def test_a_business_failure_is_not_retried_and_compensates_newest_first(
    runner: SagaRunner, ledger: Ledger
):
    result = runner.run(LINEAR, {}, faults={"c": Fault.business("card declined")})
    assert result.state is SagaState.COMPENSATED
    assert result.steps["c"].state is StepState.FAILED
    assert result.steps["c"].error == "BusinessError: card declined"
    assert result.steps["c"].calls == 1, "a refusal is final"
    assert result.moves("COMPENSATED") == ["b", "a"]
    assert ledger.effects == {}, "every applied effect was undone"


def test_a_transient_fault_is_retried_with_backoff_then_succeeds(runner: SagaRunner):
    result = runner.run(LINEAR, {}, faults={"b": Fault.transient(2)})
    assert result.state is SagaState.COMPLETED
    b = result.steps["b"]
    assert (b.attempts, b.calls) == (3, 3)
    assert result.step_history("b") == [
        ("PENDING", "RUNNING", 1), ("RUNNING", "RUNNING", 2), ("RUNNING", "RUNNING", 3),
        ("RUNNING", "SUCCEEDED", 3),
    ]
    # NO_JITTER: 1 s before the second attempt, 2 s before the third.
    assert [e.at for e in result.history if e.step == "b"] == [0.0, 0.0, 1.0, 3.0]
    assert result.elapsed == 3.0


def test_transient_faults_past_the_attempts_make_the_outcome_unknown_and_the_step_is_undone(
    runner: SagaRunner, ledger: Ledger
):
    result = runner.run(LINEAR, {}, faults={"b": Fault.transient(5)})
    assert result.state is SagaState.COMPENSATED
    b = result.steps["b"]
    assert b.calls == NO_JITTER.attempts
    assert b.error is not None and b.error.startswith("StepOutcomeUnknown: TransientError")
    assert b.state is StepState.COMPENSATED, "its effect may have committed: undone too"
    assert result.moves("COMPENSATED") == ["b", "a"]


def test_a_lost_worker_after_the_effect_fails_indefinitely_and_the_effect_is_undone(
    runner: SagaRunner, ledger: Ledger
):
    result = runner.run(LINEAR, {}, faults={"b": Fault.lost_worker_after_effect()})
    assert result.state is SagaState.COMPENSATED
    b = result.steps["b"]
    assert b.error is not None and b.error.startswith("WorkerLostError")
    assert (b.calls, b.compensation_calls, b.state) == (1, 1, StepState.COMPENSATED)
    assert ("b", "FAILED", "COMPENSATING", 1) in result.history_tuples()
    assert ledger.effects == {}, "the effect that happened before the loss was compensated"


def test_a_lost_worker_redelivered_runs_the_participant_again_with_the_same_key(
    ledger: Ledger,
):
    with SagaRunner(LINEAR, participants=ledger.participants("a", "b", "c"),
                    lost_worker_redeliveries=3) as r:
        result = r.run(LINEAR, {}, faults={"b": Fault.lost_worker_after_effect()})
    assert result.state is SagaState.COMPLETED
    assert result.steps["b"].calls == 2
    assert result.steps["b"].attempts == 1, "Celery's redelivery is not a saga retry"
    assert len(ledger.effects) == 3, "the second call found the first one's effect"
    assert result.elapsed == 1.0, "sent again after the worker-lost retry delay"


def test_a_compensation_that_fails_for_good_parks_the_saga(runner: SagaRunner):
    result = runner.run(LINEAR, {}, faults={"c": Fault.business(), "b": Fault.compensation_fails()})
    assert result.state is SagaState.COMPENSATION_FAILED
    assert result.error == "compensation failed for: b"
    b = result.steps["b"]
    assert b.state is StepState.COMPENSATION_FAILED
    assert b.compensation_calls == b.compensation_attempts == NO_JITTER.attempts
    assert b.error is not None and "InjectedFault" in b.error
    assert result.steps["a"].state is StepState.COMPENSATED, "the other compensations ran"


def test_an_operator_retry_resumes_a_parked_saga_once_the_fault_is_gone(runner: SagaRunner):
    parked = runner.run(LINEAR, {}, faults={"c": Fault.business(), "b": Fault.compensation_fails()})
    resumed = runner.retry(parked.id, faults={})
    assert resumed.state is SagaState.COMPENSATED
    assert resumed.steps["b"].state is StepState.COMPENSATED


def test_a_business_refusal_after_the_pivot_parks_the_saga_at_once(runner: SagaRunner):
    result = runner.run(GRAPH, {}, faults={"after": Fault.business("address unknown")})
    assert result.state is SagaState.FORWARD_FAILED
    assert result.steps["pivot"].state is StepState.SUCCEEDED
    after = result.steps["after"]
    assert (after.state, after.calls, after.attempts) == (StepState.FAILED, 1, 1)
    assert after.error == "RefusedAfterPivot: BusinessError: address unknown"
    assert result.error is not None and "refused for good after the pivot" in result.error
    assert result.moves("COMPENSATING") == []


def test_a_pivot_whose_outcome_never_becomes_known_is_reported_not_looped_forever(
    runner: SagaRunner,
):
    with pytest.raises(SagaDidNotSettle) as caught:
        runner.run(GRAPH, {}, faults={"pivot": Fault.transient(1000)}, max_deliveries=40)
    result = caught.value.result
    assert result is not None and result.state is SagaState.RUNNING
    assert result.steps["pivot"].state is StepState.RUNNING, "re-driven until it is known"


def test_a_fault_that_never_clears_after_the_pivot_parks_once_its_forward_budget_is_spent(
    runner: SagaRunner,
):
    result = runner.run(GRAPH, {}, faults={"after": Fault.transient(1000)})
    assert result.state is SagaState.FORWARD_FAILED
    after = result.steps["after"]
    # Its retry policy's 3 tries, then sent again forward_retries (10) times, one try each.
    assert after.calls == after.attempts == 3 + 10
    assert result.error is not None and "failed 11 times (forward_retries=10)" in result.error
    assert result.moves("COMPENSATING") == []
    resumed = runner.retry(result.id, faults={})
    assert resumed.state is SagaState.COMPLETED, "sagas retry sends it again"
    assert resumed.steps["after"].calls == 3 + 10 + 1


# --- the virtual clock ---------------------------------------------------------------------
def test_a_thirty_second_backoff_takes_no_real_time():
    slow_retry = RetryPolicy(attempts=2, backoff=30.0, jitter=False)
    saga = Saga("k_backoff", [Step("a", "svc.a", retry=slow_retry)])
    with SagaRunner(saga, participants={"svc.a": lambda ctx: {"ok": True}}) as r:
        began = time.monotonic()
        result = r.run(saga, {}, faults={"a": Fault.transient(1)})
        took = time.monotonic() - began
    assert result.state is SagaState.COMPLETED
    assert result.elapsed == 30.0
    assert took < 2.0


def test_the_store_is_written_with_virtual_times_and_the_wall_clock_is_given_back(
    runner: SagaRunner,
):
    result = runner.run(LINEAR, {}, faults={"a": Fault.slow(90)})
    view = runner.store.get_view(result.id)
    a = {s["name"]: s for s in view["steps"]}["a"]
    assert a["finished_at"] == runner.clock.now().isoformat()
    assert result.elapsed == 90.0
    assert sql.utcnow() < runner.clock.now(), "outside a run the store reads the wall clock"


def test_parallel_branches_take_the_longer_branchs_time_not_the_sum(runner: SagaRunner):
    result = runner.run(GRAPH, {}, faults={"left": Fault.slow(10), "right": Fault.slow(25)})
    assert result.state is SagaState.COMPLETED
    at = {e.step: e.at for e in result.history if e.to_state == "SUCCEEDED"}
    assert (at["left"], at["right"], at["join"]) == (10.0, 25.0, 25.0)
    assert result.elapsed == 25.0


def test_for_seconds_stops_the_run_part_way(runner: SagaRunner):
    saga_id = runner.start(LINEAR, {}, faults={"a": Fault.slow(60)})
    runner.drain(for_seconds=30)
    assert runner.result(saga_id).steps["a"].state is StepState.RUNNING
    assert runner.clock.elapsed == 30.0
    runner.drain()
    assert runner.result(saga_id).state is SagaState.COMPLETED


# --- time limits ----------------------------------------------------------------------------
def test_a_step_slower_than_its_time_limit_is_cut_off_and_compensated_without_retry(
    ledger: Ledger,
):
    saga = Saga("k_timed", [step("a"), step("slow", time_limit=10)])
    with SagaRunner(saga, participants=ledger.participants("a", "slow")) as r:
        result = r.run(saga, {}, faults={"slow": Fault.slow(60)})
    assert result.state is SagaState.COMPENSATED
    slow = result.steps["slow"]
    assert slow.error == "StepOutcomeUnknown: SoftTimeLimitExceeded: SoftTimeLimitExceeded()"
    assert (slow.calls, slow.attempts, slow.state) == (1, 1, StepState.COMPENSATED)
    assert ("action", "slow", 1) not in ledger.calls, "cut off before its effect"
    assert result.elapsed == 10.0, "the limit, not the 60 s the call would have taken"


def test_a_step_within_its_time_limit_just_takes_its_time(ledger: Ledger):
    saga = Saga("k_timed_ok", [step("slow", time_limit=10)])
    with SagaRunner(saga, participants=ledger.participants("slow")) as r:
        result = r.run(saga, {}, faults={"slow": Fault.slow(9)})
    assert (result.state, result.elapsed) == (SagaState.COMPLETED, 9.0)


def test_a_saga_past_its_own_deadline_is_compensated_by_the_reconciler(ledger: Ledger):
    saga = Saga("k_deadline", [step("a"), step("b")], deadline=60)
    with SagaRunner(saga, participants=ledger.participants("a", "b")) as r:
        result = r.run(saga, {}, faults={"b": Fault.slow(600)})
    assert result.state is SagaState.COMPENSATED
    assert result.error == "saga deadline passed"
    # b (no time limit) made no progress within STEP_TIMEOUT (300 s): in a saga called off it
    # is not sent forward again but undone, in case it ran; beat's next run is at 305 s.
    assert result.step_history("b")[-3:] == [
        ("RUNNING", "FAILED", 1), ("FAILED", "COMPENSATING", 1),
        ("COMPENSATING", "COMPENSATED", 1),
    ]
    assert result.elapsed == 305.0
    assert result.steps["b"].calls == 1, "never sent again"


def test_a_participant_that_really_overruns_its_time_limit_gets_the_same_outcome():
    saga = Saga("k_wall", [Step("a", "svc.a", time_limit=0.05, retry=NO_JITTER)])
    with SagaRunner(saga, participants={"svc.a": lambda ctx: time.sleep(0.1)}) as r:
        result = r.run(saga, {})
    assert result.state is SagaState.COMPENSATED
    assert result.steps["a"].error == (
        "StepOutcomeUnknown: SoftTimeLimitExceeded: SoftTimeLimitExceeded()"
    )
    assert result.steps["a"].calls == 1, "a time limit is not retried"


def test_a_saga_deadline_does_not_turn_back_a_pivot_in_flight():
    saga = Saga("k_pivot_deadline", [step("a"), step("p", undo=False, pivot=True)], deadline=60)
    ledger = Ledger()
    with SagaRunner(saga, participants=ledger.participants("a", "p")) as r:
        result = r.run(saga, {}, faults={"p": Fault.slow(1000, times=1)}, max_deliveries=20)
    assert result.state is SagaState.COMPLETED
    assert result.moves("COMPENSATING") == []
    # Its stall deadline (the 300 s step timeout) passed first: re-driven, it went through.
    assert result.step_history("p")[-2:] == [
        ("RUNNING", "RUNNING", 2), ("RUNNING", "SUCCEEDED", 2),
    ]
    assert result.elapsed == 305.0


# --- a graph with a join and a pivot -------------------------------------------------------
def test_the_join_runs_once_after_both_parallel_roots(runner: SagaRunner, ledger: Ledger):
    result = runner.run(GRAPH, {})
    assert result.state is SagaState.COMPLETED
    assert [c for c in ledger.calls if c[1] == "join"] == [("action", "join", 1)]
    assert result.results["join"]["seen"] == ["left", "right"]
    assert result.results["after"]["seen"] == ["join", "left", "pivot", "right"]


def test_a_failure_before_the_pivot_compensates_both_branches(runner: SagaRunner):
    result = runner.run(GRAPH, {}, faults={"join": Fault.business("no")})
    assert result.state is SagaState.COMPENSATED
    assert result.step_states() == {
        "left": StepState.COMPENSATED, "right": StepState.COMPENSATED,
        "join": StepState.FAILED, "pivot": StepState.SKIPPED, "after": StepState.SKIPPED,
    }
    assert sorted(result.moves("COMPENSATED")) == ["left", "right"]


def test_a_failure_after_the_pivot_is_retried_forward_never_compensated(runner: SagaRunner):
    result = runner.run(GRAPH, {}, faults={"after": Fault.transient(4)})
    assert result.state is SagaState.COMPLETED
    assert result.moves("COMPENSATING") == []
    assert ("after", "FAILED", "RUNNING", 4) in result.history_tuples()
    assert result.steps["after"].calls == 5


def test_the_pivots_unknown_outcome_waits_for_the_reconciler_then_goes_forward(
    runner: SagaRunner,
):
    result = runner.run(GRAPH, {}, faults={"pivot": Fault.transient(3)})
    assert result.state is SagaState.COMPLETED
    pivot = result.step_history("pivot")
    assert ("RUNNING", "RUNNING", 4) in pivot and pivot[-1] == ("RUNNING", "SUCCEEDED", 4)
    redrive = next(e for e in result.history if e.error == "re-driven by recovery")
    # Left RUNNING with the default step timeout (300 s) as its stall deadline; beat's next
    # run after it (every 5 s) re-drove the pivot with the same idempotency key.
    assert 300.0 < redrive.at <= 310.0
    assert result.moves("COMPENSATING") == []


def test_the_pivot_timed_out_stays_running_and_is_re_driven():
    calls: list[int] = []
    saga = Saga("k_pivot_timed", [
        Step("pivot", "svc.pivot", pivot=True, time_limit=20, retry=NO_JITTER),
    ])
    with SagaRunner(saga, participants={"svc.pivot": lambda ctx: calls.append(1)}) as r:
        result = r.run(saga, {}, faults={"pivot": Fault.slow(30, times=1)})
    assert result.state is SagaState.COMPLETED
    assert result.step_history("pivot")[-2:] == [
        ("RUNNING", "RUNNING", 2), ("RUNNING", "SUCCEEDED", 2),
    ]
    assert len(calls) == 1, "the cut-off call never reached the participant"


# --- no broker, no Redis --------------------------------------------------------------------
def test_it_needs_no_broker_no_redis_and_no_network(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")  # the discard port: closed

    def no_network(*_: Any, **__: Any) -> None:
        raise AssertionError("the in-process runner opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with SagaRunner(GRAPH, participants=ledger.participants(
            "left", "right", "join", "pivot", "after")) as r:
        ok = r.run(GRAPH, {})
        failed = r.run(GRAPH, {}, faults={"right": Fault.business(BusinessError("out"))})
    assert ok.state is SagaState.COMPLETED
    assert failed.state is SagaState.COMPENSATED
