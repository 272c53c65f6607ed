"""Whole saga scenarios driven through ``coordinator.decide`` on in-memory snapshots."""

from __future__ import annotations

import copy

import pytest

from sagas.coordinator import (
    ACTION,
    COMPENSATION,
    CancelRequested,
    Dispatch,
    Redrive,
    RetryRequested,
    Revoke,
    Started,
    StepFailed,
    StepRetrying,
    StepSucceeded,
)
from sagas.errors import SagaStateError
from sagas.states import SagaState, StepState
from tests.unit.harness import Run, make_saga, step

S = StepState


def linear(n: int = 3) -> Run:
    names = "abcdefgh"[:n]
    return Run(make_saga(*(step(name) for name in names)))


def diamond() -> Run:
    """a -> (b, c) -> d"""
    return Run(make_saga(
        step("a"), step("b"), step("c", depends_on=["a"]), step("d", depends_on=["b", "c"]),
    ))


def with_pivot() -> Run:
    """a -> pay (pivot) -> ship -> notify"""
    return Run(make_saga(
        step("a"), step("pay", pivot=True), step("ship", comp=False), step("notify", comp=False),
    ))


# --- happy path ---------------------------------------------------------------------------------
def test_starting_a_saga_dispatches_only_its_root_steps():
    run = linear()
    decision = run.start()
    assert run.state == SagaState.RUNNING
    assert decision.dispatches == [Dispatch("a", ACTION, 1)]
    assert run.states() == {"a": S.RUNNING, "b": S.PENDING, "c": S.PENDING}


def test_linear_saga_dispatches_each_step_after_its_parent_succeeds_and_then_completes():
    run = linear()
    run.start()
    assert run.succeed("a", result={"n": 1}).dispatches == [Dispatch("b", ACTION, 1)]
    assert run.state == SagaState.RUNNING
    assert run.succeed("b", result={"n": 2}).dispatches == [Dispatch("c", ACTION, 1)]
    last = run.succeed("c", result={"n": 3})
    assert last.dispatches == []
    assert run.state == SagaState.COMPLETED
    assert run.dispatched() == ["a", "b", "c"]
    assert run.saga_path() == [SagaState.RUNNING, SagaState.COMPLETED]
    assert all(state == S.SUCCEEDED for state in run.states().values())
    assert run.snap.results() == {"a": {"n": 1}, "b": {"n": 2}, "c": {"n": 3}}
    assert run.snap.error is None


def test_every_step_goes_pending_running_succeeded_on_the_happy_path():
    run = linear()
    run.start()
    for name in "abc":
        run.succeed(name)
    for name in "abc":
        assert run.step_path(name) == [S.RUNNING, S.SUCCEEDED]


def test_independent_roots_are_dispatched_together():
    run = Run(make_saga(step("a"), step("b", depends_on=[]), step("c", depends_on=["a", "b"])))
    assert [d.step for d in run.start().dispatches] == ["a", "b"]


# --- rollback -------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_failure_of_step_k_compensates_the_earlier_succeeded_steps_newest_first(k):
    run = linear(4)
    names = list("abcd")
    run.start()
    for name in names[: k - 1]:
        run.succeed(name)
    failing = names[k - 1]
    run.fail(failing, error="card declined")
    assert run.snap.error == f"step {failing!r} failed: card declined"
    # Undo one compensation at a time, exactly as they are dispatched.
    undone = 0
    while run.state == SagaState.COMPENSATING:
        pending = run.dispatched(COMPENSATION)[undone:]
        assert len(pending) == 1, "a linear saga compensates one step at a time"
        run.undo(pending[0])
        undone += 1
    expected = list(reversed(names[: k - 1]))
    assert run.entered(S.COMPENSATING) == expected
    assert run.entered(S.COMPENSATED) == expected
    assert run.state == SagaState.COMPENSATED
    assert run.step_state(failing) == S.FAILED
    assert run.dispatched(COMPENSATION) == expected
    for name in names[k:]:
        assert run.step_path(name) == [S.SKIPPED]
    assert run.dispatched(ACTION) == names[:k]


