"""The saga and step state machines: the tables are the only source of allowed moves."""

from __future__ import annotations

import itertools

import pytest

from sagas.errors import InvalidTransitionError
from sagas.states import (
    SAGA_SETTLED,
    SAGA_TERMINAL,
    SAGA_TRANSITIONS,
    STEP_ROLLED_BACK,
    STEP_TRANSITIONS,
    SagaState,
    StepState,
    can_transition_saga,
    can_transition_step,
    check_saga_transition,
    check_step_transition,
)

SAGA_PAIRS = list(itertools.product(SagaState, SagaState))
STEP_PAIRS = list(itertools.product(StepState, StepState))


def _id(pair: tuple[object, object]) -> str:
    return f"{pair[0]}->{pair[1]}"


# --- tables are complete -----------------------------------------------------------------
def test_every_saga_state_is_a_key_of_the_saga_table():
    assert set(SAGA_TRANSITIONS) == set(SagaState)


def test_every_step_state_is_a_key_of_the_step_table():
    assert set(STEP_TRANSITIONS) == set(StepState)


def test_saga_table_targets_are_saga_states():
    for targets in SAGA_TRANSITIONS.values():
        assert targets <= set(SagaState)


def test_step_table_targets_are_step_states():
    for targets in STEP_TRANSITIONS.values():
        assert targets <= set(StepState)


# --- every pair agrees with the table -------------------------------------------------------
@pytest.mark.parametrize("pair", SAGA_PAIRS, ids=[_id(p) for p in SAGA_PAIRS])
def test_saga_transition_is_allowed_exactly_when_the_table_lists_it(pair):
    current, target = pair
    allowed = target in SAGA_TRANSITIONS[current]
    assert can_transition_saga(current, target) is allowed
    if allowed:
        check_saga_transition(current, target)
    else:
        with pytest.raises(InvalidTransitionError, match=f"from {current} to {target}"):
            check_saga_transition(current, target)


@pytest.mark.parametrize("pair", STEP_PAIRS, ids=[_id(p) for p in STEP_PAIRS])
def test_step_transition_is_allowed_exactly_when_the_table_lists_it(pair):
    current, target = pair
    allowed = target in STEP_TRANSITIONS[current]
    assert can_transition_step(current, target) is allowed
    if allowed:
        check_step_transition("pay", current, target)
    else:
        with pytest.raises(InvalidTransitionError, match=f"'pay' cannot go from {current}"):
            check_step_transition("pay", current, target)


