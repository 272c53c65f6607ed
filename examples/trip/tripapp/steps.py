"""The participants: holds, the charge, the confirmation and the notification.

Every task takes the step context (one dict) and is idempotent by its idempotency key: the
effect is written to a small SQLite ledger (``TRIP_LEDGER``, default ``var/trip-ledger.db``)
under ``(key, kind)``, first write wins, so a redelivered or retried task returns what the first
run recorded. The ledger stands in for the airline's, the hotel's and the bank's own systems.

A card in ``DECLINED_CARDS`` or an amount over ``TRIP_CHARGE_LIMIT`` (default 5000) is declined
with a ``BusinessError``: the saga compensates (the three holds are released).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sagas import BusinessError, StepContext, TransientError
from tripapp import CONFIRMATIONS, HOLDS, PAYMENTS, app

DECLINED_CARDS = frozenset({"4000000000000002"})
"""Test cards the (pretend) bank always declines."""


class TripRequest(BaseModel):
    """The saga's input, validated by ``engine.start`` before anything is recorded."""

    model_config = ConfigDict(extra="forbid")

    traveller: str = Field(min_length=1, max_length=100)
    origin: str = Field(min_length=3, max_length=3, pattern=r"^[A-Z]{3}$")
    destination: str = Field(min_length=3, max_length=3, pattern=r"^[A-Z]{3}$")
    depart: date
    nights: int = Field(ge=1, le=60)
    amount: Decimal = Field(gt=0, max_digits=10, decimal_places=2)
    card: str = Field(pattern=r"^\d{12,19}$")
    email: str = Field(default="", max_length=200)


class CardDeclined(BusinessError):
    """The bank refused the charge: final, never retried; the saga compensates."""


# --- the ledger ------------------------------------------------------------------------------
def ledger_path() -> Path:
    return Path(os.environ.get("TRIP_LEDGER", "var/trip-ledger.db"))


@contextmanager
def ledger() -> Iterator[sqlite3.Connection]:
    """One transaction on the ledger (``BEGIN IMMEDIATE``: writers queue, none is lost)."""
    path = ledger_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS effects ("
            " seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, kind TEXT NOT NULL,"
            " saga_id TEXT NOT NULL, detail TEXT NOT NULL, UNIQUE (key, kind))"
        )
        conn.execute(
            "CREATE TABLE IF NOT EXISTS attempts (key TEXT PRIMARY KEY, n INTEGER NOT NULL)"
        )
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.close()


def find(conn: sqlite3.Connection, key: str, kind: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT detail FROM effects WHERE key = ? AND kind = ?", (key, kind)
    ).fetchone()
    return None if row is None else dict(json.loads(row[0]))


def record(step: StepContext, kind: str, detail: dict[str, Any]) -> dict[str, Any]:
    """Write ``detail`` once per (idempotency key, kind); returns what the first write stored."""
    with ledger() as conn:
        existing = find(conn, step.idempotency_key, kind)
        if existing is not None:
            return existing
        conn.execute(
            "INSERT INTO effects (key, kind, saga_id, detail) VALUES (?, ?, ?, ?)",
            (step.idempotency_key, kind, step.saga_id, json.dumps(detail, sort_keys=True)),
        )
        return detail


def effects(saga_id: str) -> list[tuple[int, str, str, dict[str, Any]]]:
    """The ledger's rows for one trip, in the order they were written: (seq, step, kind, detail)."""
    with ledger() as conn:
        rows = conn.execute(
            "SELECT seq, key, kind, detail FROM effects WHERE saga_id = ? ORDER BY seq",
            (saga_id,),
        ).fetchall()
    return [(seq, key.rsplit(":", 1)[-1], kind, json.loads(d)) for seq, key, kind, d in rows]


def reference(prefix: str, key: str) -> str:
    """A stable reference per idempotency key: the same on every attempt."""
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:8].upper()}"


# --- holds -----------------------------------------------------------------------------------
def _hold(ctx: dict[str, Any], what: str, prefix: str) -> dict[str, Any]:
    step = StepContext.model_validate(ctx)
    trip = TripRequest.model_validate(step.input)
    detail = {"hold": reference(prefix, step.idempotency_key), "what": what,
              "destination": trip.destination, "depart": trip.depart.isoformat()}
    if what == "flight":
        detail["route"] = f"{trip.origin}-{trip.destination}"
    else:
        detail["nights"] = trip.nights
    return record(step, "hold", detail)


def _release(ctx: dict[str, Any]) -> dict[str, Any]:
    """Release a hold; a hold that never happened gets a tombstone (a late hold then sees it)."""
    step = StepContext.model_validate(ctx)
    with ledger() as conn:
        held = find(conn, step.idempotency_key, "hold")
    detail = {"released": held["hold"]} if held else {"released": None, "note": "nothing held"}
    return record(step, "release", detail)