def test_a_step_that_refused_for_sure_is_never_compensated():
    run = linear()
    run.start()
    run.succeed("a")
    run.fail("b")
    run.undo("a")
    assert run.state == SagaState.COMPENSATED
    assert "b" not in run.dispatched(COMPENSATION)


def test_a_step_whose_failure_hides_its_outcome_is_compensated_before_its_parents():
    run = linear()
    run.start()
    run.succeed("a")
    decision = run.fail("b", error="StepOutcomeUnknown: timeout after commit", definite=False)
    # Its effect may have committed: undo it first; its parent waits for that.
    assert decision.dispatches == [Dispatch("b", COMPENSATION, 1)]
    assert run.step_path("b") == [S.RUNNING, S.FAILED, S.COMPENSATING]
    assert run.step_state("a") == S.SUCCEEDED
    assert run.undo("b").dispatches == [Dispatch("a", COMPENSATION, 1)]
    run.undo("a")
    assert run.state == SagaState.COMPENSATED
    assert run.entered(S.COMPENSATED) == ["b", "a"]
    assert run.step_path("c") == [S.SKIPPED]


def test_an_uncertain_failure_of_a_step_without_compensation_just_fails_it():
    run = Run(make_saga(step("a"), step("b", comp=False), step("c")))
    run.start()
    run.succeed("a")
    run.fail("b", definite=False)
    assert run.step_state("b") == S.FAILED
    assert run.dispatched(COMPENSATION) == ["a"]


def test_compensation_of_a_step_waits_until_the_step_after_it_is_compensated():
    run = linear()
    run.start()
    run.succeed("a")
    run.succeed("b")
    decision = run.fail("c")
    assert decision.dispatches == [Dispatch("b", COMPENSATION, 1)]
    assert run.step_state("a") == S.SUCCEEDED
    assert run.undo("b").dispatches == [Dispatch("a", COMPENSATION, 1)]


def test_step_without_compensation_is_skipped_in_rollback_and_its_parent_still_compensates():
    run = Run(make_saga(step("a"), step("b", comp=False), step("c")))
    run.start()
    run.succeed("a")
    run.succeed("b")
    decision = run.fail("c")
    assert run.step_path("b") == [S.RUNNING, S.SUCCEEDED, S.SKIPPED]
    assert decision.dispatches == [Dispatch("a", COMPENSATION, 1)]
    run.undo("a")
    assert run.state == SagaState.COMPENSATED
    assert run.dispatched(COMPENSATION) == ["a"]


def test_saga_whose_first_step_fails_is_compensated_at_once_with_nothing_to_undo():
    run = linear()
    run.start()
    decision = run.fail("a")
    assert run.state == SagaState.COMPENSATED
    assert decision.dispatches == []
    assert run.saga_path() == [SagaState.RUNNING, SagaState.COMPENSATING, SagaState.COMPENSATED]


# --- joins and parallel branches ----------------------------------------------------------------
def test_join_step_is_dispatched_once_after_all_parents_succeed():
    run = diamond()
    run.start()
    assert [d.step for d in run.succeed("a").dispatches] == ["b", "c"]
    assert run.succeed("b").dispatches == []
    assert run.step_state("d") == S.PENDING
    assert run.succeed("c").dispatches == [Dispatch("d", ACTION, 1)]
    for duplicate in ("b", "c", "b", "a"):
        decision = run.succeed(duplicate)
        assert decision.ignored
        assert decision.transitions == [] and decision.dispatches == []
    assert run.dispatched().count("d") == 1
    run.succeed("d")
    assert run.state == SagaState.COMPLETED


