"""The chaos scenario: order sagas through crashing workers, a broker that loses everything
once, and faults in every participant; then every saga must be terminal and the ledgers must
balance.

A private deployment (tests/chaos/cluster.py): one worker process per queue (inventory, payment,
shipping, saga; prefork, 2 pool processes each), ``celery beat`` running the reconciler, its own
redis-server and database, and as broker that Redis or (``--broker rabbitmq``, or
``SAGAS_TEST_BROKER=rabbitmq``) a RabbitMQ vhost of its own. A client process starts N order
sagas (30% over the payment limit) spread over the kill window. Every KILL_EVERY seconds during
that window a random worker process is SIGKILLed: either a whole worker (main process and pool,
as a crashed container; it is restarted at once) or one pool process (Celery replaces it and
re-sends its task). Halfway through, the broker loses everything: Redis is killed and started
again empty; on RabbitMQ clients are locked out, the server closes every connection, the queues
are purged and clients are let back in, and the result backend's Redis is restarted empty.
FAULT_RATE makes every participant step and compensation raise transient faults, some of them
after the effect committed.

``python -m tests.chaos.run`` (``make chaos``: 1000 sagas, 60 s of kills) prints the summary;
``tests/chaos/test_chaos.py`` runs a smaller one in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sagas.ops.audit import PARKED, RULE_IDLE, STUCK
from tests.chaos.client import wave_plan
from tests.chaos.cluster import Cluster
from tests.support import pgcluster
from tests.support.pgcluster import PgCluster
from tests.support.services import BROKERS, broker_kind

TERMINAL = {"COMPLETED", "COMPENSATED"}
NOT_DOUBLED = {RULE_IDLE, STUCK, PARKED}  # audit findings that are about settling, not effects
QUEUES = ("inventory", "payment", "shipping", "saga")
RECOVERY_GRACE = 2.0  # past a step's hard time limit, before recovery re-drives it
# The order saga's steps have time_limit=30: Celery kills a delivery 5 s later, and recovery
# re-drives it RECOVERY_GRACE after that (their stall deadline).
ORDER_STEP_DEADLINE = 30.0 + 5.0 + RECOVERY_GRACE


@dataclass
class ChaosConfig:
    sagas: int = int(os.environ.get("CHAOS_SAGAS", "200"))
    kill_for: float = float(os.environ.get("CHAOS_KILL_SECONDS", "60"))
    kill_every: float = float(os.environ.get("CHAOS_KILL_EVERY", "2"))
    fault_rate: float = float(os.environ.get("CHAOS_FAULT_RATE", "0.05"))
    over_limit: float = 0.3
    recovery_interval: float = float(os.environ.get("CHAOS_RECOVERY_INTERVAL", "2"))
    concurrency: int = 2
    seed: int = int(os.environ.get("CHAOS_SEED", "7"))
    database_url: str | None = os.environ.get("CHAOS_DATABASE_URL") or None
    # "postgresql": a private cluster (initdb + pg_ctl, a free port), restarted twice mid-run
    database: str = os.environ.get("CHAOS_DATABASE", "sqlite")
    db_down_s: float = float(os.environ.get("CHAOS_DB_DOWN_SECONDS", "30"))
    first_wave: float = 0.3  # share of the sagas started at once at 0
    second_wave_at: float = 0.45  # the rest at once, at this share of the submit window
    broker: str = field(default_factory=broker_kind)

    @property
    def submit_for(self) -> float:
        return self.kill_for * 0.75

    @property
    def wave_spec(self) -> str:
        return f"0:{self.first_wave},{self.second_wave_at}:{1 - self.first_wave}"

    def waves(self) -> tuple[int, int]:
        offsets = wave_plan(self.wave_spec, self.sagas, self.submit_for)
        first = offsets.count(0.0)
        return first, len(offsets) - first

    @property
    def settle_bound(self) -> float:
        """Every saga terminal within this after the last disruption: a stalled step waits out
        its deadline, then one reconciler interval, then its remaining steps run (a second
        stall at most, for a saga whose re-drive was itself lost), plus a drain margin."""
        outage = self.db_down_s if self.database == "postgresql" else 0.0
        return (2 * (ORDER_STEP_DEADLINE + self.recovery_interval) + 30 + self.sagas / 20
                + outage)


@dataclass
class ChaosResult:
    sagas: int = 0
    completed: int = 0
    compensated: int = 0
    parked: int = 0
    not_terminal: int = 0
    worker_kills: int = 0
    pool_kills: int = 0
    broker: str = "redis"
    database: str = "sqlite"
    faults: list[FaultRecord] = field(default_factory=list)
    lost: int = 0  # started, yet no row in SQL
    doubled: int = 0  # effects applied twice or undone without being done (the audit)
    outage_lines: int = 0  # "saga store unavailable" WARNINGs, every process
    tracebacks: int = 0  # ending in a store error, in every worker's and beat's log
    publish_errors: int = 0
    redriven_sagas: int = 0
    redrives: int = 0
    redeliveries: int = 0
    duplicates_absorbed: int = 0
    slowest_recovery_s: float = 0.0
    settled_after_s: float = 0.0
    settle_bound_s: float = 0.0
    wall_s: float = 0.0
    audit: dict[str, Any] = field(default_factory=dict)
    log_dir: str = ""

    @property
    def stuck(self) -> int:
        return self.not_terminal + self.parked

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.stuck == 0 and self.doubled == 0
                and bool(self.audit.get("ok")))

    def summary(self) -> str:
        audit = "clean" if self.audit.get("ok") else (
            f"{len(self.audit.get('violations', []))} violations")
        lines = [
            f"chaos: {self.sagas} order sagas on {self.database} with {self.broker}",
            f"  completed / compensated      {self.completed} / {self.compensated}",
            f"  lost / stuck / doubled       {self.lost} / {self.stuck} / {self.doubled}",
            f"  workers killed whole / pool  {self.worker_kills} / {self.pool_kills}",
        ]
        lines += [f"  fault: {f.line()}" for f in self.faults]
        lines += [
            f"  starts whose publish failed  {self.publish_errors}",
            f"  sagas re-driven by recovery  {self.redriven_sagas} ({self.redrives} steps)",
            f"  duplicate deliveries absorbed {self.redeliveries} (step deliveries beyond the"
            " first: retries, worker-lost re-sends, re-drives; same idempotency key)",
            f"    ran to success again       {self.duplicates_absorbed} (callback ignored)",
            f"  store outage lines / store tracebacks {self.outage_lines} / {self.tracebacks}",
            f"  slowest recovery             {self.slowest_recovery_s:.1f}s after last progress",
            f"  all terminal                 {self.settled_after_s:.1f}s after the chaos ended "
            f"(bound {self.settle_bound_s:.0f}s)",
            f"  audit                        {audit}",
            f"  wall time                    {self.wall_s:.0f}s; logs in {self.log_dir}",
        ]
        return "\n".join(lines)


@dataclass
class FaultRecord:
    """One fault as it struck: what, when (s into the run), and the sagas it caught."""

    kind: str
    at_s: float = 0.0
    started: int = 0  # sagas recorded by then
    in_flight: int = 0  # of them RUNNING or COMPENSATING
    waiting: int = 0  # of them PENDING or WAITING (queued behind a lock or a message)
    down_s: float = 0.0  # how long the server refused connections (restarts)

    def line(self) -> str:
        down = f", down {self.down_s:.1f}s" if self.down_s else ""
        return (f"{self.kind} at {self.at_s:.0f}s: {self.in_flight} of {self.started} sagas "
                f"in flight{down}")


IN_FLIGHT = ("RUNNING", "COMPENSATING")
QUEUED = ("PENDING", "WAITING")


def _kill_loop(cluster: Cluster, cfg: ChaosConfig, result: ChaosResult, rng: random.Random,
               stop: threading.Event) -> None:
    """Every KILL_EVERY seconds of the window, SIGKILL a whole worker or one pool process."""
    began = time.monotonic()
    while not stop.wait(cfg.kill_every):
        cluster.ensure_beat()  # a supervisor's job: beat exits when the broker refuses it
        if time.monotonic() - began > cfg.kill_for:
            return
        name = rng.choice(QUEUES)
        children = cluster.pool_children(name)
        if children and rng.random() < 0.5:
            try:
                os.kill(rng.choice(children), signal.SIGKILL)
                result.pool_kills += 1
            except ProcessLookupError:
                pass
        else:
            cluster.restart_worker(name, wait=False)  # SIGKILL the group, start a new one
            result.worker_kills += 1


def _snapshot(cluster: Cluster, kind: str, began: float) -> FaultRecord:
    counts = cluster.state_counts()
    return FaultRecord(kind=kind, at_s=time.monotonic() - began, started=sum(counts.values()),
                       in_flight=sum(counts.get(s, 0) for s in IN_FLIGHT),
                       waiting=sum(counts.get(s, 0) for s in QUEUED))


def _when_half_in_flight(cluster: Cluster, kind: str, began: float, landed: int,
                         patience: float = 20.0) -> FaultRecord:
    """Wait until ``landed`` sagas are recorded and at least half of them are in flight (a
    fault then hits work, not an idle system); after ``patience`` s strike anyway: the
    record says what it caught."""
    deadline = time.monotonic() + patience
    while True:
        snap = _snapshot(cluster, kind, began)
        if (snap.started >= landed and 2 * snap.in_flight >= snap.started) or (
                time.monotonic() > deadline):
            return snap
        time.sleep(0.05)


def _fault_loop(cluster: Cluster, cfg: ChaosConfig, result: ChaosResult, pg: PgCluster | None,
                began: float) -> None:
    """The scheduled faults, in order: the broker wiped (FLUSHALL) as the first wave is in
    flight, the database restarted fast, the broker server restarted empty as the second wave
    is in flight, the database down ``db_down_s`` s. Database faults need the private
    PostgreSQL cluster (``--database postgresql``)."""
    wave_a, wave_b = cfg.waves()

    def at(fraction: float) -> None:
        time.sleep(max(0.0, began + cfg.kill_for * fraction - time.monotonic()))

    at(0.0)
    record = _when_half_in_flight(cluster, "broker wiped (FLUSHALL)", began, wave_a)
    cluster.wipe_broker()
    result.faults.append(record)
    if pg is not None:
        at(0.25)
        record = _snapshot(cluster, "database restarted (fast)", began)
        record.down_s = pg.restart("fast")
        result.faults.append(record)
    at(cfg.second_wave_at * 0.75)
    record = _when_half_in_flight(cluster, "broker restarted empty", began, wave_a + wave_b)
    cluster.restart_broker()
    result.faults.append(record)
    if pg is not None:
        at(0.6)
        record = _snapshot(cluster, f"database down {cfg.db_down_s:.0f}s", began)
        record.down_s = pg.down_for(cfg.db_down_s, "fast")
        result.faults.append(record)


_STEP_TASK = r"Task (?:inventory|payment|shipping)\.\w+\[(\S+?)\.(\w+)\.(do|undo)\.\d+\] "
_RECEIVED = re.compile(_STEP_TASK + "received")
_SUCCEEDED = re.compile(_STEP_TASK + "succeeded")


# The last line of a traceback whose error is the store's (a driver's or SQLAlchemy's, or ours)
_STORE_TRACEBACK = re.compile(
    r"^(?:sagas\.errors\.StoreUnavailableError|psycopg\.\S+|sqlalchemy\.exc\.\S+|"
    r"sqlite3\.\S+): ", re.MULTILINE)


def _beyond_first(pattern: re.Pattern[str], logs: str) -> int:
    runs = Counter(m.groups() for m in pattern.finditer(logs))
    return sum(n - 1 for n in runs.values())


def run_chaos(cfg: ChaosConfig, root: Path) -> ChaosResult:
    began = time.monotonic()
    rng = random.Random(cfg.seed)
    pg: PgCluster | None = None
    database_url = cfg.database_url
    if cfg.database == "postgresql" and database_url is None:
        pg = PgCluster().start()
        database_url = pg.create_database("sagas")
    cluster = Cluster(root, database_url=database_url, env={
        "FAULT_RATE": str(cfg.fault_rate),
        "RECOVERY_INTERVAL": str(cfg.recovery_interval),
        "STEP_TIMEOUT": str(ORDER_STEP_DEADLINE),
        "RECOVERY_GRACE": str(RECOVERY_GRACE),
        "STARTING_STOCK": json.dumps({"laptop": 100_000, "phone": 100_000, "book": 100_000}),
        "SAGAS_IMPORTS": "",
    }, broker=cfg.broker)
    result = ChaosResult(log_dir=str(root), settle_bound_s=cfg.settle_bound, broker=cfg.broker,
                         database=cfg.database if pg is not None or cfg.database_url is None
                         else "postgresql (given)")
    try:
        cluster.migrate()
        cluster.start_workers({q: (q, cfg.concurrency) for q in QUEUES})
        cluster.start_beat()
        stop = threading.Event()
        killer = threading.Thread(target=_kill_loop, args=(cluster, cfg, result, rng, stop),
                                  daemon=True)
        window = time.monotonic()
        faults = threading.Thread(target=_fault_loop, args=(cluster, cfg, result, pg, window),
                                  daemon=True)
        submit = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.client",
             "--patience", str(cfg.db_down_s * 2 + 30), "orders", str(cfg.sagas),
             "--over", str(cfg.over_limit), "--duration", str(cfg.submit_for),
             "--waves", cfg.wave_spec, "--customers", "997", "--seed", str(cfg.seed)],
            cwd=Path(__file__).resolve().parents[2], env=cluster.env,
            stdout=subprocess.PIPE, stderr=open(root / "client.log", "wb"),  # noqa: SIM115
            text=True,
        )
        killer.start()
        faults.start()
        out, _ = submit.communicate(timeout=cfg.kill_for * 4 + 300)
        killer.join(cfg.kill_for + 60)
        faults.join(cfg.kill_for + cfg.db_down_s + 120)
        stop.set()
        chaos_end = time.monotonic()
        submitted = json.loads(out.strip().splitlines()[-1])
        ids: list[str] = submitted["ids"]
        result.sagas = len(ids)
        result.publish_errors = submitted["publish_errors"]
        cluster.ensure_workers()
        cluster.ensure_beat()

        states: dict[str, str] = {}
        deadline = chaos_end + cfg.settle_bound
        while time.monotonic() < deadline:
            states = cluster.states(ids)
            if len(states) == len(ids) and all(s in TERMINAL | {"COMPENSATION_FAILED"}
                                               for s in states.values()):
                break
            time.sleep(1)
        result.settled_after_s = time.monotonic() - chaos_end
        values = list(states.values())
        result.lost = len(ids) - len(states)
        result.completed = values.count("COMPLETED")
        result.compensated = values.count("COMPENSATED")
        result.parked = values.count("COMPENSATION_FAILED")
        result.not_terminal = len(states) - result.completed - result.compensated - result.parked
        redrives = cluster.redrives()
        result.redrives = len(redrives)
        result.redriven_sagas = len({r["saga"] for r in redrives})
        result.slowest_recovery_s = max((r["stalled_s"] for r in redrives), default=0.0)
        audit = cluster.sagas_cli("audit", "--json", check=False)
        result.audit = json.loads(audit.stdout) if audit.stdout.strip() else {
            "ok": False, "violations": [audit.stderr]}
        result.doubled = sum(1 for v in result.audit.get("violations", [])
                             if isinstance(v, dict) and v.get("rule") not in NOT_DOUBLED)
        logs = cluster.logs()
        beat = (root / "beat.log").read_text(errors="replace")
        result.redeliveries = _beyond_first(_RECEIVED, logs)
        result.duplicates_absorbed = _beyond_first(_SUCCEEDED, logs)
        result.outage_lines = (logs + beat).count("saga store unavailable")
        result.tracebacks = len(_STORE_TRACEBACK.findall(logs + beat))
    finally:
        cluster.stop()
        if pg is not None:
            pg.close()
    result.wall_s = time.monotonic() - began
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sagas", type=int, default=1000)
    parser.add_argument("--kill-seconds", type=float, default=60.0)
    parser.add_argument("--fault-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--broker", choices=BROKERS, default=broker_kind(),
                        help="redis (its own redis-server) or rabbitmq (a vhost of its own on "
                        "SAGAS_TEST_AMQP_URL, made with rabbitmqctl); default SAGAS_TEST_BROKER")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite",
                        help="sqlite: a fresh file; postgresql: a private cluster (initdb, a "
                        "free port) restarted twice mid-run")
    parser.add_argument("--db-down-seconds", type=float, default=30.0)
    parser.add_argument("--json", action="store_true", help="one JSON line, no summary")
    args = parser.parse_args(argv)
    if args.database == "postgresql":
        ready, why = pgcluster.available()
        if not ready:
            print(f"chaos on PostgreSQL SKIPPED: {why}")
            return 1 if os.environ.get("CI", "").lower() == "true" else 0
    cfg = ChaosConfig(sagas=args.sagas, kill_for=args.kill_seconds, fault_rate=args.fault_rate,
                      seed=args.seed, database=args.database, db_down_s=args.db_down_seconds,
                      broker=args.broker)
    root = Path(tempfile.mkdtemp(prefix="sagas-chaos-"))
    result = run_chaos(cfg, root)
    if not args.json:
        print(result.summary())
        if not result.audit.get("ok"):
            print(json.dumps(result.audit.get("violations", [])[:20], indent=2))
    print(json.dumps({k: v for k, v in asdict(result).items() if k != "audit"}
                     | {"audit_ok": result.audit.get("ok"), "ok": result.ok}))
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
