"""`make up`: the Procfile's processes under supervisord, and what one dead worker does to them.

The stack is started as the Makefile's ``up`` target starts it (``supervisord -c
supervisord.conf`` with the venv on PATH and ``SAGAS_RUN_DIR``), on free ports, with a broker
and a database of its own. A worker SIGKILLed (``kill -9``) leaves every other process running
and is started again, Flower (still the same process) sees the new worker, and orders go on
completing; a worker an operator stops stays stopped, shows offline in Flower, and its queue
waits for it. ``supervisorctl`` is how an operator sees each program's state.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import private_broker
from tests.support.services import RedisServer
from tests.support.stack import (
    BIN,
    ROOT,
    flower_workers,
    get_until,
    metric,
    node_pid,
    order_settles,
    place_order,
    stack_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROGRAMS = {"web", "beat", "flower", "relay", "worker_inventory", "worker_payment",
            "worker_shipping", "worker_saga"}


@dataclass
class Stack:
    env: dict[str, str]
    run_dir: Path
    process: subprocess.Popen[bytes]
    console: Path

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.env['PORT']}"

    @property
    def flower(self) -> str:
        return f"http://127.0.0.1:{self.env['FLOWER_PORT']}"

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "supervisorctl"), "-c", str(ROOT / "supervisord.conf"),
                               *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=120, check=False)

    def status(self) -> dict[str, tuple[str, int | None]]:
        """``supervisorctl status``: program -> (state, pid)."""
        out: dict[str, tuple[str, int | None]] = {}
        for line in self.ctl("status").stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2:
                pid = re.search(r"pid (\d+)", line)
                out[parts[0]] = (parts[1], int(pid.group(1)) if pid else None)
        return out

    def log(self) -> str:
        logs = [self.console.read_text(errors="replace")]
        for path in sorted((self.run_dir / "log").glob("*.log")):
            logs.append(f"==> {path.name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(logs)

    def wait_status(self, program: str, state: str, timeout: float = 60,
                    not_pid: int | None = None) -> int | None:
        deadline = time.monotonic() + timeout
        seen: tuple[str, int | None] = ("?", None)
        while time.monotonic() < deadline:
            seen = self.status().get(program, ("?", None))
            if seen[0] == state and (not_pid is None or seen[1] != not_pid):
                return seen[1]
            time.sleep(0.3)
        pytest.fail(f"{program} is {seen}, not {state}:\n{self.log()[-6000:]}")


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("make-up")
    run_dir = tmp / "run"
    (run_dir / "log").mkdir(parents=True)
    # make up: PATH="$(CURDIR)/$(BIN):$PATH" SAGAS_RUN_DIR=... supervisord -c supervisord.conf
    env = stack_env(tmp, private_broker("make-up", 8), redis_server.url_db(8),
                    SAGAS_RUN_DIR=str(run_dir))
    console = tmp / "console.log"
    with open(console, "wb") as out:
        process = subprocess.Popen([str(BIN / "supervisord"), "-c", "supervisord.conf"],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    stack = Stack(env, run_dir, process, console)
    try:
        get_until(f"{stack.web}/healthz", lambda r: r.status_code == 200, "web health",
                  stack.log, timeout=90)
        get_until(f"{stack.flower}/healthcheck", lambda r: r.status_code == 200, "flower",
                  stack.log)
        for program in PROGRAMS:
            stack.wait_status(program, "RUNNING")
        yield stack
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # supervisord stops every program, then itself
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def node(program: str) -> str:
    """The Celery node name a program's worker has: ``-n ${SUPERVISOR_PROCESS_NAME}@%h``."""
    return f"{program}@{socket.gethostname()}"


def wait_flower(stack: Stack, wanted: dict[str, bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    seen: dict[str, bool] = {}
    while time.monotonic() < deadline:
        seen = flower_workers(stack.flower, status=1)
        if all(seen.get(name) is alive for name, alive in wanted.items()):
            return
        time.sleep(0.3)
    pytest.fail(f"Flower shows {seen}, wanted {wanted}:\n{stack.log()[-4000:]}")


def test_a_sigkilled_worker_is_restarted_and_nothing_else_stops(stack: Stack):
    before = stack.status()
    assert {p for p, (state, _) in before.items() if state == "RUNNING"} == PROGRAMS, before
    wait_flower(stack, {node("worker_payment"): True})
    killed = before["worker_payment"][1]
    assert killed is not None and node_pid(stack.flower, node("worker_payment")) == killed

    os.kill(killed, signal.SIGKILL)  # kill -9, the worker's main process
    back = stack.wait_status("worker_payment", "RUNNING", not_pid=killed)
    assert "exited: worker_payment (terminated by SIGKILL; not expected)" in \
        stack.console.read_text()
    # Every other process is the one that was there before: nothing else stopped.
    after = stack.status()
    for program in PROGRAMS - {"worker_payment"}:
        assert after[program] == before[program], (program, before[program], after[program])
    assert stack.process.poll() is None
    # Flower, never restarted, reports the node again, now with the new process.
    deadline = time.monotonic() + 60
    while node_pid(stack.flower, node("worker_payment")) != back:
        assert time.monotonic() < deadline, f"Flower never saw pid {back}:\n{stack.log()}"
        time.sleep(0.5)
    wait_flower(stack, {node("worker_payment"): True})
    # And the payment queue is served again: an order goes through every pool.
    order = place_order(stack.web)
    assert order_settles(stack.web, order, stack.log) == "COMPLETED"


def test_a_worker_an_operator_stops_stays_down_shows_offline_and_its_queue_waits(stack: Stack):
    before = stack.status()
    stopped = stack.ctl("stop", "worker_shipping")
    assert stopped.returncode == 0 and "worker_shipping: stopped" in stopped.stdout, stopped
    time.sleep(3)  # supervisord restarts what exits on its own, never what it was told to stop
    assert stack.status()["worker_shipping"] == ("STOPPED", None)
    wait_flower(stack, {node("worker_shipping"): False, node("worker_payment"): True})
    after = stack.status()
    for program in PROGRAMS - {"worker_shipping"}:
        assert after[program] == before[program], program

    order = place_order(stack.web)
    waiting = get_until(
        f"{stack.web}/orders/{order}",
        lambda r: (r.json().get("steps") or {}).get("ship_order") == "RUNNING",
        "the order to reach its shipping step", stack.log)
    assert waiting.json()["status"] == "RUNNING", "it waits for shipping, nothing fails"

    started = stack.ctl("start", "worker_shipping")
    assert started.returncode == 0 and "worker_shipping: started" in started.stdout, started
    assert order_settles(stack.web, order, stack.log) == "COMPLETED"
    wait_flower(stack, {node("worker_shipping"): True})


def test_the_web_apps_metrics_count_what_the_stacks_workers_did(stack: Stack):
    """Out of the box: the Procfile's commands share var/metrics, emptied by the first one."""
    order = place_order(stack.web)
    assert order_settles(stack.web, order, stack.log) == "COMPLETED"
    completed = httpx.get(f"{stack.web}/sagas", params={"state": "COMPLETED"}, timeout=10)
    scraped = httpx.get(f"{stack.web}/metrics", timeout=10).text
    counted = metric(scraped, "sagas_finished_total", saga="order", state="COMPLETED")
    assert counted == completed.json()["total"] >= 1, scraped[-2000:]
