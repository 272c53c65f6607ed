"""The order saga through real workers: what the ledgers of each service show afterwards."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select

from config import app
from tasks.db import transaction
from tasks.inventory import release, reserve
from tasks.models import Charge, Refund, Reservation, Shipment, Stock
from tasks.order_saga import start_order_saga
from tasks.payment import charge, refund
from tests.conftest import Backend, wait_for_saga

pytestmark = pytest.mark.integration


def stock(sku: str) -> int:
    with transaction() as conn:
        return int(conn.execute(
            select(Stock.available).where(Stock.sku == sku)).scalar_one())


def rows(model: Any, saga_id: str) -> list[Any]:
    with transaction() as conn:
        return list(conn.execute(
            select(model.__table__).where(model.__table__.c.saga_id == saga_id)).all())


def order(**overrides: Any) -> dict[str, Any]:
    body = {"customer_id": "c1", "item": "laptop", "quantity": 2, "price": 100}
    body.update(overrides)
    return body


def test_an_order_reserves_stock_charges_once_and_ships(engine_backend: Backend):
    before = stock("laptop")
    result = start_order_saga.delay(order())
    view = wait_for_saga(result.id)
    assert view["state"] == "COMPLETED"
    assert view["id"] == result.id, "the AsyncResult's id is the saga id"
    assert stock("laptop") == before - 2
    [reservation] = rows(Reservation, result.id)
    assert (reservation.sku, reservation.quantity, reservation.state) == ("laptop", 2, "reserved")
    [charged] = rows(Charge, result.id)
    assert (charged.amount, charged.state) == (Decimal("200.00"), "charged")
    assert rows(Refund, result.id) == []
    [shipment] = rows(Shipment, result.id)
    assert (shipment.sku, shipment.quantity) == ("laptop", 2)


def test_a_handle_from_the_async_results_id_waits_for_the_orders_outcome(
    engine_backend: Backend,
):
    from config import engine
    from sagas import SagaState, StepState

    declined = start_order_saga.delay(order(quantity=3, price=250))
    shipped = start_order_saga.delay(order(quantity=1))
    outcome = engine.handle(declined.id).wait(timeout=30)
    assert outcome.state is SagaState.COMPENSATED
    assert {n: s.state for n, s in outcome.steps.items()} == {
        "reserve_inventory": StepState.COMPENSATED, "charge_payment": StepState.FAILED,
        "ship_order": StepState.SKIPPED,
    }
    assert "declined" in (outcome.steps["charge_payment"].error or "")
    good = engine.handle(shipped.id).wait(timeout=30)
    assert good.succeeded and good.results["reserve_inventory"]["quantity"] == 1
    assert engine.states([declined.id, shipped.id]) == {
        declined.id: SagaState.COMPENSATED, shipped.id: SagaState.COMPLETED}


def test_a_payment_over_500_is_declined_without_retry_and_stock_comes_back(
    engine_backend: Backend,
):
    before = stock("phone")
    result = start_order_saga.delay(order(item="phone", quantity=3, price=200))
    view = wait_for_saga(result.id)
    assert view["state"] == "COMPENSATED"
    steps = {s["name"]: s for s in view["steps"]}
    assert steps["charge_payment"]["state"] == "FAILED"
    assert steps["charge_payment"]["attempts"] == 1
    assert "declined" in steps["charge_payment"]["error"]
    assert steps["reserve_inventory"]["state"] == "COMPENSATED"
    assert steps["ship_order"]["state"] == "SKIPPED"
    assert stock("phone") == before
    [reservation] = rows(Reservation, result.id)
    assert reservation.state == "released"
    assert rows(Charge, result.id) == []
    assert rows(Shipment, result.id) == []


def test_exactly_500_is_not_over_the_limit(engine_backend: Backend):
    result = start_order_saga.delay(order(item="book", quantity=5, price=100))
    assert wait_for_saga(result.id)["state"] == "COMPLETED"


@pytest.mark.parametrize(
    ("item", "quantity", "message"),
    [("unicorn", 1, "unknown item 'unicorn'"), ("book", 10**6, "insufficient stock")],
)
def test_unknown_item_or_too_many_is_a_business_failure(
    engine_backend: Backend, item: str, quantity: int, message: str
):
    result = start_order_saga.delay(order(item=item, quantity=quantity, price=0.0001))
    view = wait_for_saga(result.id)
    assert view["state"] == "COMPENSATED"
    reserve_step = view["steps"][0]
    assert reserve_step["state"] == "FAILED"
    assert message in reserve_step["error"]
    assert reserve_step["attempts"] == 1


def _ctx(saga_id: str, step: str, phase: str, body: dict[str, Any]) -> dict[str, Any]:
    # inline=False: the participant runs on its worker but no saga bookkeeping happens.
    return {"saga_id": saga_id, "saga": "order", "step": step, "phase": phase, "attempt": 1,
            "idempotency_key": f"{saga_id}:{step}", "inline": False, "input": body,
            "results": {}}


def _send_and_wait(task: Any, ctx: dict[str, Any], copies: int) -> None:
    """Deliver the same message ``copies`` times; the worker runs them concurrently."""
    results = [task.apply_async((ctx,), queue=task.queue, ignore_result=False)
               for _ in range(copies)]
    ids = {r.id for r in results}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        states = {app.backend.get_task_meta(i)["status"] for i in ids}
        if states <= {"SUCCESS", "FAILURE"}:
            return
        time.sleep(0.05)
    raise AssertionError(f"{task.name} copies did not finish: {states}")


def test_a_redelivered_reservation_and_charge_take_effect_once(engine_backend: Backend):
    saga_id = f"redelivery-{uuid.uuid4()}"
    body = order(item="book", quantity=4, price=10)
    before = stock("book")
    _send_and_wait(reserve, _ctx(saga_id, "reserve_inventory", "action", body), copies=3)
    _send_and_wait(charge, _ctx(saga_id, "charge_payment", "action", body), copies=3)
    assert stock("book") == before - 4
    assert len(rows(Reservation, saga_id)) == 1
    [charged] = rows(Charge, saga_id)
    assert charged.amount == Decimal("40.00")


def test_a_refund_happens_at_most_once_and_a_release_restores_stock_once(
    engine_backend: Backend,
):
    saga_id = f"refund-{uuid.uuid4()}"
    body = order(item="book", quantity=2, price=10)
    before = stock("book")
    _send_and_wait(reserve, _ctx(saga_id, "reserve_inventory", "action", body), copies=1)
    _send_and_wait(charge, _ctx(saga_id, "charge_payment", "action", body), copies=1)
    _send_and_wait(refund, _ctx(saga_id, "charge_payment", "compensation", body), copies=3)
    _send_and_wait(release, _ctx(saga_id, "reserve_inventory", "compensation", body), copies=3)
    assert stock("book") == before
    assert len(rows(Refund, saga_id)) == 1
    assert rows(Charge, saga_id)[0].state == "refunded"
    assert rows(Reservation, saga_id)[0].state == "released"


def test_a_compensation_before_its_action_is_a_no_op_and_blocks_the_late_action(
    engine_backend: Backend,
):
    saga_id = f"early-undo-{uuid.uuid4()}"
    body = order(item="book", quantity=3, price=10)
    before = stock("book")
    _send_and_wait(release, _ctx(saga_id, "reserve_inventory", "compensation", body), copies=1)
    _send_and_wait(refund, _ctx(saga_id, "charge_payment", "compensation", body), copies=1)
    _send_and_wait(reserve, _ctx(saga_id, "reserve_inventory", "action", body), copies=1)
    _send_and_wait(charge, _ctx(saga_id, "charge_payment", "action", body), copies=1)
    assert stock("book") == before
    assert [r.state for r in rows(Reservation, saga_id)] == ["cancelled"]
    assert [c.state for c in rows(Charge, saga_id)] == ["cancelled"]
    assert rows(Refund, saga_id) == []
