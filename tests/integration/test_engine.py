"""The engine end to end: real worker processes, real Redis, SQLite and PostgreSQL."""

from __future__ import annotations

import time
from typing import Any

import pytest

from config import app
from tests.conftest import Backend, wait_for_saga
from tests.support import test_sagas as ts
from tests.support.engine import start_saga

pytestmark = pytest.mark.integration


def steps(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in view["steps"]}


def moves(view: dict[str, Any], to_state: str) -> list[str]:
    return [e["step"] for e in view["events"] if e["to_state"] == to_state and e["step"]]


def calls(saga_id: str, step: str, phase: str = "action") -> int:
    return int(ts.ledger().get(f"calls:{saga_id}:{step}:{phase}") or 0)


def test_happy_path_runs_every_step_in_order_and_passes_results_on(engine_backend: Backend):
    saga_id = start_saga(ts.linear, {})
    view = wait_for_saga(saga_id)
    assert view["state"] == "COMPLETED"
    assert [s["state"] for s in view["steps"]] == ["SUCCEEDED"] * 4
    assert [s["attempts"] for s in view["steps"]] == [1] * 4
    assert moves(view, "RUNNING") == ["a", "b", "c", "d"]
    assert view["context"]["results"]["d"]["seen"] == ["a", "b", "c"]
    assert [e["to_state"] for e in view["events"] if e["step"] is None] == ["RUNNING", "COMPLETED"]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_failure_of_step_k_compensates_exactly_the_earlier_steps_newest_first(
    engine_backend: Backend, k: int
):
    failing = "abcd"[k - 1]
    saga_id = start_saga(ts.linear, {"plan": {failing: {"fail": True}}})
    view = wait_for_saga(saga_id)
    assert view["state"] == "COMPENSATED"
    succeeded = list("abcd"[: k - 1])
    assert moves(view, "COMPENSATED") == list(reversed(succeeded))
    for name in succeeded:
        assert calls(saga_id, name, "compensation") == 1
    state = steps(view)
    assert state[failing]["state"] == "FAILED"
    assert "planned failure" in state[failing]["error"]
    assert state[failing]["attempts"] == 1, "a business failure is never retried"
    for later in "abcd"[k:]:
        assert state[later]["state"] == "SKIPPED"
        assert calls(saga_id, later) == 0
    log = ts.ledger().lrange(f"log:{saga_id}", 0, -1)
    assert [x for x in log if x.startswith("compensation")] == [
        f"compensation:{n}" for n in reversed(succeeded)
    ]


def test_step_without_compensation_is_skipped_in_rollback(engine_backend: Backend):
    saga_id = start_saga(ts.no_undo, {"plan": {"c": {"fail": True}}})
    view = wait_for_saga(saga_id)
    assert view["state"] == "COMPENSATED"
    state = steps(view)
    assert state["b"]["state"] == "SKIPPED"
    assert ("b", "SUCCEEDED", "SKIPPED") in [
        (e["step"], e["from_state"], e["to_state"]) for e in view["events"]
    ]
    assert state["a"]["state"] == "COMPENSATED"
    assert calls(saga_id, "b", "compensation") == 0


def test_transient_failure_is_retried_with_attempts_recorded(engine_backend: Backend):
    saga_id = start_saga(ts.linear, {"plan": {"b": {"transient": 2}}})
    view = wait_for_saga(saga_id)
    assert view["state"] == "COMPLETED"
    assert steps(view)["b"]["attempts"] == 3
    retries = [e for e in view["events"] if e["step"] == "b" and e["from_state"] == "RUNNING"
               and e["to_state"] == "RUNNING"]
    assert [e["attempt"] for e in retries] == [2, 3]
    assert all("planned transient failure" in e["error"] for e in retries)
    assert calls(saga_id, "b") == 3


def test_exhausted_retries_fail_the_step_and_compensate_it_too(engine_backend: Backend):
    # Each attempt of b ran (its effect may be there) and then raised: only a business
    # refusal proves nothing happened, so b is undone first, then a.
    saga_id = start_saga(ts.linear, {"plan": {"b": {"transient": 99}}})
    view = wait_for_saga(saga_id)
    assert view["state"] == "COMPENSATED"
    b = steps(view)["b"]
    assert b["state"] == "COMPENSATED", (b, view["events"])
    assert b["attempts"] == ts.FAST.attempts
    assert b["error"].startswith("StepOutcomeUnknown: TransientError: planned transient failure")
    assert calls(saga_id, "b") == ts.FAST.attempts
    assert [(e["from_state"], e["to_state"]) for e in view["events"] if e["step"] == "b"][-3:] == [
        ("RUNNING", "FAILED"), ("FAILED", "COMPENSATING"), ("COMPENSATING", "COMPENSATED")]
    assert moves(view, "COMPENSATED") == ["b", "a"]
    assert calls(saga_id, "b", "compensation") == 1
    assert steps(view)["c"]["state"] == "SKIPPED"