@app.task(name="trip.hold_flight", queue=HOLDS)
def hold_flight(ctx: dict[str, Any]) -> dict[str, Any]:
    return _hold(ctx, "flight", "FL")


@app.task(name="trip.hold_hotel", queue=HOLDS)
def hold_hotel(ctx: dict[str, Any]) -> dict[str, Any]:
    return _hold(ctx, "hotel", "HT")


@app.task(name="trip.hold_car", queue=HOLDS)
def hold_car(ctx: dict[str, Any]) -> dict[str, Any]:
    return _hold(ctx, "car", "CR")


@app.task(name="trip.release_flight", queue=HOLDS)
def release_flight(ctx: dict[str, Any]) -> dict[str, Any]:
    return _release(ctx)


@app.task(name="trip.release_hotel", queue=HOLDS)
def release_hotel(ctx: dict[str, Any]) -> dict[str, Any]:
    return _release(ctx)


@app.task(name="trip.release_car", queue=HOLDS)
def release_car(ctx: dict[str, Any]) -> dict[str, Any]:
    return _release(ctx)


# --- payment ---------------------------------------------------------------------------------
def charge_limit() -> Decimal:
    return Decimal(os.environ.get("TRIP_CHARGE_LIMIT", "5000"))


@app.task(name="trip.charge", queue=PAYMENTS)
def charge(ctx: dict[str, Any]) -> dict[str, Any]:
    """Charge the card once per trip; declined cards and amounts over the limit are refused."""
    step = StepContext.model_validate(ctx)
    trip = TripRequest.model_validate(step.input)
    holds = [step.results[name]["hold"] for name in ("flight", "hotel", "car")]
    last4 = trip.card[-4:]  # the ledger never keeps a card number
    limit = charge_limit()
    if trip.card in DECLINED_CARDS or trip.amount > limit:
        reason = "card declined" if trip.card in DECLINED_CARDS else f"over the limit of {limit}"
        record(step, "declined", {"card": last4, "amount": str(trip.amount), "reason": reason})
        raise CardDeclined(f"charge of {trip.amount} on card *{last4} refused: {reason}")
    return record(step, "charge", {"charge": reference("CH", step.idempotency_key),
                                   "amount": str(trip.amount), "card": last4, "holds": holds})


@app.task(name="trip.refund", queue=PAYMENTS)
def refund(ctx: dict[str, Any]) -> dict[str, Any]:
    step = StepContext.model_validate(ctx)
    with ledger() as conn:
        charged = find(conn, step.idempotency_key, "charge")
    if charged is None:
        return record(step, "refund", {"refunded": "0.00", "note": "nothing was charged"})
    return record(step, "refund", {"refunded": charged["amount"], "charge": charged["charge"]})


# --- after the payment -----------------------------------------------------------------------
@app.task(name="trip.confirm", queue=CONFIRMATIONS)
def confirm(ctx: dict[str, Any]) -> dict[str, Any]:
    """The pivot: tickets and vouchers are issued; from here the trip only goes forward."""
    step = StepContext.model_validate(ctx)
    booked = {name: step.results[name]["hold"] for name in ("flight", "hotel", "car")}
    return record(step, "confirm", {"booking": reference("TRIP", step.saga_id), **booked,
                                    "charge": step.results["charge"]["charge"]})


def notify_flakes() -> int:
    """How many attempts per trip the mail gateway refuses before it accepts (a demo knob)."""
    return int(os.environ.get("TRIP_NOTIFY_FLAKES", "0"))


@app.task(name="trip.notify", queue=CONFIRMATIONS)
def notify(ctx: dict[str, Any]) -> dict[str, Any]:
    """Send the confirmation; a busy gateway is a transient fault, retried forward."""
    step = StepContext.model_validate(ctx)
    with ledger() as conn:
        sent = find(conn, step.idempotency_key, "notify")
        if sent is not None:
            return sent
        conn.execute(
            "INSERT INTO attempts (key, n) VALUES (?, 1)"
            " ON CONFLICT (key) DO UPDATE SET n = n + 1", (step.idempotency_key,),
        )
        (tries,) = conn.execute(
            "SELECT n FROM attempts WHERE key = ?", (step.idempotency_key,)
        ).fetchone()
    if tries <= notify_flakes():
        raise TransientError(f"mail gateway busy (try {tries})")
    to = step.input.get("email") or step.input["traveller"]
    return record(step, "notify", {"sent_to": to, "booking": step.results["confirm"]["booking"],
                                   "tries": tries})
