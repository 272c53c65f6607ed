"""Processes the example and packaging tests run as a user would: workers, the CLI, a Redis.

Kept here rather than in ``tests/support`` so these tests depend on nothing of the sample app:
every subprocess gets an environment built from scratch (``clean_env``), never the sample's
``SAGAS_APP`` / ``DATABASE_URL`` / ``REDIS_URL`` / ``BROKER_URL`` that ``tests/conftest.py``
exports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sagas.devtools.localredis import free_port, start_redis_server

SAMPLE_ENV = ("SAGAS_APP", "SAGAS_IMPORTS", "DATABASE_URL", "REDIS_URL", "BROKER_URL",
              "PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "SAGAS_LISTENERS")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the sample app's settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in SAMPLE_ENV}
    env.update(extra)
    return env


class PrivateRedis:
    """A loopback redis-server on a free port, for one module or session."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process = start_redis_server(self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class Worker:
    """``python -m celery -A <app> worker -P prefork`` in its own session, logging to a file."""

    def __init__(self, python: str, app: str, queues: Iterable[str], *, cwd: Path,
                 env: Mapping[str, str], log_dir: Path, name: str, concurrency: int = 2) -> None:
        self.args = [
            python, "-m", "celery", "-A", app, "worker", "-P", "prefork",
            "-c", str(concurrency), "-Q", ",".join(queues), "-n", f"{name}-{os.getpid()}@%h",
            "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]
        self.cwd = cwd
        self.env = dict(env)
        self.name = name
        self.log_path = log_dir / f"worker-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.args, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.log()}")
            if b" ready." in self.log_path.read_bytes():
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready in {timeout}s:\n{self.log()}")

    def terminate(self) -> None:
        """Ask for a warm shutdown (the whole session: main process and pool)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self, timeout: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.terminate()
            self.process.wait(timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def stop_all(workers: Iterable[Worker]) -> None:
    """Stop several workers at once: all are asked first, then each is waited for."""
    workers = list(workers)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.stop()


def run(args: list[str], *, cwd: Path, env: Mapping[str, str], timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=dict(env), capture_output=True, text=True,
                          timeout=timeout, check=False)


def run_all(commands: Iterable[list[str]], *, cwd: Path, env: Mapping[str, str],
            timeout: float = 120) -> list[subprocess.CompletedProcess[str]]:
    """Several commands at the same time (each CLI call pays its imports); results in order."""
    commands = list(commands)
    with ThreadPoolExecutor(max_workers=max(1, len(commands))) as pool:
        return list(pool.map(lambda c: run(c, cwd=cwd, env=env, timeout=timeout), commands))


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return (f"$ {' '.join(map(str, result.args))}\nexit {result.returncode}\n"
            f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
