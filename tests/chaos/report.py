"""``make chaos``: every chaos scenario at full size, then one table; exit 1 on any loss.

Runs, each in its own process: the order sagas through worker kills and broker faults on SQLite
and on a private PostgreSQL cluster restarted twice (tests/chaos/run.py), then the several-hosts
deployment with one host cut off and one host killed (tests/chaos/hosts.py). Each prints one
JSON line; this reads them and prints one row per measure, one column per scenario.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def scenarios(args: argparse.Namespace) -> dict[str, list[str]]:
    run = ["-m", "tests.chaos.run", "--json", "--sagas", str(args.sagas),
           "--kill-seconds", str(args.kill_seconds)]
    if args.broker:
        run += ["--broker", args.broker]
    hosts = ["-m", "tests.chaos.hosts", "--partition-seconds", str(args.partition_seconds)]
    return {
        "sqlite": [*run, "--database", "sqlite"],
        "postgresql": [*run, "--database", "postgresql"],
        "partition": [*hosts, "--fault", "partition"],
        "host killed": [*hosts, "--fault", "kill"],
    }


def _last_json(out: str) -> dict[str, Any] | None:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    return None


def _faults(r: dict[str, Any], prefix: str) -> str:
    hits = [f for f in r.get("faults", []) if f["kind"].startswith(prefix)]
    return ", ".join(f"{f['in_flight']}/{f['started']}" for f in hits) or "-"


def rows(results: dict[str, dict[str, Any] | None]) -> list[tuple[str, list[str]]]:
    """(measure, one cell per scenario): the run scenarios and the hosts ones say the same
    things in different fields."""
    def cell(r: dict[str, Any] | None, run: Any, hosts: Any) -> str:
        if r is None:
            return "no result"
        value = run(r) if "faults" in r else hosts(r)
        return str(value)

    def each(run: Any, hosts: Any) -> list[str]:
        return [cell(r, run, hosts) for r in results.values()]

    return [
        ("sagas", each(lambda r: r["sagas"], lambda r: r["sagas"])),
        ("in flight at broker wipe", each(lambda r: _faults(r, "broker wiped"),
                                          lambda r: "-")),
        ("in flight at broker restart", each(lambda r: _faults(r, "broker restarted"),
                                             lambda r: "-")),
        ("in flight at db restarts", each(lambda r: _faults(r, "database"),
                                                lambda r: "-")),
        ("victim's steps in flight", each(lambda r: "-",
                                          lambda r: len(r["in_flight_at_fault"]))),
        ("worker kills (whole/pool)", each(lambda r: f"{r['worker_kills']}/{r['pool_kills']}",
                                           lambda r: "1/0" if r["fault"] == "kill" else "-")),
        ("broker wipes/restarts", each(
            lambda r: f"{sum(f['kind'].startswith('broker wiped') for f in r['faults'])}/"
                      f"{sum(f['kind'].startswith('broker restarted') for f in r['faults'])}",
            lambda r: "-")),
        ("database restarts", each(
            lambda r: sum(f["kind"].startswith("database") for f in r["faults"]),
            lambda r: "-")),
        ("partitions", each(lambda r: 0, lambda r: int(r["fault"] == "partition"))),
        ("lost", each(lambda r: r["lost"], lambda r: 0)),
        ("stuck", each(lambda r: r["not_terminal"] + r["parked"],
                       lambda r: len(r["not_terminal"]) + r["parked"])),
        ("doubled effects", each(lambda r: r["doubled"],
                                 lambda r: len(r["changed_after_heal"]))),
        ("audit", each(lambda r: "clean" if r["audit_ok"] else "FAILED",
                       lambda r: "clean" if r["audit_ok"] else "FAILED")),
        ("wall time", each(lambda r: f"{r['wall_s']:.0f}s", lambda r: f"{r['wall_s']:.0f}s")),
    ]


def table(results: dict[str, dict[str, Any] | None]) -> str:
    body = rows(results)
    first = max(len(name) for name, _ in body)
    widths = [max(len(name), *(len(cells[i]) for _, cells in body))
              for i, name in enumerate(results)]
    head = " " * first + "  " + "  ".join(n.rjust(w) for n, w in zip(results, widths, strict=True))
    lines = [head, "-" * len(head)]
    lines += [name.ljust(first) + "  " + "  ".join(c.rjust(w) for c, w in
                                                   zip(cells, widths, strict=True))
              for name, cells in body]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.report", description=__doc__)
    parser.add_argument("--sagas", type=int, default=1000)
    parser.add_argument("--kill-seconds", type=float, default=60.0)
    parser.add_argument("--partition-seconds", type=float, default=60.0)
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default=None)
    parser.add_argument("--only", action="append", default=None,
                        help="run only this scenario (repeatable): sqlite, postgresql, "
                        "partition, 'host killed'")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, Any] | None] = {}
    failed = []
    for name, cmd in scenarios(args).items():
        if args.only and name not in args.only:
            continue
        began = time.monotonic()
        sys.stderr.write(f"chaos: {name} ...\n")
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
        results[name] = _last_json(proc.stdout)
        sys.stderr.write(f"chaos: {name} exited {proc.returncode} after "
                         f"{time.monotonic() - began:.0f}s\n")
        if proc.returncode != 0:
            failed.append(name)
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    print(table(results))
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
