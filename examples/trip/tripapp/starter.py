"""Start one trip and wait for its outcome: ``python -m tripapp.starter [--card N] [--json]``.

``engine.start`` records the saga and publishes its first steps (the three holds); the returned
handle's ``wait`` polls the store until the saga settles. Exit status 0 when the trip completed,
1 when it did not (compensated, parked, or still running after ``--timeout``).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date, timedelta
from typing import Any

from sagas import SagaOutcome, SagaTimeoutError
from tripapp import engine, trip


def as_dict(outcome: SagaOutcome) -> dict[str, Any]:
    return {
        "id": outcome.id, "state": outcome.state, "error": outcome.error,
        "steps": {
            name: {"state": s.state, "result": s.result, "error": s.error,
                   "attempts": s.attempts, "compensation_attempts": s.compensation_attempts}
            for name, s in outcome.steps.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traveller", default="Ada Lovelace")
    parser.add_argument("--origin", default="LHR")
    parser.add_argument("--destination", default="LIS")
    parser.add_argument("--nights", type=int, default=3)
    parser.add_argument("--amount", default="840.00")
    parser.add_argument("--card", default="4242424242424242",
                        help="4000000000000002 is always declined")
    parser.add_argument("--email", default="ada@example.com")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    args = parser.parse_args(argv)

    handle = engine.start(trip, {
        "traveller": args.traveller, "origin": args.origin, "destination": args.destination,
        "depart": (date.today() + timedelta(days=30)).isoformat(), "nights": args.nights,
        "amount": args.amount, "card": args.card, "email": args.email,
    })
    if not args.json:
        print(f"trip {handle.id} started: {handle.state}")
    try:
        outcome = handle.wait(timeout=args.timeout)
    except SagaTimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(as_dict(outcome), indent=2, default=str))
    else:
        print(f"trip {outcome.id}: {outcome.state}" + (f" ({outcome.error})" if outcome.error
                                                          else ""))
        for name, step in outcome.steps.items():
            shown = step.result if step.state == "SUCCEEDED" else step.error or step.result
            detail = json.dumps(shown, default=str) if isinstance(shown, dict) else shown or ""
            print(f"  {name:8} {step.state:12} {detail}")
    return 0 if outcome.succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
