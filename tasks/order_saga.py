"""The order saga: reserve stock, charge the customer, ship (the pivot)."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator

from config import engine
from config.queues import INVENTORY, PAYMENT, SHIPPING
from config.settings import get_app_settings
from sagas import RetryPolicy, Saga, Step
from tasks import inventory, payment, shipping


class OrderInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_id: str = Field(min_length=1, max_length=100)
    item: str = Field(min_length=1, max_length=100)
    quantity: int = Field(gt=0, le=1_000_000, strict=True)
    price: float = Field(gt=0, le=1_000_000_000)

    @field_validator("price")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("price must be a finite number")
        return value


STEP_TIME_LIMIT = get_app_settings().order_step_time_limit
LOCKS = {k.strip() for k in get_app_settings().order_locks.split(",") if k.strip()}


def order_locks(order: OrderInput) -> list[str]:
    """Semantic locks: one order per customer at a time, one per item (``ORDER_LOCKS``).

    A second order of the same customer waits until the first one ends: two orders never
    interleave their charges and refunds of one customer, nor their reservations of one item.
    """
    keys = []
    if "customer" in LOCKS:
        keys.append(f"customer:{order.customer_id}")
    if "sku" in LOCKS:
        keys.append(f"sku:{order.item}")
    return keys

# A refund or a release must outlast its own database's restart (the soak keeps it down 30 s):
# backoff 1, 2, 4 ... 30 s, about 75 s in all on average, before the saga is parked.
UNDO_RETRY = RetryPolicy(attempts=10, backoff=1.0, backoff_max=30.0)

order_saga = engine.register(Saga(
    "order",
    steps=[
        Step(
            "reserve_inventory", action=inventory.reserve, compensation=inventory.release,
            queue=INVENTORY, retry=RetryPolicy(attempts=5), time_limit=STEP_TIME_LIMIT,
            compensation_retry=UNDO_RETRY,
        ),
        Step(
            "charge_payment", action=payment.charge, compensation=payment.refund,
            queue=PAYMENT, retry=RetryPolicy(attempts=5), time_limit=STEP_TIME_LIMIT,
            compensation_retry=UNDO_RETRY,
        ),
        Step(
            "ship_order", action=shipping.create_shipment, queue=SHIPPING, pivot=True,
            retry=RetryPolicy(attempts=5), time_limit=STEP_TIME_LIMIT,
        ),
    ],
    input_model=OrderInput,
    locks=order_locks if LOCKS else None,
    on_locked=get_app_settings().order_lock_policy,
))


# ``start_order_saga.delay(order)`` records the saga before it returns (the AsyncResult's id is
# the saga id): a broker that loses messages can delay an order, never lose it.
start_order_saga = engine.start_task(order_saga, name="orders.start_saga")
