"""The order domain's HTTP routes: take orders, show them, and show each service's ledger.

``POST /orders`` records the order and enqueues ``start_order_saga`` with the order id as the
Celery task id, so the order id is the saga id. The ``orders`` table is what makes an
``Idempotency-Key`` answer synchronously: a repeat finds the first order (and its saga) even
before any worker has picked the start message up, and a reused key with another body is a 409.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Generic, TypeVar

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import JSON, DateTime, String, Table, delete, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql import Select

from config import engine
from sagas import SagaLockedError, SagaOutcome, SagaState
from sagas.ops.api import AdminAuth, Offset, Problem
from tasks.db import transaction
from tasks.models import Charge, DomainBase, Refund, Reservation, Shipment, Stock
from tasks.order_saga import OrderInput, start_order_saga
from tasks.payment import order_amount

T = TypeVar("T")


class Order(DomainBase):
    """One accepted order; schema in migration ``orders_0002``."""

    __tablename__ = "orders"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    saga_id: Mapped[str] = mapped_column(String(64), unique=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    body_digest: Mapped[str] = mapped_column(String(64))
    customer_id: Mapped[str] = mapped_column(String(100), index=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True,
                                                 server_default=func.now())


orders_t: Table = Order.__table__  # type: ignore[assignment]


def body_digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# --- request and response models ---------------------------------------------
class OrderRequest(OrderInput):
    """The order as a client sends it: strict types, so ``"2"`` or ``true`` is not a number."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @field_validator("customer_id", "item")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        # PostgreSQL text cannot hold NUL: refused here (422 naming the field), not a 500.
        if "\x00" in value:
            raise ValueError("NUL characters are not allowed")
        return value


class OrderOut(BaseModel):
    id: str = Field(description="The order id; also the saga id")
    saga_id: str
    status: SagaState = Field(description="The saga's state; PENDING until a worker starts it")
    customer_id: str
    item: str
    quantity: int
    price: float
    amount: Decimal = Field(description="quantity x price, as the payment service charges it")
    error: str | None = None
    created_at: datetime | None
    steps: dict[str, str] | None = Field(None, description="Step name -> state (detail only)")


class Page(BaseModel, Generic[T]):
    total: int
    limit: int
    offset: int
    items: list[T]


class StockOut(BaseModel):
    sku: str
    available: int


class ReservationOut(BaseModel):
    key: str
    saga_id: str
    sku: str
    quantity: int
    state: str
    created_at: datetime | None
    released_at: datetime | None


class ChargeOut(BaseModel):
    key: str
    saga_id: str
    customer_id: str
    amount: Decimal
    state: str
    created_at: datetime | None


class RefundOut(BaseModel):
    charge_key: str
    saga_id: str
    amount: Decimal
    created_at: datetime | None


class ShipmentOut(BaseModel):
    key: str
    saga_id: str
    customer_id: str
    sku: str
    quantity: int
    created_at: datetime | None


class InventoryOut(BaseModel):
    stock: list[StockOut]
    reservations: Page[ReservationOut]


class PaymentsOut(BaseModel):
    charges: Page[ChargeOut]
    refunds: Page[RefundOut]


# --- helpers -------------------------------------------------------------------
Limit = Annotated[int, Query(ge=1, le=500)]
SagaFilter = Annotated[str | None, Query(max_length=64, description="Only this saga's rows")]

def _orders_query() -> Select[Any]:
    return select(orders_t)


def _order_out(row: Any, saga: SagaOutcome | None, with_steps: bool = False) -> OrderOut:
    """An order and its saga as the engine reports it (PENDING until a worker starts it)."""
    body = row.body
    steps = {n: str(s.state) for n, s in saga.steps.items()} if saga and with_steps else None
    return OrderOut(
        id=row.id, saga_id=row.saga_id, status=saga.state if saga else SagaState.PENDING,
        customer_id=body["customer_id"], item=body["item"], quantity=body["quantity"],
        price=body["price"], amount=order_amount(body), error=saga.error if saga else None,
        created_at=row.created_at, steps=steps,
    )


def _find(column: Any, value: str) -> Any:
    with transaction() as conn:
        return conn.execute(_orders_query().where(column == value)).first()


