"""``sagas bench --in-flight N``: what 10,000 sagas in flight cost the store, the reconciler and
the workers.

The throughput bench says how fast; this says whether anything grows that should not. It starts
N three-step ``bench`` sagas while no worker serves their queue (so all N are in flight at
once), measuring the store's size at four checkpoints (linear means a constant number of bytes
per saga), then shows the plan of the reconciler's stalled-saga query over those N live rows
(it must use ``ix_saga_instances_state_stall``, not scan), then starts one prefork worker and
samples its memory (main process plus pool) while it drains all N: flat means no per-saga state
is kept in the worker. Everything private, as for the throughput bench. It reports; it asserts
nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.run import Reporter, start_redis, start_worker, stop_group, tree_pids

INDEX = "ix_saga_instances_state_stall"


@dataclass
class ScaleReport:
    in_flight: int
    database: str
    store_bytes: list[tuple[int, int]] = field(default_factory=list)  # (sagas, bytes)
    start_seconds: float = 0.0
    reconciler_plan: list[str] = field(default_factory=list)
    reconciler_uses_index: bool = False
    reconciler_query_ms: float = 0.0
    drain_seconds: float = 0.0
    rss_mb: list[tuple[int, float]] = field(default_factory=list)  # (completed, worker MB)
    redis_mb_full: float = 0.0
    redis_mb_drained: float = 0.0

    def bytes_per_saga(self) -> list[float]:
        """Marginal bytes per saga between checkpoints: equal values mean linear growth."""
        out = []
        for (n0, b0), (n1, b1) in zip(self.store_bytes, self.store_bytes[1:], strict=False):
            out.append((b1 - b0) / max(1, n1 - n0))
        return out

    def rss_growth(self) -> float:
        """Worker memory at the end over memory a quarter of the way in (1.0 = flat)."""
        if len(self.rss_mb) < 2:
            return 0.0
        quarter = next((mb for done, mb in self.rss_mb if done >= self.in_flight // 4),
                       self.rss_mb[0][1])
        return self.rss_mb[-1][1] / quarter if quarter else 0.0


@dataclass
class ScaleOptions:
    """``sagas bench --in-flight N``'s options (see ``sagas bench --help``)."""

    in_flight: int
    database_url: str | None
    concurrency: int
    timeout: float
    json_path: Path | None


def store_bytes(db: Any) -> int:
    """Bytes the saga tables take (``db``: the store's SQLAlchemy engine, measured directly)."""
    from sqlalchemy import text

    with db.connect() as conn:
        if db.dialect.name == "sqlite":
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar() or 0
            free = conn.exec_driver_sql("PRAGMA freelist_count").scalar() or 0
            size = conn.exec_driver_sql("PRAGMA page_size").scalar() or 0
            return int((pages - free) * size)
        return int(conn.execute(text(
            "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND n.nspname = current_schema() "
            "AND c.relname LIKE 'saga%'"
        )).scalar() or 0)


