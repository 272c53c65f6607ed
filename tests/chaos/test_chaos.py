"""No saga lost, no effect doubled: the chaos scenario (tests/chaos/run.py) at test-suite size.

CHAOS_SAGAS (default 200) order sagas submitted over the first 45 s, CHAOS_KILL_SECONDS
(default 60) of SIGKILLs every 2 s, the broker losing everything halfway (Redis restarted
empty; on RabbitMQ, with SAGAS_TEST_BROKER=rabbitmq, clients locked out, every connection
closed and the queues purged, and the result backend's Redis restarted empty),
CHAOS_FAULT_RATE (default 0.05) transient faults in every participant step and compensation,
some after the commit.
``make chaos`` runs the full size (1000 sagas) through ``python -m tests.chaos.run``.
"""

from __future__ import annotations

import pytest

from tests.chaos.run import ChaosConfig, run_chaos

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.integration]


@pytest.mark.timeout(900)
def test_every_saga_ends_terminal_and_the_ledgers_balance_through_chaos(
    tmp_path_factory: pytest.TempPathFactory,
):
    cfg = ChaosConfig()
    result = run_chaos(cfg, tmp_path_factory.mktemp("chaos"))
    print("\n" + result.summary())
    assert result.sagas == cfg.sagas
    assert result.worker_kills + result.pool_kills >= cfg.kill_for / cfg.kill_every - 3
    assert result.broker == cfg.broker
    assert result.broker_restarts == 1
    assert result.not_terminal == 0, "every saga terminal within the bound"
    assert result.parked == 0
    assert result.settled_after_s <= result.settle_bound_s
    assert result.completed > 0 and result.compensated >= cfg.sagas * cfg.over_limit * 0.5
    assert result.audit.get("ok"), result.audit.get("violations")
    assert result.audit.get("sagas") == cfg.sagas
