"""The sample's order saga, unit-tested in-process with ``sagas.testing``: no worker, no broker.

The participants are the sample's own Celery tasks (their plain functions), writing to the
sample's tables in a throwaway SQLite file; the saga store is the runner's, in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from sagas import SagaState, StepState
from sagas.testing import Fault, SagaRunner

STOCK = 1000  # the sample's starting stock per item


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[SagaRunner]:
    """The order saga on a runner, its participants pointed at a fresh sample database."""
    from config.settings import get_app_settings

    previous = os.environ.get("DATABASE_URL")
    url = f"sqlite:///{tmp_path}/shop.db"
    os.environ["DATABASE_URL"] = url
    get_app_settings.cache_clear()
    try:
        import tasks.migrate
        from tasks import db
        from tasks.order_saga import order_saga

        tasks.migrate.upgrade()
        with SagaRunner(order_saga) as runner:
            yield runner
        engine = db._engines.pop((os.getpid(), url), None)
        if engine is not None:
            engine.dispose()
    finally:
        if previous is None:
            os.environ.pop("DATABASE_URL", None)
        else:
            os.environ["DATABASE_URL"] = previous
        get_app_settings.cache_clear()


def order(price: float, quantity: int = 2, item: str = "laptop") -> dict[str, Any]:
    return {"customer_id": "ada", "item": item, "quantity": quantity, "price": price}


def available(item: str = "laptop") -> int:
    from tasks.db import transaction
    from tasks.models import Stock

    with transaction() as conn:
        return int(conn.execute(select(Stock.available).where(Stock.sku == item)).scalar_one())


def rows(model: Any, saga_id: str) -> list[Any]:
    from tasks.db import transaction

    with transaction() as conn:
        return list(conn.execute(select(model).where(model.saga_id == saga_id)).all())


def count(model: Any, saga_id: str) -> int:
    from tasks.db import transaction

    with transaction() as conn:
        return int(conn.execute(
            select(func.count()).select_from(model).where(model.saga_id == saga_id)
        ).scalar_one())


def test_an_order_reserves_charges_and_ships(shop: SagaRunner):
    from tasks.models import Charge, Shipment

    result = shop.run("order", order(price=120.0))
    assert result.state is SagaState.COMPLETED
    assert result.step_states() == dict.fromkeys(
        ("reserve_inventory", "charge_payment", "ship_order"), StepState.SUCCEEDED
    )
    assert result.results["charge_payment"]["amount"] == "240.00"
    assert available() == STOCK - 2
    (charge,) = rows(Charge, result.id)
    assert (charge.state, charge.amount) == ("charged", Decimal("240.00"))
    assert count(Shipment, result.id) == 1


def test_a_600_dollar_order_is_declined_and_its_stock_comes_back(shop: SagaRunner):
    from tasks.models import Charge, Reservation, Shipment

    result = shop.run("order", order(price=600.0, quantity=1))
    assert result.state is SagaState.COMPENSATED
    charge = result.steps["charge_payment"]
    assert charge.state is StepState.FAILED
    assert charge.error == "PaymentDeclined: payment of 600.00 declined: over the limit of 500.0"
    assert charge.calls == 1, "a decline is final: never retried"
    assert result.steps["reserve_inventory"].state is StepState.COMPENSATED
    assert result.steps["ship_order"].state is StepState.SKIPPED
    assert available() == STOCK
    assert [r.state for r in rows(Reservation, result.id)] == ["released"]
    assert count(Charge, result.id) == 0 and count(Shipment, result.id) == 0


def test_a_transient_fault_in_payment_is_retried_and_charges_once(shop: SagaRunner):
    from tasks.models import Charge

    result = shop.run("order", order(price=50.0), faults={"charge_payment": Fault.transient(2)})
    assert result.state is SagaState.COMPLETED
    charge = result.steps["charge_payment"]
    assert (charge.attempts, charge.calls) == (3, 3)
    assert [e.error for e in result.history if e.step == "charge_payment" and e.error] == [
        "TransientError: injected transient failure 1 of charge_payment",
        "TransientError: injected transient failure 2 of charge_payment",
    ]
    assert [c.state for c in rows(Charge, result.id)] == ["charged"]


def test_a_charge_whose_worker_died_after_the_commit_is_refunded(shop: SagaRunner):
    from tasks.models import Charge, Refund

    result = shop.run(
        "order", order(price=80.0), faults={"charge_payment": Fault.lost_worker_after_effect()}
    )
    assert result.state is SagaState.COMPENSATED
    assert result.steps["charge_payment"].state is StepState.COMPENSATED
    assert [c.state for c in rows(Charge, result.id)] == ["refunded"]
    assert count(Refund, result.id) == 1
    assert available() == STOCK


def test_a_shipment_whose_outcome_is_unknown_is_re_driven_and_shipped_once(shop: SagaRunner):
    from tasks.models import Shipment

    result = shop.run("order", order(price=10.0), faults={"ship_order": Fault.transient(5)})
    assert result.state is SagaState.COMPLETED, "the pivot is never compensated"
    assert "re-driven by recovery" in [e.error for e in result.history]
    assert result.elapsed > 30, "the reconciler waited for the pivot's 30 s time limit"
    assert count(Shipment, result.id) == 1