def reconciler_plan(db: Any) -> tuple[list[str], float]:
    """EXPLAIN of the reconciler's own query, compiled with its real parameters.

    The one place the bench calls an engine internal: the plan measured must be the plan of the
    very query the reconciler runs, so it runs ``stalled_sagas`` and captures its statement.
    """
    from sagas.runtime.recovery import stalled_sagas

    captured: list[tuple[str, Any]] = []
    from sqlalchemy import event

    def grab(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        captured.append((statement, params))

    now = datetime.now(UTC)
    with db.connect() as conn:
        if db.dialect.name == "postgresql":
            conn.exec_driver_sql("ANALYZE saga_instances")
            conn.commit()
        event.listen(db, "before_cursor_execute", grab)
        try:
            began = time.perf_counter()
            stalled_sagas(conn, now, 500)
            took_ms = (time.perf_counter() - began) * 1000
        finally:
            event.remove(db, "before_cursor_execute", grab)
        statement, params = captured[-1]
        prefix = "EXPLAIN QUERY PLAN " if db.dialect.name == "sqlite" else "EXPLAIN "
        rows = conn.exec_driver_sql(prefix + statement, params).all()
    if db.dialect.name == "sqlite":
        return [str(r[-1]) for r in rows], took_ms
    return [str(r[0]) for r in rows], took_ms


def rss_mb(root_pid: int) -> float:
    total_kb = 0
    for pid in tree_pids(root_pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def run(args: ScaleOptions, workdir: Path, progress: Reporter) -> ScaleReport:
    import redis

    from bench.run import _point_here
    from sagas import SagaState

    redis_proc = worker = None
    try:
        redis_proc, redis_url = start_redis(workdir)
        database_url = args.database_url or f"sqlite:///{workdir}/scale.db"
        engine = _point_here(redis_url, database_url, workdir)
        from bench.app import bench_saga

        engine.upgrade_schema()
        db = engine.store.engine  # measured directly: table sizes and the reconciler's plan
        report = ScaleReport(args.in_flight, db.dialect.name)
        n = args.in_flight
        checkpoints = {n // 4, n // 2, 3 * n // 4, n}
        report.store_bytes.append((0, store_bytes(db)))
        progress.phase(f"starting {n} sagas with no worker serving their queue")
        began = time.monotonic()
        pending: list[str] = []
        for i in range(1, n + 1):
            pending.append(engine.start(bench_saga, {"key": f"scale-{i}"}).id)
            progress.advance(1)
            if i in checkpoints:
                report.store_bytes.append((i, store_bytes(db)))
                progress.result(f"  {i} in flight, store {report.store_bytes[-1][1] / 1e6:.1f} MB")
        report.start_seconds = time.monotonic() - began
        client = redis.Redis.from_url(redis_url)
        report.redis_mb_full = client.info("memory")["used_memory"] / 1e6
        progress.phase("explaining the reconciler's query")
        report.reconciler_plan, report.reconciler_query_ms = reconciler_plan(db)
        report.reconciler_uses_index = any(INDEX in line for line in report.reconciler_plan)

        env = dict(os.environ)
        env.pop("SAGAS_BENCH_DIR", None)  # no per-task measurement hooks: memory only
        worker = start_worker(env, args.concurrency, workdir / "worker.log")
        progress.phase(f"draining {n} sagas through one worker (concurrency {args.concurrency})")
        progress.update(0)
        began = time.monotonic()
        last_line = began
        next_sample = 0.0
        while True:
            now = time.monotonic()
            if now - began > args.timeout:
                raise RuntimeError(f"not drained in {args.timeout:.0f}s")
            if worker.poll() is not None:
                raise RuntimeError("the worker exited; see " + str(workdir / "worker.log"))
            if now >= next_sample:
                # Only the sagas not yet seen completed are read: the poll shrinks as they drain.
                states = engine.states(pending)
                pending = [i for i in pending if states.get(i) is not SagaState.COMPLETED]
                done = n - len(pending)
                report.rss_mb.append((done, rss_mb(worker.pid)))
                progress.update(done)
                if now - last_line >= 10:  # a log gets a line every 10 s
                    progress.result(f"  {done} of {n} drained")
                    last_line = now
                next_sample = now + 1.0
                if done >= n:
                    break
            time.sleep(0.1)
        report.drain_seconds = time.monotonic() - began
        report.redis_mb_drained = client.info("memory")["used_memory"] / 1e6
        return report
    finally:
        stop_group(worker)
        stop_group(redis_proc)


def render(report: ScaleReport, console: Any) -> None:
    from rich.table import Table

    sizes = Table("sagas in flight", "store MB", "bytes/saga since previous",
                  title=f"store size ({report.database})")
    marginal = [None, *report.bytes_per_saga()]
    for (count, size), per in zip(report.store_bytes, marginal, strict=False):
        sizes.add_row(str(count), f"{size / 1e6:.2f}", "-" if per is None else f"{per:.0f}")
    console.print(sizes)
    console.print(f"started {report.in_flight} sagas in {report.start_seconds:.1f}s; Redis "
                  f"{report.redis_mb_full:.1f} MB with all queued, "
                  f"{report.redis_mb_drained:.1f} MB drained")
    console.print(f"reconciler query over {report.in_flight} live sagas "
                  f"({report.reconciler_query_ms:.2f} ms), plan:", highlight=False)
    for line in report.reconciler_plan:
        console.print(f"    {line}", markup=False, highlight=False)
    verdict = "uses" if report.reconciler_uses_index else "does NOT use"
    console.print(f"  -> {verdict} {INDEX}", highlight=False)
    memory = Table("completed", "worker RSS MB (main + pool)", title="worker memory while draining")
    step = max(1, len(report.rss_mb) // 8)
    for done, mb in [*report.rss_mb[::step], report.rss_mb[-1]]:
        memory.add_row(str(done), f"{mb:.1f}")
    console.print(memory)
    console.print(f"drained in {report.drain_seconds:.1f}s; worker RSS end / quarter-way "
                  f"{report.rss_growth():.3f}x")


def main(args: ScaleOptions) -> int:
    from rich.console import Console

    console, err = Console(), Console(stderr=True)
    workdir = Path(tempfile.mkdtemp(prefix="sagas-scale-"))
    try:
        with Reporter(err, args.in_flight, "starting a private broker") as progress:
            report = run(args, workdir, progress)
    except (RuntimeError, OSError) as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        err.print(f"logs kept in {workdir}", markup=False, highlight=False)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted: the study's worker and broker are stopped", highlight=False)
        return 130
    render(report, console)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(
            asdict(report) | {"bytes_per_saga": report.bytes_per_saga(),
                              "rss_growth": report.rss_growth()}, indent=2) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0
