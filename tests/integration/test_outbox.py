"""The saga log as the transactional outbox, and its relay: at least once, never skipped, and
one relay at a time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue
from sqlalchemy import select, update

from sagas import SagaSettings
from sagas.coordinator import Decision, SagaSnapshot, StepSnapshot, Transition
from sagas.runtime import relay as outbox
from sagas.states import SagaState, StepState
from sagas.store import migrate
from sagas.store import outbox as store_outbox
from sagas.store.log import LogEntry, entry_of
from sagas.store.sql import Store, log_t
from tests.conftest import Backend, broker_url, fresh_database, wait_for_saga
from tests.support import test_sagas as ts
from tests.support.engine import get_store, start_saga
from tests.support.services import (
    create_pg_database,
    drop_pg_database,
    postgres_reachable,
    require_service,
)

ROOT = Path(__file__).resolve().parents[2]


def log_of(store: Store, saga_ids: list[str]) -> list[tuple[str, LogEntry]]:
    with store.read() as conn:
        return [
            (str(r[0]), entry_of(r[1:]))
            for r in conn.execute(
                select(log_t.c.saga_id, log_t.c.seq, log_t.c.at, log_t.c.cause, log_t.c.step,
                       log_t.c.saga_state, log_t.c.transitions, log_t.c.result)
                .where(log_t.c.saga_id.in_(saga_ids)).order_by(log_t.c.seq)
            )
        ]


def events_for(store: Store, saga_ids: list[str], saga: str = "t_linear") -> list[dict[str, Any]]:
    return [e for saga_id, entry in log_of(store, saga_ids)
            for e in store_outbox.events_of(entry, saga_id, saga, {})]


class Consumer:
    """A queue bound to the events exchange before anything is published."""

    def __init__(self, url: str, binding: str = "#") -> None:
        self.conn = Connection(url)
        self.queue = Queue(f"obs-test-{uuid.uuid4().hex[:8]}",
                           Exchange(store_outbox.EXCHANGE, type="topic", durable=True),
                           routing_key=binding, auto_delete=False)
        self.queue(self.conn.default_channel).declare()
        self.simple = self.conn.SimpleQueue(self.queue)
        self.received: list[dict[str, Any]] = []

    def drain(self, timeout: float = 0.2) -> list[dict[str, Any]]:
        while True:
            try:
                message = self.simple.get(timeout=timeout)
            except self.simple.Empty:
                return self.received
            payload = message.payload
            payload["_routing_key"] = message.delivery_info.get("routing_key")
            self.received.append(payload)
            message.ack()

    def close(self) -> None:
        self.simple.close()  # its consumer first: RabbitMQ cancels consumers of a deleted queue
        self.queue(self.conn.default_channel).delete()
        self.conn.release()


@pytest.fixture
def consumer() -> Iterator[Consumer]:
    c = Consumer(broker_url())
    yield c
    c.close()


# --- what is published -------------------------------------------------------------------
def test_only_lifecycle_transitions_of_a_log_row_are_events():
    entry = LogEntry(7, datetime(2026, 1, 1, tzinfo=UTC), "StepSucceeded", "a", "RUNNING", (
        Transition(None, "PENDING", "RUNNING"),
        Transition("a", "RUNNING", "SUCCEEDED", 1),
        Transition("b", "PENDING", "RUNNING", 1),
        Transition("b", "RUNNING", "RUNNING", 2, "retry"),
    ), {"r": 1})
    events = store_outbox.events_of(entry, "s", "order", {"x": 1})
    assert [e["payload"]["event"] for e in events] == ["saga.started", "step.succeeded"]
    assert [e["routing_key"] for e in events] == ["order.saga.started", "order.step.succeeded"]
    assert [e["event_id"] for e in events] == ["7.0", "7.1"], "stable ids: log seq and index"
    assert events[0]["payload"]["input"] == {"x": 1}
    assert events[1]["payload"]["result"] == {"r": 1}


@pytest.mark.integration
def test_a_compensated_sagas_lifecycle_is_in_its_log_in_order(engine_backend: Backend):
    saga_id = start_saga(ts.linear, {"plan": {"c": {"fail": True}}})
    wait_for_saga(saga_id)
    events = events_for(get_store(), [saga_id])
    assert [(e["payload"]["event"], e["payload"]["step"]) for e in events] == [
        ("saga.started", None), ("step.succeeded", "a"), ("step.succeeded", "b"),
        ("step.failed", "c"), ("step.compensated", "b"), ("step.compensated", "a"),
        ("saga.compensated", None),
    ]
    assert "planned failure" in events[3]["payload"]["error"]


@pytest.mark.integration
def test_no_log_row_survives_a_transition_that_rolled_back(engine_backend: Backend):
    store = get_store()
    snap = SagaSnapshot(f"rollback-{uuid.uuid4()}", "t_linear", SagaState.RUNNING, {},
                        {n: StepSnapshot(n) for n in "abcd"})
    decision = Decision(transitions=[Transition(None, SagaState.PENDING, SagaState.RUNNING)])
    with pytest.raises(RuntimeError), store.begin() as conn:
        store.append(conn, snap, decision, cause="Started", subject=None, stall_deadline=None)
        written = [e for _, e in log_of_conn(conn, snap.id)]
        assert [e.cause for e in written] == ["Started"], "written in the transition's own"
        raise RuntimeError("the transition fails after its row was written")
    assert log_of(store, [snap.id]) == []


def log_of_conn(conn: Any, saga_id: str) -> list[tuple[str, LogEntry]]:
    return [(saga_id, entry_of(r)) for r in conn.execute(
        select(log_t.c.seq, log_t.c.at, log_t.c.cause, log_t.c.step, log_t.c.saga_state,
               log_t.c.transitions, log_t.c.result).where(log_t.c.saga_id == saga_id))]


# --- the relay ---------------------------------------------------------------------------
@pytest.fixture
def scratch_store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path}/outbox.db")
    migrate.upgrade(store.engine)
    return store


def add_saga(store: Store, n: int, saga: str = "order") -> str:
    """A started saga whose first ``n`` steps succeeded: 1 + n events on the log."""
    steps = [f"x{i}" for i in range(n + 1)]
    snap = SagaSnapshot(str(uuid.uuid4()), saga, SagaState.PENDING, {},
                        {s: StepSnapshot(s) for s in steps})
    started = Decision(transitions=[Transition(None, SagaState.PENDING, SagaState.RUNNING)])
    snap.state = SagaState.RUNNING
    store.start(snap, started, idempotency_key=None, digest=None, stall_deadline=None,
                deadline_at=None)
    for step in steps[:n]:
        snap.steps[step] = StepSnapshot(step, StepState.SUCCEEDED, 1, {"step": step})
        with store.begin() as conn:
            store.append(conn, snap, Decision(transitions=[
                Transition(step, StepState.RUNNING, StepState.SUCCEEDED, 1)]),
                cause="StepSucceeded", subject=step, stall_deadline=None)
    return snap.id


def test_a_failing_publish_keeps_the_cursor_and_is_retried_until_it_goes_through(
    scratch_store: Store,
):
    calls: list[str] = []
    down = True

    def broker(row: dict[str, Any]) -> None:
        calls.append(row["event_id"])
        if down:
            raise ConnectionError("broker down")

    relay = outbox.Relay(scratch_store, SagaSettings(), broker, backoff=20, backoff_max=20)
    add_saga(scratch_store, 2)
    with pytest.raises(ConnectionError):
        relay.run_once()
    assert outbox.stats(scratch_store).pending == 3, "nothing passed: the cursor stays"
    assert relay.failures == 1 and 10 <= relay.delay(relay.failures) <= 20
    with pytest.raises(ConnectionError):
        relay.run_once()
    assert calls[0] == calls[1], "the same first event is tried again, nothing skipped"
    down = False
    calls.clear()
    assert relay.run_once() == 3
    assert len(calls) == 3 and len(set(calls)) == 3
    assert outbox.stats(scratch_store).pending == 0 and relay.failures == 0


def test_the_relays_backlog_is_a_gauge_read_on_metrics_at_scrape_time(scratch_store: Store):
    from sagas.observe import metrics

    def pending() -> float:
        text = metrics.render().decode()
        line = next(x for x in text.splitlines() if x.startswith("sagas_outbox_pending "))
        return float(line.split()[1])

    previous = metrics._in_flight_source
    metrics.count_in_flight_of(lambda: scratch_store)
    try:
        add_saga(scratch_store, 2)
        assert pending() == 3 == outbox.stats(scratch_store).pending
        add_saga(scratch_store, 1)
        assert pending() == 5, "read when scraped, not cached"
        sent: list[str] = []
        outbox.Relay(scratch_store, SagaSettings(), lambda row: sent.append(row)).run_once()
        assert len(sent) == 5 and pending() == 0
    finally:
        metrics.count_in_flight_of(previous)


def test_relay_publishes_to_the_topic_exchange_by_saga_and_event(
    scratch_store: Store, redis_server: Any
):
    only_completions = Consumer(broker_url(), binding="*.saga.completed")
    everything = Consumer(broker_url(), binding="billing.#")
    try:
        saga_id = add_saga(scratch_store, 2, saga="billing")
        snap = SagaSnapshot(saga_id, "billing", SagaState.COMPLETED, {}, {})
        with scratch_store.begin() as conn:
            scratch_store.append(conn, snap, Decision(
                transitions=[Transition(None, SagaState.RUNNING, SagaState.COMPLETED)],
                saga_changed=True), cause="StepSucceeded", subject=None, stall_deadline=None)
        relay = outbox.Relay(scratch_store, SagaSettings(), outbox.KombuPublisher(broker_url()))
        assert relay.run_once() == 4
        got = everything.drain()
        assert [m["event"] for m in got] == ["saga.started", "step.succeeded", "step.succeeded",
                                             "saga.completed"]
        assert {m["_routing_key"] for m in got} == {
            "billing.saga.started", "billing.step.succeeded", "billing.saga.completed"}
        assert [m["event"] for m in only_completions.drain()] == ["saga.completed"]
        assert outbox.stats(scratch_store).pending == 0
    finally:
        only_completions.close()
        everything.close()


def test_while_one_relay_holds_the_lease_another_publishes_nothing(scratch_store: Store):
    first_sent: list[str] = []
    second_sent: list[str] = []
    first = outbox.Relay(scratch_store, SagaSettings(), lambda r: first_sent.append(
        r["event_id"]), lease=30, owner="first")
    second = outbox.Relay(scratch_store, SagaSettings(), lambda r: second_sent.append(
        r["event_id"]), lease=30, owner="second")
    add_saga(scratch_store, 1)
    assert first.run_once() == 2
    add_saga(scratch_store, 1)
    assert second.run_once() == 0 and second_sent == []
    assert outbox.stats(scratch_store).owner == "first"
    first.release()
    assert second.run_once() == 2
    assert len(first_sent) == len(second_sent) == 2
    assert not set(first_sent) & set(second_sent)


def start_relay(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "sagas.ops.cli", "-A", "config", "relay",
             "--interval", "0.05", *args],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )


def _catch_up(store: Store) -> None:
    """Earlier tests' events are not this test's: move the cursor past them."""
    stats = outbox.stats(store)
    with store.begin() as conn:
        newest = conn.execute(select(log_t.c.seq, log_t.c.txid).order_by(
            log_t.c.txid.desc() if store.dialect == "postgresql" else log_t.c.seq.desc(),
            log_t.c.seq.desc()).limit(1)).first()
        if newest is None:
            return
        moved = conn.execute(update(store_outbox.cursor_t).values(
            position=newest.seq, position_txid=newest.txid or 0, owner=None,
            lease_until=None)).rowcount
        if not moved:
            conn.execute(store_outbox.cursor_t.insert().values(
                name="default", position=newest.seq, position_txid=newest.txid or 0))
    assert outbox.stats(store).pending == 0, stats


@pytest.mark.integration
@pytest.mark.slow
def test_killing_a_relay_mid_batch_loses_no_event(
    engine_backend: Backend, consumer: Consumer, tmp_path: Path
):
    saga_ids = [start_saga(ts.linear, {}) for _ in range(5)]
    for saga_id in saga_ids:
        wait_for_saga(saga_id)
    store = get_store()
    expected = {e["event_id"] for e in events_for(store, saga_ids)}
    assert len(expected) == 5 * 6
    _park_before(store, saga_ids)
    log = tmp_path / "relay.log"
    first = start_relay(engine_backend.env, log, "--batch", "10", "--throttle", "0.2",
                        "--lease", "2")
    try:
        deadline = time.monotonic() + 30
        while len(consumer.drain(0.05)) < 3 and time.monotonic() < deadline:
            pass
        assert len(consumer.received) >= 3, f"the first relay published nothing: {log.read_text()}"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    published_before_kill = {m["id"] for m in consumer.drain(0.3)} & expected
    position = outbox.stats(store).position
    unrecorded = {i for i in published_before_kill if int(i.split(".")[0]) > position}
    assert unrecorded, "the kill did not land mid-batch: the cursor passed every published row"

    second = start_relay(engine_backend.env, log, "--lease", "2")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and outbox.stats(store).pending:
            time.sleep(0.2)
        assert outbox.stats(store).pending == 0, log.read_text()
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(10)
    received = [m["id"] for m in consumer.drain(0.5)]
    assert expected <= set(received), f"lost: {expected - set(received)}"
    once = sorted(i for i in unrecorded if received.count(i) < 2)
    assert not once, (f"the killed batch is sent again; sent once only: {once}; relay log:\n"
                      f"{log.read_text()}")


@pytest.mark.integration
@pytest.mark.slow
def test_two_relays_at_once_deliver_each_event_exactly_once(
    engine_backend: Backend, consumer: Consumer, tmp_path: Path
):
    store = get_store()
    saga_ids = [start_saga(ts.linear, {}) for _ in range(12)]
    for saga_id in saga_ids:
        wait_for_saga(saga_id)
    expected = {e["event_id"] for e in events_for(store, saga_ids)}
    _park_before(store, saga_ids)
    log = tmp_path / "relays.log"
    # A backlog, two relays started together, small batches and a pause per publish: without
    # the lease both would read the same rows from the same cursor.
    relays = [start_relay(engine_backend.env, log, "--batch", "5", "--lease", "5",
                          "--throttle", "0.01") for _ in range(2)]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not expected <= {m["id"] for m in consumer.drain()}:
            time.sleep(0.1)
        more = saga_ids + [start_saga(ts.linear, {}) for _ in range(4)]
        for saga_id in more:
            wait_for_saga(saga_id)
        expected = {e["event_id"] for e in events_for(store, more)}
        while time.monotonic() < deadline and not expected <= {m["id"] for m in consumer.drain()}:
            time.sleep(0.1)
    finally:
        for relay in relays:
            os.killpg(relay.pid, signal.SIGTERM)
            relay.wait(15)
    counts = Counter(m["id"] for m in consumer.drain(0.5))
    assert expected <= set(counts), f"lost: {expected - set(counts)}\n{log.read_text()}"
    twice = {i: n for i, n in counts.items() if i in expected and n > 1}
    assert not twice, f"published more than once by two relays at once: {twice}"


def _park_before(store: Store, saga_ids: list[str]) -> None:
    """The relay's cursor just before these sagas' first log row."""
    _catch_up(store)
    with store.begin() as conn:
        first = conn.execute(
            select(log_t.c.txid, log_t.c.seq).where(log_t.c.saga_id.in_(saga_ids))
            .order_by(log_t.c.txid, log_t.c.seq).limit(1)
        ).one()
        conn.execute(update(store_outbox.cursor_t).values(position=first.seq - 1,
                                                          position_txid=first.txid or 0))


@pytest.mark.integration
def test_a_row_that_commits_late_on_postgresql_is_not_skipped(tmp_path_factory: Any):
    """Sequence numbers are taken at insert, not at commit: the relay must not pass a row whose
    transaction is still open, or it would never publish it."""
    require_service(postgres_reachable(), "PostgreSQL at 127.0.0.1:5432")
    name, url = create_pg_database()
    try:
        store = Store(url)
        migrate.upgrade(store.engine)
        sent: list[str] = []
        relay = outbox.Relay(store, SagaSettings(), lambda r: sent.append(r["payload"]["saga_id"]))
        early = add_saga(store, 0)
        assert relay.run_once() == 1
        snap = SagaSnapshot(early, "order", SagaState.RUNNING, {},
                            {"x0": StepSnapshot("x0", StepState.SUCCEEDED, 1, {})})
        with store.engine.begin() as slow:  # its own connection: takes its seq first, commits last
            store.append(slow, snap, Decision(transitions=[
                Transition("x0", StepState.RUNNING, StepState.SUCCEEDED, 1)]),
                cause="StepSucceeded", subject="x0", stall_deadline=None)
            late = add_saga(store, 0)  # a later seq, committed while the first is open
            assert relay.run_once() == 0, "nothing passes an open transaction's row"
        assert relay.run_once() == 2
        assert sent == [early, early, late]
    finally:
        from sagas.store.connect import _engines

        for key in [k for k in _engines if k[1] == url]:
            _engines.pop(key).dispose()
        drop_pg_database(name)


@pytest.mark.integration
def test_a_relay_started_before_the_schema_waits_quietly_then_relays(
    redis_server: Any, tmp_path: Path
):
    from tests.conftest import _worker_env

    url = f"sqlite:///{tmp_path}/fresh.db"
    env = _worker_env(url)
    log = tmp_path / "relay.log"
    relay = start_relay(env, log)
    try:
        time.sleep(2.5)  # several polls with no tables yet
        upgraded = subprocess.run([sys.executable, "-m", "sagas.ops.cli", "-A", "config", "db",
                                   "upgrade"], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=60)
        assert upgraded.returncode == 0, upgraded.stderr
        deadline = time.monotonic() + 15
        while "relaying" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(relay.pid, signal.SIGTERM)
        relay.wait(15)
    text = log.read_text()
    assert text.count("waiting for the saga tables") == 1, text
    assert "the saga tables are there: relaying" in text
    for noise in ("no such table", "relation", "Traceback", "SELECT", "[SQL"):
        assert noise not in text, text


_ = fresh_database  # the fixtures module is imported for its helpers
