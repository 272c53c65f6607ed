"""The order ledgers checked against the saga states: the chaos suite's oracle, a plug-in check.

``sagas audit`` runs the engine's own rules on every saga (``sagas.ops.audit``), then this check,
registered on ``config.engine`` when ``tasks`` is imported. Each participant owns its ledger and
applies each effect once per idempotency key; the saga store says how each order ended. The
check joins the two and lists every place they disagree:

- COMPLETED: exactly one reservation, still ``reserved``; exactly one charge, ``charged`` and
  never refunded; exactly one shipment.
- COMPENSATED: no reservation left ``reserved`` (released, a ``cancelled`` tombstone, or none);
  no net charge (never charged, or charged and refunded exactly once for the full amount); no
  shipment.
- every sku: starting stock minus the units of live (``reserved``) reservations == available.
- no ledger row belongs to a saga the store does not know.
- once idle (the default; ``--no-idle`` while sagas still run), every order saga is COMPLETED
  or COMPENSATED: RUNNING/COMPENSATING is stuck work, COMPENSATION_FAILED and FORWARD_FAILED
  are parked work.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from config.settings import get_app_settings
from sagas.ops.audit import Finding, audit_idle
from tasks.db import transaction
from tasks.models import Charge, Refund, Reservation, Shipment, Stock

if TYPE_CHECKING:
    from sagas import Sagas

ORDER_SAGA = "order"
TERMINAL = ("COMPLETED", "COMPENSATED")


def order_ledgers(
    engine: Sagas,
    *,
    starting_stock: dict[str, int] | None = None,
    idle: bool = True,
) -> list[Finding]:
    """The order ledgers in ``engine.store`` against its order sagas' states.

    ``starting_stock`` defaults to the app's STARTING_STOCK. The "not terminal" rule runs when
    ``idle`` is True and the audit running this check is not a ``--no-idle`` one.
    """
    stock0 = dict(
        starting_stock if starting_stock is not None else get_app_settings().starting_stock
    )
    idle = idle and audit_idle()
    sagas: dict[str, str] = {}
    while True:  # the engine's own read of every order saga's state, a page at a time
        page, total = engine.store.list_sagas(name=ORDER_SAGA, limit=1000, offset=len(sagas))
        sagas.update({r["id"]: r["state"] for r in page})
        if not page or len(sagas) >= total:
            break
    with transaction() as conn:
        reservations = conn.execute(select(Reservation.__table__)).all()
        charges = conn.execute(select(Charge.__table__)).all()
        refunds = conn.execute(select(Refund.__table__)).all()
        shipments = conn.execute(select(Shipment.__table__)).all()
        stock = {str(r.sku): int(r.available) for r in conn.execute(select(Stock.__table__))}

    report = _Findings()
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
    return report.findings


def order_ledger_check(
    starting_stock: dict[str, int] | None = None, idle: bool = True
) -> Callable[[Sagas], list[Finding]]:
    """``order_ledgers`` as an audit check (``engine.add_audit_check``), its options bound."""

    def order_ledgers_check(engine: Sagas) -> list[Finding]:
        return order_ledgers(engine, starting_stock=starting_stock, idle=idle)

    order_ledgers_check.__name__ = order_ledgers_check.__qualname__ = "order_ledgers"
    return order_ledgers_check


class _Findings:
    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def add(self, rule: str, detail: str, saga_id: str | None = None) -> None:
        self.findings.append(Finding(rule, detail, saga_id))


def _key(row: Any) -> str:
    return str(getattr(row, "key", None) or getattr(row, "charge_key", "?"))


def _check_completed(report: _Findings, saga_id: str, ledger: dict[str, list[Any]]) -> None:
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


def _check_compensated(report: _Findings, saga_id: str, ledger: dict[str, list[Any]]) -> None:
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


from config import engine  # noqa: E402 - registered once everything above is defined

engine.add_audit_check(order_ledger_check())
