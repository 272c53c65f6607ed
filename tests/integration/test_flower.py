"""Flower against the test broker: every step and compensation is its own task in its API.

Flower is started as an operator would (``celery -A config flower``); it turns task events on in
the running workers by itself, which this test relies on rather than starting workers with -E.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tasks.order_saga import start_order_saga
from tests.conftest import Backend, wait_for_saga
from tests.support.services import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
AUTH = ("ops", "flower-test-pass")


@dataclass
class Flower:
    base: str
    log: Path

    def tasks(self, **params: Any) -> dict[str, dict[str, Any]]:
        response = httpx.get(f"{self.base}/api/tasks", params=params, auth=AUTH, timeout=10)
        response.raise_for_status()
        return response.json()


@pytest.fixture
def flower(engine_backend: Backend, tmp_path: Path) -> Iterator[Flower]:
    port = free_port()
    log = tmp_path / "flower.log"
    env = {**engine_backend.env, "FLOWER_BASIC_AUTH": ":".join(AUTH)}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config", "flower", "--address=127.0.0.1",
             f"--port={port}", "--persistent=False"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    flower = Flower(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"flower exited:\n{log.read_text()}"
            try:
                if httpx.get(f"{flower.base}/healthcheck", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"flower not up:\n{log.read_text()}"
            time.sleep(0.2)
        yield flower
    finally:
        process.terminate()
        process.wait(15)


def order(**overrides: Any) -> dict[str, Any]:
    return {"customer_id": "flower", "item": "phone", "quantity": 1, "price": 50, **overrides}


def wait_until_flower_sees_events(flower: Flower, timeout: float = 40) -> None:
    """Flower enables worker events on a 5 s timer; run small sagas until one shows up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        saga_id = start_order_saga.delay(order()).id
        wait_for_saga(saga_id)
        time.sleep(0.5)
        if any(t.startswith(saga_id) for t in flower.tasks(taskname="shipping.create_shipment")):
            return
    pytest.fail(f"Flower never saw a task event:\n{flower.log.read_text()[-3000:]}")


def by_name(tasks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {t["name"]: {**t, "uuid": uuid} for uuid, t in tasks.items()}


def wait_for_states(flower: Flower, saga_id: str, wanted: dict[str, str], timeout: float = 15
                    ) -> dict[str, dict[str, Any]]:
    """Events trail the saga's own record a little; poll until Flower agrees."""
    deadline = time.monotonic() + timeout
    seen: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        seen = by_name(flower.tasks(search=saga_id))
        if all(seen.get(name, {}).get("state") == state for name, state in wanted.items()):
            return seen
        time.sleep(0.2)
    states = {name: t.get("state") for name, t in seen.items()}
    raise AssertionError(f"Flower shows {states} for saga {saga_id}, wanted {wanted}")


def test_flower_lists_each_step_of_a_saga_as_a_task_with_its_state(flower: Flower):
    wait_until_flower_sees_events(flower)
    good = start_order_saga.delay(order(quantity=2, price=100)).id
    declined = start_order_saga.delay(order(quantity=2, price=300)).id
    assert wait_for_saga(good)["state"] == "COMPLETED"
    assert wait_for_saga(declined)["state"] == "COMPENSATED"

    tasks = wait_for_states(flower, good, {
        "inventory.reserve": "SUCCESS", "payment.charge": "SUCCESS",
        "shipping.create_shipment": "SUCCESS",
    })
    charge = tasks["payment.charge"]
    assert charge["uuid"] == f"{good}.charge_payment.do.1"
    assert good in charge["args"] and "charge_payment" in charge["args"], (
        "the saga id and step are visible in the task's arguments")
    assert {t for t in tasks if not t.startswith("orders.")} == {
        "inventory.reserve", "payment.charge", "shipping.create_shipment"}

    tasks = wait_for_states(flower, declined, {
        "inventory.reserve": "SUCCESS", "payment.charge": "FAILURE",
        "inventory.release": "SUCCESS",
    })
    assert "declined" in (tasks["payment.charge"].get("exception") or "")
    assert tasks["inventory.release"]["uuid"] == f"{declined}.reserve_inventory.undo.1"
    assert "shipping.create_shipment" not in tasks
    failures = flower.tasks(taskname="payment.charge", state="FAILURE")
    assert f"{declined}.charge_payment.do.1" in failures


def test_the_reconcilers_runs_leave_flower_and_the_worker_log_to_the_operators_sagas(
    flower: Flower, engine_backend: Backend
):
    from config import app
    from sagas.runtime.dispatch import RECOVER_TASK

    wait_until_flower_sees_events(flower)
    for _ in range(8):  # what beat sends every RECOVERY_INTERVAL: an idle minute, compressed
        app.send_task(RECOVER_TASK)  # routed to the saga queue by the engine
    saga_id = start_order_saga.delay(order()).id
    wait_for_saga(saga_id)
    wait_for_states(flower, saga_id, {"shipping.create_shipment": "SUCCESS"})
    time.sleep(1.5)  # the runs were queued before the saga: their events would be in by now
    assert flower.tasks(taskname=RECOVER_TASK) == {}, "Flower lists the reconciler's runs"
    log = engine_backend.worker_log()
    assert f"Task {RECOVER_TASK}[" not in log, "the worker logs two lines per reconciler run"
    assert f"Task shipping.create_shipment[{saga_id}" in log, "the sagas' own lines stay"
