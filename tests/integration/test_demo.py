"""`make demo`'s program: Ctrl-C in the middle stops every process it started, promptly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _demo_children(pid: int) -> list[str]:
    found = subprocess.run(["pgrep", "-af", f"-n {'.*'}-{pid}@"], capture_output=True,
                           text=True, check=False)
    return [line for line in found.stdout.splitlines() if "celery" in line]


def test_ctrl_c_in_the_middle_of_the_demo_stops_every_worker_within_3_seconds(tmp_path: Path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "BROKER_URL", "DATABASE_URL", "SAGAS_APP", "SAGAS_IMPORTS")}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path}/demo.db", PYTHONPATH=str(ROOT))
    log = tmp_path / "demo.out"
    with open(log, "wb") as out:
        demo = subprocess.Popen([sys.executable, "-m", "tasks.demo", "--orders", "200"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        workers_log = tmp_path / "var" / "log"
        while time.monotonic() < deadline:
            assert demo.poll() is None, log.read_text()
            ready = [p for p in workers_log.glob("worker-*.log") if b" ready." in p.read_bytes()]
            if len(ready) == 4:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the demo's workers never came up:\n{log.read_text()}")
        time.sleep(1.0)  # sagas are running now
        interrupted = time.monotonic()
        demo.send_signal(signal.SIGINT)
        code = demo.wait(20)
        took = time.monotonic() - interrupted
    finally:
        if demo.poll() is None:
            demo.kill()
    text = log.read_text()
    assert took < 3.0, f"Ctrl-C took {took:.1f}s:\n{text}"
    assert code == 130, text
    assert "interrupted: stopped worker inventory, worker payment, worker shipping, worker saga" \
        in text and "and the private Redis" in text, text
    assert "Traceback" not in text, text
    assert _demo_children(demo.pid) == [], "a worker outlived the demo"
