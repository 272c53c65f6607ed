"""Several hosts sharing one broker and one database (tests/chaos/hosts.py): one host dies, or
is cut off and comes back; no saga is lost, stuck or doubled.

Each host is a network namespace with its own worker (a: inventory+saga, b: payment+shipping+
saga, c: every queue and beat); Redis and PostgreSQL run in a services namespace. The order
saga's step limits are 8 s here (ORDER_STEP_TIME_LIMIT; the sample's default is 30 s), so a
stalled step is re-driven once Celery's hard limit (8 + 5 s) and RECOVERY_GRACE (2 s here) have
passed, about 16 s after it was sent. HOSTS_PARTITION_SECONDS (default 20) sets how long
the cut lasts; ``make chaos`` runs the 60 s cut with the real 30 s limits through
``python -m tests.chaos.hosts``.

Needs root and iproute2 (namespaces, veth) and PostgreSQL's server binaries: skipped locally
without them, a failure under CI=true.
"""

from __future__ import annotations

import os

import pytest

from tests.chaos.hosts import HostsConfig, HostsResult, run_hosts
from tests.support import netns, pgcluster
from tests.support.services import require_service

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.integration]



@pytest.fixture(autouse=True)
def _hosts_can_be_made() -> None:
    ok, why = netns.supported()
    require_service(ok, f"test hosts in network namespaces ({why})")
    ok, why = pgcluster.available()
    require_service(ok, f"a private PostgreSQL cluster ({why})")


def _run(cfg: HostsConfig, tmp_path_factory: pytest.TempPathFactory) -> HostsResult:
    result = run_hosts(cfg, tmp_path_factory.mktemp(f"hosts-{cfg.fault}"))
    print("\n" + result.summary())
    return result


def _assert_every_saga_terminal(result: HostsResult, expected: int) -> None:
    assert result.sagas == expected
    assert result.not_terminal == [], "every saga COMPLETED or COMPENSATED"
    assert result.parked == 0
    assert result.completed > 0 and result.compensated > 0, "both outcomes were exercised"
    assert result.settled_after_s <= result.settle_bound_s


def _assert_audit_clean(result: HostsResult, sagas: int) -> None:
    """Last: the engine's rules and the order ledgers (every effect applied exactly once)."""
    audit = result.audit
    violations = audit.get("violations", [])
    assert audit.get("ok"), violations[:20]
    assert audit.get("sagas") == sagas


@pytest.mark.timeout(600)
def test_a_host_killed_mid_run_loses_no_saga_and_doubles_no_effect(
    tmp_path_factory: pytest.TempPathFactory,
):
    """Every worker process of host a (inventory+saga) SIGKILLed mid-burst, for good."""
    cfg = HostsConfig(fault="kill", victim="a")
    result = _run(cfg, tmp_path_factory)
    _assert_every_saga_terminal(result, cfg.sagas)
    assert result.in_flight_at_fault, "host a was killed in the middle of a step"
    assert result.redriven_elsewhere, "its steps in flight ran again on another host"
    _assert_audit_clean(result, cfg.sagas)


@pytest.mark.timeout(600)
def test_a_host_cut_off_is_replaced_and_its_late_results_change_nothing(
    tmp_path_factory: pytest.TempPathFactory,
):
    """Host b (payment+shipping+saga) cut off mid-burst, then plugged back: its steps in flight
    run again elsewhere, sagas started meanwhile finish on a and c, and once b is back, what it
    reports late (its stale steps, their time limits, its requeued messages) changes nothing.
    Sagas started after the heal finish too (whether b itself serves again is Celery's
    business: its main process can die as the cut heals, see README; reported, not asserted)."""
    cfg = HostsConfig(fault="partition", victim="b",
                      partition_s=float(os.environ.get("HOSTS_PARTITION_SECONDS", "20")))
    assert cfg.partition_s > cfg.redrive_after + 2 * cfg.recovery_interval, (
        "the cut must outlast a step's limit, or nothing is re-driven while b is away")
    result = _run(cfg, tmp_path_factory)
    total = cfg.sagas + cfg.during_sagas + cfg.after_sagas
    _assert_every_saga_terminal(result, total)
    assert result.in_flight_at_fault, "b was cut off in the middle of a step"
    assert result.redriven_elsewhere, "its steps in flight ran again on another host"
    assert result.during_terminal_before_heal == cfg.during_sagas, (
        "the other hosts kept serving while b was away")
    assert result.late_outcomes, "b came back and acted on the work it held"
    assert result.changed_after_heal == [], "b's late results changed a settled saga"
    _assert_audit_clean(result, total)
