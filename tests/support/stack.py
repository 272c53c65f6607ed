"""The sample's whole stack as an operator starts it: the Procfile under honcho, or the same
commands under supervisord (``make up``), on free ports, with a broker and database of its own.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FLOWER_AUTH = ("ops", "stack-test-pass")


def procfile() -> dict[str, str]:
    """The Procfile's entries: name -> command."""
    entries: dict[str, str] = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, command = line.split(":", 1)
            entries[name.strip()] = command.strip()
    return entries


def supervisor_programs() -> dict[str, dict[str, str]]:
    """supervisord.conf's ``[program:x]`` sections, options as written (no interpolation)."""
    parser = configparser.RawConfigParser()
    parser.read(ROOT / "supervisord.conf")
    return {section.split(":", 1)[1]: dict(parser.items(section))
            for section in parser.sections() if section.startswith("program:")}


def stack_env(tmp_path: Path, broker_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    """The environment an operator exports: this checkout's venv on PATH, free ports for the web
    app and Flower, a SQLite store and a beat schedule in ``tmp_path``."""
    from tests.support.services import free_port

    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "BROKER_URL": broker_url,
        "REDIS_URL": redis_url,
        "DATABASE_URL": f"sqlite:///{tmp_path}/stack.db",
        "PORT": str(free_port()),
        "FLOWER_PORT": str(free_port()),
        "FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH),
        "BEAT_SCHEDULE": str(tmp_path / "celerybeat-schedule"),
        "PYTHONPATH": str(ROOT),
        "SAGAS_IMPORTS": "",
    }
    for name in ("PROMETHEUS_MULTIPROC_DIR", "SAGAS_METRICS_PORT", "SAGAS_RUN_DIR"):
        env.pop(name, None)  # out of the box: whatever the Procfile says
    env.update(extra)
    return env


def get_until(url: str, ok: Callable[[httpx.Response], bool], what: str,
              log: Callable[[], str], timeout: float = 60, **kwargs: Any) -> httpx.Response:
    """GET ``url`` until ``ok``; fails with the tail of ``log()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx.get(url, timeout=5, **kwargs)
            if ok(response):
                return response
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} timed out; log:\n{log()[-4000:]}")
        time.sleep(0.3)


def place_order(web: str, **overrides: Any) -> str:
    body = {"customer_id": "stack", "item": "laptop", "quantity": 1, "price": 120, **overrides}
    response = httpx.post(f"{web}/orders", json=body, timeout=20)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def order_settles(web: str, order_id: str, log: Callable[[], str], timeout: float = 60) -> str:
    done = get_until(f"{web}/orders/{order_id}",
                     lambda r: r.json().get("status") in ("COMPLETED", "COMPENSATED"),
                     f"order {order_id} to settle", log, timeout)
    return str(done.json()["status"])


def metric(text: str, name: str, **labels: str) -> float | None:
    """One sample's value in Prometheus text, or None when it is not there."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def seed_earlier_run(metrics_dir: Path, finished: float) -> None:
    """Leave files in ``metrics_dir`` as an earlier run's processes would: ``finished``
    completed order sagas counted by a process that is gone."""
    metrics_dir.mkdir(parents=True, exist_ok=True)
    code = ("from sagas.observe import metrics; "
            f"metrics.SAGAS_FINISHED.labels('order', 'COMPLETED').inc({finished})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60,
                   env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                        "PYTHONPATH": str(ROOT)})
    assert list(metrics_dir.glob("counter_*.db")), "the earlier run left its counters"


def flower_workers(flower: str, **params: Any) -> dict[str, Any]:
    response = httpx.get(f"{flower}/api/workers", params=params, auth=FLOWER_AUTH, timeout=30)
    response.raise_for_status()
    return dict(response.json())


def node_pid(flower: str, node: str) -> int | None:
    """The pid Flower's inspection reports for ``node`` (None: not answering)."""
    info = flower_workers(flower, refresh=1, workername=node).get(node) or {}
    pid = (info.get("stats") or {}).get("pid")
    return int(pid) if pid else None


def unescape_supervisor(command: str) -> str:
    """A supervisord ``command`` as the shell gets it: %% is a literal %."""
    return re.sub(r"%%", "%", command)
