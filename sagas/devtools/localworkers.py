"""Worker processes started on this machine, as an operator would start them (demo, bench)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


class LocalWorker:
    def __init__(
        self, queues: str, *, app: str, concurrency: int = 1, name: str | None = None,
        env: Mapping[str, str] | None = None, log_dir: Path = Path("var/log"),
        pool: str = "prefork",
    ) -> None:
        self.queues = queues
        self.app = app
        self.concurrency = concurrency
        self.name = name or queues.replace(",", "-")
        self.env = dict(env if env is not None else os.environ)
        self.pool = pool
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"worker-{self.name}-{os.getpid()}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> LocalWorker:
        self.log_path.write_bytes(b"")
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", self.app, "worker", "-Q", self.queues,
             "-c", str(self.concurrency), "-P", self.pool, "-n", f"{self.name}-{os.getpid()}@%h",
             "--loglevel=INFO", "--without-gossip", "--without-mingle"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited early; see {self.log_path}")
            if b" ready." in self.log_path.read_bytes():
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready after {timeout}s; see {self.log_path}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Signal the worker's whole process group (main process and pool), if it runs."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        except ProcessLookupError:
            pass


def stop_all(workers: list[LocalWorker], grace: float = 2.0) -> list[str]:
    """Stop every worker at once: SIGTERM to all, SIGKILL to what still runs after ``grace``.

    Returns the names of the workers that were running (for a line saying what stopped).
    """
    running = [w for w in workers if w.running]
    for worker in running:
        worker.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(w.running for w in running) and time.monotonic() < deadline:
        time.sleep(0.05)
    for worker in running:
        if worker.running:
            worker.signal(signal.SIGKILL)
    for worker in running:
        if worker.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(2)
    return [w.name for w in running]
