"""A saga client in its own process (its Celery app uses the deployment's REDIS_URL).

``python -m tests.chaos.client start t_crashy '{"plan": {}}' [--id X] [--key K]``
``python -m tests.chaos.client many t_two_pools '{}' 200`` (one kind, one input, N times)
``python -m tests.chaos.client orders 200 --over 0.3 --duration 20 --seed 1``
``python -m tests.chaos.client delay 40`` (``start_order_saga.delay(order)``, as a web app does)
``python -m tests.chaos.client --patience 60 orders ...`` keeps retrying a database that is down
for up to 60 s (default 4).

Prints one JSON line. A start records the saga in SQL first and publishes after; when the
publish fails (Redis down or restarting) the saga still exists and recovery re-drives it, so
the client counts the failure and goes on, as a web front end would.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

import config
from sagas.errors import StoreUnavailableError
from tests.support.engine import start_saga

ITEMS = ("laptop", "phone", "book")


def order(rng: random.Random, i: int, over: bool, limit: float = 500.0, customers: int = 97
          ) -> dict[str, Any]:
    quantity = rng.randint(1, 3)
    if over:
        price = round(rng.uniform(limit / quantity + 1, 2 * limit / quantity), 2)
    else:
        price = round(rng.uniform(5, limit / quantity - 1), 2)
    return {"customer_id": f"c{i % customers}", "item": rng.choice(ITEMS), "quantity": quantity,
            "price": price}


PATIENCE = 4.0  # seconds a start keeps retrying an unreachable store (--patience)


def _start(saga: str, data: dict[str, Any], saga_id: str | None, key: str | None,
           patience: float = PATIENCE) -> str:
    """Start once; a store hiccup is retried with the same id (starts are idempotent), for up
    to ``patience`` seconds (a test that takes the database down for longer raises it)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return start_saga(saga, data, saga_id=saga_id, idempotency_key=key)
        except StoreUnavailableError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def cmd_start(args: argparse.Namespace) -> dict[str, Any]:
    data = json.loads(args.input)
    try:
        saga_id = _start(args.saga, data, args.id, args.key, args.patience)
        return {"id": saga_id, "published": True}
    except Exception as exc:
        if args.id is None:
            raise
        return {"id": args.id, "published": False, "error": f"{type(exc).__name__}: {exc}"}


def cmd_many(args: argparse.Namespace) -> dict[str, Any]:
    """``many SAGA INPUT COUNT``: COUNT sagas of one kind, one input, as fast as they go."""
    data = json.loads(args.input)
    started = time.monotonic()
    ids = [_start(args.saga, data, None, None, args.patience) for _ in range(args.count)]
    return {"ids": ids, "seconds": round(time.monotonic() - started, 2)}


def wave_plan(spec: str, count: int, duration: float) -> list[float]:
    """``"0:0.3,0.5:0.7"`` (at share of the duration : share of the sagas) as each start's
    offset (s): a wave goes out as fast as the client can start sagas."""
    waves = [tuple(float(x) for x in part.split(":")) for part in spec.split(",")]
    offsets: list[float] = []
    for n, (at, share) in enumerate(waves):
        size = count - len(offsets) if n == len(waves) - 1 else round(count * share)
        offsets += [at * duration] * size
    return offsets


def cmd_orders(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    ids: list[str] = []
    over = 0
    publish_errors = 0
    started = time.monotonic()
    offsets = wave_plan(args.waves, args.count, args.duration) if args.waves else None
    for i in range(args.count):
        if offsets is not None:
            lag = started + offsets[i] - time.monotonic()
            if lag > 0:
                time.sleep(lag)
        is_over = rng.random() < args.over
        over += is_over
        saga_id = f"{args.prefix}-{i:05d}"
        try:
            data = order(rng, i, is_over, customers=args.customers)
            _start("order", data, saga_id, saga_id, args.patience)
        except StoreUnavailableError:
            raise
        except Exception as exc:  # the publish failed after the saga was recorded
            publish_errors += 1
            sys.stderr.write(f"{saga_id}: publish failed: {type(exc).__name__}: {exc}\n")
        ids.append(saga_id)
        if args.duration and offsets is None:
            lag = started + args.duration * (i + 1) / args.count - time.monotonic()
            if lag > 0:
                time.sleep(lag)
    return {"submitted": len(ids), "over_limit": over, "publish_errors": publish_errors,
            "seconds": round(time.monotonic() - started, 2), "ids": ids}


def cmd_delay(args: argparse.Namespace) -> dict[str, Any]:
    """Orders started as a web app would: ``start_order_saga.delay(order)``, ids as returned."""
    from tasks.order_saga import start_order_saga

    rng = random.Random(args.seed)
    ids = []
    for i in range(args.count):
        result = start_order_saga.delay(order(rng, i, rng.random() < args.over))
        ids.append(result.id)
    return {"submitted": len(ids), "ids": ids}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tests.chaos.client")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("saga")
    s.add_argument("input")
    s.add_argument("--id")
    s.add_argument("--key")
    m = sub.add_parser("many")
    m.add_argument("saga")
    m.add_argument("input")
    m.add_argument("count", type=int)
    o = sub.add_parser("orders")
    o.add_argument("count", type=int)
    o.add_argument("--over", type=float, default=0.3, help="share of amounts over the limit")
    o.add_argument("--duration", type=float, default=0.0, help="spread the starts over this (s)")
    o.add_argument("--seed", type=int, default=1)
    o.add_argument("--prefix", default="chaos")
    o.add_argument("--waves", default="", help="start in waves instead of evenly: "
                   "'0:0.3,0.5:0.7' = 30%% at once at 0, 70%% at half the duration")
    o.add_argument("--customers", type=int, default=97,
                   help="distinct customers (the sample locks one order per customer)")
    d = sub.add_parser("delay")
    d.add_argument("count", type=int)
    d.add_argument("--over", type=float, default=0.3, help="share of amounts over the limit")
    d.add_argument("--seed", type=int, default=1)
    parser.add_argument("--patience", type=float, default=PATIENCE,
                        help="seconds a start retries an unreachable database (before the "
                        "command: client --patience 60 orders ...)")
    args = parser.parse_args(argv)
    config.app.loader.import_default_modules()  # every saga a worker knows
    commands = {"start": cmd_start, "many": cmd_many, "orders": cmd_orders, "delay": cmd_delay}
    result = commands[args.cmd](args)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