def test_failure_in_one_branch_compensates_the_running_sibling_only_after_it_succeeds():
    run = diamond()
    run.start()
    run.succeed("a")
    decision = run.fail("b")
    assert run.state == SagaState.COMPENSATING
    assert decision.dispatches == [], "a waits: its child c is still running"
    assert run.step_state("d") == S.SKIPPED
    assert run.step_state("a") == S.SUCCEEDED

    decision = run.succeed("c")
    assert decision.dispatches == [Dispatch("c", COMPENSATION, 1)]
    assert run.step_state("a") == S.SUCCEEDED

    decision = run.undo("c")
    assert decision.dispatches == [Dispatch("a", COMPENSATION, 1)]
    run.undo("a")
    assert run.state == SagaState.COMPENSATED
    assert run.entered(S.COMPENSATING) == ["c", "a"]
    assert "d" not in run.dispatched(ACTION)


def test_when_both_branches_fail_their_parent_compensates_after_the_second_failure():
    run = diamond()
    run.start()
    run.succeed("a")
    run.fail("b")
    assert run.fail("c").dispatches == [Dispatch("a", COMPENSATION, 1)]
    run.undo("a")
    assert run.state == SagaState.COMPENSATED
    assert run.states() == {"a": S.COMPENSATED, "b": S.FAILED, "c": S.FAILED, "d": S.SKIPPED}


# --- failing compensations and operator retry -----------------------------------------------------
def park_with_failed_compensation() -> Run:
    run = linear()
    run.start()
    run.succeed("a")
    run.succeed("b")
    run.fail("c")
    return run


def test_failing_compensation_still_lets_the_others_run_and_parks_the_saga():
    run = park_with_failed_compensation()
    decision = run.fail("b", COMPENSATION, error="refund service down")
    assert run.step_state("b") == S.COMPENSATION_FAILED
    assert run.snap.steps["b"].error == "refund service down"
    assert decision.dispatches == [Dispatch("a", COMPENSATION, 1)]
    assert run.state == SagaState.COMPENSATING

    run.undo("a")
    assert run.step_state("a") == S.COMPENSATED
    assert run.state == SagaState.COMPENSATION_FAILED
    assert run.snap.error == "compensation failed for: b"
    assert run.transitions[-1].step is None
    assert run.transitions[-1].error == "compensation failed for: b"


def test_operator_retry_of_a_parked_saga_redispatches_only_the_failed_compensation():
    run = park_with_failed_compensation()
    run.fail("b", COMPENSATION)
    run.undo("a")
    decision = run.send(RetryRequested())
    assert run.state == SagaState.COMPENSATING
    assert decision.dispatches == [Dispatch("b", COMPENSATION, 2)]
    assert run.step_state("b") == S.COMPENSATING
    assert run.snap.steps["b"].compensation_attempts == 2
    run.undo("b")
    assert run.state == SagaState.COMPENSATED
    assert run.saga_path()[-3:] == [
        SagaState.COMPENSATION_FAILED, SagaState.COMPENSATING, SagaState.COMPENSATED,
    ]


def test_retry_of_a_completed_saga_is_refused():
    run = linear(1)
    run.start()
    run.succeed("a")
    with pytest.raises(SagaStateError, match="nothing to retry"):
        run.send(RetryRequested())


# --- pivot ---------------------------------------------------------------------------------------
def test_failure_after_the_pivot_is_retried_forward_instead_of_compensating():
    run = with_pivot()
    run.start()
    run.succeed("a")
    run.succeed("pay")
    decision = run.fail("ship", error="courier timeout")
    assert run.state == SagaState.RUNNING
    assert [(t.from_state, t.to_state, t.attempt) for t in decision.transitions] == [
        (S.RUNNING, S.FAILED, 1), (S.FAILED, S.RUNNING, 2),
    ]
    assert len(decision.dispatches) == 1
    retry = decision.dispatches[0]
    assert (retry.step, retry.phase, retry.attempt) == ("ship", ACTION, 2)
    assert retry.countdown > 0
    assert run.snap.steps["ship"].error == "courier timeout"
    assert run.dispatched(COMPENSATION) == []
    assert S.COMPENSATING not in [t.to_state for t in run.transitions]


