"""``make demo`` (``python -m tasks.demo``): 20 orders through real workers, one pool per queue.

With REDIS_URL unset it starts a private Redis; with DATABASE_URL unset it uses the sample's
default store, var/sagas.db, which `sagas -A config ...` reads afterwards. Orders over the
payment limit are declined and must end COMPENSATED with their stock restored; the rest must end
COMPLETED. Exit 0 only when every saga ended as expected.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

QUEUES = ("inventory", "payment", "shipping", "saga")
ITEMS = ("laptop", "phone", "book")
console = Console()
if not console.is_terminal:
    console = Console(width=140)


def demo_orders(count: int) -> list[dict[str, Any]]:
    """Deterministic orders; every third one is over the payment limit (amount > 500)."""
    orders = []
    for i in range(count):
        item = ITEMS[i % len(ITEMS)]
        over = i % 3 == 2
        quantity = 2 + i % 2 if over else 1 + i % 3
        price = 300.0 if over else 25.0 + 10 * (i % 7)
        orders.append({"customer_id": f"c{i + 1:02d}", "item": item, "quantity": quantity,
                       "price": price})
    return orders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.demo", description=__doc__)
    parser.add_argument("--orders", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args(argv or [])
    with ExitStack() as stack:
        try:
            _prepare_environment(stack)
            return _run(args.orders, args.timeout, stack)
        except KeyboardInterrupt:
            from sagas.devtools.localworkers import stop_all

            stopped = stop_all(_WORKERS)
            names = ", ".join(f"worker {n}" for n in stopped) or "no worker"
            redis = " and the private Redis" if os.environ.get("SAGAS_DEMO_PRIVATE_REDIS") else ""
            console.print(f"\ninterrupted: stopped {names}{redis}", highlight=False)
            return 130


def _prepare_environment(stack: ExitStack) -> None:
    from sagas.devtools.localredis import LocalRedis

    if not os.environ.get("REDIS_URL"):
        redis = stack.enter_context(LocalRedis())
        os.environ["REDIS_URL"] = redis.url
        os.environ["SAGAS_DEMO_PRIVATE_REDIS"] = "1"
        console.print(f"[dim]started a private Redis at {redis.url}[/]")
    if not os.environ.get("DATABASE_URL"):
        # The sample's default store (config.settings): the one `sagas -A config ...` reads
        # afterwards, so the commands printed at the end work as printed.
        db = Path("var/sagas.db")
        db.parent.mkdir(exist_ok=True)
        console.print(f"[dim]using the SQLite file {db}[/]")
    # The sample app reads its settings when it is first imported: only now, after the above.
    import config  # noqa: F401


_WORKERS: list[Any] = []  # every worker this run started, for a Ctrl-C that stops them all


def _run(count: int, timeout: float, stack: ExitStack) -> int:
    import tasks.migrate
    from config import engine
    from sagas.devtools.localworkers import LocalWorker
    from tasks.order_saga import start_order_saga
    from tasks.payment import order_amount

    engine.upgrade_schema()
    tasks.migrate.upgrade()
    stock_before = _stock()
    workers = [LocalWorker(q, app="config", concurrency=1) for q in QUEUES]
    _WORKERS.extend(workers)
    for worker in workers:
        worker.start()
        stack.callback(worker.stop)
    starting = "starting one worker per queue: " + ", ".join(QUEUES)
    if not console.is_terminal:
        console.print(starting, highlight=False)  # a log gets the line the spinner shows
    with console.status(starting):
        for worker in workers:
            worker.wait_ready()
    console.print(f"[dim]{len(workers)} workers ready; starting {count} order sagas[/]")

    limit = _limit()
    orders = demo_orders(count)
    started = []
    for order in orders:
        result = start_order_saga.delay(order)
        expected = "COMPENSATED" if order_amount(order) > limit else "COMPLETED"
        started.append((result.id, order, expected))

    store = engine.store
    settled = {"COMPLETED", "COMPENSATED", "COMPENSATION_FAILED", "FORWARD_FAILED"}
    states: dict[str, str] = {}
    columns = (TextColumn("sagas"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    deadline = time.monotonic() + timeout
    live = console.is_terminal  # piped (a log, CI): a line per second with news instead
    said, said_at = -1, 0.0
    with Progress(*columns, console=console, disable=not live) as progress:
        bar = progress.add_task("sagas", total=len(started))
        while time.monotonic() < deadline:
            waiting = [i for i, _, _ in started if states.get(i) not in settled]
            states.update(engine.states(waiting))  # one read-only query for all of them
            done = sum(1 for s in states.values() if s in settled)
            progress.update(bar, completed=done)
            now = time.monotonic()
            if not live and done != said and (now - said_at >= 1 or done == len(started)):
                console.print(f"sagas settled: {done}/{len(started)}", highlight=False)
                said, said_at = done, now
            if done == len(started):
                break
            time.sleep(0.2)

    steps = store.step_states([s for s, _, _ in started])
    # Nothing is ever cut ("COMPL..."): the step states need ~120 columns, so a narrower
    # terminal gets the saga's own state only (`sagas show` has the steps). The id's first 8
    # characters are a prefix `sagas show` accepts.
    wide = console.width >= 120
    columns = ["saga", "customer", "order", "amount", "expected", "final"]
    if wide:
        columns += ["reserve", "charge", "ship"]
    table = Table(title="order sagas", box=box.SIMPLE_HEAD)
    for col in columns:
        table.add_column(col, no_wrap=True)
    ok = True
    for saga_id, order, expected in started:
        final = states.get(saga_id, "?")
        good = final == expected
        ok &= good
        step = steps.get(saga_id, {})
        colour = "green" if good else "red"
        cells = [saga_id[:8], order["customer_id"], f"{order['quantity']} x {order['item']}",
                 str(order_amount(order)), expected, f"[{colour}]{final}[/]"]
        if wide:
            cells += [step.get(name, "?") for name in
                      ("reserve_inventory", "charge_payment", "ship_order")]
        table.add_row(*cells)
    console.print(table)
    completed = sum(1 for _, o, e in started if e == "COMPLETED")
    shipped = {}
    for _, order, expected in started:
        if expected == "COMPLETED":
            shipped[order["item"]] = shipped.get(order["item"], 0) + order["quantity"]
    stock_after = _stock()
    stock_ok = all(stock_after[s] == stock_before[s] - shipped.get(s, 0) for s in stock_before)
    ok &= stock_ok
    console.print(
        f"{completed} orders expected to complete, {len(started) - completed} to be declined "
        f"and compensated; stock {'restored for every declined order' if stock_ok else 'WRONG'}: "
        + ", ".join(f"{s} {stock_before[s]}->{stock_after[s]}" for s in sorted(stock_before))
    )
    console.print("[bold green]every saga ended as expected[/]" if ok
                  else "[bold red]some sagas did not end as expected[/]")
    declined = next((i for i, _, e in started if e == "COMPENSATED"), started[0][0])
    console.print("\nnext, in this clone (the same store):", highlight=False)
    console.print(f"  .venv/bin/sagas -A config show {declined}", highlight=False,
                  soft_wrap=True, markup=False)
    console.print("  .venv/bin/sagas -A config list --limit 20", highlight=False, markup=False)
    console.print("  make web   then   http://127.0.0.1:8000/dashboard", highlight=False,
                  markup=False)
    return 0 if ok else 1


def _limit() -> Any:
    from decimal import Decimal

    from config.settings import get_app_settings

    return Decimal(str(get_app_settings().payment_limit))


def _stock() -> dict[str, int]:
    from sqlalchemy import select

    from tasks.db import transaction
    from tasks.models import Stock

    with transaction() as conn:
        return {r.sku: r.available for r in conn.execute(select(Stock.__table__)).all()}


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
