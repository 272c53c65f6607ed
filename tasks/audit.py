"""``sagas audit``: the order ledgers checked against the saga states, the chaos suite's oracle.

Each participant owns its ledger and applies each effect once per idempotency key; the saga
store says how each order ended. The audit joins the two and lists every place they disagree:

- COMPLETED: exactly one reservation, still ``reserved``; exactly one charge, ``charged`` and
  never refunded; exactly one shipment.
- COMPENSATED: no reservation left ``reserved`` (released, a ``cancelled`` tombstone, or none);
  no net charge (never charged, or charged and refunded exactly once for the full amount); no
  shipment.
- every sku: starting stock minus the units of live (``reserved``) reservations == available.
- no ledger row belongs to a saga the store does not know.
- once idle (the default; ``--no-idle`` while sagas still run), every order saga is COMPLETED
  or COMPENSATED: RUNNING/COMPENSATING is stuck work, COMPENSATION_FAILED is parked work.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import select

from config.settings import get_app_settings
from sagas.errors import SagaError, StoreUnavailableError
from sagas.store import Store, sagas_t
from tasks.models import Charge, Refund, Reservation, Shipment, Stock

ORDER_SAGA = "order"
TERMINAL = ("COMPLETED", "COMPENSATED")


@dataclass
class AuditReport:
    sagas: int = 0
    states: dict[str, int] = field(default_factory=dict)
    violations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def add(self, rule: str, detail: str, saga_id: str | None = None) -> None:
        self.violations.append({"saga": saga_id, "rule": rule, "detail": detail})

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "sagas": self.sagas, "states": self.states,
                "violations": self.violations}


def run_audit(
    database_url: str | None = None,
    *,
    idle: bool = True,
    starting_stock: dict[str, int] | None = None,
) -> AuditReport:
    """Audit the order ledgers in ``database_url`` (default DATABASE_URL)."""
    settings = get_app_settings()
    store = Store(database_url or settings.database_url)
    stock0 = dict(starting_stock if starting_stock is not None else settings.starting_stock)
    with store.read() as conn:
        sagas = {
            str(r.id): str(r.state)
            for r in conn.execute(
                select(sagas_t.c.id, sagas_t.c.state).where(sagas_t.c.name == ORDER_SAGA)
            )
        }
        reservations = conn.execute(select(Reservation.__table__)).all()
        charges = conn.execute(select(Charge.__table__)).all()
        refunds = conn.execute(select(Refund.__table__)).all()
        shipments = conn.execute(select(Shipment.__table__)).all()
        stock = {str(r.sku): int(r.available) for r in conn.execute(select(Stock.__table__))}

    report = AuditReport(sagas=len(sagas))
    for state in sagas.values():
        report.states[state] = report.states.get(state, 0) + 1

    by_saga: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for kind, rows in (("reservation", reservations), ("charge", charges),
                       ("refund", refunds), ("shipment", shipments)):
        for row in rows:
            if str(row.saga_id) not in sagas:
                report.add("orphan effect", f"{kind} {_key(row)} for unknown saga",
                           str(row.saga_id))
            by_saga[str(row.saga_id)][kind].append(row)

    for saga_id, state in sorted(sagas.items()):
        ledger = by_saga.get(saga_id, {})
        if state == "COMPLETED":
            _check_completed(report, saga_id, ledger)
        elif state == "COMPENSATED":
            _check_compensated(report, saga_id, ledger)
        elif idle:
            report.add("not terminal", f"saga is {state} while the system is idle", saga_id)

    live: dict[str, int] = defaultdict(int)
    for row in reservations:
        if row.state == "reserved":
            live[str(row.sku)] += int(row.quantity)
    for sku in sorted(set(stock0) | set(stock) | set(live)):
        if sku not in stock:
            if live.get(sku):
                report.add("stock conserved", f"{sku}: reserved {live[sku]} of an unknown sku")
            continue
        if sku not in stock0:
            report.add("stock conserved", f"{sku}: in stock but not in the starting stock")
            continue
        expected = stock0[sku] - live.get(sku, 0)
        if stock[sku] != expected:
            report.add(
                "stock conserved",
                f"{sku}: available {stock[sku]}, expected {expected} "
                f"(start {stock0[sku]} - reserved {live.get(sku, 0)})",
            )
    return report


def _key(row: Any) -> str:
    return str(getattr(row, "key", None) or getattr(row, "charge_key", "?"))


def _check_completed(report: AuditReport, saga_id: str, ledger: dict[str, list[Any]]) -> None:
    reserved = ledger.get("reservation", [])
    if [r.state for r in reserved] != ["reserved"]:
        report.add("completed: one reservation consumed",
                   f"reservations {[(r.key, r.state) for r in reserved]}", saga_id)
    charges = ledger.get("charge", [])
    if [c.state for c in charges] != ["charged"]:
        report.add("completed: one charge, not refunded",
                   f"charges {[(c.key, c.state) for c in charges]}", saga_id)
    if ledger.get("refund"):
        report.add("completed: one charge, not refunded",
                   f"{len(ledger['refund'])} refund(s)", saga_id)
    if len(ledger.get("shipment", [])) != 1:
        report.add("completed: one shipment",
                   f"{len(ledger.get('shipment', []))} shipments", saga_id)


def _check_compensated(report: AuditReport, saga_id: str, ledger: dict[str, list[Any]]) -> None:
    still = [r.key for r in ledger.get("reservation", []) if r.state == "reserved"]
    if still:
        report.add("compensated: stock back", f"reservations still held: {still}", saga_id)
    refunds = {r.charge_key: Decimal(r.amount) for r in ledger.get("refund", [])}
    net = Decimal("0")
    for charge in ledger.get("charge", []):
        amount = Decimal(charge.amount)
        if charge.state == "charged":
            net += amount
        elif charge.state == "refunded":
            if refunds.get(charge.key) != amount:
                report.add("compensated: no net charge",
                           f"charge {charge.key} refunded {refunds.get(charge.key)} of {amount}",
                           saga_id)
        elif charge.state != "cancelled":
            report.add("compensated: no net charge",
                       f"charge {charge.key} in unknown state {charge.state}", saga_id)
    if net:
        report.add("compensated: no net charge", f"{net} charged and not refunded", saga_id)
    if ledger.get("shipment"):
        report.add("compensated: no shipment",
                   f"{len(ledger['shipment'])} shipment(s)", saga_id)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sagas audit",
        description="Check the order ledgers (stock, charges, shipments) against saga states.",
    )
    parser.add_argument("--json", action="store_true", dest="as_json", help="print JSON")
    parser.add_argument("--no-idle", action="store_true",
                        help="sagas may still be running: do not flag live ones")
    parser.add_argument("--starting-stock", default=None,
                        help="JSON object sku -> units the database started with "
                             "(default STARTING_STOCK)")
    args = parser.parse_args(argv)
    stock0 = json.loads(args.starting_stock) if args.starting_stock else None
    try:
        report = run_audit(idle=not args.no_idle, starting_stock=stock0)
    except SagaError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 3 if isinstance(exc, StoreUnavailableError) else 1
    if args.as_json:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2, default=str) + "\n")
    else:
        verdict = "ok" if report.ok else f"{len(report.violations)} violations"
        states = ", ".join(f"{k} {v}" for k, v in sorted(report.states.items()))
        sys.stdout.write(f"audit: {report.sagas} order sagas ({states or 'none'}): {verdict}\n")
        for v in report.violations[:50]:
            sys.stdout.write(f"  {v['saga'] or '-'}: {v['rule']}: {v['detail']}\n")
    return 0 if report.ok else 1
