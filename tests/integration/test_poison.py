"""Poison on every queue, refused one by one, and nothing else disturbed.

A private deployment (its own Redis and SQLite store, ``tests.chaos.cluster``) runs one prefork
worker serving the sample's four queues (inventory, payment, shipping, saga) and the test
domain's, with multiprocess metrics on a port as the README says. A foreign client then puts
poison on each of the four queues: a body that is not JSON, JSON that is not a task message,
arguments that do not fit the task, a step message with wrong fields, an unregistered task, a
step of an unknown saga, of an unknown version and of an unknown step, and a 10 MiB payload;
and the test domain runs sagas whose step returns a result JSON cannot hold. Each must be
refused with one log line and no traceback, counted in ``sagas_poison_messages_total{reason}``,
listed by ``sagas dead``, and the same worker must still run an order saga through all four
queues.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery

from config import queues
from sagas.runtime.poison import PoisonReason
from tests.chaos.cluster import Cluster
from tests.support.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SAMPLE_QUEUES = ("inventory", "payment", "shipping", "saga")
# A task each queue's worker serves, in the sample (the saga queue's is the engine's own).
TASK_OF = {"inventory": "inventory.reserve", "payment": "payment.charge",
           "shipping": "shipping.create_shipment", "saga": "sagas.step_failed"}
STEP_TASK = "inventory.reserve"  # every worker registers every task; the queue decides who runs
TEN_MIB = 10 * 1024 * 1024


@dataclass(frozen=True)
class Poison:
    task_id: str
    queue: str
    reason: PoisonReason


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, int]]:
    root = tmp_path_factory.mktemp("poison")
    prom = root / "prom"
    prom.mkdir()
    port = free_port()
    cluster = Cluster(root, env={"PROMETHEUS_MULTIPROC_DIR": str(prom),
                                 "SAGAS_METRICS_PORT": str(port)})
    try:
        cluster.migrate()
        cluster.start_workers({"all": (",".join((*SAMPLE_QUEUES, "testsvc")), 2)})
        yield cluster, port
    finally:
        cluster.stop()


def foreign(cluster: Cluster) -> Celery:
    """Another client of the deployment's broker, never current in this process."""
    other = Celery("hostile", broker=cluster.broker_url, set_as_current=False)
    other.conf.update(task_queues=queues.task_queues, task_default_queue=queues.SAGA,
                      task_serializer="json")
    return other


def publish_raw(other: Celery, queue_name: str, body: bytes, task: str, task_id: str) -> None:
    queue = other.amqp.queues[queue_name]
    with other.connection_for_write() as conn:
        conn.Producer().publish(
            body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
            content_type="application/json", content_encoding="utf-8",
            headers={"task": task, "id": task_id, "lang": "py"},
        )


def step_message(saga: str, version: int = 1, step: str = "reserve_inventory",
                 **changes: Any) -> dict[str, Any]:
    saga_id = str(uuid.uuid4())
    ctx = {"saga_id": saga_id, "saga": saga, "step": step, "phase": "action",
           "idempotency_key": f"{saga_id}:{step}", "attempt": 1, "version": version,
           "inline": True, "input": {"customer_id": "c", "item": "book", "quantity": 1,
                                     "price": 1}, "results": {}}
    ctx.update(changes)
    return ctx


def send_poison(cluster: Cluster) -> list[Poison]:
    """Every kind of poison on each of the sample's four queues; their task ids say which."""
    other = foreign(cluster)
    sent: list[Poison] = []

    def tid(queue: str, reason: PoisonReason) -> str:
        task_id = f"poison-{queue}-{reason}-{uuid.uuid4().hex[:6]}"
        sent.append(Poison(task_id, queue, reason))
        return task_id

    try:
        for q in SAMPLE_QUEUES:
            task = TASK_OF[q]
            publish_raw(other, q, b"{not json", task, tid(q, PoisonReason.UNDECODABLE))
            publish_raw(other, q, b'{"hello": "world"}', task, tid(q, PoisonReason.MALFORMED))
            other.send_task(task, args=(1, 2, 3, 4, 5, 6, 7), queue=q,
                            task_id=tid(q, PoisonReason.MALFORMED))
            other.send_task(STEP_TASK, args=(step_message("order", phase="sideways",
                                                          attempt="first"),),
                            queue=q, task_id=tid(q, PoisonReason.MALFORMED))
            other.send_task("no.such.task", args=(1,), queue=q,
                            task_id=tid(q, PoisonReason.UNKNOWN_TASK))
            other.send_task(STEP_TASK, args=(step_message("no_such_saga"),), queue=q,
                            task_id=tid(q, PoisonReason.UNKNOWN_SAGA))
            other.send_task(STEP_TASK, args=(step_message("order", version=99),), queue=q,
                            task_id=tid(q, PoisonReason.UNKNOWN_VERSION))
            other.send_task(STEP_TASK, args=(step_message("order", step="teleport"),), queue=q,
                            task_id=tid(q, PoisonReason.UNKNOWN_STEP))
            other.send_task(STEP_TASK, args=(step_message("order", pad="x" * TEN_MIB),),
                            queue=q, task_id=tid(q, PoisonReason.TOO_LARGE))
    finally:
        other.close()
    return sent


