"""Real Celery worker processes, started the way an operator would start them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALL_QUEUES = "inventory,payment,shipping,saga,testsvc"


class WorkerProcess:
    def __init__(
        self, env: dict[str, str], queues: str = ALL_QUEUES, concurrency: int = 4,
        name: str = "w", log_dir: Path | None = None, extra: list[str] | None = None,
        app: str = "config", prefix: Sequence[str] = (),
    ) -> None:
        self.app = app
        self.prefix = list(prefix)  # e.g. ``ip netns exec <ns>``: a worker on a test host
        self.env = env
        self.queues = queues
        self.concurrency = concurrency
        self.name = name
        log_name = f"worker-{name}-{os.getpid()}-{time.time_ns()}.log"
        self.log_path = (log_dir or Path("/tmp")) / log_name
        self.extra = extra or []
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [
                *self.prefix, sys.executable, "-m", "celery", "-A", self.app, "worker",
                "-Q", self.queues, "-c", str(self.concurrency), "-P", "prefork",
                "-n", f"{self.name}-{os.getpid()}@%h", "--loglevel=INFO",
                "--without-gossip", "--without-mingle", *self.extra,
            ],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: see {self.log_path}")
            if self.log_path.exists() and b" ready." in self.log_path.read_bytes():
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready in {timeout}s: see {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
