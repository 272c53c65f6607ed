"""Inventory service: reserve and release stock, once per idempotency key."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from config import app
from config.queues import INVENTORY
from sagas import BusinessError, StepContext
from tasks.db import call_service, maybe_fault, transaction
from tasks.models import Reservation, Stock

stock_t = Stock.__table__
reservations_t = Reservation.__table__


@app.task(name="inventory.reserve", queue=INVENTORY)
def reserve(ctx: dict[str, Any]) -> dict[str, Any]:
    step = StepContext.model_validate(ctx)
    sku, quantity = step.input["item"], int(step.input["quantity"])
    call_service("inventory.reserve")
    try:
        with transaction() as conn:
            existing = conn.execute(
                select(reservations_t).where(reservations_t.c.key == step.idempotency_key)
            ).first()
            if existing is not None:
                return {"reservation": existing.key, "sku": existing.sku,
                        "quantity": existing.quantity, "state": existing.state}
            taken = conn.execute(
                update(stock_t)
                .where(stock_t.c.sku == sku, stock_t.c.available >= quantity)
                .values(available=stock_t.c.available - quantity)
            ).rowcount
            if not taken:
                row = conn.execute(select(stock_t).where(stock_t.c.sku == sku)).first()
                if row is None:
                    raise BusinessError(f"unknown item {sku!r}")
                raise BusinessError(
                    f"insufficient stock for {sku!r}: {row.available} available, "
                    f"{quantity} requested"
                )
            conn.execute(
                insert(reservations_t).values(
                    key=step.idempotency_key, saga_id=step.saga_id, sku=sku,
                    quantity=quantity, state="reserved",
                )
            )
    except IntegrityError:
        # A concurrent delivery of the same step won; its reservation is ours.
        return reserve(ctx)
    maybe_fault("inventory.reserve:after-commit")
    return {"reservation": step.idempotency_key, "sku": sku, "quantity": quantity,
            "state": "reserved"}


@app.task(name="inventory.release", queue=INVENTORY)
def release(ctx: dict[str, Any]) -> dict[str, Any]:
    step = StepContext.model_validate(ctx)
    call_service("inventory.release")
    try:
        with transaction() as conn:
            existing = conn.execute(
                select(reservations_t).where(reservations_t.c.key == step.idempotency_key)
            ).first()
            if existing is None:
                conn.execute(
                    insert(reservations_t).values(
                        key=step.idempotency_key, saga_id=step.saga_id,
                        sku=step.input.get("item", "?"), quantity=0, state="cancelled",
                    )
                )
                return {"released": 0, "note": "nothing was reserved"}
            # Compare-and-set: of concurrent copies, only the one that flips the state
            # puts the stock back.
            flipped = conn.execute(
                update(reservations_t)
                .where(reservations_t.c.key == step.idempotency_key,
                       reservations_t.c.state == "reserved")
                .values(state="released", released_at=_now())
            ).rowcount
            if not flipped:
                return {"released": 0, "note": f"reservation already {existing.state}"}
            conn.execute(
                update(stock_t)
                .where(stock_t.c.sku == existing.sku)
                .values(available=stock_t.c.available + existing.quantity)
            )
    except IntegrityError:
        return release(ctx)
    return {"released": existing.quantity}


def _now() -> Any:
    return datetime.now(UTC)
