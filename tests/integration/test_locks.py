"""Semantic locks on real workers: sagas on one key never interleave, in arrival order; a
``reject`` saga is refused with the key and its holder; crashes and a broker wipe leak no lock.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select

import sagas
from config import engine
from sagas.store.locks import locks_t, waits_t
from tests.chaos.cluster import Cluster
from tests.conftest import Backend, wait_for_saga
from tests.support import test_sagas as ts
from tests.support.engine import get_store, start_saga

pytestmark = pytest.mark.integration

TERMINAL = {"COMPLETED", "COMPENSATED"}


def _when(view: dict[str, Any]) -> tuple[datetime, datetime]:
    """When the saga started running its steps and when it settled (from its history)."""
    began = next(e["at"] for e in view["events"] if e["step"] is None
                 and e["to_state"] == "RUNNING")
    ended = next(e["at"] for e in view["events"] if e["step"] is None
                 and e["to_state"] in TERMINAL)
    return datetime.fromisoformat(began), datetime.fromisoformat(ended)


@pytest.mark.slow
def test_a_hundred_sagas_on_one_key_run_one_at_a_time_in_arrival_order(engine_backend: Backend):
    key = f"account:{uuid.uuid4()}"
    ids = [start_saga(ts.locked, {"keys": [key], "n": i}) for i in range(100)]
    states = engine.states(ids)
    assert states[ids[-1]] is sagas.SagaState.WAITING, "the last one queued behind the others"
    assert engine.lock_holder(key) in ids
    views = [wait_for_saga(i, timeout=180) for i in ids]
    assert {v["state"] for v in views} == {"COMPLETED"}
    spans = [_when(v) for v in views]
    for (began, _), (_, ended) in zip(spans[1:], spans, strict=False):
        assert began >= ended, "two sagas on one key in flight at once"
    assert [s[0] for s in spans] == sorted(s[0] for s in spans), "not in arrival order"
    waited = [v for v in views if any(e["to_state"] == "WAITING" for e in v["events"])]
    assert len(waited) >= 90, "most of them waited"
    assert any(f"waiting for key {key!r}" in (e["error"] or "") for e in waited[0]["events"])
    assert engine.lock_holder(key) is None and engine.locks(key) == []


@pytest.mark.slow
def test_with_reject_exactly_the_holder_runs_and_every_other_start_is_refused_by_name(
    engine_backend: Backend,
):
    key = f"account:{uuid.uuid4()}"
    holder = start_saga(ts.locked_reject, {"keys": [key], "plan": {"a": {"sleep": 4}}})
    refused: list[sagas.SagaLockedError] = []
    others = [f"refused-{uuid.uuid4()}" for _ in range(99)]
    for saga_id in others:
        with pytest.raises(sagas.SagaLockedError) as caught:
            start_saga(ts.locked_reject, {"keys": [key]}, saga_id=saga_id)
        refused.append(caught.value)
    assert len(refused) == 99
    assert {(e.key, e.holder) for e in refused} == {(key, holder)}
    assert f"held by saga {holder}" in str(refused[0])
    assert engine.states(others) == {}, "nothing of a refused start is recorded"
    assert wait_for_saga(holder, timeout=60)["state"] == "COMPLETED"
    assert engine.lock_holder(key) is None
    # Free again: the next start runs.
    assert wait_for_saga(start_saga(ts.locked_reject, {"keys": [key]}))["state"] == "COMPLETED"


@pytest.mark.slow
def test_sagas_taking_two_keys_in_any_order_never_deadlock(engine_backend: Backend):
    x, y = f"x:{uuid.uuid4()}", f"y:{uuid.uuid4()}"
    shapes = [[x, y], [y, x], [y], [x]]
    ids = [start_saga(ts.locked, {"keys": shapes[i % 4]}) for i in range(24)]
    views = [wait_for_saga(i, timeout=120) for i in ids]
    assert {v["state"] for v in views} == {"COMPLETED"}
    for k in (x, y):  # on each key, one saga at a time
        spans = sorted(_when(v) for v, i in zip(views, range(24), strict=True)
                       if k in shapes[i % 4])
        for (began, _), (_, ended) in zip(spans[1:], spans, strict=False):
            assert began >= ended
    assert engine.locks(x) == [] and engine.locks(y) == []


def test_a_cancelled_waiter_leaves_its_queue_and_the_key_goes_to_the_next(
    engine_backend: Backend,
):
    key = f"account:{uuid.uuid4()}"
    first = start_saga(ts.locked, {"keys": [key], "plan": {"a": {"sleep": 2}}})
    second = start_saga(ts.locked, {"keys": [key]})
    third = start_saga(ts.locked, {"keys": [key]})
    assert engine.states([second, third]) == {second: sagas.SagaState.WAITING,
                                              third: sagas.SagaState.WAITING}
    engine.cancel(second)
    assert engine.handle(second).state is sagas.SagaState.COMPENSATED, "nothing of it ran"
    assert engine.locks(key)[0]["waiting"] == [third]
    assert wait_for_saga(third, timeout=60)["state"] == "COMPLETED"
    assert wait_for_saga(first)["state"] == "COMPLETED"
    assert int(ts.ledger().get(f"calls:{second}:a:action") or 0) == 0


def test_a_participant_sees_the_keys_its_saga_holds_and_a_read_api_can_ask(
    engine_backend: Backend,
):
    key = f"account:{uuid.uuid4()}"
    saga_id = start_saga(ts.locked, {"keys": [key], "plan": {"a": {"sleep": 1}}})
    assert engine.lock_holder(key) == saga_id  # a pessimistic view: "being changed"
    view = get_store().get_view(saga_id)
    assert view["locks"] == {"holds": [key], "waits": []}
    wait_for_saga(saga_id)
    assert engine.lock_holder(key) is None


# --- crashes and a broker wipe ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_worker_and_a_wiped_broker_leak_no_lock(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, env={"STEP_TIMEOUT": "3", "RECOVERY_GRACE": "1"})
    try:
        cluster.migrate()
        cluster.start_workers({"w": ("testsvc,saga", 2)})
        cluster.start_beat()
        keys = [f"k{i}" for i in range(3)]
        ids = []
        for i in range(30):
            plan = {"a": {"sleep": 0.3}}
            body = json.dumps({"keys": [keys[i % 3]], "plan": plan})
            ids.append(cluster.client("start", "t_locked", body)["id"])
        time.sleep(1.5)
        cluster.restart_worker("w")  # SIGKILL mid-run, a new one in its place
        redis.Redis.from_url(cluster.redis.url).flushall()  # every queued message gone
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            if set(cluster.states(ids).values()) <= TERMINAL:
                break
            cluster.ensure_workers()
            time.sleep(1)
        states = cluster.states(ids)
        assert set(states.values()) <= TERMINAL, (states, cluster.logs()[-3000:])
        with cluster.store.read() as conn:
            leaked = conn.execute(select(locks_t)).all() + conn.execute(select(waits_t)).all()
        assert leaked == [], "every key given back, every queue empty"
        for key in keys:  # still one at a time per key, through the crash
            spans = sorted(_when(cluster.view(i)) for n, i in enumerate(ids)
                           if keys[n % 3] == key)
            for (began, _), (_, ended) in zip(spans[1:], spans, strict=False):
                assert began >= ended
        audit = json.loads(cluster.sagas_cli("audit", "--json", check=False).stdout)
        assert audit["ok"], audit["violations"][:10]
    finally:
        cluster.stop()


def test_the_cli_shows_who_holds_a_key_and_who_waits_piped_at_80_columns(
    engine_backend: Backend,
):
    from tests.integration.test_cli import sagas as cli

    key = f"account:{uuid.uuid4()}"
    # The holder sleeps long enough for four CLI runs on a busy machine.
    holder = start_saga(ts.locked, {"keys": [key], "plan": {"a": {"sleep": 12}}})
    waiter = start_saga(ts.locked, {"keys": [key]})
    env = {**engine_backend.env, "COLUMNS": "80"}
    listed = cli(env, "locks", key)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [f"{key}  held by {holder}", f"  1. waiting: {waiter}"]
    shown = cli(env, "show", waiter)
    assert f"waits for key {key} (held by saga {holder})" in shown.stdout
    assert "WAITING" in shown.stdout
    as_json = json.loads(cli(env, "locks", key, "--json").stdout)
    assert as_json[0]["holder"] == holder and as_json[0]["waiting"] == [waiter]
    wait_for_saga(waiter, timeout=60)
    assert cli(env, "locks", key).stdout.strip() == f"key {key} is free"
