"""Recovery's pieces that need no broker: its schedule, its report, and how failures are read."""

from __future__ import annotations

import pytest

from sagas.recovery import RECOVER_TASK, RecoveryReport, beat_schedule, get_recovery_settings
from sagas.worker import _is_definite


@pytest.fixture
def interval(monkeypatch: pytest.MonkeyPatch):
    def set_to(value: str) -> None:
        monkeypatch.setenv("RECOVERY_INTERVAL", value)
        get_recovery_settings.cache_clear()

    yield set_to
    get_recovery_settings.cache_clear()


def test_beat_runs_the_reconciler_on_the_saga_queue_every_recovery_interval(interval):
    interval("2.5")
    entry = beat_schedule()["sagas-recover-stalled"]
    assert entry["task"] == RECOVER_TASK
    assert entry["schedule"] == 2.5
    assert entry["options"]["queue"] == "saga"
    assert entry["options"]["expires"] == 2.5, "a run stuck in a backlog is dropped, not piled up"


def test_the_default_interval_keeps_the_30_second_recovery_bound(interval):
    from sagas.settings import get_settings

    assert get_recovery_settings().recovery_interval < get_settings().recovery_grace


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