def test_forward_retries_keep_going_with_capped_backoff_until_the_step_succeeds():
    run = with_pivot()
    run.start()
    run.succeed("a")
    run.succeed("pay")
    countdowns = [run.fail("ship").dispatches[0].countdown for _ in range(6)]
    assert countdowns == sorted(countdowns)
    assert max(countdowns) == 4.0  # the step's backoff_max
    assert run.snap.steps["ship"].attempts == 7
    run.succeed("ship")
    run.succeed("notify")
    assert run.state == SagaState.COMPLETED


def test_failure_of_the_pivot_itself_compensates_the_steps_before_it():
    run = with_pivot()
    run.start()
    run.succeed("a")
    decision = run.fail("pay")
    assert run.state == SagaState.COMPENSATING
    assert decision.dispatches == [Dispatch("a", COMPENSATION, 1)]
    assert run.states()["ship"] == S.SKIPPED


def test_branch_beside_the_pivot_that_fails_once_the_pivot_succeeded_is_retried_forward():
    run = Run(make_saga(
        step("a"), step("pay", pivot=True), step("side", depends_on=["a"]),
    ))
    run.start()
    run.succeed("a")
    run.succeed("pay")
    decision = run.fail("side")
    assert run.state == SagaState.RUNNING
    assert [(d.step, d.attempt) for d in decision.dispatches] == [("side", 2)]


def test_pivot_that_succeeds_during_a_rollback_is_rolled_back_with_its_unstarted_children():
    run = Run(make_saga(
        step("a"), step("pay", pivot=True), step("ship", comp=False),
        step("side", depends_on=["a"]),
    ))
    run.start()
    run.succeed("a")
    run.fail("side")
    assert run.state == SagaState.COMPENSATING
    decision = run.succeed("pay")
    assert run.step_state("ship") == S.SKIPPED
    assert decision.dispatches == [Dispatch("pay", COMPENSATION, 1)]


# --- duplicate and late events -----------------------------------------------------------------
def _assert_ignored(run: Run, event) -> None:
    before = copy.deepcopy(run.snap)
    decision = run.send(event)
    assert decision.ignored
    assert decision.transitions == []
    assert decision.dispatches == []
    assert not decision.changed
    assert run.snap == before


def test_success_for_a_step_that_already_succeeded_is_ignored():
    run = linear()
    run.start()
    run.succeed("a")
    _assert_ignored(run, StepSucceeded("a", ACTION, {"late": True}))
    assert run.snap.steps["a"].result is None


def test_failure_for_a_step_that_already_failed_is_ignored():
    run = diamond()
    run.start()
    run.succeed("a")
    run.fail("b")
    _assert_ignored(run, StepFailed("b", ACTION, "again"))


def test_late_failure_for_a_step_that_succeeded_is_ignored():
    run = linear()
    run.start()
    run.succeed("a")
    _assert_ignored(run, StepFailed("a", ACTION, "late"))
    assert run.state == SagaState.RUNNING


@pytest.mark.parametrize(
    "event",
    [
        StepSucceeded("ghost", ACTION),
        StepFailed("ghost", ACTION, "x"),
        StepSucceeded("ghost", COMPENSATION),
        StepFailed("ghost", COMPENSATION, "x"),
        StepRetrying("ghost", ACTION, 2, "x"),
    ],
    ids=lambda e: type(e).__name__ + "-" + e.phase,
)
def test_event_for_an_unknown_step_is_ignored(event):
    run = linear()
    run.start()
    _assert_ignored(run, event)


def test_event_for_a_step_that_was_never_dispatched_is_ignored():
    run = linear()
    run.start()
    _assert_ignored(run, StepSucceeded("c", ACTION))
    _assert_ignored(run, StepFailed("c", ACTION, "x"))