# --- the moves the engine relies on ----------------------------------------------------------
@pytest.mark.parametrize(
    ("current", "target"),
    [
        (SagaState.PENDING, SagaState.RUNNING),
        (SagaState.PENDING, SagaState.COMPENSATING),
        (SagaState.RUNNING, SagaState.COMPLETED),
        (SagaState.RUNNING, SagaState.COMPENSATING),
        (SagaState.COMPENSATING, SagaState.COMPENSATED),
        (SagaState.COMPENSATING, SagaState.COMPENSATION_FAILED),
        (SagaState.COMPENSATION_FAILED, SagaState.COMPENSATING),
        (SagaState.RUNNING, SagaState.FORWARD_FAILED),
        (SagaState.FORWARD_FAILED, SagaState.RUNNING),
    ],
)
def test_saga_lifecycle_moves_are_allowed(current, target):
    check_saga_transition(current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (SagaState.RUNNING, SagaState.COMPENSATED),
        (SagaState.RUNNING, SagaState.PENDING),
        (SagaState.COMPENSATING, SagaState.RUNNING),
        (SagaState.COMPENSATING, SagaState.COMPLETED),
        (SagaState.PENDING, SagaState.COMPLETED),
        (SagaState.COMPENSATION_FAILED, SagaState.COMPENSATED),
        (SagaState.RUNNING, SagaState.RUNNING),
        (SagaState.COMPENSATING, SagaState.FORWARD_FAILED),
        (SagaState.FORWARD_FAILED, SagaState.COMPENSATING),
        (SagaState.FORWARD_FAILED, SagaState.COMPLETED),
    ],
)
def test_saga_shortcuts_are_refused(current, target):
    with pytest.raises(InvalidTransitionError):
        check_saga_transition(current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (StepState.PENDING, StepState.RUNNING),
        (StepState.PENDING, StepState.SKIPPED),
        (StepState.RUNNING, StepState.RUNNING),
        (StepState.RUNNING, StepState.SUCCEEDED),
        (StepState.RUNNING, StepState.FAILED),
        (StepState.FAILED, StepState.RUNNING),
        (StepState.SUCCEEDED, StepState.COMPENSATING),
        (StepState.SUCCEEDED, StepState.SKIPPED),
        (StepState.COMPENSATING, StepState.COMPENSATING),
        (StepState.COMPENSATING, StepState.COMPENSATED),
        (StepState.COMPENSATING, StepState.COMPENSATION_FAILED),
        (StepState.COMPENSATION_FAILED, StepState.COMPENSATING),
    ],
)
def test_step_lifecycle_moves_are_allowed(current, target):
    check_step_transition("s", current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (StepState.PENDING, StepState.SUCCEEDED),
        (StepState.PENDING, StepState.COMPENSATING),
        (StepState.RUNNING, StepState.COMPENSATING),
        (StepState.RUNNING, StepState.SKIPPED),
        (StepState.SUCCEEDED, StepState.RUNNING),
        (StepState.SUCCEEDED, StepState.FAILED),
        (StepState.FAILED, StepState.SUCCEEDED),
        (StepState.COMPENSATING, StepState.SUCCEEDED),
        (StepState.COMPENSATION_FAILED, StepState.COMPENSATED),
    ],
)
def test_step_shortcuts_are_refused(current, target):
    with pytest.raises(InvalidTransitionError):
        check_step_transition("s", current, target)


# --- terminal and settled states ---------------------------------------------------------------
@pytest.mark.parametrize("state", sorted(SAGA_TERMINAL))
def test_terminal_saga_states_have_no_outgoing_transitions(state):
    assert SAGA_TRANSITIONS[state] == frozenset()
    assert state.is_terminal
    for target in SagaState:
        assert not can_transition_saga(state, target)


def test_completed_and_compensated_are_the_terminal_saga_states():
    assert {SagaState.COMPLETED, SagaState.COMPENSATED} == SAGA_TERMINAL
    assert {s for s in SagaState if s.is_terminal} == SAGA_TERMINAL


def test_compensation_failed_saga_is_settled_but_not_terminal_so_an_operator_can_retry():
    state = SagaState.COMPENSATION_FAILED
    assert not state.is_terminal
    assert state in SAGA_SETTLED
    assert can_transition_saga(state, SagaState.COMPENSATING)


def test_forward_failed_saga_is_settled_but_not_terminal_so_an_operator_can_retry():
    state = SagaState.FORWARD_FAILED
    assert not state.is_terminal
    assert state in SAGA_SETTLED
    assert SAGA_TRANSITIONS[state] == frozenset({SagaState.RUNNING}), "it only goes forward"


def test_only_settled_saga_states_are_parked():
    assert {SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.COMPENSATION_FAILED,
            SagaState.FORWARD_FAILED} == SAGA_SETTLED


@pytest.mark.parametrize("state", [StepState.COMPENSATED, StepState.SKIPPED])
def test_final_step_states_have_no_outgoing_transitions(state):
    assert STEP_TRANSITIONS[state] == frozenset()


def test_steps_that_are_still_in_flight_or_undoable_are_not_rolled_back():
    assert StepState.RUNNING not in STEP_ROLLED_BACK
    assert StepState.SUCCEEDED not in STEP_ROLLED_BACK
    assert StepState.COMPENSATING not in STEP_ROLLED_BACK
    assert {
        StepState.PENDING, StepState.FAILED, StepState.COMPENSATED,
        StepState.COMPENSATION_FAILED, StepState.SKIPPED,
    } == STEP_ROLLED_BACK


def test_states_are_strings_so_they_store_and_compare_as_text():
    assert SagaState.RUNNING == "RUNNING"
    assert StepState("SKIPPED") is StepState.SKIPPED
