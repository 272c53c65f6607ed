"""The listener hook interface: who is told what, when, and that a failing listener is harmless."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery.signals import task_prerun

from sagas.coordinator import (
    Decision,
    Redrive,
    SagaSnapshot,
    Started,
    StepSnapshot,
    StepSucceeded,
    Transition,
)
from sagas.observe import listeners, metrics, setup, tracing
from sagas.observe.listeners import SagaListener, StepAttempt, TransitionEvent
from sagas.states import SagaState, StepState


class Recorder(SagaListener):
    def __init__(self) -> None:
        self.saga: list[TransitionEvent] = []
        self.steps: list[TransitionEvent] = []

    def on_saga_transition(self, event: TransitionEvent) -> None:
        self.saga.append(event)

    def on_step_transition(self, event: TransitionEvent) -> None:
        self.steps.append(event)


class Exploding(SagaListener):
    def on_step_transition(self, event: TransitionEvent) -> None:
        raise RuntimeError("listener bug")

    on_saga_transition = on_step_transition


class Timed(SagaListener):
    def before_attempt(self, attempt: StepAttempt) -> None:
        pass


@pytest.fixture(autouse=True)
def isolated() -> Iterator[None]:
    listeners.reset()
    yield
    listeners.reset()
    listeners._active = None  # the next test in this process configures afresh


def snap(state: SagaState = SagaState.RUNNING) -> SagaSnapshot:
    return SagaSnapshot(
        id="s-1", name="order", state=state, input={"qty": 1},
        steps={"a": StepSnapshot("a", StepState.SUCCEEDED, 1, {"ok": True}),
               "b": StepSnapshot("b", StepState.RUNNING, 1)},
    )


def decision(*transitions: Transition) -> Decision:
    return Decision(transitions=list(transitions))


A_DONE = Transition("a", StepState.RUNNING, StepState.SUCCEEDED, 1)
B_RUNS = Transition("b", StepState.PENDING, StepState.RUNNING, 1)
SAGA_DONE = Transition(None, SagaState.RUNNING, SagaState.COMPLETED)


def test_every_committed_transition_reaches_the_matching_hook_in_order():
    rec = listeners.register(Recorder())
    listeners.notify(snap(SagaState.COMPLETED), decision(A_DONE, B_RUNS, SAGA_DONE),
                     StepSucceeded("a", "action"))
    assert [(e.step, e.from_state, e.to_state) for e in rec.steps] == [
        ("a", "RUNNING", "SUCCEEDED"), ("b", "PENDING", "RUNNING"),
    ]
    assert [(e.from_state, e.to_state, e.saga_state) for e in rec.saga] == [
        ("RUNNING", "COMPLETED", "COMPLETED"),
    ]
    assert {e.cause for e in rec.steps + rec.saga} == {"StepSucceeded"}
    assert all(e.saga_id == "s-1" and e.saga == "order" for e in rec.steps)


def test_a_listener_that_raises_is_logged_and_the_others_still_hear(caplog):
    listeners.register(Exploding())
    rec = listeners.register(Recorder())
    with caplog.at_level(logging.ERROR, logger="sagas.listeners"):
        listeners.notify(snap(), decision(A_DONE), StepSucceeded("a", "action"))
    assert len(rec.steps) == 1
    assert "Exploding.on_step_transition raised" in caplog.text


def test_no_listener_means_no_events_are_even_built(monkeypatch):
    def boom(*_: Any) -> None:
        raise AssertionError("events built with nobody listening")

    monkeypatch.setattr(listeners, "_events", boom)
    listeners.notify(snap(), decision(A_DONE), StepSucceeded("a", "action"))


def test_json_log_listener_writes_one_parseable_line_per_transition(caplog):
    listeners.register(listeners.JsonLogListener())
    with caplog.at_level(logging.INFO, logger="sagas.transitions"):
        listeners.notify(snap(), decision(A_DONE, B_RUNS), StepSucceeded("a", "action"))
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "sagas.transitions"]
    assert [(x["step"], x["from"], x["to"], x["attempt"]) for x in lines] == [
        ("a", "RUNNING", "SUCCEEDED", 1), ("b", "PENDING", "RUNNING", 1),
    ]
    assert {"saga_id", "duration", "error", "ts"} <= lines[0].keys()
    assert lines[0]["saga_id"] == "s-1"


def test_step_duration_comes_from_the_attempt_running_in_this_process():
    rec = listeners.register(Recorder())
    attempt = StepAttempt("s-1", "order", "a", "action", 1, "t-1", None,
                          started=time.time() - 2.0)
    token = listeners._current_attempt.set(attempt)
    try:
        listeners.notify(snap(), decision(A_DONE, B_RUNS), StepSucceeded("a", "action"))
    finally:
        listeners._current_attempt.reset(token)
    a_done, b_runs = rec.steps
    assert a_done.duration is not None and 1.9 < a_done.duration < 10
    assert b_runs.duration is None, "a step that only starts has no duration yet"


def test_saga_duration_is_measured_from_its_start_when_it_settles():
    rec = listeners.register(Recorder())
    started = datetime.now(UTC) - timedelta(seconds=30)
    listeners.notify(snap(SagaState.COMPLETED), decision(SAGA_DONE), StepSucceeded("a", "action"),
                     started.replace(tzinfo=None))
    assert 29 < (rec.saga[0].duration or 0) < 60


def test_attempt_hooks_cost_nothing_until_a_listener_wants_them():
    def ours() -> list[Any]:
        return [r for r in task_prerun.receivers if "sagas.listeners" in str(r[0])]

    listeners.reset([Recorder()])
    assert ours() == []
    listeners.reset([Timed()])
    assert len(ours()) == 1
    listeners.reset()
    assert ours() == []


def test_settings_choose_builtins_and_user_listeners_by_dotted_path():
    built = setup.listeners_named("json_log,metrics,tests.unit.test_listeners:Recorder")
    assert [type(x).__name__ for x in built] == ["JsonLogListener", "MetricsListener", "Recorder"]


def test_an_unknown_listener_name_is_reported_not_fatal(caplog):
    with caplog.at_level(logging.ERROR, logger="sagas.listeners"):
        kinds = [type(x).__name__ for x in setup.listeners_named("nonsense,json_log")]
    assert kinds == ["JsonLogListener"]
    assert "'nonsense' could not be set up" in caplog.text


def test_metrics_listener_counts_finals_retries_and_recoveries():
    listeners.register(metrics.MetricsListener())
    before = {
        "done": metrics.sample("sagas_finished_total", {"saga": "order", "state": "COMPLETED"}),
        "step": metrics.sample("saga_steps_finished_total",
                               {"saga": "order", "step": "a", "state": "SUCCEEDED"}),
        "started": metrics.sample("sagas_started_total", {"saga": "order"}),
        "recovered": metrics.sample("saga_recoveries_total", {"saga": "order"}),
        "hist": metrics.sample("saga_duration_seconds_count",
                               {"saga": "order", "state": "COMPLETED"}),
    }
    listeners.notify(snap(SagaState.COMPLETED), decision(A_DONE, SAGA_DONE),
                     StepSucceeded("a", "action"), datetime.now(UTC) - timedelta(seconds=3))
    listeners.notify(snap(), decision(Transition(None, SagaState.PENDING, SagaState.RUNNING)),
                     Started())
    listeners.notify(snap(), decision(Transition("b", StepState.RUNNING, StepState.RUNNING, 2)),
                     Redrive())
    assert metrics.sample("sagas_finished_total",
                          {"saga": "order", "state": "COMPLETED"}) == before["done"] + 1
    step_labels = {"saga": "order", "step": "a", "state": "SUCCEEDED"}
    assert metrics.sample("saga_steps_finished_total", step_labels) == before["step"] + 1
    assert metrics.sample("sagas_started_total", {"saga": "order"}) == before["started"] + 1
    assert metrics.sample("saga_recoveries_total", {"saga": "order"}) == before["recovered"] + 1
    assert metrics.sample("saga_duration_seconds_count",
                          {"saga": "order", "state": "COMPLETED"}) == before["hist"] + 1


def test_tracing_is_off_unless_an_otel_exporter_is_named():
    tracing.disable()
    assert tracing.configure_from_env({}) is False
    assert tracing.configure_from_env({"OTEL_TRACES_EXPORTER": "none"}) is False
    assert tracing.configure_from_env(
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}) is False
    assert not tracing.ENABLED
    try:
        assert tracing.configure_from_env({"OTEL_TRACES_EXPORTER": "console"}) is True
        assert tracing.ENABLED
    finally:
        tracing.disable()


def test_a_listener_enabled_from_code_survives_a_reconfigure_without_doubling():
    listeners.configure()  # e.g. the first transition in this process
    tracing.enable(None)
    try:
        listeners._worker_process_init()  # a pool (re)start rebuilds listeners
        kinds = [type(x).__name__ for x in listeners.active()]
        assert kinds.count("TracingListener") == 1
    finally:
        tracing.disable()
    assert "TracingListener" not in [type(x).__name__ for x in listeners.active()]


def test_json_log_chosen_by_name_writes_bare_json_lines_whatever_the_root_format(capsys):
    root = logging.getLogger()
    celery_like = logging.StreamHandler()
    celery_like.setFormatter(logging.Formatter("[%(asctime)s: %(levelname)s] %(message)s"))
    root.addHandler(celery_like)
    logger = logging.getLogger("sagas.transitions")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    logger.handlers[:] = []  # a handler left by an earlier test writes to that test's stderr
    try:
        listener = setup.build_listener("json_log")
        event = listeners.TransitionEvent("s-1", "order", "a", "RUNNING", "SUCCEEDED", 1, None,
                                          0.25, "StepSucceeded", "RUNNING", 1_700_000_000.0)
        listener.on_step_transition(event)
    finally:
        root.removeHandler(celery_like)
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    parsed = json.loads(lines[0])
    assert (parsed["saga_id"], parsed["step"], parsed["to"]) == ("s-1", "a", "SUCCEEDED")
