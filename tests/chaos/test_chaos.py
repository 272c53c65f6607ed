"""No saga lost, stuck or doubled: the chaos scenario (tests/chaos/run.py) at test-suite size,
on SQLite and on a private PostgreSQL cluster.

CHAOS_SAGAS (default 200) order sagas started in two waves, CHAOS_KILL_SECONDS (default 60) of
SIGKILLs every 2 s, and the broker's two faults each struck while at least half of the sagas
recorded are RUNNING or COMPENSATING: a FLUSHALL (on RabbitMQ, with SAGAS_TEST_BROKER=rabbitmq:
clients locked out, every connection closed, the queues purged) during the first wave, a Redis
restart (empty) during the second. On PostgreSQL the database is restarted fast, then kept down
30 s. CHAOS_FAULT_RATE (default 0.05) transient faults in every participant step and
compensation, some after the commit. ``make chaos`` runs the full size and prints one table.
"""

from __future__ import annotations

import pytest

from tests.chaos.run import ChaosConfig, run_chaos
from tests.conftest import DATABASES
from tests.support import pgcluster
from tests.support.services import require_service

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.integration]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("database", DATABASES)  # SAGAS_TEST_DATABASES narrows it
def test_every_saga_ends_terminal_and_the_ledgers_balance_through_chaos(
    tmp_path_factory: pytest.TempPathFactory, database: str,
):
    if database == "postgresql":
        ok, why = pgcluster.available()
        require_service(ok, f"a private PostgreSQL cluster ({why})")
    cfg = ChaosConfig(database=database)
    result = run_chaos(cfg, tmp_path_factory.mktemp(f"chaos-{database}"))
    print("\n" + result.summary())
    assert result.sagas == cfg.sagas
    assert result.worker_kills + result.pool_kills >= cfg.kill_for / cfg.kill_every - 3
    assert result.broker == cfg.broker
    kinds = [f.kind.split(" (")[0].split(" down")[0] for f in result.faults]
    expected = ["broker wiped", "broker restarted empty"]
    if database == "postgresql":
        expected = ["broker wiped", "database restarted", "broker restarted empty",
                    "database"]
    assert kinds == expected, [f.line() for f in result.faults]
    for fault in result.faults:
        if fault.kind.startswith("broker"):
            assert 2 * fault.in_flight >= fault.started > 0, (
                f"the broker fault hit work in flight: {fault.line()}")
        else:
            assert fault.in_flight > 0, fault.line()
            assert fault.down_s > 0
    assert result.lost == 0, "every started saga is recorded"
    assert result.not_terminal == 0, "every saga terminal within the bound"
    assert result.parked == 0
    assert result.doubled == 0, result.audit.get("violations")
    assert result.settled_after_s <= result.settle_bound_s
    assert result.completed > 0 and result.compensated >= cfg.sagas * cfg.over_limit * 0.5
    assert result.audit.get("ok"), result.audit.get("violations")
    assert result.audit.get("sagas") == cfg.sagas
    if database == "postgresql":
        # each process says it once per outage, rather than a traceback per task
        assert result.outage_lines >= 1
        assert result.tracebacks == 0, (
            f"{result.tracebacks} store tracebacks in the logs: {result.log_dir}")
