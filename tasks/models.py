"""The order domain's own tables: each participant service owns its ledger."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import DateTime, Integer, MetaData, Numeric, String, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class DomainBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Stock(DomainBase):
    __tablename__ = "inventory_stock"
    sku: Mapped[str] = mapped_column(String(100), primary_key=True)
    available: Mapped[int] = mapped_column(Integer)


class Reservation(DomainBase):
    """Keyed by the step's idempotency key; state reserved, released or cancelled.

    ``cancelled`` is a tombstone: the release arrived before the reserve ever ran, so a late
    reserve with the same key must do nothing.
    """

    __tablename__ = "inventory_reservations"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    saga_id: Mapped[str] = mapped_column(String(64), index=True)
    sku: Mapped[str] = mapped_column(String(100))
    quantity: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Charge(DomainBase):
    """State charged, refunded, or cancelled (tombstone: refund before any charge)."""

    __tablename__ = "payment_charges"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    saga_id: Mapped[str] = mapped_column(String(64), index=True)
    customer_id: Mapped[str] = mapped_column(String(100))
    amount: Mapped[Decimal] = mapped_column(Numeric(14, 2))
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Refund(DomainBase):
    """At most one refund per charge: the charge key is the primary key."""

    __tablename__ = "payment_refunds"
    charge_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    saga_id: Mapped[str] = mapped_column(String(64), index=True)
    amount: Mapped[Decimal] = mapped_column(Numeric(14, 2))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Shipment(DomainBase):
    __tablename__ = "shipments"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    saga_id: Mapped[str] = mapped_column(String(64), index=True)
    customer_id: Mapped[str] = mapped_column(String(100))
    sku: Mapped[str] = mapped_column(String(100))
    quantity: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
