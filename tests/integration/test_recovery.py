"""Recovery: stalled sagas re-driven from SQL after crashes, lost messages and broker loss.

Two kinds of test. The reconciler's own decisions run in this process against SQLite and
PostgreSQL, on sagas whose queue no worker serves, so what it publishes is read back from the
real broker's queue. The crash scenarios run a private deployment (tests/chaos/cluster.py): its
own Redis (and RabbitMQ vhost, under SAGAS_TEST_BROKER=rabbitmq), SQLite file, a real worker and
``celery beat`` running the reconciler every second, with STEP_TIMEOUT=3 s so a stalled step's
deadline passes 3 s after its dispatch.

Where the brokers differ, the tests say so. A message held by a worker killed whole stays
unacknowledged on Redis until the visibility timeout (1 h), so the reconciler re-drives its
step (the next attempt); RabbitMQ hands it back as soon as the dead worker's connection closes,
so the restarted worker runs the same delivery again (and the reconciler may re-drive it too,
if the restart took longer than the stall deadline). Either way the effect applies once.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from sagas.coordinator import StepSucceeded
from sagas.store.sql import sagas_t, utcnow
from tests.chaos import crash_sagas as cs
from tests.chaos.cluster import Cluster
from tests.conftest import DATABASES, ON_RABBITMQ, broker_url, fresh_database, use_database
from tests.support.engine import apply_event, get_store, recover_stalled, start_saga
from tests.support.engine import make_stale as age_saga
from tests.support.services import drop_from_queue, peek_queue

pytestmark = pytest.mark.integration

RECOVERY_INTERVAL = 1.0
STEP_TIMEOUT = 3.0
# Re-driven within the beat interval of the deadline, plus a worker's and beat's scheduling slack.
REDRIVE_BOUND = STEP_TIMEOUT + RECOVERY_INTERVAL + 4.0


# --- the reconciler's decisions, in process --------------------------------------------------
@pytest.fixture(scope="module", params=DATABASES)
def recovery_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[str]:
    previous = os.environ.get("DATABASE_URL")
    with fresh_database(request.param, tmp_path_factory) as url:
        yield url
    if previous is not None:
        use_database(previous)


@pytest.fixture
def db(recovery_db: str) -> str:
    use_database(recovery_db)  # other modules' fixtures re-point the process between tests
    return recovery_db


def published(saga_id: str) -> list[dict[str, Any]]:
    """Messages for ``saga_id`` waiting in the unserved queue, as (task id, context)."""
    out = []
    for headers, body in peek_queue(broker_url(), cs.UNSERVED):
        task_id = headers["id"]
        if task_id.startswith(f"{saga_id}."):
            out.append({"task_id": task_id, "ctx": body[0][0]})
    return out


def make_stale(saga_id: str, seconds: float = 60) -> None:
    """Its work in flight made no progress for a long while (see tests.support.engine)."""
    age_saga(saga_id, seconds)


@pytest.fixture(autouse=True)
def _broker_look_restored() -> Iterator[None]:
    from config import engine

    yield
    engine._binding.probe = None


def lose(saga_id: str) -> None:
    """Its messages are gone from the queue, as when a worker took them and died.

    On Redis the reconciler then finds nothing of it in the queue's list. A RabbitMQ queue
    cannot be read: one that holds messages (the other tests') and has no consumer is known to
    be unserved, and its stalled steps are held, lost or not (``test_a_stalled_step_whose_
    message_still_waits_is_held_not_sent_again``). The tests of what a re-drive does there look
    as a broker that cannot say anything would.
    """
    from config import engine
    from sagas.runtime.waiting import QueueLook

    drop_from_queue(broker_url(), cs.UNSERVED, f"{saga_id}.")
    if ON_RABBITMQ:
        engine._binding.probe = lambda queues: {q: QueueLook(q) for q in queues}


def stale_and_lost(saga_id: str, seconds: float = 60) -> None:
    make_stale(saga_id, seconds)
    lose(saga_id)


def stall_deadline(saga_id: str) -> Any:
    with get_store().read() as conn:
        return conn.execute(
            select(sagas_t.c.stall_deadline).where(sagas_t.c.id == saga_id)
        ).scalar_one()


def test_reconciler_redrives_only_sagas_past_their_stall_deadline_with_the_same_key(db: str):
    stalled = start_saga(cs.recovery_unit, {})
    fresh = start_saga(cs.recovery_unit, {})
    stale_and_lost(stalled)
    report = recover_stalled()
    assert stalled in report.redriven
    assert fresh not in report.redriven
    assert [m["task_id"] for m in published(stalled)] == [f"{stalled}.a.do.2"]
    again = published(stalled)[-1]["ctx"]
    assert again["idempotency_key"] == f"{stalled}:a", "same key: the effect applies once"
    assert again["attempt"] == 2
    assert [m["task_id"] for m in published(fresh)] == [f"{fresh}.a.do.1"]
    view = get_store().get_view(stalled)
    assert [e["error"] for e in view["events"] if e["step"] == "a"][-1] == "re-driven by recovery"
    assert stall_deadline(stalled) is not None


def test_a_redriven_saga_is_not_redriven_again_before_its_new_deadline(db: str):
    saga_id = start_saga(cs.recovery_unit, {})
    stale_and_lost(saga_id)
    assert saga_id in recover_stalled().redriven
    second = recover_stalled()
    assert saga_id not in second.redriven
    assert len(published(saga_id)) == 1


def test_racing_reconcilers_dispatch_each_stalled_step_exactly_once(db: str):
    sagas = [start_saga(cs.recovery_unit, {}) for _ in range(8)]
    for saga_id in sagas:
        stale_and_lost(saga_id)
    now = utcnow()  # every reconciler saw the same stale rows in its scan
    barrier = threading.Barrier(4)
    reports: list[Any] = []

    def reconcile() -> None:
        barrier.wait()
        reports.append(recover_stalled(now=now))

    threads = [threading.Thread(target=reconcile) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    redriven = [s for r in reports for s in r.redriven if s in sagas]
    assert sorted(redriven) == sorted(sagas), "each stalled saga re-driven by exactly one"
    for saga_id in sagas:
        assert [m["task_id"] for m in published(saga_id)] == [f"{saga_id}.a.do.2"]


def test_a_stalled_compensation_is_redriven_as_a_compensation(db: str):
    saga_id = start_saga(cs.recovery_unit, {})
    apply_event(saga_id, StepSucceeded("a", "action", {"ok": 1}))
    from tests.support.engine import cancel_saga

    cancel_saga(saga_id)  # b is in flight: the saga waits for it, then undoes a
    apply_event(saga_id, StepSucceeded("b", "action", {"ok": 1}))
    assert [m["task_id"] for m in published(saga_id)][-1] == f"{saga_id}.b.undo.1"
    stale_and_lost(saga_id)
    assert saga_id in recover_stalled().redriven
    assert published(saga_id)[-1]["task_id"] == f"{saga_id}.b.undo.2"
    assert published(saga_id)[-1]["ctx"]["phase"] == "compensation"


def test_a_stalled_step_whose_message_still_waits_is_held_not_sent_again(db: str):
    from config import engine

    saga_id = start_saga(cs.recovery_unit, {})  # its queue has no worker: do.1 waits there
    make_stale(saga_id)
    report = recover_stalled()
    assert saga_id in report.held and saga_id not in report.redriven
    assert [m["task_id"] for m in published(saga_id)] == [f"{saga_id}.a.do.1"], "no duplicate"
    view = engine.view(saga_id)
    note = [e for e in view["events"] if e["step"] == "a"][-1]
    assert (note["from_state"], note["to_state"], note["attempt"]) == ("RUNNING", "RUNNING", 1)
    assert note["error"].startswith("re-drive held: its message still waits in the broker")
    stall = view["stalled"]
    assert stall["reasons"] == ["queued"]
    (step,) = stall["steps"]
    assert (step["step"], step["queue"], step["looks"]) == ("a", cs.UNSERVED, 1)
    assert "no worker has taken its message" in step["detail"]
    # The next look backs off: twice the step's span (STEP_TIMEOUT, no time limit) after now.
    span = engine.settings.step_timeout
    ahead = (stall_deadline(saga_id).replace(tzinfo=None) - utcnow().replace(tzinfo=None))
    assert 2 * span - 5 < ahead.total_seconds() <= 2 * span
    assert saga_id not in recover_stalled().held, "not looked at again before then"


def test_redrives_of_a_step_that_makes_no_progress_back_off_up_to_the_ceiling(db: str):
    from config import engine
    from sagas.runtime.transitions import step_due

    saved = engine.settings
    engine.settings = saved.model_copy(update={"step_timeout": 10.0,
                                               "recovery_backoff_max": 100.0})
    try:
        saga_id = start_saga(cs.recovery_unit, {})
        waits = []
        for _ in range(5):
            stale_and_lost(saga_id, seconds=1)
            before = utcnow()
            assert saga_id in recover_stalled().redriven
            snap = get_store().read_outcomes([saga_id])[saga_id]
            due = step_due(engine.settings, engine.saga("t_recovery_unit"), snap.steps["a"])
            waits.append(round((due - before).total_seconds()))
    finally:
        engine.settings = saved
    assert waits == [20, 40, 80, 100, 100], "doubling from the 10 s span, capped at 100 s"
    assert [m["task_id"] for m in published(saga_id)] == [f"{saga_id}.a.do.6"]


def test_an_action_stalled_in_a_called_off_saga_is_undone_not_sent_again(db: str):
    from tests.support.engine import cancel_saga

    saga_id = start_saga(cs.recovery_unit, {})
    apply_event(saga_id, StepSucceeded("a", "action", {"ok": 1}))
    cancel_saga(saga_id)  # b's message is in flight (its queue has no worker)
    stale_and_lost(saga_id)
    assert saga_id in recover_stalled().redriven
    assert [m["task_id"] for m in published(saga_id)] == [f"{saga_id}.b.undo.1"]
    b = [(e["from_state"], e["to_state"]) for e in get_store().get_view(saga_id)["events"]
         if e["step"] == "b"]
    assert b[-2:] == [("RUNNING", "FAILED"), ("FAILED", "COMPENSATING")]


def test_a_saga_past_its_deadline_compensates(db: str):
    saga_id = start_saga(cs.recovery_deadline, {})
    apply_event(saga_id, StepSucceeded("a", "action", {"ok": 1}))
    with get_store().begin() as conn:
        conn.execute(update(sagas_t).where(sagas_t.c.id == saga_id)
                     .values(deadline_at=utcnow() - timedelta(seconds=1)))
    report = recover_stalled()
    assert saga_id in report.deadline_compensated
    view = get_store().get_view(saga_id)
    assert view["state"] == "COMPENSATING"
    assert view["error"] == "saga deadline passed"
    # b is still in flight; once it reports, both succeeded steps are undone newest first.
    apply_event(saga_id, StepSucceeded("b", "action", {"ok": 1}))
    assert published(saga_id)[-1]["task_id"] == f"{saga_id}.b.undo.1"


def test_a_saga_past_its_pivot_ignores_its_deadline_and_goes_forward(db: str):
    saga_id = start_saga(cs.recovery_pivot, {})
    apply_event(saga_id, StepSucceeded("a", "action", {}))
    apply_event(saga_id, StepSucceeded("p", "action", {}))
    with get_store().begin() as conn:
        conn.execute(update(sagas_t).where(sagas_t.c.id == saga_id)
                     .values(deadline_at=utcnow() - timedelta(seconds=1)))
    report = recover_stalled()
    assert saga_id not in report.deadline_compensated
    assert get_store().get_view(saga_id)["state"] == "RUNNING"
    with get_store().read() as conn:
        deadline = conn.execute(
            select(sagas_t.c.deadline_at).where(sagas_t.c.id == saga_id)
        ).scalar_one()
    assert deadline is None, "a saga that can only go forward is not looked at again"


def test_sagas_recover_by_hand_prints_a_one_line_summary(db: str, tmp_path: Path):
    import subprocess
    import sys

    from tests.support.workers import ROOT

    start_saga(cs.recovery_unit, {})  # a fresh one: its message waits in the queue
    saga_id = start_saga(cs.recovery_unit, {})
    stale_and_lost(saga_id)
    env = dict(os.environ, DATABASE_URL=db, PYTHONPATH=str(ROOT),
               SAGAS_IMPORTS="tests.support.test_sagas,tests.chaos.crash_sagas")
    dry = subprocess.run([sys.executable, "-m", "sagas.ops.cli", "recover", "--dry-run", "--json"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    # Its own process asks the broker: on RabbitMQ the queue holds a message and has no
    # consumer, so its steps are held (see lose()); on Redis the lost message is not in the
    # list, and the saga is re-driven.
    kind = "held" if ON_RABBITMQ else "redriven"
    assert saga_id in json.loads(dry.stdout)[kind]
    assert len(published(saga_id)) == 0, "a dry run changes nothing"
    run = subprocess.run([sys.executable, "-m", "sagas.ops.cli", "recover"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("recovery: ")
    assert ("1 held (" if ON_RABBITMQ else "re-drove 1,") in lines[0], lines[0]
    assert len(published(saga_id)) == (0 if ON_RABBITMQ else 1)


# --- crash scenarios against a private deployment ---------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("recovery-cluster"),
                env={"RECOVERY_INTERVAL": str(RECOVERY_INTERVAL),
                     "STEP_TIMEOUT": str(STEP_TIMEOUT)})
    try:
        c.migrate()
        c.start_workers({"w": ("crashy,saga", 2)})
        c.start_beat()
        yield c
    finally:
        c.stop()


@pytest.fixture
def live(cluster: Cluster) -> Cluster:
    cluster.ensure_workers()
    return cluster


def start(cluster: Cluster, plan: dict[str, Any], undo_plan: dict[str, Any] | None = None
          ) -> str:
    body = {"plan": plan, "undo_plan": undo_plan or {}}
    return cluster.client("start", "t_crashy", json.dumps(body))["id"]


def deliveries(cluster: Cluster, task_id: str) -> int:
    """How often a worker received the message ``task_id`` (a redelivery keeps its id)."""
    return len(re.findall(rf"Task crashy\.\w+\[{re.escape(task_id)}\] received",
                          cluster.logs()))


def assert_came_back(cluster: Cluster, saga_id: str, step: str, phase: str = "do") -> None:
    """The step the killed worker held ran again: re-driven by the reconciler on Redis (its
    message is unacked for an hour); redelivered by RabbitMQ once the dead worker's connection
    closed (and re-driven too when the restart outlasted the stall deadline)."""
    if not ON_RABBITMQ:
        assert_redriven_in_bound(cluster, saga_id)
        assert deliveries(cluster, f"{saga_id}.{step}.{phase}.1") == 1, "never redelivered"
        return
    redelivered = deliveries(cluster, f"{saga_id}.{step}.{phase}.1")
    assert redelivered == 2, f"RabbitMQ redelivers the dead worker's message: {redelivered}"
    if any(r["saga"] == saga_id for r in cluster.redrives()):
        assert_redriven_in_bound(cluster, saga_id)


def runs_after_a_kill(cluster: Cluster, saga_id: str, step: str, phase: str = "action") -> int:
    """The killed run, then one more: the re-drive (Redis) or the redelivery (RabbitMQ), plus
    on RabbitMQ a re-drive when the redelivery came after the stall deadline."""
    runs = cluster.calls(saga_id, step, phase)
    redriven = ON_RABBITMQ and any(r["saga"] == saga_id for r in cluster.redrives())
    assert runs == 2 + int(redriven), f"{step} {phase} ran {runs} times"
    return runs


def assert_redriven_in_bound(cluster: Cluster, saga_id: str, bound: float = REDRIVE_BOUND
                             ) -> float:
    redrives = [r for r in cluster.redrives() if r["saga"] == saga_id]
    assert redrives, f"saga {saga_id} was never re-driven"
    slowest = max(r["stalled_s"] for r in redrives)
    assert slowest <= bound, f"re-driven {slowest:.1f}s after its last progress"
    print(f"saga {saga_id}: re-driven {slowest:.2f}s after its last progress")
    return slowest


def test_worker_killed_mid_step_is_redriven_by_beat_and_completes(live: Cluster):
    saga_id = start(live, {"b": {"crash": "worker_before"}})
    live.wait_worker_dead("w")
    live.restart_worker("w")
    view = live.wait_for(saga_id, timeout=60)
    assert view["state"] == "COMPLETED"
    assert_came_back(live, saga_id, "b")
    assert live.effect(f"{saga_id}:b")
    runs_after_a_kill(live, saga_id, "b")


def test_worker_killed_mid_compensation_is_redriven_and_compensates_once(live: Cluster):
    saga_id = start(live, {"c": {"fail": True}}, {"b": {"crash": "worker_before"}})
    live.wait_worker_dead("w")
    live.restart_worker("w")
    view = live.wait_for(saga_id, timeout=60)
    assert view["state"] == "COMPENSATED"
    assert [s["state"] for s in view["steps"]] == ["COMPENSATED", "COMPENSATED", "FAILED"]
    assert_came_back(live, saga_id, "b", "undo")
    runs_after_a_kill(live, saga_id, "b", "compensation")
    assert live.calls(saga_id, "a", "compensation") == 1


def test_worker_killed_after_the_effect_before_the_callback_applies_it_once(live: Cluster):
    saga_id = start(live, {"a": {"crash": "worker_after"}})
    live.wait_worker_dead("w")
    live.restart_worker("w")
    view = live.wait_for(saga_id, timeout=60)
    assert view["state"] == "COMPLETED"
    assert_came_back(live, saga_id, "a")
    assert runs_after_a_kill(live, saga_id, "a") >= 2, "delivered twice"
    assert view["context"]["results"]["a"]["applied"] is False, "the second found the effect"


def test_coordinator_killed_mid_transition_is_redriven(live: Cluster):
    saga_id = start(live, {"b": {"crash": "coordinator"}})
    live.wait_worker_dead("w")
    # The transition never committed: SQL still says b is running.
    assert {s["name"]: s["state"] for s in live.view(saga_id)["steps"]}["b"] == "RUNNING"
    live.restart_worker("w")
    view = live.wait_for(saga_id, timeout=60)
    assert view["state"] == "COMPLETED"
    assert_came_back(live, saga_id, "b")
    runs_after_a_kill(live, saga_id, "b")


def test_a_soft_time_limit_while_its_success_is_recorded_fails_no_step(live: Cluster):
    """The step's effect is applied, then its soft limit strikes the statement recording it.

    Found by the several-hosts partition in ``make chaos``: a charge committed, the host was cut
    off while recording it, and the soft limit fired in that statement once the cut healed. The
    raw ``SoftTimeLimitExceeded`` reached the failure handler as a definite failure: the step
    FAILED uncompensated, the saga COMPENSATED with the charge in place ("charged and not
    refunded"). The effect is known to have happened: the step must succeed."""
    saga_id = start(live, {"b": {"crash": "soft_limit_on_record"}})
    view = live.wait_for(saga_id, timeout=60)
    assert [s["state"] for s in view["steps"]] == ["SUCCEEDED", "SUCCEEDED", "SUCCEEDED"]
    assert view["state"] == "COMPLETED"
    assert live.calls(saga_id, "a", "compensation") == 0


def test_redis_restarted_empty_loses_no_saga(live: Cluster):
    """Every queued message lost (Redis restarted empty; RabbitMQ: see restart_broker)."""
    live.workers["w"].stop()  # nobody consumes: the first steps wait in the broker
    began = time.monotonic()
    sagas = [start(live, {}) for _ in range(3)]
    assert live.queue_depth("crashy") == 3, "the first steps wait in the broker"
    live.restart_broker()
    assert live.queue_depth("crashy") == 0
    live.restart_worker("w")
    # Stalled since its start; re-driven within the bound of the worker (and beat) being back.
    bound = time.monotonic() - began + REDRIVE_BOUND
    for saga_id in sagas:
        assert live.wait_for(saga_id, timeout=60)["state"] == "COMPLETED"
        assert_redriven_in_bound(live, saga_id, bound)
        for step in "abc":
            assert live.calls(saga_id, step, "action") == 1
