"""`make demo`'s program: Ctrl-C in the middle stops every process it started, promptly."""

from __future__ import annotations

import os
import re
import shlex
import shutil
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


def _fresh_clone(dest: Path) -> Path:
    """The checkout's files as a fresh clone has them (tracked, plus new files not ignored): no
    venv, no var/, no caches."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.mark.slow
def test_a_cold_make_demo_in_a_fresh_clone_is_under_a_minute_and_its_printed_commands_work(
    tmp_path: Path,
):
    """Only python3 on PATH, empty pip/uv caches: install, services, sagas, each with progress;
    then the commands the demo prints, run as printed, read the sagas it ran."""
    clone = _fresh_clone(tmp_path / "clone")
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL", "SAGAS_APP", "SAGAS_IMPORTS", "VIRTUAL_ENV",
                        "PYTHONPATH", "PIP_NO_CACHE_DIR", "COLUMNS")}
    env.update(PATH=path, PIP_CACHE_DIR=str(tmp_path / "pip-cache"),
               UV_CACHE_DIR=str(tmp_path / "uv-cache"))
    began = time.monotonic()
    demo = subprocess.run(["make", "demo"], cwd=clone, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300, check=False)
    took = time.monotonic() - began
    out = demo.stdout  # both streams, in the order a terminal shows them
    assert demo.returncode == 0, out[-4000:]
    assert took < 60, f"a cold make demo took {took:.0f}s:\n{out[-4000:]}"
    installed = re.search(r"Installed \d+ packages|Successfully installed sagas|"
                          r"Successfully installed .* sagas-", out)  # uv's, or pip's
    assert installed, f"the installer's progress:\n{out[:4000]}"
    phases = ["installing the engine and what the demo needs", installed.group(0),
              "starting one worker per queue", "4 workers ready; starting 20 order sagas",
              "sagas settled: 20/20", "every saga ended as expected"]
    at = [out.find(phase) for phase in phases]
    assert -1 not in at and at == sorted(at), f"progress, in order: {phases}\n{out[-4000:]}"
    for line in demo.stdout.splitlines():
        assert "…" not in line, f"a cut cell: {line}"

    printed = [line.strip() for line in demo.stdout.splitlines()
               if line.strip().startswith(".venv/bin/sagas ")]
    show = next(line for line in printed if " show " in line)
    saga_id = show.split()[-1]
    assert len(saga_id) == 36, show
    env_cli = {k: v for k, v in env.items() if k != "COLUMNS"} | {"COLUMNS": "80"}
    for line in printed:
        ran = subprocess.run(shlex.split(line), cwd=clone, env=env_cli, capture_output=True,
                             text=True, timeout=60, check=False)
        assert ran.returncode == 0, f"{line}: {ran.stderr}"
        assert "COMPENSATED" in ran.stdout
    shown = subprocess.run([*shlex.split(show)[:-1], saga_id[:8]], cwd=clone, env=env_cli,
                           capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0 and saga_id in shown.stdout, shown.stderr
    assert "input: " in shown.stdout and "result of reserve_inventory" in shown.stdout
    # At 80 columns the history's step names and states are whole, never folded.
    assert re.search(r"^\s*[\d:.]+\s+reserve_inventory\s+SUCCEEDED\s+COMPENSATING\s+1\s*$",
                     shown.stdout, re.M), shown.stdout