def metric(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^sagas_poison_messages_total\{reason="([a-z_]+)"\} (\S+)$', text, re.MULTILINE)}


def wait_until(predicate: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def refusal_lines(log: str, task_id: str) -> list[str]:
    return [line for line in log.splitlines()
            if "poison message refused" in line and task_id in line]


@pytest.fixture(scope="module")
def poisoned(deployment: tuple[Cluster, int]) -> dict[str, Any]:
    cluster, _ = deployment
    sent = send_poison(cluster)
    # A result JSON cannot hold, before the pivot (undone) and from the pivot (kept, forward).
    before_pivot = cluster.client("start", "t_pivot", json.dumps(
        {"plan": {"a": {"unserializable": True}}}))["id"]
    at_pivot = cluster.client("start", "t_pivot", json.dumps(
        {"plan": {"p": {"unserializable": True}}}))["id"]
    # ... and the business as usual: an order through all four queues, after all the poison.
    order = cluster.client("start", "order", json.dumps(
        {"customer_id": "after-poison", "item": "book", "quantity": 1, "price": 10}))["id"]
    views = {name: cluster.wait_for(saga_id, timeout=90) for name, saga_id in
             (("before_pivot", before_pivot), ("at_pivot", at_pivot), ("order", order))}
    wait_until(lambda: all(refusal_lines(cluster.logs(), p.task_id) for p in sent),
               "a refusal line for every poison message", timeout=60)
    return {"sent": sent, "views": views}


# --- the tests -----------------------------------------------------------------------------
def test_each_poison_message_is_refused_with_one_line_and_no_traceback(
    deployment: tuple[Cluster, int], poisoned: dict[str, Any]
):
    cluster, _ = deployment
    log = cluster.logs()
    for p in poisoned["sent"]:
        lines = refusal_lines(log, p.task_id)
        assert len(lines) == 1, (p, lines)
        line = lines[0]
        assert f"poison message refused ({p.reason})" in line, (p, line)
        assert "dead letter" in line and "sagas dead show" in line, line
        level = "WARNING" if p.reason is PoisonReason.UNKNOWN_VERSION else "ERROR"
        assert level in line, line
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:4000]
    for celery_report in ("Received unregistered task", "Can't decode message body",
                          "Received invalid task message", "raised unexpected"):
        assert celery_report not in log


def test_every_queue_is_drained_and_the_worker_still_runs_sagas_through_all_four(
    deployment: tuple[Cluster, int], poisoned: dict[str, Any]
):
    cluster, _ = deployment
    order = poisoned["views"]["order"]
    assert order["state"] == "COMPLETED", order
    assert [s["state"] for s in order["steps"]] == ["SUCCEEDED"] * 3
    worker = cluster.workers["all"]
    assert worker.process is not None and worker.process.poll() is None
    depths = {q: cluster.queue_depth(q) for q in SAMPLE_QUEUES}
    assert depths == dict.fromkeys(SAMPLE_QUEUES, 0)
    # Nothing the poison named was run or recorded.
    assert set(cluster.states()) == {v["id"] for v in poisoned["views"].values()}


def test_a_result_json_cannot_hold_is_undone_before_the_pivot_and_kept_after(
    deployment: tuple[Cluster, int], poisoned: dict[str, Any]
):
    undone = poisoned["views"]["before_pivot"]
    assert undone["state"] == "COMPENSATED", undone
    steps = {s["name"]: s for s in undone["steps"]}
    # Its effect may have happened: a is compensated (never lost, never left RUNNING).
    assert steps["a"]["state"] == "COMPENSATED"
    assert "UnserializableResult" in (steps["a"]["error"] or "")
    assert "not JSON-serialisable" in (steps["a"]["error"] or "")
    forward = poisoned["views"]["at_pivot"]
    assert forward["state"] == "COMPLETED", forward
    pivot = {s["name"]: s for s in forward["steps"]}["p"]
    assert pivot["state"] == "SUCCEEDED"
    assert pivot["result"] == {"unserializable_result": "dict: {'step': 'p', 'ids': {1, 2}}"}
    cluster, _ = deployment
    log = cluster.logs()
    for saga_id in (undone["id"], forward["id"]):
        lines = [ln for ln in log.splitlines()
                 if "poison message refused (unserializable_result)" in ln and saga_id in ln]
        assert len(lines) == 1, lines


def test_the_metric_counts_each_refusal_by_reason(
    deployment: tuple[Cluster, int], poisoned: dict[str, Any]
):
    _, port = deployment
    expected = Counter(str(p.reason) for p in poisoned["sent"])
    expected["unserializable_result"] += 2
    counted = wait_until(lambda: (m := metric(port)) == dict(expected) and m, "the metric")
    assert counted == dict(expected)
    assert set(counted) == {str(r) for r in PoisonReason}


def test_sagas_dead_lists_shows_and_purges_them(
    deployment: tuple[Cluster, int], poisoned: dict[str, Any]
):
    cluster, _ = deployment
    sent = poisoned["sent"]
    env_cols = {"COLUMNS": "80"}
    listed = json.loads(cluster.sagas_cli("dead", "--json", "--limit", "500").stdout)
    assert listed["total"] == len(sent) + 2
    by_task = {item["task_id"]: item for item in listed["items"]}
    for p in sent:
        item = by_task[p.task_id]
        assert (item["reason"], item["queue"]) == (str(p.reason), p.queue), item
    assert listed["counts"]["too_large"] == len(SAMPLE_QUEUES)

    # What an operator reads, piped (80 columns): every reason and queue, no line over 80.
    old = cluster.env.get("COLUMNS")
    cluster.env.update(env_cols)
    try:
        table = cluster.sagas_cli("dead", "--limit", "500")
        assert table.returncode == 0
        text = table.stdout
        assert f"{len(sent) + 2} dead letters" in text
        for reason in PoisonReason:
            assert str(reason) in text, reason
        for queue in SAMPLE_QUEUES:
            assert queue in text
        assert max(len(line) for line in text.splitlines()) <= 80, text

        big = next(p for p in sent if p.reason is PoisonReason.TOO_LARGE)
        letter_id = by_task[big.task_id]["id"]
        shown = cluster.sagas_cli("dead", "show", str(letter_id))
        assert shown.returncode == 0
        assert "reason: too_large" in shown.stdout
        assert f"queue: {big.queue}" in shown.stdout
        assert f"task_id: {big.task_id}" in shown.stdout
        assert "over SAGAS_MAX_MESSAGE_BYTES" in shown.stdout
        assert by_task[big.task_id]["size"] > TEN_MIB
        assert "body, the first 8192 characters:" in shown.stdout

        missing = cluster.sagas_cli("dead", "show", "999999", check=False)
        assert (missing.returncode, missing.stderr.strip()) == (2, "error: no dead letter 999999")
        nothing = cluster.sagas_cli("dead", "purge", check=False)
        assert nothing.returncode == 1 and "name the dead letters" in nothing.stderr

        purged = cluster.sagas_cli("dead", "purge", "--reason", "too_large")
        assert purged.stdout.strip() == f"{len(SAMPLE_QUEUES)} dead letters purged"
        left = json.loads(cluster.sagas_cli("dead", "--json").stdout)
        assert left["total"] == len(sent) + 2 - len(SAMPLE_QUEUES)
        assert "too_large" not in left["counts"]
    finally:
        if old is None:
            cluster.env.pop("COLUMNS", None)
        else:
            cluster.env["COLUMNS"] = old


def test_the_worker_log_names_the_settings_limit(deployment: tuple[Cluster, int],
                                                 poisoned: dict[str, Any]):
    """The 10 MiB payload is refused on the consumer before it is decoded: the line says so."""
    cluster, _ = deployment
    big = [p for p in poisoned["sent"] if p.reason is PoisonReason.TOO_LARGE]
    log = cluster.logs()
    for p in big:
        [line] = refusal_lines(log, p.task_id)
        assert f"over SAGAS_MAX_MESSAGE_BYTES ({1024 * 1024}); not decoded" in line
        assert f"queue {p.queue}" in line


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_the_dead_letter_store_keeps_whatever_a_hostile_message_carries(
    kind: str, tmp_path_factory: pytest.TempPathFactory
):
    """NUL in names, NaN in headers, bytes that are not UTF-8: PostgreSQL takes none as is."""
    from config import engine
    from sagas.store import dead_letters
    from sagas.store.dead_letters import DeadLetter
    from tests.conftest import fresh_database

    with fresh_database(kind, tmp_path_factory):
        store = engine.store
        letter = DeadLetter(
            reason=str(PoisonReason.UNKNOWN_TASK), detail="task 'a\x00b' is not registered",
            queue="inventory", task="a\x00b" * 100, task_id="x" * 500, size=3,
            headers=consumer_headers({"task": "a\x00b", "nan": float("nan")}),
            body=b"\xff\xfe\x00" + b"y" * 20000,
        )
        first = dead_letters.record(store, letter)
        second = dead_letters.record(store, DeadLetter(reason="too_large", detail="big"))
        rows, total = dead_letters.list_dead(store)
        assert total == 2 and [r["id"] for r in rows] == [second, first]
        shown = dead_letters.get_dead(store, first)
        assert shown is not None
        assert shown["task"].startswith("a\\x00b") and len(shown["task"]) == 200
        assert shown["body"].startswith("\\xff\\xfe\\x00y")
        assert len(shown["body"]) < 8300
        assert dead_letters.counts(store) == {"unknown_task": 1, "too_large": 1}
        assert dead_letters.purge(store) == 0, "nothing named, nothing purged"
        assert dead_letters.purge(store, reason="too_large") == 1
        assert dead_letters.purge(store, everything=True) == 1
        assert dead_letters.list_dead(store) == ([], 0)


def consumer_headers(headers: dict[str, Any]) -> dict[str, Any]:
    from sagas.runtime.consumer import _jsonable

    return _jsonable(headers)
