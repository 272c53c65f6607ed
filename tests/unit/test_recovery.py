"""Recovery's pieces that need no broker: its schedule, its report, and how failures are read."""

from __future__ import annotations

import pytest
from celery import Celery

from sagas import Sagas, SagaSettings
from sagas.runtime.dispatch import RECOVER_TASK
from sagas.runtime.recovery import BEAT_ENTRY, RecoveryReport, beat_entry
from sagas.runtime.worker import _is_definite


def test_beat_runs_the_reconciler_on_the_saga_queue_every_recovery_interval():
    entry = beat_entry(SagaSettings(recovery_interval=2.5, saga_queue="coord"))
    assert entry["task"] == RECOVER_TASK
    assert entry["schedule"] == 2.5
    assert entry["options"]["queue"] == "coord"
    assert entry["options"]["expires"] == 2.5, "a run stuck in a backlog is dropped, not piled up"


def test_binding_an_app_puts_the_reconciler_in_its_own_beat_schedule():
    app = Celery("beat-test", broker="memory://")
    Sagas(app, SagaSettings(recovery_interval=3.0, sagas_listeners=""))
    entry = app.conf.beat_schedule[BEAT_ENTRY]
    assert entry["task"] == RECOVER_TASK
    assert entry["schedule"] == 3.0
    assert entry["options"]["queue"] == "saga"
    assert RECOVER_TASK in app.tasks


def test_the_default_interval_keeps_the_30_second_recovery_bound():
    settings = SagaSettings()
    assert settings.recovery_interval < settings.recovery_grace


def test_the_report_summary_is_one_line_with_the_counts():
    report = RecoveryReport(stalled=3, redriven=["a", "b"], deadline_compensated=["c"],
                            skipped=1, max_overdue_s=4.25, duration_s=0.5)
    line = report.summary()
    assert "\n" not in line
    assert line.startswith("recovery: 3 stalled, re-drove 2, 1 past their deadline")
    assert "1 skipped" in line and "most overdue 4.2s" in line
    assert RecoveryReport(dry_run=True).summary().startswith("recovery: 0 stalled, would re-drive")


@pytest.mark.parametrize("error", [
    "WorkerLostError: Worker exited prematurely: signal 9 (SIGKILL) Job: 4.",
    "ConnectionError: Error 111 connecting to 127.0.0.1:6379. Connection refused.",
    "Reject: (OperationalError(...), False)",
    "TimeLimitExceeded: 35.0",
    "failed (error detail unavailable: ConnectionError: refused)",
    "failed (backend shows RETRY, not the final error)",
    "StepOutcomeUnknown: TransientError: injected transient fault in payment.charge",
    "StepOutcomeUnknown: SoftTimeLimitExceeded: SoftTimeLimitExceeded()",
])
def test_failures_that_say_nothing_about_the_effect_are_not_definite(error: str):
    assert not _is_definite(error)


@pytest.mark.parametrize("error", [
    "PaymentDeclined: payment of 600.00 declined: over the limit of 500",
    "BusinessError: insufficient stock",
    "TransientError: injected transient fault in payment.charge",
    "SoftTimeLimitExceeded: SoftTimeLimitExceeded()",
])
def test_the_steps_own_failures_are_definite(error: str):
    assert _is_definite(error)


def test_the_engines_tasks_are_routed_to_the_saga_queue_even_sent_by_name():
    app = Celery("route-test", broker="memory://")
    app.conf.task_routes = {"shop.*": {"queue": "shop"}}
    Sagas(app, SagaSettings(saga_queue="coord", sagas_listeners=""))
    router = app.amqp.router
    for name in ("sagas.start", "sagas.step_failed", "sagas.step_succeeded", RECOVER_TASK):
        assert router.route({}, name)["queue"].name == "coord", name
    assert router.route({}, "shop.buy")["queue"].name == "shop", "the app's own routes stay"


def test_a_late_configuration_load_keeps_the_reconciler_and_the_routes():
    app = Celery("late-config", broker="memory://")
    Sagas(app, SagaSettings(sagas_listeners=""))
    app.config_from_object({"beat_schedule": {"mine": {"task": "x", "schedule": 9.0}},
                            "task_routes": {"x": {"queue": "xq"}}}, force=True)
    assert set(app.conf.beat_schedule) == {"mine", BEAT_ENTRY}
    assert app.amqp.router.route({}, "sagas.start")["queue"].name == "saga"
    assert app.amqp.router.route({}, "x")["queue"].name == "xq"