def test_compensation_events_for_a_step_that_is_not_compensating_are_ignored():
    run = park_with_failed_compensation()
    _assert_ignored(run, StepSucceeded("a", COMPENSATION))
    run.undo("b")
    _assert_ignored(run, StepSucceeded("b", COMPENSATION))
    _assert_ignored(run, StepFailed("b", COMPENSATION, "late"))


def test_starting_a_saga_twice_is_ignored():
    run = linear()
    run.start()
    _assert_ignored(run, Started())


def test_any_event_after_completion_is_ignored():
    run = linear(2)
    run.start()
    run.succeed("a")
    run.succeed("b")
    for event in (StepSucceeded("b", ACTION), StepFailed("b", ACTION, "x"), Started(),
                  StepRetrying("a", ACTION, 5, "x"), Redrive()):
        _assert_ignored(run, event)
    assert run.state == SagaState.COMPLETED


# --- in-worker retries ----------------------------------------------------------------------
def test_step_retrying_records_the_new_attempt_once_and_ignores_a_duplicate():
    run = linear()
    run.start()
    decision = run.send(StepRetrying("a", ACTION, 2, "TimeoutError"))
    assert [(t.from_state, t.to_state, t.attempt) for t in decision.transitions] == [
        (S.RUNNING, S.RUNNING, 2),
    ]
    assert decision.dispatches == [], "the worker retries the task itself"
    assert run.snap.steps["a"].attempts == 2
    assert run.snap.steps["a"].error == "TimeoutError"
    _assert_ignored(run, StepRetrying("a", ACTION, 2, "TimeoutError"))
    _assert_ignored(run, StepRetrying("a", ACTION, 1, "stale"))
    assert run.snap.steps["a"].attempts == 2


def test_compensation_retrying_counts_compensation_attempts_separately():
    run = park_with_failed_compensation()
    run.send(StepRetrying("b", COMPENSATION, 2, "503"))
    step_b = run.snap.steps["b"]
    assert (step_b.attempts, step_b.compensation_attempts) == (1, 2)
    _assert_ignored(run, StepRetrying("b", ACTION, 2, "wrong phase"))


def test_step_retrying_for_a_step_that_is_no_longer_running_is_ignored():
    run = linear()
    run.start()
    run.succeed("a")
    _assert_ignored(run, StepRetrying("a", ACTION, 2, "late"))


# --- operator cancel ----------------------------------------------------------------------------
def test_cancel_of_a_running_saga_compensates_what_succeeded_once_running_steps_settle():
    run = linear()
    run.start()
    run.succeed("a")
    decision = run.send(CancelRequested("customer changed their mind"))
    assert run.state == SagaState.COMPENSATING
    assert run.snap.error == "customer changed their mind"
    assert run.step_state("c") == S.SKIPPED
    assert decision.dispatches == [], "a waits for the running b"
    assert run.succeed("b").dispatches == [Dispatch("b", COMPENSATION, 1)]
    assert run.undo("b").dispatches == [Dispatch("a", COMPENSATION, 1)]
    run.undo("a")
    assert run.state == SagaState.COMPENSATED


def test_cancel_of_a_pending_saga_skips_every_step_and_is_compensated_at_once():
    run = linear()
    run.send(CancelRequested())
    assert run.state == SagaState.COMPENSATED
    assert set(run.states().values()) == {S.SKIPPED}
    assert run.dispatches == []


def test_cancel_after_the_pivot_succeeded_is_refused_and_changes_nothing():
    run = with_pivot()
    run.start()
    run.succeed("a")
    run.succeed("pay")
    before = copy.deepcopy(run.snap)
    with pytest.raises(SagaStateError, match="passed its pivot step 'pay'"):
        run.send(CancelRequested())
    assert run.snap == before


def test_cancel_before_the_pivot_succeeded_is_accepted():
    run = with_pivot()
    run.start()
    run.succeed("a")
    run.send(CancelRequested())
    assert run.state == SagaState.COMPENSATING


def test_cancel_of_a_compensating_saga_is_ignored():
    run = park_with_failed_compensation()
    _assert_ignored(run, CancelRequested())


