"""Payment service: charge (declined above the limit) and refund, at most once per charge."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from config import app
from config.queues import PAYMENT
from config.settings import get_app_settings
from sagas import BusinessError, StepContext
from tasks.db import call_service, maybe_fault, transaction
from tasks.models import Charge, Refund

charges_t = Charge.__table__
refunds_t = Refund.__table__


class PaymentDeclined(BusinessError):
    pass


def order_amount(order: dict[str, Any]) -> Decimal:
    return (Decimal(str(order["price"])) * int(order["quantity"])).quantize(Decimal("0.01"))


@app.task(name="payment.charge", queue=PAYMENT)
def charge(ctx: dict[str, Any]) -> dict[str, Any]:
    step = StepContext.model_validate(ctx)
    amount = order_amount(step.input)
    limit = Decimal(str(get_app_settings().payment_limit))
    if amount > limit:
        raise PaymentDeclined(f"payment of {amount} declined: over the limit of {limit}")
    call_service("payment.charge")
    try:
        with transaction() as conn:
            existing = conn.execute(
                select(charges_t).where(charges_t.c.key == step.idempotency_key)
            ).first()
            if existing is None:
                conn.execute(
                    insert(charges_t).values(
                        key=step.idempotency_key, saga_id=step.saga_id,
                        customer_id=step.input["customer_id"], amount=amount, state="charged",
                    )
                )
                state = "charged"
            else:
                state = existing.state
    except IntegrityError:
        return charge(ctx)
    maybe_fault("payment.charge:after-commit")
    return {"charge": step.idempotency_key, "amount": str(amount), "state": state}


@app.task(name="payment.refund", queue=PAYMENT)
def refund(ctx: dict[str, Any]) -> dict[str, Any]:
    step = StepContext.model_validate(ctx)
    call_service("payment.refund")
    try:
        with transaction() as conn:
            existing = conn.execute(
                select(charges_t).where(charges_t.c.key == step.idempotency_key)
            ).first()
            if existing is None:
                conn.execute(
                    insert(charges_t).values(
                        key=step.idempotency_key, saga_id=step.saga_id,
                        customer_id=step.input.get("customer_id", "?"), amount=0,
                        state="cancelled",
                    )
                )
                return {"refunded": "0.00", "note": "nothing was charged"}
            if existing.state != "charged":
                return {"refunded": "0.00", "note": f"charge already {existing.state}"}
            conn.execute(
                insert(refunds_t).values(
                    charge_key=existing.key, saga_id=step.saga_id, amount=existing.amount
                )
            )
            flipped = conn.execute(
                update(charges_t)
                .where(charges_t.c.key == existing.key, charges_t.c.state == "charged")
                .values(state="refunded")
            ).rowcount
            if not flipped:
                raise IntegrityError("refund raced", None, Exception("charge no longer charged"))
    except IntegrityError:
        return refund(ctx)
    return {"refunded": str(existing.amount)}
