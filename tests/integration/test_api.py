"""The HTTP API against real workers: what a client sees (codes, bodies) and what the sagas did.

The HTTP side runs in this process (FastAPI's TestClient); every saga runs on the session's real
worker processes. The 503 cases run the app as a real uvicorn process pointed at a closed port.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from config import engine
from config.settings import Settings
from config.web import create_app
from tests.conftest import Backend, broker_down, wait_for_saga
from tests.support import test_sagas as ts
from tests.support.engine import get_store, make_stale, recover_stalled, start_saga
from tests.support.services import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(engine_backend: Backend) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(admin_token=TOKEN)),
                    raise_server_exceptions=False) as c:
        yield c


def an_order(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"customer_id": f"c-{uuid.uuid4().hex[:8]}", "item": "book",
                            "quantity": 2, "price": 100}
    body.update(overrides)
    return body


def wait_for(predicate: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def step_states(view: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["state"] for s in view["steps"]}


# --- orders ------------------------------------------------------------------------
def test_an_order_over_http_is_accepted_runs_to_completion_and_shows_in_every_ledger(
    client: TestClient,
):
    body = an_order()
    response = client.post("/orders", json=body)
    assert response.status_code == 202, response.text
    order = response.json()
    assert order["id"] == order["saga_id"]
    assert response.headers["location"] == f"/orders/{order['id']}"
    assert (order["customer_id"], order["item"], order["quantity"]) == (
        body["customer_id"], "book", 2)
    assert order["amount"] == "200.00"

    view = wait_for_saga(order["id"])
    assert view["state"] == "COMPLETED"
    shown = client.get(f"/orders/{order['id']}").json()
    assert shown["status"] == "COMPLETED"
    assert shown["steps"] == {"reserve_inventory": "SUCCEEDED", "charge_payment": "SUCCEEDED",
                              "ship_order": "SUCCEEDED"}
    mine = client.get("/orders", params={"customer_id": body["customer_id"]}).json()
    assert mine["total"] == 1 and mine["items"][0]["id"] == order["id"]

    inventory = client.get("/inventory", params={"saga_id": order["id"]}).json()
    assert "book" in {s["sku"] for s in inventory["stock"]}
    [reservation] = inventory["reservations"]["items"]
    assert (reservation["sku"], reservation["quantity"], reservation["state"]) == (
        "book", 2, "reserved")
    payments = client.get("/payments", params={"saga_id": order["id"]}).json()
    [charge] = payments["charges"]["items"]
    assert (charge["amount"], charge["state"]) == ("200.00", "charged")
    assert payments["refunds"]["total"] == 0
    shipments = client.get("/shipments", params={"saga_id": order["id"]}).json()
    assert shipments["total"] == 1 and shipments["items"][0]["sku"] == "book"


def test_an_order_over_the_payment_limit_ends_compensated_with_its_stock_released(
    client: TestClient,
):
    order = client.post("/orders", json=an_order(quantity=2, price=300)).json()
    wait_for_saga(order["id"])
    shown = client.get(f"/orders/{order['id']}").json()
    assert shown["status"] == "COMPENSATED"
    assert "declined" in shown["error"]
    assert shown["steps"]["charge_payment"] == "FAILED"
    assert shown["steps"]["reserve_inventory"] == "COMPENSATED"
    [reservation] = client.get("/inventory", params={"saga_id": order["id"]}).json()[
        "reservations"]["items"]
    assert reservation["state"] == "released"
    assert client.get("/payments", params={"saga_id": order["id"]}).json()["charges"][
        "total"] == 0
    assert client.get("/shipments", params={"saga_id": order["id"]}).json()["total"] == 0


def test_a_repeat_with_the_same_idempotency_key_returns_the_same_order_and_charges_once(
    client: TestClient,
):
    body, key = an_order(), f"key-{uuid.uuid4()}"
    first = client.post("/orders", json=body, headers={"Idempotency-Key": key})
    again = client.post("/orders", json=body, headers={"Idempotency-Key": key})
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    wait_for_saga(first.json()["id"])
    late = client.post("/orders", json=body, headers={"Idempotency-Key": key})
    assert late.json()["id"] == first.json()["id"] and late.json()["status"] == "COMPLETED"
    assert client.get("/orders", params={"customer_id": body["customer_id"]}).json()[
        "total"] == 1
    assert client.get("/payments", params={"saga_id": first.json()["id"]}).json()[
        "charges"]["total"] == 1


def test_the_same_idempotency_key_with_another_body_is_409_and_starts_nothing(
    client: TestClient,
):
    body, key = an_order(), f"key-{uuid.uuid4()}"
    first = client.post("/orders", json=body, headers={"Idempotency-Key": key})
    other = client.post("/orders", json={**body, "quantity": 3},
                        headers={"Idempotency-Key": key})
    assert other.status_code == 409
    assert first.json()["id"] in other.json()["detail"]
    assert client.get("/orders", params={"customer_id": body["customer_id"]}).json()[
        "total"] == 1


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"customer_id": "c", "item": "book", "quantity": "2", "price": 10}', "quantity"),
        ('{"customer_id": "c", "item": "book", "quantity": 1.5, "price": 10}', "quantity"),
        ('{"customer_id": "c", "item": "book", "quantity": true, "price": 10}', "quantity"),
        ('{"customer_id": "c", "item": "book", "quantity": 0, "price": 10}', "quantity"),
        ('{"customer_id": "c", "item": "book", "quantity": -1, "price": 10}', "quantity"),
        ('{"customer_id": "c", "item": "book", "quantity": 1, "price": 0}', "price"),
        ('{"customer_id": "c", "item": "book", "quantity": 1, "price": -5}', "price"),
        ('{"customer_id": "c", "item": "book", "quantity": 1, "price": "10"}', "price"),
        ('{"customer_id": "c", "item": "book", "quantity": 1, "price": NaN}', "price"),
        ('{"customer_id": "c", "item": "book", "quantity": 1, "price": Infinity}', "price"),
        ('{"customer_id": "c", "item": "book", "quantity": 1, "price": 1e999}', "price"),
        ('{"customer_id": "c", "item": "book", "quantity": 1, "price": 10, "vip": 1}', "vip"),
        ('{"customer_id": "c", "item": "book", "quantity": 1}', "price"),
        ('{"customer_id": 7, "item": "book", "quantity": 1, "price": 10}', "customer_id"),
    ],
)
def test_a_bad_order_gets_422_naming_the_field_and_starts_no_saga(
    client: TestClient, raw: str, field: str
):
    before = client.get("/orders").json()["total"]
    response = client.post("/orders", content=raw,
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert field in [e["field"] for e in response.json()["detail"]]
    assert client.get("/orders").json()["total"] == before


def test_a_body_that_is_not_json_is_422(client: TestClient):
    response = client.post("/orders", content="{not json",
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422


def test_a_body_over_64_kib_is_413_with_or_without_content_length(client: TestClient):
    big = an_order(item="x" * (65 * 1024))
    assert client.post("/orders", json=big).status_code == 413

    def chunks() -> Iterator[bytes]:
        yield b'{"customer_id": "c", "item": "'
        for _ in range(70):
            yield b"x" * 1024
        yield b'", "quantity": 1, "price": 1}'

    response = client.post("/orders", content=chunks(),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "65536" in response.json()["detail"]
    padded = b'{"customer_id": "c", "item": "book", "quantity": 1, "price": 1' + (
        b" " * (60 * 1024)) + b"}"
    assert client.post("/orders", content=padded,
                       headers={"Content-Type": "application/json"}).status_code == 202, (
        "the limit is on bytes: a big but valid body under it is accepted")


# --- sagas -------------------------------------------------------------------------
def test_get_saga_is_the_same_json_as_sagas_show(client: TestClient):
    saga_id = start_saga(ts.linear, {})
    wait_for_saga(saga_id)
    shown = client.get(f"/sagas/{saga_id}")
    assert shown.status_code == 200
    assert shown.json() == engine.view(saga_id)  # what `sagas show --json` prints
    assert shown.json() == {**get_store().get_view(saga_id), "stalled": None}
    assert [s["name"] for s in shown.json()["steps"]] == ["a", "b", "c", "d"]
    assert {"step", "from_state", "to_state", "attempt", "at"} <= shown.json()["events"][0].keys()


def test_a_compensated_steps_action_and_compensation_times_are_apart(client: TestClient):
    saga_id = start_saga(ts.linear, {"plan": {"c": {"fail": True}}})
    assert wait_for_saga(saga_id)["state"] == "COMPENSATED"
    steps = {s["name"]: s for s in client.get(f"/sagas/{saga_id}").json()["steps"]}
    a = steps["a"]
    assert a["started_at"] <= a["finished_at"] < a["compensation_started_at"] <= (
        a["compensation_finished_at"]), "the compensation never moves the action's times"
    assert a["started_at"] == next(e["at"] for e in client.get(f"/sagas/{saga_id}").json()[
        "events"] if e["step"] == "a" and e["to_state"] == "RUNNING")
    assert steps["d"]["started_at"] is None and steps["d"]["compensation_started_at"] is None
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"compensation_started_at", "compensation_finished_at"} <= set(
        schema["StepView"]["properties"])
    assert "stalled" in schema["SagaView"]["properties"]


def test_a_stalled_saga_says_why_and_is_marked_in_the_list(client: TestClient):
    from tests.chaos import crash_sagas as cs
    from tests.support.engine import make_stale, recover_stalled

    saga_id = start_saga(cs.recovery_unit, {})  # its queue has no worker
    make_stale(saga_id)
    assert saga_id in recover_stalled().held, "its message still waits: held, not re-sent"
    stall = client.get(f"/sagas/{saga_id}").json()["stalled"]
    assert stall["reasons"] == ["queued"]
    (step,) = stall["steps"]
    assert (step["step"], step["queue"], step["reason"]) == ("a", cs.UNSERVED, "queued")
    assert "no worker has taken its message" in stall["reason"]
    listed = client.get("/sagas", params={"name": "t_recovery_unit", "limit": 500}).json()
    assert {i["id"]: i["stalled"] for i in listed["items"]}[saga_id] is True
    done = start_saga(ts.linear, {})
    wait_for_saga(done)
    assert client.get(f"/sagas/{done}").json()["stalled"] is None


def test_list_sagas_filters_by_state_and_name_and_pages(client: TestClient):
    done = [start_saga(ts.no_undo, {}) for _ in range(3)]
    failed = start_saga(ts.no_undo, {"plan": {"a": {"fail": True}}})
    for saga_id in [*done, failed]:
        wait_for_saga(saga_id)
    page = client.get("/sagas", params={"name": "t_no_undo", "state": "COMPLETED",
                                        "limit": 2}).json()
    assert page["total"] >= 3 and len(page["items"]) == 2
    assert {(s["name"], s["state"]) for s in page["items"]} == {("t_no_undo", "COMPLETED")}
    second = client.get("/sagas", params={"name": "t_no_undo", "state": "COMPLETED",
                                          "limit": 2, "offset": 2}).json()
    assert not {s["id"] for s in page["items"]} & {s["id"] for s in second["items"]}
    compensated = client.get("/sagas", params={"name": "t_no_undo",
                                               "state": "COMPENSATED"}).json()
    assert failed in {s["id"] for s in compensated["items"]}
    assert client.get("/sagas", params={"state": "DONE"}).status_code == 422
    assert client.get("/sagas", params={"limit": 0}).status_code == 422


def test_unknown_ids_are_404(client: TestClient):
    missing = f"no-such-{uuid.uuid4()}"
    assert client.get(f"/sagas/{missing}").status_code == 404
    assert client.get(f"/orders/{missing}").status_code == 404
    assert client.post(f"/sagas/{missing}/retry", headers=ADMIN).status_code == 404
    assert client.post(f"/sagas/{missing}/cancel", headers=ADMIN).status_code == 404
    assert missing in client.get(f"/sagas/{missing}").json()["detail"]
    page = client.get(f"/dashboard/sagas/{missing}")
    assert page.status_code == 404 and "text/html" in page.headers["content-type"], (
        "an unknown saga's page is a 404 page, not a 200")


def running_with_a_done(saga_id: str) -> dict[str, Any] | None:
    view = get_store().get_view(saga_id)
    ok = view["state"] == "RUNNING" and step_states(view)["a"] == "SUCCEEDED"
    return view if ok else None


@pytest.mark.parametrize("action", ["retry", "cancel"])
def test_retry_and_cancel_without_a_token_are_401_and_with_a_wrong_one_403(
    client: TestClient, action: str
):
    saga_id = start_saga(ts.linear, {"plan": {"b": {"sleep": 1.5}}})
    wait_for(lambda: running_with_a_done(saga_id), "step a to succeed")
    no_token = client.post(f"/sagas/{saga_id}/{action}")
    assert no_token.status_code == 401
    assert no_token.headers["www-authenticate"] == "Bearer"
    wrong = client.post(f"/sagas/{saga_id}/{action}", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    assert wait_for_saga(saga_id)["state"] == "COMPLETED", "refused calls changed nothing"


def test_cancel_makes_a_running_saga_compensate_what_it_did(client: TestClient):
    saga_id = start_saga(ts.linear, {"plan": {"b": {"sleep": 2.0}}})
    wait_for(lambda: running_with_a_done(saga_id), "step a to succeed")
    response = client.post(f"/sagas/{saga_id}/cancel", headers=ADMIN)
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "COMPENSATING"
    view = wait_for_saga(saga_id)
    assert view["state"] == "COMPENSATED"
    states = step_states(view)
    assert states["a"] == "COMPENSATED"
    assert states["b"] == "COMPENSATED", "the step in flight is undone once it finishes"
    assert (states["c"], states["d"]) == ("SKIPPED", "SKIPPED")


def test_cancel_of_a_completed_saga_is_409(client: TestClient):
    saga_id = start_saga(ts.linear, {})
    wait_for_saga(saga_id)
    response = client.post(f"/sagas/{saga_id}/cancel", headers=ADMIN)
    assert response.status_code == 409
    assert "COMPLETED" in response.json()["detail"]
    assert client.post(f"/sagas/{saga_id}/retry", headers=ADMIN).status_code == 409


def test_retry_runs_a_failed_compensation_again(client: TestClient):
    saga_id = start_saga(ts.linear, {"plan": {"b": {"undo_fail": True}, "c": {"fail": True}}})
    parked = wait_for_saga(saga_id)
    assert parked["state"] == "COMPENSATION_FAILED"
    undo_calls = int(ts.ledger().get(f"calls:{saga_id}:b:compensation") or 0)
    response = client.post(f"/sagas/{saga_id}/retry", headers=ADMIN)
    assert response.status_code == 202, response.text
    assert response.json()["action"] == "retry"
    wait_for(lambda: int(ts.ledger().get(f"calls:{saga_id}:b:compensation") or 0) > undo_calls,
             "the compensation to run again")
    again = wait_for_saga(saga_id)
    assert again["state"] == "COMPENSATION_FAILED", "it still fails, so it parks again"
    before = {s["name"]: s for s in parked["steps"]}["b"]["compensation_attempts"]
    assert {s["name"]: s for s in again["steps"]}["b"]["compensation_attempts"] > before


def test_reads_need_the_token_when_configured(engine_backend: Backend):
    app = create_app(Settings(admin_token=TOKEN, protect_reads=True))
    with TestClient(app) as guarded:
        assert guarded.get("/sagas").status_code == 401
        assert guarded.get("/orders", headers={"Authorization": "Bearer x"}).status_code == 403
        assert guarded.get("/sagas", headers=ADMIN).status_code == 200
        assert guarded.get("/healthz").status_code == 200, "health stays open"


def test_health_and_openapi(client: TestClient):
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "database": "ok", "broker": "ok"}
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/orders", "/orders/{order_id}", "/inventory", "/payments", "/shipments",
                 "/sagas", "/sagas/{saga_id}", "/sagas/{saga_id}/retry",
                 "/sagas/{saga_id}/cancel", "/healthz"):
        assert path in paths


# --- a real uvicorn with its database or broker gone --------------------------------
def closed_port() -> int:
    port = free_port()
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        pytest.fail(f"port {port} unexpectedly open")
    return port


@contextlib.contextmanager
def uvicorn_app(env: dict[str, str], log: Path) -> Iterator[str]:
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "config.web:app", "--host", "127.0.0.1",
             "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"uvicorn exited:\n{log.read_text()}")
            try:
                httpx.get(f"{base}/openapi.json", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    pytest.fail(f"uvicorn not up:\n{log.read_text()}")
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(10)


def test_with_the_database_unreachable_every_route_answers_503_not_500(
    engine_backend: Backend, tmp_path: Path
):
    env = {**engine_backend.env, "ADMIN_TOKEN": TOKEN,
           "DATABASE_URL": f"postgresql+psycopg://sagas@127.0.0.1:{closed_port()}/sagas"}
    with uvicorn_app(env, tmp_path / "uvicorn.log") as base:
        calls = [
            ("GET", "/healthz"), ("GET", "/sagas"), ("GET", "/sagas/x"), ("GET", "/orders"),
            ("GET", "/orders/x"), ("GET", "/inventory"), ("GET", "/payments"),
            ("GET", "/shipments"), ("POST", "/sagas/x/retry"), ("POST", "/sagas/x/cancel"),
        ]
        for method, path in calls:
            response = httpx.request(method, base + path, headers=ADMIN, timeout=20)
            assert response.status_code == 503, (method, path, response.text)
        order = httpx.post(f"{base}/orders", json=an_order(), timeout=20)
        assert order.status_code == 503
        assert order.json() == {"detail": "database unavailable, try again later"}
        health = httpx.get(f"{base}/healthz", timeout=20).json()
        assert health["database"].startswith("unavailable") and health["broker"] == "ok"
    logged = (tmp_path / "uvicorn.log").read_text()
    assert "Exception in ASGI application" not in logged and "Traceback" not in logged


def test_with_the_broker_unreachable_an_order_is_recorded_and_runs_once_it_is_back(
    client: TestClient, engine_backend: Backend, tmp_path: Path
):
    """The start is durable: a broker outage delays an order, it never loses or refuses it."""
    env = {**engine_backend.env, **broker_down(closed_port())}
    body = an_order()
    with uvicorn_app(env, tmp_path / "uvicorn.log") as base:
        accepted = [httpx.post(f"{base}/orders", json=body, timeout=30) for _ in range(2)]
        assert [r.status_code for r in accepted] == [202, 202], accepted[-1].text
        # Recorded: the first with its first step waiting for the broker, the second (the
        # same customer and item: the order's semantic locks) queued behind it.
        assert [r.json()["status"] for r in accepted] == ["RUNNING", "WAITING"]
        health = httpx.get(f"{base}/healthz", timeout=30)
        assert health.status_code == 503
        assert health.json()["broker"].startswith("unavailable")
        assert health.json()["database"] == "ok"
    logged = (tmp_path / "uvicorn.log").read_text()
    assert "Exception in ASGI application" not in logged and "Traceback" not in logged
    said = [line for line in logged.splitlines() if "the broker is unavailable" in line]
    assert len(said) == 1, f"one line per outage, not one per order:\n{logged}"
    orders = [r.json()["id"] for r in accepted]
    assert client.get("/orders", params={"customer_id": body["customer_id"]}).json()[
        "total"] == 2
    # Nothing of it was published: recovery re-drives the first step once its deadline passed.
    for order_id in orders:
        make_stale(order_id)
    recover_stalled()
    for order_id in orders:
        assert wait_for_saga(order_id)["state"] == "COMPLETED"


def test_the_root_points_to_the_dashboard_and_the_docs_which_work_offline(client: TestClient):
    root = client.get("/")
    assert root.status_code == 200
    for link in ('href="/dashboard"', 'href="/docs"', 'href="/healthz"'):
        assert link in root.text
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "/docs/assets/swagger-ui-bundle.js" in docs.text
    assert "cdn." not in docs.text and "https://" not in docs.text.split("<body>")[0]
    bundle = client.get("/docs/assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000
    assert client.get("/docs/assets/swagger-ui.css").status_code == 200


def test_the_sagas_list_filters_by_definition_version(client: TestClient):
    saga_id = start_saga(ts.linear, {})
    wait_for_saga(saga_id)
    v1 = client.get("/sagas", params={"name": "t_linear", "version": 1, "limit": 500}).json()
    assert saga_id in {s["id"] for s in v1["items"]} and {s["version"] for s in v1["items"]} == {1}
    assert client.get("/sagas", params={"name": "t_linear", "version": 2}).json()["total"] == 0
    board = client.get("/dashboard/api/sagas", params={"version": 1, "q": saga_id}).json()
    assert [s["id"] for s in board["sagas"]] == [saga_id] and board["sagas"][0]["version"] == 1
    assert client.get("/dashboard/api/sagas", params={"version": 2, "q": saga_id}).json()[
        "sagas"] == []
    assert client.get(f"/sagas/{saga_id}").json()["version"] == 1


def test_with_reject_a_second_order_of_a_busy_customer_is_409_naming_the_key_and_holder(
    engine_backend: Backend, tmp_path: Path
):
    # No broker: the first order's saga stays RUNNING (recorded, its first step not yet sent),
    # holding its customer's key for as long as this test needs.
    env = {**engine_backend.env, **broker_down(closed_port()),
           "ORDER_LOCK_POLICY": "reject", "ORDER_LOCKS": "customer"}
    body = an_order()
    with uvicorn_app(env, tmp_path / "uvicorn.log") as base:
        first = httpx.post(f"{base}/orders", json=body, timeout=30)
        assert first.status_code == 202 and first.json()["status"] == "RUNNING", first.text
        second = httpx.post(f"{base}/orders", json={**body, "item": "phone"}, timeout=30)
        assert second.status_code == 409, second.text
        assert second.json()["key"] == f"customer:{body['customer_id']}"
        assert second.json()["holder"] == first.json()["id"]
        assert f"held by saga {first.json()['id']}" in second.json()["detail"]
        listed = httpx.get(f"{base}/orders", params={"customer_id": body["customer_id"]},
                           timeout=30).json()
        assert [o["id"] for o in listed["items"]] == [first.json()["id"]], "the refused one "
        "is not kept"
        held = httpx.get(f"{base}/locks", params={"key": second.json()["key"]}, timeout=30)
        assert held.status_code == 200
        assert [(r["key"], r["holder"]) for r in held.json()] == [
            (second.json()["key"], first.json()["id"])]
    engine.cancel(first.json()["id"])  # give the key back (nothing of the saga ran)
