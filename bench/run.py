"""``sagas bench``: our saga engine against a raw Celery chain of the same tasks, in the same run.

A raw ``chain(reserve, charge, ship)`` on the same broker and the same worker is the floor a saga
runner on Celery can approach; the figures that matter are the ratios ours/raw, so both variants
are interleaved (their order alternates per repetition) and repeated, and machine drift hits
both alike. Per variant it measures throughput under load, end-to-end latency under load and
idle, broker messages, SQL statements and commits, and CPU time per saga; then the same for the
failure path (the last step fails, two compensations) against a raw chain whose errback
enqueues the same two compensations.

Everything is private by default: a redis-server on a free loopback port, a SQLite file in a
temporary directory (PostgreSQL with ``--database-url``), and one prefork worker of concurrency 2
of the bench's own app (``celery -A bench.app worker -Q bench,saga``, see ``bench.app``).
Benchmarks report; they assert nothing about speed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sagas import Sagas
from sagas.devtools.localredis import free_port, start_redis_server
from sagas.runtime.revoke import CONNECT_MARGIN

ROOT = Path(__file__).resolve().parents[1]
APP = "bench.app"  # the bench's own Celery app and engine, never the order sample's
OURS, RAW = "saga", "raw"
HAPPY, FAILURE = "happy", "failure"
QUEUES = ("bench", "saga")
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGETS = {"throughput": 0.8, "idle_p50": 1.5, "failure_throughput": 0.7}


# --- options (the command line is `sagas bench`, in sagas.ops.cli) ---------------------------
@dataclass
class Options:
    """What one bench run does; ``sagas bench --help`` describes each field."""

    n: int
    failure_n: int | None
    repeat: int
    idle: int
    warmup: int
    concurrency: int
    database_url: str | None
    redis_url: str | None
    use_running_workers: bool
    no_failure: bool
    quick: bool
    json_path: Path | None
    timeout: float
    keep: bool
    locks: bool = False  # our saga under semantic locks (a distinct key per saga)

    def __post_init__(self) -> None:
        if self.quick:  # a smoke-test size
            self.n, self.repeat, self.idle, self.warmup = min(self.n, 50), 1, 10, 5
        if self.failure_n is None:
            self.failure_n = self.n

    @property
    def failures(self) -> int:
        return self.n if self.failure_n is None else self.failure_n


# --- private services -----------------------------------------------------------------------
def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = start_redis_server(port, workdir=workdir, new_session=True)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_worker(env: dict[str, str], concurrency: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", APP, "worker", "-Q", ",".join(QUEUES),
             "-c", str(concurrency), "-P", "prefork", "-n", f"bench-{os.getpid()}@%h",
             "--loglevel=WARNING", "--without-gossip", "--without-mingle",
             "--without-heartbeat"],
            cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )


def stop_group(proc: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# --- counters -------------------------------------------------------------------------------
def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants (the prefork pool), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [root], [root]
    while frontier:
        current = frontier.pop()
        kids = [pid for pid, ppid in parents.items() if ppid == current]
        found += kids
        frontier += kids
    return found


@dataclass
class Snapshot:
    at: float
    lpush: int
    worker_ticks: int
    broker_ticks: int
    client_cpu: float
    sql: tuple[int, int, int]
    client_sql: tuple[int, int, int]
    db_ticks: dict[int, int] = field(default_factory=dict)
    wal: int | None = None


@dataclass
class Env:
    """Where the bench runs: the servers, the worker, the counters."""

    redis: Any
    stats_dir: Path
    worker: subprocess.Popen[bytes] | None
    redis_proc: subprocess.Popen[bytes] | None
    counting: bool
    database_url: str = ""

    def db_ticks(self) -> dict[int, int]:
        """CPU of the PostgreSQL backends serving this database: the server shares our cores."""
        if not self.database_url.startswith("postgresql"):
            return {}
        import psycopg
        from sqlalchemy.engine import make_url

        # Plain psycopg, outside SQLAlchemy: this query must not land in the SQL counts.
        url = make_url(self.database_url).set(drivername="postgresql")
        with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
            pids = [r[0] for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )]
        return {pid: proc_cpu_ticks(pid) for pid in pids}

    def wal_bytes(self) -> int | None:
        """PostgreSQL's WAL position in bytes (cluster-wide: read it on a quiet server)."""
        if not self.database_url.startswith("postgresql"):
            return None
        import psycopg
        from sqlalchemy.engine import make_url

        url = make_url(self.database_url).set(drivername="postgresql")
        with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
            row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')").fetchone()
        return int(row[0]) if row else None

    def commandstat(self, name: str) -> int:
        stats = self.redis.info("commandstats")
        return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))

    def sql_counts(self, pid: int | None = None) -> tuple[int, int, int]:
        """Statements, commits and rows written, over every process (or one)."""
        slot = struct.Struct("<qqq")
        stmts = commits = rows = 0
        files = [self.stats_dir / f"sql-{pid}.bin"] if pid else self.stats_dir.glob("sql-*.bin")
        for path in files:
            try:
                s, c, r = slot.unpack(path.read_bytes()[: slot.size])
            except (OSError, struct.error):
                continue
            stmts, commits, rows = stmts + s, commits + c, rows + r
        return stmts, commits, rows

    def snapshot(self) -> Snapshot:
        db_ticks = self.db_ticks()
        worker_ticks = (
            sum(proc_cpu_ticks(p) for p in tree_pids(self.worker.pid)) if self.worker else 0
        )
        broker_ticks = proc_cpu_ticks(self.redis_proc.pid) if self.redis_proc else 0
        return Snapshot(
            time.monotonic(), self.commandstat("lpush"), worker_ticks, broker_ticks,
            time.process_time(), self.sql_counts(), self.sql_counts(os.getpid()),
            db_ticks, self.wal_bytes(),
        )

    def quiet(self, timeout: float = 10.0) -> None:
        """Wait until no message is queued or unacknowledged: the next run starts from idle."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pipe = self.redis.pipeline(transaction=False)
            for q in QUEUES:
                pipe.llen(q)
            pipe.hlen("unacked")
            if not any(pipe.execute()):
                return
            time.sleep(0.02)


# --- the runs -------------------------------------------------------------------------------
@dataclass
class Run:
    variant: str
    scenario: str
    rep: int
    n: int
    seconds: float = 0.0
    sagas_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    msgs_per_saga: float = 0.0
    sql_per_saga: float | None = None
    commits_per_saga: float | None = None
    rows_per_saga: float | None = None
    client_sql_per_saga: float | None = None
    worker_cpu_ms: float | None = None
    client_cpu_ms: float = 0.0
    broker_cpu_ms: float | None = None
    db_cpu_ms: float | None = None
    wal_kb_per_saga: float | None = None


@dataclass
class Idle:
    variant: str
    scenario: str
    latencies_ms: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Bench:
    def __init__(self, env: Env, args: Options, tick: Callable[[int], None]) -> None:
        from bench.app import DONE_KEY, bench_locked_saga, bench_saga, engine, raw_chain

        self.env, self.args, self.tick = env, args, tick
        self.done_key = DONE_KEY
        saga = bench_locked_saga if args.locks else bench_saga
        self._start_saga = lambda payload: engine.start(saga, payload).id
        self._raw = lambda payload: raw_chain(payload).apply_async()

    def submit(self, variant: str, payload: dict[str, Any]) -> None:
        (self._start_saga if variant == OURS else self._raw)(payload)

    def drain(self) -> list[tuple[str, float]]:
        pipe = self.env.redis.pipeline(transaction=True)
        pipe.lrange(self.done_key, 0, -1)
        pipe.delete(self.done_key)
        items, _ = pipe.execute()
        out = []
        for raw in items:
            key, _, at = raw.decode().rpartition("|")
            out.append((key, float(at)))
        return out

    def load(self, variant: str, scenario: str, n: int, rep: int, timed: bool = True) -> Run:
        """Submit ``n`` at once and wait for all: throughput and latency under load."""
        self.env.quiet()
        self.drain()
        prefix = uuid.uuid4().hex[:12]
        fail = scenario == FAILURE
        before = self.env.snapshot()
        submitted: dict[str, float] = {}
        finished: dict[str, float] = {}
        for i in range(n):
            key = f"{prefix}:{i}"
            submitted[key] = time.monotonic()
            self.submit(variant, {"key": key, "fail": fail})
            if i % 200 == 199:
                self._collect(finished, submitted, timed)
        last_progress = time.monotonic()
        while len(finished) < n:
            if self._collect(finished, submitted, timed):
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > self.args.timeout:
                raise RuntimeError(
                    f"{variant}/{scenario}: only {len(finished)} of {n} finished; "
                    f"nothing for {self.args.timeout:.0f}s (see the worker log)"
                )
            else:
                time.sleep(0.01)
        end = max(finished.values())
        self.env.quiet()
        after = self.env.snapshot()
        start = min(submitted.values())
        lat = [(finished[k] - submitted[k]) * 1000 for k in submitted]
        run = Run(variant, scenario, rep, n, seconds=end - start)
        run.sagas_per_s = n / (end - start)
        run.p50_ms, run.p99_ms = percentile(lat, 0.5), percentile(lat, 0.99)
        run.msgs_per_saga = (after.lpush - before.lpush) / n
        run.client_cpu_ms = (after.client_cpu - before.client_cpu) * 1000 / n
        if self.env.counting:
            run.sql_per_saga = (after.sql[0] - before.sql[0]) / n
            run.commits_per_saga = (after.sql[1] - before.sql[1]) / n
            run.rows_per_saga = (after.sql[2] - before.sql[2]) / n
            run.client_sql_per_saga = (after.client_sql[0] - before.client_sql[0]) / n
        if self.env.worker:
            run.worker_cpu_ms = (after.worker_ticks - before.worker_ticks) * 1000 / CLK_TCK / n
        if after.db_ticks:
            ticks = sum(t - before.db_ticks.get(pid, 0) for pid, t in after.db_ticks.items())
            run.db_cpu_ms = ticks * 1000 / CLK_TCK / n
        if after.wal is not None and before.wal is not None:
            run.wal_kb_per_saga = (after.wal - before.wal) / 1024 / n
        if self.env.redis_proc:
            run.broker_cpu_ms = (after.broker_ticks - before.broker_ticks) * 1000 / CLK_TCK / n
        return run

    def _collect(self, finished: dict[str, float], submitted: dict[str, float],
                 timed: bool) -> int:
        got = [(k, at) for k, at in self.drain() if k in submitted]
        for key, at in got:
            finished[key] = at
        if timed and got:
            self.tick(len(got))
        return len(got)

    def one(self, variant: str, scenario: str) -> float:
        """One saga on an idle system: the latency a lone request sees."""
        self.env.quiet()
        key = f"idle-{uuid.uuid4().hex[:12]}"
        self.drain()
        at = time.monotonic()
        self.submit(variant, {"key": key, "fail": scenario == FAILURE})
        deadline = at + self.args.timeout
        while time.monotonic() < deadline:
            item = self.env.redis.blpop(self.done_key, timeout=1)
            if item is not None:
                done_key, _, done_at = item[1].decode().rpartition("|")
                if done_key == key:
                    self.tick(1)
                    return (float(done_at) - at) * 1000
        raise RuntimeError(f"idle {variant}/{scenario} saga did not finish (see the worker log)")


# --- summary --------------------------------------------------------------------------------
METRICS = [
    ("sagas_per_s", "sagas/s (under load)", "{:.1f}"),
    ("p50_ms", "p50 latency under load, ms", "{:.0f}"),
    ("p99_ms", "p99 latency under load, ms", "{:.0f}"),
    ("idle_p50_ms", "p50 latency idle, ms", "{:.1f}"),
    ("idle_p99_ms", "p99 latency idle, ms", "{:.1f}"),
    ("msgs_per_saga", "broker messages/saga", "{:.2f}"),
    ("sql_per_saga", "SQL statements/saga", "{:.2f}"),
    ("commits_per_saga", "SQL commits/saga", "{:.2f}"),
    ("rows_per_saga", "SQL rows written/saga", "{:.2f}"),
    ("worker_cpu_ms", "worker CPU ms/saga", "{:.2f}"),
    ("client_cpu_ms", "client CPU ms/saga", "{:.2f}"),
    ("broker_cpu_ms", "broker CPU ms/saga", "{:.2f}"),
    ("db_cpu_ms", "PostgreSQL CPU ms/saga", "{:.2f}"),
    ("wal_kb_per_saga", "PostgreSQL WAL KB/saga", "{:.2f}"),
]


def _median(values: list[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def summarize(runs: list[Run], idles: list[Idle]) -> dict[str, Any]:
    """Medians over repetitions; each ratio is the median of the per-repetition ratios."""
    out: dict[str, Any] = {}
    for scenario in (HAPPY, FAILURE):
        figures: dict[str, dict[str, float | None]] = {}
        for variant in (OURS, RAW):
            mine = [r for r in runs if r.variant == variant and r.scenario == scenario]
            if not mine:
                continue
            fig: dict[str, float | None] = {
                k: _median([getattr(r, k) for r in mine]) for k, _, _ in METRICS
                if not k.startswith("idle")
            }
            samples = [x for i in idles if i.variant == variant and i.scenario == scenario
                       for x in i.latencies_ms]
            fig["idle_p50_ms"] = percentile(samples, 0.5) if samples else None
            fig["idle_p99_ms"] = percentile(samples, 0.99) if samples else None
            figures[variant] = fig
        if len(figures) < 2:
            continue
        ratios: dict[str, float | None] = {}
        for key, _, _ in METRICS:
            if key.startswith("idle"):
                a, b = figures[OURS][key], figures[RAW][key]
                ratios[key] = a / b if a is not None and b else None
                continue
            per_rep = []
            for rep in {r.rep for r in runs}:
                pair = {r.variant: getattr(r, key) for r in runs
                        if r.rep == rep and r.scenario == scenario}
                a, b = pair.get(OURS), pair.get(RAW)
                if a is not None and b:
                    per_rep.append(a / b)
            ratios[key] = statistics.median(per_rep) if per_rep else None
        out[scenario] = {"ours": figures[OURS], "raw": figures[RAW], "ratio": ratios}
    targets: dict[str, Any] = {}
    if HAPPY in out:
        r = out[HAPPY]["ratio"]
        targets["throughput"] = _target(r["sagas_per_s"], TARGETS["throughput"], higher=True)
        targets["idle_p50"] = _target(r["idle_p50_ms"], TARGETS["idle_p50"], higher=False)
    if FAILURE in out:
        targets["failure_throughput"] = _target(
            out[FAILURE]["ratio"]["sagas_per_s"], TARGETS["failure_throughput"], higher=True
        )
    out["targets"] = targets
    return out


def _target(value: float | None, goal: float, higher: bool) -> dict[str, Any]:
    met = None if value is None else (value >= goal if higher else value <= goal)
    return {"ratio": value, "goal": goal, "higher_is_better": higher, "met": met}


def machine_info(database_url: str) -> dict[str, Any]:
    import celery
    import kombu
    import sqlalchemy
    from sqlalchemy.engine import make_url

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "celery": celery.__version__,
        "kombu": kombu.__version__, "sqlalchemy": sqlalchemy.__version__,
        "database": make_url(database_url).get_backend_name(),
        "loadavg_start": list(os.getloadavg()),
    }


def render(summary: dict[str, Any], info: dict[str, Any], args: Options,
           console: Any) -> None:
    from rich.table import Table

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None or value != value else spec.format(value)

    table = Table(
        title=f"sagas bench: N={args.n} (failure {args.failure_n}), repeat {args.repeat}, "
        f"{info['database']}, {info['cores']} cores, worker -c {args.concurrency}"
        + (", ours under semantic locks" if args.locks else ""),
        caption="medians over repetitions; ratio = median of per-repetition ours/raw",
    )
    table.add_column("metric")
    for scenario in (HAPPY, FAILURE):
        if scenario in summary:
            label = "happy" if scenario == HAPPY else "failure"
            table.add_column(f"ours {label}", justify="right")
            table.add_column("raw chain", justify="right")
            table.add_column("ours/raw", justify="right", style="bold")
    for key, label, spec in METRICS:
        row = [label]
        for scenario in (HAPPY, FAILURE):
            if scenario in summary:
                s = summary[scenario]
                row += [fmt(s["ours"][key], spec), fmt(s["raw"][key], spec),
                        fmt(s["ratio"][key], "{:.2f}x")]
        table.add_row(*row)
    console.print(table)
    names = {"throughput": "throughput ours/raw", "idle_p50": "idle p50 ours/raw",
             "failure_throughput": "failure-path throughput ours/raw"}
    for key, t in summary.get("targets", {}).items():
        mark = {True: "[green]met[/]", False: "[red]missed[/]", None: "-"}[t["met"]]
        sign = ">=" if t["higher_is_better"] else "<="
        console.print(f"{names[key]}: {fmt(t['ratio'], '{:.2f}x')} "
                      f"(target {sign} {t['goal']}x) {mark}")


# --- orchestration --------------------------------------------------------------------------
@contextmanager
def bench_env(args: Options, workdir: Path) -> Iterator[tuple[Env, str]]:
    """Start (and always stop) the private broker and worker; point this process at them."""
    import redis

    redis_proc: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    try:
        if args.redis_url:
            redis_url = args.redis_url
        else:
            redis_proc, redis_url = start_redis(workdir)
        database_url = args.database_url or f"sqlite:///{workdir}/bench.db"
        _point_here(redis_url, database_url, workdir).upgrade_schema()
        if not args.use_running_workers:
            env = dict(os.environ)
            env.update(REDIS_URL=redis_url, BROKER_URL=redis_url, DATABASE_URL=database_url,
                       SAGAS_BENCH_DIR=str(workdir),
                       PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                env.get("PYTHONPATH")])))
            worker = start_worker(env, args.concurrency, workdir / "worker.log")
        client = redis.Redis.from_url(redis_url)
        yield Env(client, workdir, worker, redis_proc, counting=worker is not None,
                  database_url=database_url), database_url
    finally:
        stop_group(worker)
        stop_group(redis_proc)


def _point_here(redis_url: str, database_url: str, workdir: Path) -> Sagas:
    """Point this process (and the workers it starts, by the environment) at the bench's own
    Redis and database; returns the bench app's engine. That Redis is the broker too, whatever
    BROKER_URL says: the bench counts and drains broker messages in Redis."""
    os.environ.update(REDIS_URL=redis_url, BROKER_URL=redis_url, DATABASE_URL=database_url,
                      SAGAS_BENCH_DIR=str(workdir))
    from bench.app import engine, install_counters, point_at

    point_at(redis_url, database_url)  # in case bench.app was imported before
    install_counters()  # the client's own statements (engine.start) are counted too
    return engine


def wait_ready(bench: Bench, worker: subprocess.Popen[bytes] | None, log: Path,
               timeout: float = 60) -> None:
    """The worker is ready when a raw chain has gone through it."""
    deadline = time.monotonic() + timeout
    key = f"ready-{uuid.uuid4().hex[:8]}"
    bench.submit(RAW, {"key": key})
    while time.monotonic() < deadline:
        if worker is not None and worker.poll() is not None:
            raise RuntimeError(f"the bench worker exited:\n{_tail(log)}")
        item = bench.env.redis.blpop(bench.done_key, timeout=1)
        if item is not None and item[1].decode().startswith(key):
            return
    raise RuntimeError(f"the bench worker did not become ready:\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Reporter:
    """Progress for whoever waits: a live bar on a terminal; piped (a log, CI) a plain line per
    phase and per run instead, with no escape codes."""

    def __init__(self, console: Any, total: int, first: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console, self.live = console, console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console, disable=not self.live,
        )
        self.bar = self.progress.add_task(first, total=total)
        if not self.live:
            self.line(first)

    def __enter__(self) -> Reporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def phase(self, description: str) -> None:
        self.progress.update(self.bar, description=description)
        if not self.live:
            self.line(description)

    def advance(self, done: int) -> None:
        self.progress.advance(self.bar, done)

    def update(self, completed: int) -> None:
        self.progress.update(self.bar, completed=completed)

    def result(self, text: str) -> None:
        """A line for logs; on a terminal the bar already says it."""
        if not self.live:
            self.line(text)

    def line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


def main(args: Options) -> int:
    from rich.console import Console

    console, err = Console(), Console(stderr=True)
    if not console.is_terminal:
        console = Console(width=150)  # the table stays readable in logs and pipes
    workdir = Path(tempfile.mkdtemp(prefix="sagas-bench-"))
    scenarios = [HAPPY] if args.no_failure else [HAPPY, FAILURE]
    runs: list[Run] = []
    idles = {(v, s): Idle(v, s) for v in (OURS, RAW) for s in scenarios}
    per_rep = sum(2 * (args.n if s == HAPPY else args.failures) for s in scenarios)
    total = args.repeat * (per_rep + 2 * len(scenarios) * args.idle)
    started = "starting the broker and the worker"
    try:
        with Reporter(err, total, started) as report, bench_env(args, workdir) as (
            env, database_url
        ):
            info = machine_info(database_url)
            bench = Bench(env, args, report.advance)
            wait_ready(bench, env.worker, workdir / "worker.log")
            if env.worker is not None:
                # For CONNECT_MARGIN after a worker connects, every action first reads whether
                # its saga was called off (a revoke may have been missed): a reconnect's cost,
                # not the steady state measured here (docs/performance.md).
                time.sleep(CONNECT_MARGIN)
            report.phase("warming up")
            for scenario in scenarios:
                for variant in (OURS, RAW):
                    if args.warmup:
                        bench.load(variant, scenario, args.warmup, -1, timed=False)
            for rep in range(args.repeat):
                order = (OURS, RAW) if rep % 2 == 0 else (RAW, OURS)
                for scenario in scenarios:
                    n = args.n if scenario == HAPPY else args.failures
                    if n == 0:
                        continue
                    for variant in order:
                        report.phase(f"rep {rep + 1}/{args.repeat} {variant} {scenario}, {n} sagas")
                        runs.append(bench.load(variant, scenario, n, rep))
                        report.result(f"  {runs[-1].sagas_per_s:.1f} sagas/s")
                report.phase(f"rep {rep + 1}/{args.repeat} idle latency, {args.idle} samples each")
                for _ in range(args.idle):
                    for scenario in scenarios:
                        for variant in order:
                            idles[(variant, scenario)].latencies_ms.append(
                                bench.one(variant, scenario)
                            )
            report.phase("stopping the worker and the broker")
        info["loadavg_end"] = list(os.getloadavg())
    except (RuntimeError, OSError) as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        err.print(f"logs kept in {workdir}", markup=False, highlight=False)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted: the bench's worker and broker are stopped", highlight=False)
        return 130
    summary = summarize(runs, list(idles.values()))
    render(summary, info, args, console)
    if args.json_path:
        doc = {
            "machine": info,
            "config": {k: v for k, v in asdict(args).items() if k != "json_path"}
            | {"database_url": _redact(database_url)},
            "summary": summary,
            "runs": [asdict(r) for r in runs],
            "idle": [asdict(i) for i in idles.values()],
        }
        Path(args.json_path).write_text(json.dumps(doc, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        err.print(f"logs kept in {workdir}", markup=False, highlight=False)
    return 0


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