@pytest.mark.parametrize("finish", ["complete", "compensate"])
def test_cancel_of_a_finished_saga_is_refused(finish):
    run = linear(1)
    run.start()
    if finish == "complete":
        run.succeed("a")
    else:
        run.fail("a")
    with pytest.raises(SagaStateError, match="only a running saga cancels"):
        run.send(CancelRequested())


# --- recovery re-drive -----------------------------------------------------------------------
def test_redrive_republishes_running_steps_under_a_new_attempt():
    run = diamond()
    run.start()
    run.succeed("a")
    run.succeed("b")
    decision = run.send(Redrive())
    assert decision.dispatches == [Dispatch("c", ACTION, 2)]
    assert run.snap.steps["c"].error is None, "a re-drive is not the step's error"


def test_redrive_of_a_compensating_step_republishes_its_compensation():
    run = park_with_failed_compensation()
    assert run.send(Redrive(("b",))).dispatches == [Dispatch("b", COMPENSATION, 2)]


def test_redrive_with_nothing_in_flight_is_ignored():
    run = park_with_failed_compensation()
    run.undo("b")
    run.undo("a")
    _assert_ignored(run, Redrive())


def test_retry_request_on_a_pending_saga_starts_it():
    run = linear()
    decision = run.send(RetryRequested())
    assert run.state == SagaState.RUNNING
    assert decision.dispatches == [Dispatch("a", ACTION, 1)]


# --- issue 15: holds, backoff counters, called-off actions, credit, the forward budget ----------
def test_a_redrive_holds_a_step_whose_message_still_waits_and_sends_nothing():
    run = diamond()
    run.start()
    run.succeed("a")
    decision = run.send(Redrive(queued=("b",)))
    assert decision.dispatches == [Dispatch("c", ACTION, 2)], "c was lost: sent again"
    held = [t for t in decision.transitions if t.step == "b"]
    assert [(t.from_state, t.to_state, t.attempt, t.keeps_error) for t in held] == [
        (S.RUNNING, S.RUNNING, 1, True)], "a note: no new attempt"
    b, c = run.snap.steps["b"], run.snap.steps["c"]
    assert (b.redrives, b.held, c.redrives, c.held) == (1, True, 1, False)
    assert b.error is None, "a hold is not the step's error"
    run.send(Redrive(queued=("b",)))
    assert run.snap.steps["b"].redrives == 2, "each look without progress counts"
    run.succeed("b")
    assert (run.snap.steps["b"].redrives, run.snap.steps["b"].held) == (0, False)


def test_an_operator_retry_of_a_stalled_saga_sends_its_work_again_whatever_waits():
    run = diamond()
    run.start()
    run.succeed("a")
    decision = run.send(RetryRequested())
    assert sorted((d.step, d.attempt) for d in decision.dispatches) == [("b", 2), ("c", 2)]


def test_cancel_revokes_the_actions_in_flight_but_never_the_pivot():
    run = Run(make_saga(step("a"), step("b", depends_on=[]), step("pay", pivot=True,
                                                                 depends_on=[])))
    run.start()
    run.send(Redrive(("b",)))  # b now has two deliveries
    decision = run.send(CancelRequested())
    assert decision.revokes == [Revoke("a", 1), Revoke("b", 2)]
    assert run.state == SagaState.COMPENSATING


def test_a_revoked_action_is_compensated_since_another_delivery_may_have_run():
    run = linear()
    run.start()
    run.succeed("a")
    run.send(CancelRequested())
    decision = run.send(StepFailed("b", ACTION, "ActionRevoked: never run", definite=False,
                                   attempt=1))
    assert decision.dispatches == [Dispatch("b", COMPENSATION, 1)]
    run.undo("b")
    assert run.dispatched(COMPENSATION) == ["b", "a"]