def test_time_limit_fails_the_step_without_retry(engine_backend: Backend):
    saga_id = start_saga(ts.timed, {"plan": {"slow": {"sleep": 4}}})
    view = wait_for_saga(saga_id)
    assert view["state"] == "COMPENSATED"
    slow = steps(view)["slow"]
    assert slow["state"] == "COMPENSATED", "a timed-out step may have acted: it is undone"
    assert "TimeLimit" in slow["error"]
    assert slow["attempts"] == 1
    assert moves(view, "COMPENSATED") == ["slow", "a"]


def test_compensation_failing_for_good_parks_the_saga_and_others_still_run(
    engine_backend: Backend,
):
    saga_id = start_saga(ts.linear, {"plan": {"d": {"fail": True}, "b": {"undo_fail": True}}})
    view = wait_for_saga(saga_id)
    assert view["state"] == "COMPENSATION_FAILED"
    assert "b" in view["error"]
    state = steps(view)
    assert state["c"]["state"] == "COMPENSATED"
    assert state["b"]["state"] == "COMPENSATION_FAILED"
    assert "planned compensation failure" in state["b"]["error"]
    assert state["b"]["compensation_attempts"] == ts.FAST_UNDO.attempts
    assert state["a"]["state"] == "COMPENSATED", "the other compensations still ran"
    assert calls(saga_id, "b", "compensation") == ts.FAST_UNDO.attempts


def test_diamond_join_runs_once_after_overlapping_branches(engine_backend: Backend):
    saga_id = start_saga(ts.diamond, {"plan": {"b": {"sleep": 0.6}, "c": {"sleep": 0.6}}})
    view = wait_for_saga(saga_id)
    assert view["state"] == "COMPLETED"
    results = view["context"]["results"]
    b, c = results["b"], results["c"]
    assert b["started"] < c["ended"] and c["started"] < b["ended"], "branches ran in parallel"
    assert calls(saga_id, "d") == 1
    assert moves(view, "RUNNING").count("d") == 1
    assert results["d"]["seen"] == ["a", "b", "c"]


def test_failure_in_one_branch_compensates_the_other_branch(engine_backend: Backend):
    saga_id = start_saga(
        ts.diamond, {"plan": {"b": {"fail": True, "sleep": 0.1}, "c": {"sleep": 0.8}}}
    )
    view = wait_for_saga(saga_id)
    assert view["state"] == "COMPENSATED"
    state = steps(view)
    assert state["b"]["state"] == "FAILED"
    assert state["d"]["state"] == "SKIPPED"
    assert state["c"]["state"] == "COMPENSATED", "c finished after the failure, then was undone"
    assert moves(view, "COMPENSATED") == ["c", "a"]
    assert calls(saga_id, "d") == 0


def test_failure_after_the_pivot_retries_forward(engine_backend: Backend):
    saga_id = start_saga(ts.pivoted, {"plan": {"z": {"transient": 4}}})
    view = wait_for_saga(saga_id, timeout=60)
    assert view["state"] == "COMPLETED"
    assert moves(view, "COMPENSATING") == []
    z = steps(view)["z"]
    assert z["attempts"] == 5
    assert ("z", "FAILED", "RUNNING") in [
        (e["step"], e["from_state"], e["to_state"]) for e in view["events"]
    ]


def test_duplicate_and_late_callbacks_change_nothing(engine_backend: Backend):
    saga_id = start_saga(ts.linear, {})
    view = wait_for_saga(saga_id)
    before = (view["state"], len(view["events"]), [s["state"] for s in view["steps"]])
    for _ in range(2):
        app.send_task("sagas.step_succeeded", args=({}, saga_id, "b", "action"), queue="saga")
        app.send_task("sagas.step_failed", args=("no-such-task", saga_id, "c", "action", 1),
                      queue="saga")
        app.send_task("sagas.step_succeeded", args=({}, saga_id, "a", "compensation"),
                      queue="saga")
        app.send_task("sagas.step_succeeded", args=({}, "no-such-saga", "a", "action"),
                      queue="saga")
    # A saga started after the duplicates completes only once they were consumed (FIFO queue).
    marker = start_saga(ts.linear, {})
    wait_for_saga(marker)
    time.sleep(0.3)
    after = wait_for_saga(saga_id)
    assert (after["state"], len(after["events"]), [s["state"] for s in after["steps"]]) == before


def test_join_is_dispatched_once_when_parent_callbacks_are_duplicated(engine_backend: Backend):
    saga_id = start_saga(ts.diamond, {"plan": {"b": {"sleep": 0.5}, "c": {"sleep": 0.5}}})
    time.sleep(0.2)
    for _ in range(3):
        for parent in ("b", "c"):
            app.send_task("sagas.step_succeeded", args=({}, saga_id, parent, "action"),
                          queue="saga")
    view = wait_for_saga(saga_id)
    assert view["state"] == "COMPLETED"
    assert moves(view, "RUNNING").count("d") == 1
    assert calls(saga_id, "d") == 1


def test_task_name_no_worker_knows_is_reported(engine_backend: Backend):
    assert ts.foreign.unknown_tasks(app.tasks.keys()) == ["nowhere.registered"]
    assert "nowhere.registered" in engine_backend.worker_log()
