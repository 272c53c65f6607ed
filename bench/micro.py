"""In-process micro-benchmark: CPU per saga of the engine's own work, without a broker.

``python -m bench.micro [--database-url URL] [-n 2000]`` starts N three-step sagas of the bench
saga through ``Sagas.start`` and records each step's success exactly as a worker does after
running it (``record_success``: the graph-decided fast path where it applies), with publishing
replaced by a list. It prints CPU ms per saga (process time: this process only; on PostgreSQL
the server's own CPU is not in it), SQL statements, commits and rows written per saga. The
failure path (the last step refused, two compensations) is measured the same way with
``--failure``.

It measures what the engine adds per saga on top of Celery, so two versions of the engine can
be compared on the same machine within a minute (docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from sagas.coordinator import ACTION, StepFailed
from sagas.runtime import transitions
from sagas.runtime.message import StepContext


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    parser.add_argument("-n", type=int, default=2000, help="sagas per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the median is shown)")
    parser.add_argument("--database-url", default=None, help="default: a private SQLite file")
    parser.add_argument("--failure", action="store_true", help="the failure path instead")
    args = parser.parse_args(argv)
    url = args.database_url or f"sqlite:///{tempfile.mkdtemp()}/micro.db"
    os.environ.setdefault("SAGAS_LISTENERS", "metrics")

    from bench.app import bench_saga, engine, point_at

    point_at(engine.settings.redis_url, url)
    engine.upgrade_schema()
    queue: list[tuple[Any, Any]] = []
    engine._binding.publisher = lambda b, saga, snap, dispatches: queue.extend(
        (b, _message(b, saga, snap, d)) for d in dispatches
    )
    counts = {"stmts": 0, "commits": 0, "rows": 0}

    def on_stmt(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement[:5].upper() != "BEGIN":
            counts["stmts"] += 1

    def on_done(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement[:6].upper() in ("INSERT", "UPDATE", "DELETE"):
            counts["rows"] += max(int(cursor.rowcount or 0), 0)

    def on_commit(conn: Any) -> None:
        counts["commits"] += 1

    event.listen(Engine, "before_cursor_execute", on_stmt)
    event.listen(Engine, "after_cursor_execute", on_done)
    event.listen(Engine, "commit", on_commit)

    results = []
    for round_no in range(args.rounds + 1):  # the first round warms up
        for k in counts:
            counts[k] = 0
        cpu = time.process_time()
        for i in range(args.n):
            engine.start(bench_saga, {"key": f"m{round_no}-{i}", "fail": args.failure})
            while queue:
                binding, ctx = queue.pop(0)
                _finish(binding, ctx, fail=args.failure)
        spent = (time.process_time() - cpu) * 1000 / args.n
        if round_no:
            results.append((spent, *(counts[k] / args.n for k in ("stmts", "commits", "rows"))))
    cpu_ms, stmts, commits, rows = (statistics.median(r[i] for r in results) for i in range(4))
    kind = "failure" if args.failure else "happy"
    print(f"{kind} path, {args.n} sagas x {args.rounds} rounds on {url.split(':', 1)[0]}: "
          f"{cpu_ms:.3f} ms CPU/saga (rounds: {', '.join(f'{r[0]:.3f}' for r in results)}), "
          f"{stmts:.2f} statements, {commits:.2f} commits, {rows:.2f} rows written per saga")
    return 0


def _message(binding: Any, saga: Any, snap: Any, dispatch: Any) -> Any:
    from sagas.runtime.dispatch import build_signature

    sig = build_signature(binding.app, binding.settings.saga_queue, saga, snap, dispatch)
    return StepContext.model_validate(sig.args[0])


def _finish(binding: Any, ctx: StepContext, *, fail: bool) -> None:
    saga = binding.find(ctx.saga, ctx.version)
    if fail and ctx.phase == ACTION and ctx.step == "ship":
        transitions.apply_event(binding, ctx.saga_id, StepFailed(
            ctx.step, ctx.phase, "BusinessError: bench: planned failure", definite=True))
        return
    result = {"key": ctx.input.get("key"), "fail": False}
    record = getattr(transitions, "record_success", None)
    if record is not None:
        record(binding, saga, ctx, ctx.attempt, result)
    else:  # an engine from before the fast path
        from sagas.coordinator import StepSucceeded

        transitions.apply_event(binding, ctx.saga_id, StepSucceeded(ctx.step, ctx.phase, result))


if __name__ == "__main__":
    raise SystemExit(main())
