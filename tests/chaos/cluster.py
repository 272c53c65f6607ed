"""A private deployment for the recovery, delivery and chaos tests: its own Redis, database,
worker processes and beat, driven only through processes and SQL, never through this process's
Celery app (which stays on the session's broker for the other tests).

The broker is its Redis, or with ``broker="rabbitmq"`` (default: ``SAGAS_TEST_BROKER``) a
RabbitMQ vhost of its own; the result backend is its Redis either way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from sagas.store.log import entry_of
from sagas.store.sql import Store, log_t, sagas_t
from tests.support.services import (
    RabbitVhost,
    RedisServer,
    broker_kind,
    create_vhost,
    start_redis,
)
from tests.support.workers import ROOT, WorkerProcess

CRASH_IMPORTS = "tests.support.test_sagas,tests.chaos.crash_sagas"
SETTLED = {"COMPLETED", "COMPENSATED", "COMPENSATION_FAILED", "FORWARD_FAILED"}
SAGAS_CLI = "import sys; from sagas.ops.cli import main; sys.argv[0] = 'sagas'; main()"


class Cluster:
    def __init__(self, root: Path, database_url: str | None = None,
                 env: dict[str, str] | None = None, broker: str | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.broker = broker or broker_kind()
        self.redis: RedisServer = start_redis()
        self.vhost: RabbitVhost | None = (
            create_vhost("cluster") if self.broker == "rabbitmq" else None)
        self.database_url = database_url or f"sqlite:///{root}/sagas.db"
        self.env = dict(os.environ)
        self.env.update(
            REDIS_URL=self.redis.url, BROKER_URL=self.broker_url,
            DATABASE_URL=self.database_url,
            SAGAS_APP="config", SAGAS_IMPORTS=CRASH_IMPORTS, CRASHY_DIR=str(root / "crashy"),
            PYTHONPATH=str(ROOT), RECOVERY_INTERVAL="1", STEP_TIMEOUT="3",
            CI=os.environ.get("CI", ""),
            # One order per customer at a time (the sample's semantic lock, under the faults);
            # its sku lock would leave three sagas in flight and little for a fault to hit.
            ORDER_LOCKS="customer",
        )
        self.env.update(env or {})
        self.workers: dict[str, WorkerProcess] = {}
        self.beat: subprocess.Popen[bytes] | None = None
        self.store = Store(self.database_url)
        self.restarts = 0

    # --- processes -----------------------------------------------------------
    def run(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """A command in this deployment's environment, from the repository root."""
        result = subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def sagas_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("-c", SAGAS_CLI, *args, check=check)

    def client(self, *args: str) -> dict[str, Any]:
        out = self.run("-m", "tests.chaos.client", *args, timeout=600).stdout
        return json.loads(out.strip().splitlines()[-1])

    def migrate(self) -> None:
        self.sagas_cli("db", "upgrade")
        self.run("-m", "tasks.migrate")  # the sample's own tables, apart from the engine's

    def start_worker(self, name: str, queues: str, concurrency: int = 2) -> WorkerProcess:
        worker = WorkerProcess(self.env, queues=queues, concurrency=concurrency, name=name,
                               log_dir=self.root).start()
        self.workers[name] = worker
        return worker

    def start_workers(self, specs: dict[str, tuple[str, int]]) -> None:
        for name, (queues, concurrency) in specs.items():
            self.start_worker(name, queues, concurrency)
        for worker in self.workers.values():
            worker.wait_ready(60)

    def restart_worker(self, name: str, wait: bool = True) -> WorkerProcess:
        old = self.workers[name]
        old.stop(signal.SIGKILL, timeout=5)
        worker = self.start_worker(name, old.queues, old.concurrency)
        self.restarts += 1
        if wait:
            worker.wait_ready(60)
        return worker

    def ensure_workers(self) -> None:
        """Restart every worker that died (a test's crash killed it)."""
        for name, worker in list(self.workers.items()):
            if worker.process is None or worker.process.poll() is not None:
                self.restart_worker(name)

    def wait_worker_dead(self, name: str, timeout: float = 30) -> None:
        worker = self.workers[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if worker.process is not None and worker.process.poll() is not None:
                return
            time.sleep(0.05)
        raise AssertionError(f"worker {name} still alive after {timeout}s")

    def pool_children(self, name: str) -> list[int]:
        worker = self.workers[name]
        if worker.process is None or worker.process.poll() is not None:
            return []
        import psutil

        try:
            return [c.pid for c in psutil.Process(worker.process.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def start_beat(self) -> None:
        log = open(self.root / "beat.log", "ab")  # noqa: SIM115 - lives as long as beat
        self.beat = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config", "beat", "--loglevel=INFO",
             "-s", str(self.root / "beat-schedule")],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ensure_beat(self) -> bool:
        """Start beat again if it died, as the Procfile's supervisor does (beat exits when the
        broker refuses it at connect: RabbitMQ's lock-out while it was starting). True if so."""
        if self.beat is None or self.beat.poll() is None:
            return False
        self.start_beat()
        return True

    @property
    def broker_url(self) -> str:
        return self.vhost.url if self.vhost is not None else self.redis.url

    def restart_broker(self) -> None:
        """The broker loses every message: Redis restarted empty (every queued and unacked
        message gone). RabbitMQ keeps durable queues across a restart, so there the fault is
        harsher than a restart (``RabbitVhost.lose_everything``): clients locked out, every
        connection closed, the task queues purged, clients let back in; the result backend's
        Redis is restarted empty too."""
        port = self.redis.port
        self.redis.stop(kill=True)
        self.redis = start_redis(port)
        if self.vhost is not None:
            queues = {q for w in list(self.workers.values()) for q in w.queues.split(",")}
            self.vhost.lose_everything(*sorted(queues))

    def wipe_broker(self) -> None:
        """The broker forgets everything while its server stays up: Redis ``FLUSHALL`` (every
        queued and unacked message and every stored result gone, connections kept); on
        RabbitMQ ``RabbitVhost.lose_everything`` and a FLUSHALL of the result backend."""
        import redis

        client = redis.Redis.from_url(self.redis.url)
        try:
            client.flushall()
        finally:
            client.close()
        if self.vhost is not None:
            queues = {q for w in list(self.workers.values()) for q in w.queues.split(",")}
            self.vhost.lose_everything(*sorted(queues))

    def state_counts(self) -> dict[str, int]:
        """Sagas per state, all of this deployment's."""
        from sqlalchemy import func

        with self.store.read() as conn:
            rows = conn.execute(select(sagas_t.c.state, func.count()).group_by(sagas_t.c.state))
            return {str(state): int(n) for state, n in rows}

    def queue_depth(self, queue: str) -> int:
        """Messages waiting in ``queue`` on this deployment's broker."""
        if self.vhost is not None:
            return self.vhost.depth(queue)
        import redis

        return int(redis.Redis.from_url(self.redis.url).llen(queue))

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop(signal.SIGKILL, timeout=5)
        if self.beat is not None and self.beat.poll() is None:
            os.killpg(self.beat.pid, signal.SIGKILL)
            self.beat.wait(10)
        self.redis.stop(kill=True)
        if self.vhost is not None:
            self.vhost.delete()
        from sagas.store.connect import _engines

        for key in [k for k in _engines if k[1] == self.database_url]:
            _engines.pop(key).dispose()

    def logs(self) -> str:
        text = "\n".join(w.log() for w in self.workers.values())
        for path in sorted(self.root.glob("worker-*.log")):
            if all(path != w.log_path for w in self.workers.values()):
                text += "\n" + path.read_text(errors="replace")
        return text

    # --- the test participants' ledger (tests/chaos/crash_sagas.py) ---------------
    def effect(self, key: str, phase: str = "action") -> bool:
        from tests.chaos.crash_sagas import effects

        return effects(key, phase, Path(self.env["CRASHY_DIR"]))

    def calls(self, saga_id: str, step: str, phase: str = "action") -> int:
        from tests.chaos.crash_sagas import calls

        return calls(saga_id, step, phase, Path(self.env["CRASHY_DIR"]))

    # --- SQL, the truth --------------------------------------------------------
    def view(self, saga_id: str) -> dict[str, Any]:
        return self.store.get_view(saga_id)

    def wait_for(self, saga_id: str, states: Iterable[str] = SETTLED, timeout: float = 60
                 ) -> dict[str, Any]:
        wanted = set(states)
        deadline = time.monotonic() + timeout
        view: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                view = self.view(saga_id)
            except Exception:
                view = {}
            if view.get("state") in wanted:
                return view
            time.sleep(0.1)
        raise AssertionError(f"saga {saga_id} not in {wanted} after {timeout}s: {view}\n"
                             f"worker logs: {self.root}")

    def states(self, saga_ids: list[str] | None = None) -> dict[str, str]:
        query = select(sagas_t.c.id, sagas_t.c.state)
        if saga_ids is not None:
            query = query.where(sagas_t.c.id.in_(saga_ids))
        with self.store.read() as conn:
            return {str(r.id): str(r.state) for r in conn.execute(query)}

    def redrives(self) -> list[dict[str, Any]]:
        """Every re-drive by recovery, with how long its saga had made no progress."""
        with self.store.read() as conn:
            rows = conn.execute(
                select(log_t.c.saga_id, log_t.c.seq, log_t.c.at, log_t.c.cause, log_t.c.step,
                       log_t.c.saga_state, log_t.c.transitions, log_t.c.result)
                .order_by(log_t.c.saga_id, log_t.c.seq)
            ).all()
        out: list[dict[str, Any]] = []
        last_progress: dict[str, datetime] = {}
        for r in rows:
            entry = entry_of(r[1:])
            for t in entry.transitions:
                if t.step is not None and t.keeps_error and entry.cause == "Redrive":
                    since = last_progress.get(r.saga_id, entry.at)
                    out.append({"saga": r.saga_id, "step": t.step, "at": entry.at,
                                "stalled_s": (entry.at - since).total_seconds()})
            if entry.cause != "Redrive":
                last_progress[r.saga_id] = entry.at
        return out