def test_an_action_stalled_in_a_called_off_saga_is_undone_not_sent_again():
    run = linear()
    run.start()
    run.succeed("a")
    run.send(CancelRequested())
    decision = run.send(Redrive())
    assert decision.dispatches == [Dispatch("b", COMPENSATION, 1)]
    assert run.step_path("b")[-2:] == [S.FAILED, S.COMPENSATING]


def test_a_failure_names_the_delivery_it_came_from_and_history_credits_that_one():
    run = linear()
    run.start()
    run.send(Redrive())  # a: do.1 in flight, then do.2
    decision = run.send(StepFailed("a", ACTION, "boom", attempt=1))
    (failed,) = [t for t in decision.transitions if t.to_state == S.FAILED]
    assert failed.attempt == 1, "do.1 failed, not the re-driven do.2"
    again = linear()
    again.start()
    again.send(StepRetrying("a", ACTION, 2, "transient"))  # a Celery retry of do.1
    decision = again.send(StepFailed("a", ACTION, "boom", attempt=1))
    (failed,) = [t for t in decision.transitions if t.to_state == S.FAILED]
    assert failed.attempt == 2, "the same message's last try is the one that failed"


def test_a_business_refusal_after_the_pivot_parks_the_saga_forward_failed():
    run = with_pivot()
    run.start()
    run.succeed("a")
    run.succeed("pay")
    decision = run.send(StepFailed("ship", ACTION, "RefusedAfterPivot: no address",
                                   business=True))
    assert run.state == SagaState.FORWARD_FAILED
    assert decision.dispatches == []
    assert run.snap.error is not None and "refused for good after the pivot" in run.snap.error
    with pytest.raises(SagaStateError, match=r"FORWARD_FAILED.*can only go forward"):
        run.send(CancelRequested())
    decision = run.send(RetryRequested())
    assert run.state == SagaState.RUNNING
    assert decision.dispatches == [Dispatch("ship", ACTION, 2)]
    run.succeed("ship")
    run.succeed("notify")
    assert run.state == SagaState.COMPLETED


def test_after_the_pivot_a_failing_step_is_sent_again_forward_retries_times_then_parks():
    run = Run(make_saga(step("a"), step("pay", pivot=True), step("ship", comp=False,
                                                                  forward_retries=2)))
    run.start()
    run.succeed("a")
    run.succeed("pay")
    assert len(run.fail("ship").dispatches) == 1
    assert len(run.fail("ship").dispatches) == 1
    decision = run.fail("ship")
    assert decision.dispatches == [] and run.state == SagaState.FORWARD_FAILED
    assert run.snap.error is not None and "failed 3 times (forward_retries=2)" in run.snap.error
    run.send(RetryRequested())  # a fresh budget
    assert run.snap.steps["ship"].failures == 0
    assert len(run.fail("ship").dispatches) == 1
    assert len(run.fail("ship").dispatches) == 1
    assert run.fail("ship").dispatches == [] and run.state == SagaState.FORWARD_FAILED


def test_a_parked_roll_forward_retry_also_resends_a_branch_still_in_flight():
    run = Run(make_saga(step("a"), step("pay", pivot=True), step("x", comp=False),
                        step("y", comp=False, depends_on=["pay"], forward_retries=0)))
    run.start()
    run.succeed("a")
    run.succeed("pay")
    run.fail("y")
    assert run.state == SagaState.FORWARD_FAILED
    decision = run.send(RetryRequested())
    assert sorted((d.step, d.attempt) for d in decision.dispatches) == [("x", 2), ("y", 2)]


def test_a_compensation_that_fails_after_its_retries_credits_its_last_try():
    again = linear()
    again.start()
    again.succeed("a")
    again.fail("b")
    again.send(StepRetrying("a", COMPENSATION, 2, "x"))  # a Celery retry of undo.1
    decision = again.send(StepFailed("a", COMPENSATION, "boom", attempt=1))
    (failed_undo,) = [t for t in decision.transitions
                      if t.step == "a" and t.to_state == S.COMPENSATION_FAILED]
    assert failed_undo.attempt == 2, "undo.1's last try, not its first"