def _saga_of(row: Any) -> SagaOutcome | None:
    return engine.outcomes([row.saga_id]).get(row.saga_id)


def _page(model: type[BaseModel], table: Table, saga_id: str | None, limit: int, offset: int,
          order_by: Any) -> dict[str, Any]:
    query = select(table)
    count = select(func.count()).select_from(table)
    if saga_id:
        query = query.where(table.c.saga_id == saga_id)
        count = count.where(table.c.saga_id == saga_id)
    with transaction() as conn:
        rows = conn.execute(query.order_by(*order_by).limit(limit).offset(offset)).all()
        total = int(conn.execute(count).scalar_one())
    return {"total": total, "limit": limit, "offset": offset,
            "items": [model.model_validate(r._mapping) for r in rows]}


def _enqueue(order_id: str, payload: dict[str, Any], key: str | None) -> None:
    """Start the saga (recorded before this returns); a repeat with the same id is the same."""
    start_order_saga.apply_async(
        args=(payload,), kwargs={"idempotency_key": f"order:{key}" if key else None},
        task_id=order_id,
    )


def _replay(existing: Any, digest: str, payload: dict[str, Any], key: str,
            response: Response) -> OrderOut:
    if existing.body_digest != digest:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"Idempotency-Key {key!r} was already used for order {existing.id} "
            "with a different body",
        )
    saga = _saga_of(existing)
    if saga is None:
        # The first request may have died between its commit and its publish.
        _enqueue(existing.id, existing.body, key)
    response.headers["Idempotent-Replayed"] = "true"
    return _order_out(existing, saga)


# What a client does next with an accepted order (OpenAPI links: Schemathesis's stateful runs
# follow them from POST /orders to the order, its saga, and the saga's retry and cancel).
def _link(path: str, method: str, parameter: str, field: str) -> dict[str, Any]:
    ref = path.replace("~", "~0").replace("/", "~1")
    return {"operationRef": f"#/paths/{ref}/{method}",
            "parameters": {parameter: f"$response.body#/{field}"}}


ORDER_LINKS = {
    "GetOrder": _link("/orders/{order_id}", "get", "order_id", "id"),
    "GetSaga": _link("/sagas/{saga_id}", "get", "saga_id", "saga_id"),
    "RetrySaga": _link("/sagas/{saga_id}/retry", "post", "saga_id", "saga_id"),
    "CancelSaga": _link("/sagas/{saga_id}/cancel", "post", "saga_id", "saga_id"),
}


