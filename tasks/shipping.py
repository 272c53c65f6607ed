"""Shipping service: create the shipment. The pivot: once it exists the order goes forward."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from config import app
from config.queues import SHIPPING
from sagas import StepContext
from tasks.db import call_service, maybe_fault, transaction
from tasks.models import Shipment

shipments_t = Shipment.__table__


@app.task(name="shipping.create_shipment", queue=SHIPPING)
def create_shipment(ctx: dict[str, Any]) -> dict[str, Any]:
    step = StepContext.model_validate(ctx)
    call_service("shipping.create_shipment")
    try:
        with transaction() as conn:
            existing = conn.execute(
                select(shipments_t.c.key).where(shipments_t.c.key == step.idempotency_key)
            ).first()
            if existing is None:
                conn.execute(
                    insert(shipments_t).values(
                        key=step.idempotency_key, saga_id=step.saga_id,
                        customer_id=step.input["customer_id"], sku=step.input["item"],
                        quantity=int(step.input["quantity"]),
                    )
                )
    except IntegrityError:
        return create_shipment(ctx)
    maybe_fault("shipping.create_shipment:after-commit")
    return {"shipment": step.idempotency_key}
