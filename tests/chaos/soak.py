"""The long soak: order sagas at about half the measured capacity for a long while (default
30 min) through periodic faults, sampled every 10 s; then every saga must have settled, the
audit must be clean, no process may have grown and no queue may keep growing.

``python -m tests.chaos.soak --minutes 30 --out DIR`` (``make soak``; not part of ``make
test``). A private deployment (tests/chaos/cluster.py) on a private PostgreSQL cluster
(tests/support/pgcluster.py) and a private redis-server as broker: one worker per queue
(inventory, payment, shipping, saga; prefork, 2 pool processes each) plus a *sentinel* worker
on every queue (1 pool process) that is never killed, ``celery beat`` running the reconciler,
the outbox relay (``sagas relay``) and a client process that starts order sagas (30 % over the
payment limit, one order per customer at a time) at a steady rate.

1. Capacity: for ``--capacity-seconds`` (20) two client processes (``--capacity-clients``;
   one alone is the bottleneck) start sagas as fast as they may while fewer than 60 are in
   flight, no faults; capacity = sagas settled per second over that window (after a 5 s
   warm-up); it says whether the workers or the clients were the limit. The backlog drains
   before the soak starts.
2. Soak: the client starts ``--load`` (0.5) x capacity sagas per second (``--rate`` sets it
   and skips step 1) for ``--minutes``; each id, the time its start returned and how it went
   (ok, publish_failed, store_down) go to ``DIR/started-soak.tsv``.
   A start the database holds back (outage) waits up to 60 s; starts missed meanwhile are not
   made up for (no burst afterwards). Faults meanwhile:
   - every uniform(``--kill-every-min``, ``--kill-every-max``) s (30-60) a random queue
     worker is SIGKILLed: half the time the whole worker (restarted at once, as a crashed
     container), else one of its pool processes (Celery replaces it);
   - once per ``--wipe-every`` minutes (10), half-way through each period (min 5, 15, 25): the
     broker is wiped, ``FLUSHALL`` on its Redis: every queued and unacked message is lost
     while sagas are in flight (the result backend, the same Redis, is lost too);
   - once per ``--db-restart-every`` minutes (10), just before each period ends (min 9.5,
     19.5, 29.5): PostgreSQL restarts, alternately a fast restart and down for
     ``--db-down-seconds`` (30).
3. Settle: starts stop; every saga must be COMPLETED or COMPENSATED within a bound (two stall
   deadlines plus reconciler intervals, a margin and the backlog at capacity); then ``sagas
   audit --json`` runs (the engine's invariants and the order ledgers).

Every 10 s (``--sample-every``) a row of ``DIR/soak.csv``: sagas started and terminal (this
soak's), in flight, the four queues' depths (LLEN on the broker), the outbox rows the relay has
not published (``sagas.runtime.relay.stats``, the ``sagas_outbox_pending`` gauge), the RSS of
each role (a worker: its main process and pool processes summed; beat, relay, client; the
redis-server for reference) and p50/p99 start-to-end (``created_at`` to ``updated_at``) of the
sagas that ended since the previous row; the faults of that interval. ``DIR/rss.csv`` has every
process's own series, ``DIR/soak.png`` plots the series with the faults as vertical lines,
``DIR/summary.json`` holds the figures; the processes' logs are in ``DIR/run``.

It fails (exit 1, saying why) on:

- a *lost* saga: a start that returned (its id recorded) whose saga has no row;
- a *stuck* one: any saga in the store not settled after the bound; *parked*
  (COMPENSATION_FAILED, FORWARD_FAILED) counts as a failure too;
- a *doubled* one: any other audit violation (an effect applied twice, a charge not refunded,
  stock not conserved, a history that does not replay);
- *RSS growth* over ``--rss-limit`` (20 %). Kills replace worker processes, so a role's sum
  restarts from a fresh process after each kill and would hide a leak; the check therefore
  compares only processes that lived through: each process (same pid and start time) alive at
  the baseline (minute ``--rss-baseline``, 5; the median of three samples from there) and at
  the end of the soak phase (median of its last three samples). The sentinel worker (main and
  pool process), beat, the relay and the client always live through; queue workers do when no
  kill hit them. Per-role sums are plotted and their growth reported, not judged.
- a *queue that keeps growing*: over the soak's last third, split in three windows, a series'
  minimum rises from window to window and ends above a floor: the four queues, the outbox
  backlog and the sagas in flight; the floor is three times the series' 90th percentile over
  the first two thirds, at least ``--queue-floor`` (20), and 200 rows for the outbox (two relay
  batches). Minima, so that a fault's spike does not count.

A 3-minute check of the machinery: ``python -m tests.chaos.soak --minutes 3 --wipe-every 3
--db-restart-every 1.5 --kill-every-min 15 --kill-every-max 30 --rss-baseline 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.chaos.cluster import SAGAS_CLI, Cluster
from tests.chaos.run import ORDER_STEP_DEADLINE, QUEUES, RECOVERY_GRACE, TERMINAL

PARKED = {"COMPENSATION_FAILED", "FORWARD_FAILED"}
SETTLED = TERMINAL | PARKED
SENTINEL = "sentinel"
ROLES = (*QUEUES, SENTINEL, "beat", "relay", "client")
REFERENCE_ROLES = ("redis",)  # plotted and written, not judged: a service, wiped on purpose
STATE_RULES = {"stuck", "parked", "not terminal"}  # audit findings that name a state
CAPACITY_IN_FLIGHT = 60
OUTBOX_FLOOR = 200
CAPACITY_WARMUP = 5.0
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class SoakConfig:
    minutes: float = 30.0
    out: Path = Path("artifacts/soak")
    load: float = 0.5
    rate: float | None = None
    capacity_seconds: float = 20.0
    kill_every_min: float = 30.0
    kill_every_max: float = 60.0
    wipe_every: float = 10.0  # minutes
    db_restart_every: float = 10.0  # minutes
    db_down_seconds: float = 30.0
    rss_baseline: float = 5.0  # minutes
    rss_limit: float = 0.20
    queue_floor: float = 20.0
    sample_every: float = 10.0
    capacity_clients: int = 2
    over: float = 0.3
    fault_rate: float = 0.0
    recovery_interval: float = 2.0
    seed: int = 7

    @property
    def seconds(self) -> float:
        return self.minutes * 60

    def wipe_times(self) -> list[float]:
        period = self.wipe_every * 60
        return [t for k in range(1000) if (t := (k + 0.5) * period) < self.seconds]

    def db_restart_times(self) -> list[float]:
        period = self.db_restart_every * 60
        return [t for k in range(1000) if (t := (k + 0.95) * period) < self.seconds]


@dataclass
class Fault:
    t: float
    kind: str  # kill-worker, kill-pool, wipe, db-restart, db-down
    target: str = ""
    in_flight: int | None = None
    seconds: float | None = None  # how long the database refused connections


@dataclass
class Sample:
    t: float
    phase: str
    started: int
    terminal: float = math.nan
    completed: float = math.nan
    compensated: float = math.nan
    parked: float = math.nan
    in_flight: float = math.nan
    queues: dict[str, float] = field(default_factory=dict)
    outbox_pending: float = math.nan
    rss_mb: dict[str, float] = field(default_factory=dict)
    ended: int = 0
    p50_s: float = math.nan
    p99_s: float = math.nan
    faults: str = ""


@dataclass
class SoakResult:
    ok: bool = False
    failures: list[str] = field(default_factory=list)
    capacity_per_s: float = 0.0
    rate_per_s: float = 0.0
    minutes: float = 0.0
    started: int = 0
    start_failures: int = 0
    publish_failures: int = 0
    completed: int = 0
    compensated: int = 0
    parked: int = 0
    lost: int = 0
    stuck: int = 0
    doubled: int = 0
    kills_worker: int = 0
    kills_pool: int = 0
    wipes: list[dict[str, Any]] = field(default_factory=list)
    db_restarts: list[dict[str, Any]] = field(default_factory=list)
    settled_after_s: float = 0.0
    settle_bound_s: float = 0.0
    rss_growth: dict[str, float] = field(default_factory=dict)  # survivors: pid label -> growth
    rss_role_growth: dict[str, float] = field(default_factory=dict)  # informational
    max_rss_growth_pct: float = 0.0
    growing: list[str] = field(default_factory=list)
    p50_s: float = math.nan
    p99_s: float = math.nan
    audit_ok: bool = False
    audit_violations: list[dict[str, Any]] = field(default_factory=list)
    out: str = ""

    def summary(self) -> str:
        def at(faults: list[dict[str, Any]]) -> str:
            parts = []
            for f in faults:
                detail = [f"{f['in_flight']} in flight"] if f["in_flight"] is not None else []
                if f.get("seconds") is not None:
                    detail.append(f"{f['kind']}, refused {f['seconds']:.1f}s")
                parts.append(f"{f['t'] / 60:.1f}min" + (f" ({', '.join(detail)})"
                                                        if detail else ""))
            return "; ".join(parts) or "none"
        return "\n".join([
            "soak summary",
            f"  duration                {self.minutes:.1f} min at {self.rate_per_s:.1f}/s "
            f"(capacity {self.capacity_per_s:.1f}/s)",
            f"  sagas started           {self.started} ({self.publish_failures} publishes "
            f"failed, recovery's to re-drive; {self.start_failures} starts refused)",
            f"  completed               {self.completed}",
            f"  compensated             {self.compensated}",
            f"  parked                  {self.parked}",
            f"  lost                    {self.lost}",
            f"  stuck                   {self.stuck}",
            f"  doubled (audit)         {self.doubled}",
            f"  kills                   {self.kills_worker + self.kills_pool} "
            f"({self.kills_worker} whole workers, {self.kills_pool} pool processes)",
            f"  broker wipes            {len(self.wipes)}: {at(self.wipes)}",
            f"  database restarts       {len(self.db_restarts)}: {at(self.db_restarts)}",
            f"  max RSS growth          {self.max_rss_growth_pct:+.1f}% "
            f"(processes alive from the baseline to the end: {len(self.rss_growth)})",
            "  role RSS growth         " + ", ".join(
                f"{k} {v * 100:+.0f}%" for k, v in self.rss_role_growth.items()),
            f"  queues growing          {', '.join(self.growing) or 'none'}",
            f"  start-to-end            p50 {self.p50_s:.2f}s, p99 {self.p99_s:.2f}s",
            f"  all settled             {self.settled_after_s:.0f}s after the starts stopped "
            f"(bound {self.settle_bound_s:.0f}s)",
            f"  audit                   {'clean' if self.audit_ok else 'VIOLATIONS'}",
            "  result                  " + (
                "OK" if self.ok else "FAILED: " + "; ".join(self.failures)),
            f"  output                  {self.out}",
        ])


# --- the client process ------------------------------------------------------------------------
def client_main(argv: list[str]) -> int:
    """``python -m tests.chaos.soak client --ids FILE ...``: starts order sagas until
    ``--seconds`` pass or SIGTERM; one line per start: id, time, ok|publish_failed|store_down."""
    parser = argparse.ArgumentParser(prog="tests.chaos.soak client")
    parser.add_argument("--ids", type=Path, required=True)
    parser.add_argument("--prefix", default="soak")
    parser.add_argument("--rate", type=float, default=0.0, help="starts per second; 0: at once")
    parser.add_argument("--max-in-flight", type=int, default=0,
                        help="with --rate 0: start while fewer sagas than this are in flight")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--over", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--patience", type=float, default=60.0)
    args = parser.parse_args(argv)

    import config
    from sagas.errors import StoreUnavailableError
    from tests.chaos.client import _start, order

    config.app.loader.import_default_modules()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    rng = random.Random(args.seed)
    began = time.monotonic()
    next_at = began
    i = 0
    with open(args.ids, "a", buffering=1) as out:
        while not stop.is_set() and time.monotonic() - began < args.seconds:
            now = time.monotonic()
            if args.rate > 0:
                if next_at > now:
                    stop.wait(min(next_at - now, 0.5))
                    continue
                if now - next_at > 5:  # held back by an outage: go on at the rate, no burst
                    next_at = now
                next_at += 1 / args.rate
            elif args.max_in_flight and _in_flight(config.engine.store) >= args.max_in_flight:
                stop.wait(0.1)
                continue
            saga_id = f"{args.prefix}-{i:06d}"
            is_over = rng.random() < args.over
            status = "ok"
            try:
                _start("order", order(rng, i, is_over), saga_id, saga_id, args.patience)
            except StoreUnavailableError as exc:
                status = "store_down"
                sys.stderr.write(f"{saga_id}: {exc}\n")
            except Exception as exc:  # recorded, not published: recovery re-drives it
                status = "publish_failed"
                sys.stderr.write(f"{saga_id}: publish failed: {type(exc).__name__}: {exc}\n")
            out.write(f"{saga_id}\t{time.time():.3f}\t{status}\n")
            i += 1
    return 0


def _in_flight(store: Any) -> int:
    from sqlalchemy import func, select

    from sagas.store.sql import sagas_t

    with store.read() as conn:
        return int(conn.execute(select(func.count()).select_from(sagas_t)
                                .where(sagas_t.c.state.not_in(SETTLED))).scalar_one())


# --- the soak ---------------------------------------------------------------------------------
class Soak:
    def __init__(self, cfg: SoakConfig) -> None:
        self.cfg = cfg
        self.out = cfg.out.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in [*self.out.glob("started-*.tsv"), *(
                self.out / f for f in ("soak.csv", "rss.csv", "soak.png", "summary.json"))]:
            stale.unlink(missing_ok=True)  # an earlier run's (the clients append)
        shutil.rmtree(self.out / "run", ignore_errors=True)
        self.rng = random.Random(cfg.seed)
        self.result = SoakResult(minutes=cfg.minutes, out=str(self.out))
        self.samples: list[Sample] = []
        self.faults: list[Fault] = []
        self.pending_faults: list[str] = []
        # (pid, create_time) -> (label, [(t, rss bytes)])
        self.procs: dict[tuple[int, float], tuple[str, list[tuple[float, int]]]] = {}
        self.ids: dict[str, dict[str, str]] = {}
        self.id_offsets: dict[str, int] = {}
        self.capacity_in_flight = 0.0
        self.seen_ended: set[str] = set()
        self.sql_since = datetime.now(UTC)
        self.relay: subprocess.Popen[bytes] | None = None
        self.client: subprocess.Popen[bytes] | None = None
        self.db_thread: threading.Thread | None = None
        self.began = time.monotonic()
        self.soak_end = 0.0

    # --- deployment ------------------------------------------------------------------------
    def start(self) -> None:
        from tests.support.pgcluster import PgCluster

        self.pg = PgCluster().start()
        url = self.pg.create_database("sagas")
        self.cluster = Cluster(self.out / "run", database_url=url, broker="redis", env={
            "FAULT_RATE": str(self.cfg.fault_rate),
            "RECOVERY_INTERVAL": str(self.cfg.recovery_interval),
            "STEP_TIMEOUT": str(ORDER_STEP_DEADLINE),
            "RECOVERY_GRACE": str(RECOVERY_GRACE),
            "STARTING_STOCK": json.dumps({s: 100_000_000 for s in ("laptop", "phone", "book")}),
            "SAGAS_IMPORTS": "",
        })
        self.cluster.migrate()
        specs = {q: (q, 2) for q in QUEUES} | {SENTINEL: (",".join(QUEUES), 1)}
        self.cluster.start_workers(specs)
        self.cluster.start_beat()
        self.relay = subprocess.Popen(
            [sys.executable, "-c", SAGAS_CLI, "relay"], cwd=ROOT, env=self.cluster.env,
            stdout=open(self.cluster.root / "relay.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def stop(self) -> None:
        for proc in (self.client, self.relay):
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self.db_thread is not None:
            self.db_thread.join(120)
        with contextlib.suppress(Exception):
            self.cluster.stop()
        with contextlib.suppress(Exception):
            self.pg.close()

    def start_client(self, prefix: str, seconds: float, rate: float = 0.0,
                     max_in_flight: int = 0) -> subprocess.Popen[bytes]:
        self.client = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.soak", "client", "--ids",
             str(self.out / f"started-{prefix}.tsv"), "--prefix", prefix, "--rate", str(rate),
             "--max-in-flight", str(max_in_flight), "--seconds", str(seconds),
             "--over", str(self.cfg.over),
             "--seed", str(self.cfg.seed)],
            cwd=ROOT, env=self.cluster.env,
            stdout=open(self.cluster.root / f"client-{prefix}.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        return self.client

    def stop_client(self, timeout: float) -> None:
        client = self.client
        if client is None:
            return
        try:
            client.wait(timeout)
        except subprocess.TimeoutExpired:
            client.send_signal(signal.SIGTERM)
            try:
                client.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(client.pid, signal.SIGKILL)
                client.wait(10)

    # --- reading -------------------------------------------------------------------------
    def read_ids(self, prefix: str) -> dict[str, str]:
        """The client's record, read on from where the last read stopped (whole lines)."""
        path = self.out / f"started-{prefix}.tsv"
        self.ids.setdefault(prefix, {})
        if path.exists():
            with open(path) as fh:
                fh.seek(self.id_offsets.get(prefix, 0))
                while line := fh.readline():
                    if not line.endswith("\n"):
                        break
                    saga_id, _, status = line.rstrip("\n").split("\t")
                    self.ids[prefix][saga_id] = status
                    self.id_offsets[prefix] = fh.tell()
        return self.ids[prefix]

    def all_started(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for path in sorted(self.out.glob("started-*.tsv")):
            out |= self.read_ids(path.stem.removeprefix("started-"))
        return out

    def started(self, prefix: str = "soak") -> int:
        return sum(s != "store_down" for s in self.read_ids(prefix).values())

    def counts(self, prefix: str | None = None) -> dict[str, int]:
        from sqlalchemy import func, select

        from sagas.store.sql import sagas_t

        query = select(sagas_t.c.state, func.count())
        if prefix is not None:
            query = query.where(sagas_t.c.id.like(f"{prefix}%"))
        with self.cluster.store.read() as conn:
            return {str(s): int(n) for s, n in conn.execute(query.group_by(sagas_t.c.state))}

    def in_flight(self) -> int | None:
        try:
            return sum(n for s, n in self.cluster.state_counts().items() if s not in SETTLED)
        except Exception:
            return None

    def durations(self, since: datetime, prefix: str = "soak") -> list[tuple[str, float]]:
        """Start-to-end of this soak's sagas that ended at ``since`` or later (not seen yet)."""
        from sqlalchemy import select

        from sagas.store.sql import sagas_t

        with self.cluster.store.read() as conn:
            rows = conn.execute(
                select(sagas_t.c.id, sagas_t.c.created_at, sagas_t.c.updated_at)
                .where(sagas_t.c.id.like(f"{prefix}-%"), sagas_t.c.state.in_(TERMINAL),
                       sagas_t.c.updated_at >= since)
            ).all()
        out = [(str(r.id), (r.updated_at - r.created_at).total_seconds()) for r in rows
               if str(r.id) not in self.seen_ended]
        self.seen_ended.update(i for i, _ in out)
        return out

    def processes(self) -> list[tuple[str, str, Any]]:
        """(role, label, psutil.Process) of every process to measure."""
        import psutil

        found: list[tuple[str, str, Any]] = []
        tops: list[tuple[str, int | None]] = [
            (name, w.process.pid if w.process is not None and w.process.poll() is None
             else None) for name, w in self.cluster.workers.items()]
        tops += [("beat", self.cluster.beat.pid if self.cluster.beat else None),
                 ("relay", self.relay.pid if self.relay else None),
                 ("client", self.client.pid if self.client and self.client.poll() is None
                  else None),
                 ("redis", self.cluster.redis.process.pid)]
        for role, pid in tops:
            if pid is None:
                continue
            try:
                top = psutil.Process(pid)
                found.append((role, f"{role}:main", top))
                found += [(role, f"{role}:child", c) for c in top.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return found

    def sample(self, phase: str) -> Sample:
        import psutil

        t = time.monotonic() - self.began
        s = Sample(t=t, phase=phase, started=self.started())
        now = datetime.now(UTC)
        try:
            counts = self.counts("soak")
            s.completed = counts.get("COMPLETED", 0)
            s.compensated = counts.get("COMPENSATED", 0)
            s.terminal = s.completed + s.compensated
            s.parked = sum(counts.get(p, 0) for p in PARKED)
            s.in_flight = float(self.in_flight() or 0)
            # A saga whose last write began before the previous sample may commit after it.
            ended = self.durations(self.sql_since - timedelta(seconds=60))
            self.sql_since = now
            s.ended = len(ended)
            if ended:
                s.p50_s, s.p99_s = percentiles([d for _, d in ended])
            from sagas.runtime import relay

            s.outbox_pending = relay.stats(self.cluster.store).pending
        except Exception as exc:  # the database is down: the row says so with blanks
            print(f"  [{t / 60:5.1f}min] database unreadable: {type(exc).__name__}",
                  flush=True)
        for q in QUEUES:
            try:
                s.queues[q] = self.cluster.queue_depth(q)
            except Exception:
                s.queues[q] = math.nan
        rss: dict[str, float] = {}
        for role, label, proc in self.processes():
            try:
                value = proc.memory_info().rss
                key = (proc.pid, proc.create_time())
            except psutil.NoSuchProcess:
                continue
            rss[role] = rss.get(role, 0.0) + value / 2**20
            self.procs.setdefault(key, (f"{label}[{proc.pid}]", []))[1].append((t, value))
        s.rss_mb = {r: rss.get(r, math.nan) for r in (*ROLES, *REFERENCE_ROLES)}
        s.faults = " ".join(self.pending_faults)
        self.pending_faults = []
        self.samples.append(s)
        self.write_csv()
        print(f"  [{t / 60:5.1f}min] {phase}: started {s.started}, terminal {s.terminal:.0f}, "
              f"in flight {s.in_flight:.0f}, queues "
              + "/".join(f"{s.queues[q]:.0f}" for q in QUEUES)
              + f", outbox {s.outbox_pending:.0f}, p50/p99 {s.p50_s:.2f}/{s.p99_s:.2f}s"
              + (f"  [{s.faults}]" if s.faults else ""), flush=True)
        return s

    # --- faults ----------------------------------------------------------------------------
    def note(self, fault: Fault) -> None:
        self.faults.append(fault)
        self.pending_faults.append(fault.kind + (f":{fault.target}" if fault.target else ""))
        extra = f" ({fault.in_flight} in flight)" if fault.in_flight is not None else ""
        print(f"  [{fault.t / 60:5.1f}min] fault: {fault.kind} {fault.target}{extra}",
              flush=True)

    def kill(self) -> None:
        name = self.rng.choice(QUEUES)
        children = self.cluster.pool_children(name)
        t = time.monotonic() - self.began
        if children and self.rng.random() < 0.5:
            pid = self.rng.choice(children)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                self.result.kills_pool += 1
                self.note(Fault(t, "kill-pool", f"{name}[{pid}]"))
            return
        self.cluster.restart_worker(name, wait=False)
        self.result.kills_worker += 1
        self.note(Fault(t, "kill-worker", name))

    def wipe(self) -> None:
        fault = Fault(time.monotonic() - self.began, "wipe", in_flight=self.in_flight())
        self.cluster.wipe_broker()  # FLUSHALL: every queued and unacked message gone
        self.note(fault)

    def db_restart(self, down: bool) -> None:
        fault = Fault(time.monotonic() - self.began, "db-down" if down else "db-restart",
                      in_flight=self.in_flight())
        self.note(fault)

        def run() -> None:
            try:
                fault.seconds = (self.pg.down_for(self.cfg.db_down_seconds) if down
                                 else self.pg.restart("fast"))
            except Exception as exc:
                print(f"  database restart failed: {exc}", flush=True)

        self.db_thread = threading.Thread(target=run, daemon=True)
        self.db_thread.start()

    # --- phases ----------------------------------------------------------------------------
    def measure_capacity(self) -> float:
        cfg = self.cfg
        n = cfg.capacity_clients
        print(f"measuring capacity: {cfg.capacity_seconds:.0f}s of starts by {n} clients as "
              f"fast as they go while fewer than {CAPACITY_IN_FLIGHT} are in flight, no faults",
              flush=True)
        clients = [self.start_client(f"cap{k}", CAPACITY_WARMUP + cfg.capacity_seconds + 60,
                                     max_in_flight=CAPACITY_IN_FLIGHT) for k in range(n)]
        time.sleep(CAPACITY_WARMUP)
        before = self.counts("cap")
        t0 = time.monotonic()
        in_flight: list[int] = []
        while time.monotonic() - t0 < cfg.capacity_seconds:
            time.sleep(1)
            in_flight.append(self.in_flight() or 0)
        after = self.counts("cap")
        elapsed = time.monotonic() - t0
        for client in clients:
            self.client = client
            self.stop_client(0)
        self.client = None
        settled = sum(after.get(s, 0) - before.get(s, 0) for s in SETTLED)
        capacity = settled / elapsed
        deadline = time.monotonic() + 180
        while (self.in_flight() or 0) > 0 and time.monotonic() < deadline:
            time.sleep(1)
        self.capacity_in_flight = statistics.median(in_flight) if in_flight else 0
        limit = ("the workers were the limit" if self.capacity_in_flight
                 >= CAPACITY_IN_FLIGHT * 0.8 else "the clients were the limit: the workers "
                 "kept up, the capacity is at least this")
        print(f"capacity: {settled} sagas settled in {elapsed:.1f}s = {capacity:.1f}/s; "
              f"in flight median {self.capacity_in_flight:.0f} ({limit}); "
              f"{sum(len(self.read_ids(f'cap{k}')) for k in range(n))} started; "
              f"drained: {self.in_flight()} in flight", flush=True)
        return capacity

    def soak(self) -> None:
        cfg = self.cfg
        rate = self.result.rate_per_s
        print(f"soak: {cfg.minutes:g} min at {rate:.2f} sagas/s; broker wipes at "
              + ", ".join(f"{t / 60:.1f}" for t in cfg.wipe_times())
              + " min; database restarts at "
              + ", ".join(f"{t / 60:.1f}" for t in cfg.db_restart_times())
              + f" min; a kill every {cfg.kill_every_min:g}-{cfg.kill_every_max:g}s", flush=True)
        self.began = time.monotonic()
        self.sql_since = datetime.now(UTC)
        # It runs on past the end; settle() stops it, after the last sample measured it.
        self.start_client("soak", cfg.seconds + 120, rate=rate)
        wipes = cfg.wipe_times()
        restarts = cfg.db_restart_times()
        next_sample = 0.0
        next_kill = self.rng.uniform(cfg.kill_every_min, cfg.kill_every_max)
        while (t := time.monotonic() - self.began) < cfg.seconds:
            if t >= next_sample:
                self.sample("soak")
                next_sample += cfg.sample_every
            if wipes and t >= wipes[0]:
                wipes.pop(0)
                self.wipe()
            if restarts and t >= restarts[0] and not (
                    self.db_thread is not None and self.db_thread.is_alive()):
                self.db_restart(down=len(self.result_db_faults()) % 2 == 1)
                restarts.pop(0)
            if t >= next_kill:
                self.kill()
                next_kill += self.rng.uniform(cfg.kill_every_min, cfg.kill_every_max)
            if self.client is not None and self.client.poll() is not None:
                self.result.failures.append(f"the client exited early ({self.client.returncode})")
                break
            time.sleep(0.2)
        self.soak_end = self.sample("soak").t

    def result_db_faults(self) -> list[Fault]:
        return [f for f in self.faults if f.kind.startswith("db-")]

    def settle(self) -> None:
        cfg = self.cfg
        self.stop_client(0)
        if self.db_thread is not None:
            self.db_thread.join(cfg.db_down_seconds + 120)
        self.cluster.ensure_workers()
        started = self.all_started()
        backlog = self.in_flight() or 0
        bound = (2 * (ORDER_STEP_DEADLINE + cfg.recovery_interval) + 60
                 + 2 * backlog / max(self.result.capacity_per_s, 1.0))
        self.result.settle_bound_s = bound
        stopped = self.began + self.soak_end
        deadline = time.monotonic() + bound  # once the database is back
        next_sample = time.monotonic() + cfg.sample_every
        print(f"settling: {backlog} in flight; bound {bound:.0f}s once the database is back",
              flush=True)
        while time.monotonic() < deadline:
            try:
                counts = self.counts()
                rows = sum(counts.values())
                if all(s in SETTLED for s in counts) and rows >= len(
                        [i for i, st in started.items() if st != "store_down"]):
                    break
            except Exception:
                pass
            if time.monotonic() >= next_sample:
                self.sample("settle")
                next_sample += cfg.sample_every
            time.sleep(1)
        self.result.settled_after_s = time.monotonic() - stopped
        self.sample("settle")

    # --- verdicts --------------------------------------------------------------------------
    def judge(self) -> None:
        from sqlalchemy import select

        from sagas.store.sql import sagas_t

        r = self.result
        started = self.all_started()
        soak_ids = self.read_ids("soak")
        with self.cluster.store.read() as conn:
            states = {str(i): str(s) for i, s in conn.execute(
                select(sagas_t.c.id, sagas_t.c.state))}
            rows = conn.execute(
                select(sagas_t.c.created_at, sagas_t.c.updated_at)
                .where(sagas_t.c.id.like("soak-%"), sagas_t.c.state.in_(TERMINAL))).all()
        r.started = sum(s != "store_down" for s in soak_ids.values())
        r.start_failures = sum(s == "store_down" for s in soak_ids.values())
        r.publish_failures = sum(s == "publish_failed" for s in soak_ids.values())
        soak_states = [states.get(i) for i in soak_ids]
        r.completed = soak_states.count("COMPLETED")
        r.compensated = soak_states.count("COMPENSATED")
        lost = [i for i, st in started.items() if st != "store_down" and i not in states]
        stuck = [i for i, st in states.items() if st not in SETTLED]
        parked = [i for i, st in states.items() if st in PARKED]
        r.lost, r.stuck, r.parked = len(lost), len(stuck), len(parked)
        durations = [(b - a).total_seconds() for a, b in rows]
        if durations:
            r.p50_s, r.p99_s = percentiles(durations)

        audit = self.cluster.sagas_cli("audit", "--json", check=False)
        report = json.loads(audit.stdout) if audit.stdout.strip() else {
            "ok": False, "violations": [{"rule": "audit failed", "detail": audit.stderr}]}
        r.audit_ok = bool(report.get("ok"))
        violations = report.get("violations", [])
        doubled = [v for v in violations if v.get("rule") not in STATE_RULES]
        r.doubled = len(doubled)
        r.audit_violations = violations[:50]

        r.rss_growth, r.rss_role_growth = self.rss_growth()
        r.max_rss_growth_pct = 100 * max(r.rss_growth.values(), default=0.0)
        r.growing = self.growing()
        r.wipes = [asdict(f) for f in self.faults if f.kind == "wipe"]
        r.db_restarts = [asdict(f) for f in self.result_db_faults()]

        if lost:
            r.failures.append(f"{len(lost)} lost (no saga for a start that returned): "
                              f"{lost[:5]}")
        if stuck:
            r.failures.append(f"{len(stuck)} stuck after {r.settle_bound_s:.0f}s: {stuck[:5]}")
        if parked:
            r.failures.append(f"{len(parked)} parked: {parked[:5]}")
        if doubled:
            r.failures.append(f"{len(doubled)} audit violations (doubled or inconsistent): "
                              + "; ".join(f"{v.get('saga')}: {v.get('rule')}: {v.get('detail')}"
                                          for v in doubled[:5]))
        elif not r.audit_ok and not (stuck or parked):
            r.failures.append("the audit is not clean")
        over = {k: v for k, v in r.rss_growth.items() if v > self.cfg.rss_limit}
        if over:
            r.failures.append("RSS grew more than "
                              f"{self.cfg.rss_limit:.0%}: " + ", ".join(
                                  f"{k} {v:+.0%}" for k, v in over.items()))
        if not r.rss_growth:
            r.failures.append("no process lived from the RSS baseline to the end")
        if r.growing:
            r.failures.append(f"keeps growing: {', '.join(r.growing)}")
        r.ok = not r.failures

    def rss_growth(self) -> tuple[dict[str, float], dict[str, float]]:
        base_t = min(self.cfg.rss_baseline * 60, self.cfg.seconds / 2)
        end_t = self.soak_end
        survivors: dict[str, float] = {}
        for label, series in self.procs.values():
            base = [v for t, v in series if t >= base_t][:3]
            end = [v for t, v in series if t <= end_t][-3:]
            if label.startswith("redis") or not base or not end:
                continue
            if series[0][0] > base_t + self.cfg.sample_every or series[-1][0] < end_t - 1:
                continue  # born after the baseline, or gone before the end
            survivors[label] = statistics.median(end) / statistics.median(base) - 1
        soak = [s for s in self.samples if s.phase == "soak"]
        roles: dict[str, float] = {}
        base_rows = [s for s in soak if s.t >= base_t][:3]
        if base_rows and soak:
            for role in ROLES:
                b = _median([s.rss_mb[role] for s in base_rows])
                e = _median([s.rss_mb[role] for s in soak[-3:]])
                if b > 0 and not math.isnan(e):
                    roles[role] = e / b - 1
        return survivors, roles

    def growing(self) -> list[str]:
        soak = [s for s in self.samples if s.phase == "soak"]
        series: dict[str, list[float]] = {f"queue {q}": [s.queues[q] for s in soak]
                                          for q in QUEUES}
        series["outbox pending"] = [s.outbox_pending for s in soak]
        series["in flight"] = [s.in_flight for s in soak]
        floors: dict[str, float] = {}
        for name, values in series.items():
            early = sorted(v for v in values[:2 * len(soak) // 3] if not math.isnan(v))
            p90 = early[int(0.9 * (len(early) - 1))] if early else 0.0
            floors[name] = max(self.cfg.queue_floor, 3 * p90)
        # The relay publishes up to a batch (100 rows) a pass: a backlog of two is ordinary.
        floors["outbox pending"] = max(floors["outbox pending"], OUTBOX_FLOOR)
        return [name for name, values in series.items() if keeps_growing(values, floors[name])]

    # --- output ----------------------------------------------------------------------------
    def write_csv(self) -> None:
        columns = ["t_s", "phase", "started", "terminal", "completed", "compensated", "parked",
                   "in_flight", *(f"queue_{q}" for q in QUEUES), "outbox_pending",
                   *(f"rss_{r}_mb" for r in (*ROLES, *REFERENCE_ROLES)), "ended", "p50_s",
                   "p99_s", "faults"]
        with open(self.out / "soak.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            for s in self.samples:
                writer.writerow([
                    f"{s.t:.1f}", s.phase, s.started, _num(s.terminal), _num(s.completed),
                    _num(s.compensated), _num(s.parked), _num(s.in_flight),
                    *(_num(s.queues.get(q, math.nan)) for q in QUEUES), _num(s.outbox_pending),
                    *(_num(s.rss_mb.get(r, math.nan), 1) for r in (*ROLES, *REFERENCE_ROLES)),
                    s.ended, _num(s.p50_s, 3), _num(s.p99_s, 3), s.faults,
                ])

    def write_rss(self) -> None:
        """Every measured process's RSS series (workers' main and pool processes apart)."""
        with open(self.out / "rss.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["t_s", "process", "rss_mb"])
            for label, series in self.procs.values():
                writer.writerows([f"{t:.1f}", label, f"{v / 2**20:.1f}"] for t, v in series)

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        s = self.samples
        t = [x.t / 60 for x in s]
        fig, axes = plt.subplots(4, 1, figsize=(13, 15), sharex=True)
        ax = axes[0]
        ax.plot(t, [x.started for x in s], label="started")
        ax.plot(t, [x.terminal for x in s], label="terminal")
        ax.set_ylabel("sagas (cumulative)")
        twin = ax.twinx()
        twin.plot(t, [x.in_flight for x in s], color="tab:red", label="in flight")
        twin.set_ylabel("in flight", color="tab:red")
        lines = ax.get_legend_handles_labels()
        lines2 = twin.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left")
        ax.set_title(f"soak: {self.cfg.minutes:g} min at {self.result.rate_per_s:.1f} sagas/s "
                     f"(capacity {self.result.capacity_per_s:.1f}/s) - "
                     + ("OK" if self.result.ok else "FAILED"))

        ax = axes[1]
        for q in QUEUES:
            ax.plot(t, [x.queues.get(q, math.nan) for x in s], label=f"queue {q}")
        ax.plot(t, [x.outbox_pending for x in s], label="outbox pending", linestyle="--",
                color="black")
        ax.set_ylabel("messages / log rows")
        ax.set_ylim(bottom=0)
        ax.legend(loc="best", ncol=3)

        ax = axes[2]
        for role in ROLES:
            ax.plot(t, [x.rss_mb.get(role, math.nan) for x in s], label=role)
        ax.set_ylabel("RSS (MB; worker = main + pool)")
        ax.legend(loc="best", ncol=4)

        ax = axes[3]
        ax.plot(t, [x.p50_s for x in s], marker=".", label="p50")
        ax.plot(t, [x.p99_s for x in s], marker=".", label="p99")
        ax.set_ylabel("start to end (s), per 10 s")
        ax.set_yscale("log")
        ax.set_xlabel("minutes since the soak started")
        ax.legend(loc="upper left")

        styles = {"kill-worker": ("tab:olive", "-", 1.0), "kill-pool": ("tab:olive", ":", 1.2),
                  "wipe": ("tab:red", "--", 1.5), "db-restart": ("tab:blue", "--", 1.5),
                  "db-down": ("tab:purple", "--", 1.5)}
        for a in axes:
            for f in self.faults:
                color, style, width = styles[f.kind]
                a.axvline(f.t / 60, color=color, linestyle=style, linewidth=width, alpha=0.7)
            a.axvline(self.soak_end / 60, color="black", linewidth=1.5)
            a.grid(alpha=0.3)
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=c, linestyle=ls, linewidth=w, label=k)
                   for k, (c, ls, w) in styles.items()]
        handles.append(Line2D([], [], color="black", label="starts stop"))
        fig.legend(handles=handles, loc="lower center", ncol=6, frameon=False)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(self.out / "soak.png", dpi=90)
        plt.close(fig)


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return at(0.50), at(0.99)


def keeps_growing(values: list[float], floor: float) -> bool:
    """The last third's minima rise window by window and end above ``floor`` (windows of two
    samples at least: a shorter run is not judged)."""
    vals = [v for v in values if not math.isnan(v)]
    tail = vals[len(vals) - len(vals) // 3:]
    size = len(tail) // 3
    if size < 2:
        return False
    windows = [tail[:size], tail[size:2 * size], tail[2 * size:]]
    lows = [min(w) for w in windows]
    return lows[0] < lows[1] < lows[2] and lows[2] > floor


def _median(values: list[float]) -> float:
    known = [v for v in values if not math.isnan(v)]
    return statistics.median(known) if known else math.nan


def _num(value: float, digits: int = 0) -> str:
    return "" if math.isnan(value) else f"{value:.{digits}f}"


def run_soak(cfg: SoakConfig) -> SoakResult:
    soak = Soak(cfg)
    try:
        soak.start()
        if cfg.rate:
            soak.result.rate_per_s = cfg.rate
        else:
            soak.result.capacity_per_s = soak.measure_capacity()
            soak.result.rate_per_s = max(0.5, cfg.load * soak.result.capacity_per_s)
        soak.soak()
        soak.settle()
        soak.judge()
    finally:
        soak.stop()
        if soak.samples:
            soak.write_rss()
            soak.plot()
        (soak.out / "summary.json").write_text(json.dumps(asdict(soak.result), indent=2,
                                                          default=str))
    return soak.result


def main(argv: list[str]) -> int:
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    d = SoakConfig()
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.soak",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--minutes", type=float, default=d.minutes)
    parser.add_argument("--out", type=Path, default=d.out, help="CSV, PNG, summary and logs")
    parser.add_argument("--load", type=float, default=d.load, help="share of the capacity")
    parser.add_argument("--rate", type=float, default=None,
                        help="sagas started per second; skips the capacity measurement "
                        "(default: load x capacity)")
    parser.add_argument("--over", type=float, default=d.over,
                        help="share of orders over the payment limit (they compensate)")
    parser.add_argument("--capacity-seconds", type=float, default=d.capacity_seconds)
    parser.add_argument("--capacity-clients", type=int, default=d.capacity_clients,
                        help="client processes starting sagas while the capacity is measured")
    parser.add_argument("--kill-every-min", type=float, default=d.kill_every_min)
    parser.add_argument("--kill-every-max", type=float, default=d.kill_every_max)
    parser.add_argument("--wipe-every", type=float, default=d.wipe_every,
                        help="minutes between broker wipes (FLUSHALL)")
    parser.add_argument("--db-restart-every", type=float, default=d.db_restart_every,
                        help="minutes between PostgreSQL restarts")
    parser.add_argument("--db-down-seconds", type=float, default=d.db_down_seconds,
                        help="how long every other restart keeps the database down")
    parser.add_argument("--rss-baseline", type=float, default=d.rss_baseline,
                        help="minute of the RSS baseline")
    parser.add_argument("--rss-limit", type=float, default=d.rss_limit)
    parser.add_argument("--queue-floor", type=float, default=d.queue_floor)
    parser.add_argument("--sample-every", type=float, default=d.sample_every)
    parser.add_argument("--fault-rate", type=float, default=d.fault_rate,
                        help="injected transient participant faults (FAULT_RATE)")
    parser.add_argument("--seed", type=int, default=d.seed)
    args = parser.parse_args(argv)
    cfg = SoakConfig(**{k: v for k, v in vars(args).items()})
    result = run_soak(cfg)
    print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
