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

from tests.chaos.cluster import Cluster
from tests.support.services import BROKERS, broker_kind

TERMINAL = {"COMPLETED", "COMPENSATED"}
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
    broker: str = field(default_factory=broker_kind)

    @property
    def settle_bound(self) -> float:
        """Every saga terminal within this after the last disruption: a stalled step waits out
        its deadline, then one reconciler interval, then its remaining steps run (a second
        stall at most, for a saga whose re-drive was itself lost), plus a drain margin."""
        return 2 * (ORDER_STEP_DEADLINE + self.recovery_interval) + 30 + self.sagas / 20


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
    broker_restarts: int = 0
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

    def summary(self) -> str:
        audit = "clean" if self.audit.get("ok") else (
            f"{len(self.audit.get('violations', []))} violations")
        return "\n".join([
            "chaos summary",
            f"  sagas                        {self.sagas}",
            f"  completed                    {self.completed}",
            f"  compensated                  {self.compensated}",
            f"  parked (COMPENSATION_FAILED) {self.parked}",
            f"  not terminal                 {self.not_terminal}",
            f"  workers killed whole         {self.worker_kills}",
            f"  pool processes killed        {self.pool_kills}",
            f"  broker lost everything       {self.broker_restarts} ({self.broker})",
            f"  starts whose publish failed  {self.publish_errors}",
            f"  sagas re-driven by recovery  {self.redriven_sagas} ({self.redrives} steps)",
            f"  duplicate deliveries absorbed {self.redeliveries} (step deliveries beyond the"
            " first: retries, worker-lost re-sends, re-drives; same idempotency key, and the"
            " audit shows no effect doubled)",
            f"    ran to success again       {self.duplicates_absorbed} (callback ignored)",
            f"  slowest recovery             {self.slowest_recovery_s:.1f}s after last progress",
            f"  all terminal                 {self.settled_after_s:.1f}s after the chaos ended "
            f"(bound {self.settle_bound_s:.0f}s)",
            f"  audit                        {audit}",
            f"  wall time                    {self.wall_s:.0f}s; logs in {self.log_dir}",
        ])


def _kill_loop(cluster: Cluster, cfg: ChaosConfig, result: ChaosResult, rng: random.Random,
               stop: threading.Event) -> None:
    began = time.monotonic()
    broker_fault: threading.Thread | None = None
    try:
        while not stop.wait(cfg.kill_every):
            elapsed = time.monotonic() - began
            if elapsed > cfg.kill_for:
                return
            if broker_fault is None and elapsed >= cfg.kill_for / 2:
                # Beside the kills, not instead of them: RabbitMQ's fault takes seconds.
                broker_fault = threading.Thread(target=cluster.restart_broker, daemon=True)
                broker_fault.start()
                result.broker_restarts += 1
                continue
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
    finally:
        if broker_fault is not None:
            broker_fault.join(120)


_STEP_TASK = r"Task (?:inventory|payment|shipping)\.\w+\[(\S+?)\.(\w+)\.(do|undo)\.\d+\] "
_RECEIVED = re.compile(_STEP_TASK + "received")
_SUCCEEDED = re.compile(_STEP_TASK + "succeeded")


def _beyond_first(pattern: re.Pattern[str], logs: str) -> int:
    runs = Counter(m.groups() for m in pattern.finditer(logs))
    return sum(n - 1 for n in runs.values())


def run_chaos(cfg: ChaosConfig, root: Path) -> ChaosResult:
    began = time.monotonic()
    rng = random.Random(cfg.seed)
    cluster = Cluster(root, database_url=cfg.database_url, env={
        "FAULT_RATE": str(cfg.fault_rate),
        "RECOVERY_INTERVAL": str(cfg.recovery_interval),
        "STEP_TIMEOUT": str(ORDER_STEP_DEADLINE),
        "RECOVERY_GRACE": str(RECOVERY_GRACE),
        "STARTING_STOCK": json.dumps({"laptop": 100_000, "phone": 100_000, "book": 100_000}),
        "SAGAS_IMPORTS": "",
    }, broker=cfg.broker)
    result = ChaosResult(log_dir=str(root), settle_bound_s=cfg.settle_bound, broker=cfg.broker)
    try:
        cluster.migrate()
        cluster.start_workers({q: (q, cfg.concurrency) for q in QUEUES})
        cluster.start_beat()
        stop = threading.Event()
        killer = threading.Thread(target=_kill_loop, args=(cluster, cfg, result, rng, stop),
                                  daemon=True)
        submit = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.client", "orders", str(cfg.sagas),
             "--over", str(cfg.over_limit), "--duration", str(cfg.kill_for * 0.75),
             "--seed", str(cfg.seed)],
            cwd=Path(__file__).resolve().parents[2], env=cluster.env,
            stdout=subprocess.PIPE, stderr=open(root / "client.log", "wb"),  # noqa: SIM115
            text=True,
        )
        killer.start()
        out, _ = submit.communicate(timeout=cfg.kill_for * 4 + 300)
        killer.join(cfg.kill_for + 60)
        stop.set()
        chaos_end = time.monotonic()
        submitted = json.loads(out.strip().splitlines()[-1])
        ids: list[str] = submitted["ids"]
        result.sagas = len(ids)
        result.publish_errors = submitted["publish_errors"]
        cluster.ensure_workers()

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
        result.completed = values.count("COMPLETED")
        result.compensated = values.count("COMPENSATED")
        result.parked = values.count("COMPENSATION_FAILED")
        result.not_terminal = len(ids) - result.completed - result.compensated - result.parked
        redrives = cluster.redrives()
        result.redrives = len(redrives)
        result.redriven_sagas = len({r["saga"] for r in redrives})
        result.slowest_recovery_s = max((r["stalled_s"] for r in redrives), default=0.0)
        audit = cluster.sagas_cli("audit", "--json", check=False)
        result.audit = json.loads(audit.stdout) if audit.stdout.strip() else {
            "ok": False, "violations": [audit.stderr]}
        logs = cluster.logs()
        result.redeliveries = _beyond_first(_RECEIVED, logs)
        result.duplicates_absorbed = _beyond_first(_SUCCEEDED, logs)
    finally:
        cluster.stop()
    result.wall_s = time.monotonic() - began
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__)
    parser.add_argument("--sagas", type=int, default=1000)
    parser.add_argument("--kill-seconds", type=float, default=60.0)
    parser.add_argument("--fault-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--broker", choices=BROKERS, default=broker_kind(),
                        help="redis (its own redis-server) or rabbitmq (a vhost of its own on "
                        "SAGAS_TEST_AMQP_URL, made with rabbitmqctl); default SAGAS_TEST_BROKER")
    parser.add_argument("--database-url", default=os.environ.get("CHAOS_DATABASE_URL"),
                        help="default: a fresh SQLite file")
    args = parser.parse_args(argv)
    cfg = ChaosConfig(sagas=args.sagas, kill_for=args.kill_seconds, fault_rate=args.fault_rate,
                      seed=args.seed, database_url=args.database_url, broker=args.broker)
    root = Path(tempfile.mkdtemp(prefix="sagas-chaos-"))
    result = run_chaos(cfg, root)
    print(result.summary())
    print(json.dumps({k: v for k, v in asdict(result).items() if k != "audit"}
                     | {"audit_ok": result.audit.get("ok")}))
    ok = result.not_terminal == 0 and result.parked == 0 and bool(result.audit.get("ok"))
    if not result.audit.get("ok"):
        print(json.dumps(result.audit.get("violations", [])[:20], indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