# --- the router ----------------------------------------------------------------
def orders_router(auth: AdminAuth) -> APIRouter:
    """Orders and the participants' read-only ledgers."""
    router = APIRouter()
    read = [Depends(auth.reader())]
    read_errors: dict[int | str, dict[str, Any]] = {
        401: {"model": Problem}, 403: {"model": Problem}, 503: {"model": Problem},
    }

    @router.post(
        "/orders", response_model=OrderOut, status_code=status.HTTP_202_ACCEPTED,
        tags=["orders"],
        responses={202: {"description": "Accepted; the saga runs on the workers",
                         "links": ORDER_LINKS},
                   409: {"model": Problem, "description": "Idempotency-Key reused, or "
                         "(ORDER_LOCK_POLICY=reject) the customer or item is locked by a saga"},
                   413: {"model": Problem}, 503: {"model": Problem}},
    )
    def create_order(
        order: OrderRequest,
        response: Response,
        idempotency_key: Annotated[
            str | None,
            Header(min_length=1, max_length=150,
                   description="A repeat with the same key returns the same order"),
        ] = None,
    ) -> OrderOut:
        """Accept an order and start its saga; 202 because the saga runs on the workers."""
        payload = order.model_dump(mode="json")
        digest = body_digest(payload)
        if idempotency_key:
            existing = _find(orders_t.c.idempotency_key, idempotency_key)
            if existing is not None:
                return _replay(existing, digest, payload, idempotency_key, response)
        order_id = str(uuid.uuid4())
        try:
            with transaction() as conn:
                conn.execute(insert(orders_t).values(
                    id=order_id, saga_id=order_id, idempotency_key=idempotency_key,
                    body_digest=digest, customer_id=order.customer_id, body=payload,
                    created_at=datetime.now(UTC),
                ))
        except IntegrityError:
            # Lost a race with a concurrent request carrying the same key.
            existing = _find(orders_t.c.idempotency_key, idempotency_key or "")
            if existing is None:
                raise
            return _replay(existing, digest, payload, idempotency_key or "", response)
        try:
            _enqueue(order_id, payload, idempotency_key)
        except Exception as exc:
            if not idempotency_key or isinstance(exc, SagaLockedError):
                # Nobody can ask for this order again (or it was refused for good): do not
                # leave it pending forever. (With a key, the client's retry starts it.)
                with transaction() as conn:
                    conn.execute(delete(orders_t).where(orders_t.c.id == order_id))
            raise
        response.headers["Location"] = f"/orders/{order_id}"
        created = _find(orders_t.c.id, order_id)
        return _order_out(created, _saga_of(created))

    @router.get("/orders", response_model=Page[OrderOut], tags=["orders"], dependencies=read,
                responses=read_errors)
    def list_orders(
        customer_id: Annotated[str | None, Query(max_length=100)] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        """Orders, newest first, each with its saga's state."""
        query = _orders_query()
        count = select(func.count()).select_from(orders_t)
        if customer_id:
            query = query.where(orders_t.c.customer_id == customer_id)
            count = count.where(orders_t.c.customer_id == customer_id)
        query = query.order_by(orders_t.c.created_at.desc(), orders_t.c.id)
        with transaction() as conn:
            rows = conn.execute(query.limit(limit).offset(offset)).all()
            total = int(conn.execute(count).scalar_one())
        sagas = engine.outcomes([r.saga_id for r in rows])  # one read for the whole page
        return {"total": total, "limit": limit, "offset": offset,
                "items": [_order_out(r, sagas.get(r.saga_id)) for r in rows]}

    @router.get("/orders/{order_id}", response_model=OrderOut, tags=["orders"],
                dependencies=read, responses={**read_errors, 404: {"model": Problem}})
    def show_order(order_id: Annotated[str, Path(min_length=1, max_length=64)]) -> OrderOut:
        """One order; its status follows the saga, with each step's state."""
        row = _find(orders_t.c.id, order_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no order with id {order_id!r}")
        return _order_out(row, _saga_of(row), with_steps=True)

    @router.get("/inventory", response_model=InventoryOut, tags=["ledgers"], dependencies=read,
                responses=read_errors)
    def inventory(saga_id: SagaFilter = None, limit: Limit = 100, offset: Offset = 0
                  ) -> dict[str, Any]:
        """Stock per sku and the reservations ledger (reserved, released, cancelled)."""
        stock_t = Stock.__table__
        with transaction() as conn:
            stock = conn.execute(select(stock_t).order_by(stock_t.c.sku)).all()
        table = Reservation.__table__
        return {
            "stock": [StockOut.model_validate(r._mapping) for r in stock],
            "reservations": _page(ReservationOut, table, saga_id, limit, offset,
                                  (table.c.created_at.desc(), table.c.key)),
        }

    @router.get("/payments", response_model=PaymentsOut, tags=["ledgers"], dependencies=read,
                responses=read_errors)
    def payments(saga_id: SagaFilter = None, limit: Limit = 100, offset: Offset = 0
                 ) -> dict[str, Any]:
        """Charges (charged, refunded, cancelled) and refunds, at most one per charge."""
        charges, refunds = Charge.__table__, Refund.__table__
        return {
            "charges": _page(ChargeOut, charges, saga_id, limit, offset,
                             (charges.c.created_at.desc(), charges.c.key)),
            "refunds": _page(RefundOut, refunds, saga_id, limit, offset,
                             (refunds.c.created_at.desc(), refunds.c.charge_key)),
        }

    @router.get("/shipments", response_model=Page[ShipmentOut], tags=["ledgers"],
                dependencies=read, responses=read_errors)
    def shipments(saga_id: SagaFilter = None, limit: Limit = 100, offset: Offset = 0
                  ) -> dict[str, Any]:
        """Shipments created (the pivot: an order that shipped only goes forward)."""
        table = Shipment.__table__
        return _page(ShipmentOut, table, saga_id, limit, offset,
                     (table.c.created_at.desc(), table.c.key))

    return router
