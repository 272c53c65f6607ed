"""The deployment files: the Procfile runs under honcho, docker-compose.yml is a valid project.

``docker compose config`` needs only the docker client (no engine); it is skipped when no
compose client is installed (a failure under CI=true). The Procfile is not only parsed: honcho
starts every entry and an order placed over HTTP completes on the pools it started.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from config.queues import ALL_QUEUES
from tests.support.services import RedisServer, free_port, require_service

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ROLES = {"web", "beat", "flower", "relay", *(f"worker_{q}" for q in ALL_QUEUES)}


def procfile() -> dict[str, str]:
    entries: dict[str, str] = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, command = line.split(":", 1)
            entries[name.strip()] = command.strip()
    return entries


def test_the_procfile_has_web_beat_flower_relay_and_one_worker_entry_per_queue():
    entries = procfile()
    assert set(entries) == ROLES
    for queue in ALL_QUEUES:
        command = entries[f"worker_{queue}"]
        assert re.search(rf"celery -A config worker -Q {queue}(\s|$)", command), command
    assert "celery -A config flower" in entries["flower"]
    assert "celery -A config beat" in entries["beat"]
    assert entries["relay"] == "exec sagas -A config relay"
    assert "sagas -A config db upgrade" in entries["web"] and "tasks.migrate" in entries["web"]
    assert "uvicorn config.web:app" in entries["web"] and "$PORT" in entries["web"].replace(
        "${PORT:-8000}", "$PORT")
    check = subprocess.run([str(BIN / "honcho"), "check"], cwd=ROOT, capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stderr
    # honcho gives the first entry PORT=5000 unless told: `make up` serves where the README says.
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "MAKEFLAGS")}
    up = subprocess.run(["make", "-n", "up"], cwd=ROOT, env=env, capture_output=True, text=True,
                        check=False)
    assert "honcho start -p ${PORT:-8000}" in up.stdout, up.stdout + up.stderr
    readme = (ROOT / "README.md").read_text()
    assert "make up   (honcho start -p 8000: the web app on 8000)" in readme
    assert "5000" not in readme


@pytest.fixture
def honcho(redis_server: RedisServer, tmp_path: Path) -> Iterator[dict[str, Any]]:
    port, flower_port = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # A Redis database of its own: the session's workers must not take these tasks.
        "REDIS_URL": redis_server.url_db(7),
        "DATABASE_URL": f"sqlite:///{tmp_path}/honcho.db",
        "PORT": str(port),
        "FLOWER_PORT": str(flower_port),
        "BEAT_SCHEDULE": str(tmp_path / "celerybeat-schedule"),
        "PYTHONPATH": str(ROOT),
    }
    log = tmp_path / "honcho.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(BIN / "honcho"), "--no-colour", "start"], cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield {"web": f"http://127.0.0.1:{port}", "flower": f"http://127.0.0.1:{flower_port}",
               "log": log, "process": process}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def get_until(url: str, ok: Any, what: str, log: Path, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx.get(url, timeout=5)
            if ok(response):
                return response
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} timed out; honcho log:\n{log.read_text()[-4000:]}")
        time.sleep(0.3)


@pytest.mark.integration
def test_honcho_starts_every_entry_and_an_order_completes_on_its_worker_pools(
    honcho: dict[str, Any],
):
    log: Path = honcho["log"]
    get_until(f"{honcho['web']}/healthz", lambda r: r.status_code == 200, "web health", log)
    response = httpx.post(f"{honcho['web']}/orders", timeout=10,
                          json={"customer_id": "h1", "item": "laptop", "quantity": 1,
                                "price": 120})
    assert response.status_code == 202, response.text
    order_id = response.json()["id"]
    done = get_until(f"{honcho['web']}/orders/{order_id}",
                     lambda r: r.json().get("status") in ("COMPLETED", "COMPENSATED"),
                     "the order to settle", log)
    assert done.json()["status"] == "COMPLETED"
    get_until(f"{honcho['flower']}/healthcheck", lambda r: r.status_code == 200, "flower", log)
    text = log.read_text()
    for role in ROLES:
        assert f"{role}.1" in text, f"honcho did not start {role}:\n{text[-4000:]}"
    assert honcho["process"].poll() is None, "no entry exited (honcho stops all when one does)"


# --- docker compose ----------------------------------------------------------------
def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_is_valid_with_every_role_healthchecked():
    command = compose_command()
    # .ci/run installs one; locally its absence skips.
    require_service(command is not None, "a docker compose client (needs no engine)")
    assert command is not None
    env = {**os.environ, "ADMIN_TOKEN": "x"}
    result = subprocess.run([*command, "-f", str(ROOT / "docker-compose.yml"), "config"],
                            cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    services = service_blocks(result.stdout)
    assert {"redis", "postgres", "migrate", *ROLES} <= set(services)
    for name in ROLES | {"redis", "postgres"}:
        assert "healthcheck:" in services[name], f"{name} has no healthcheck"
        assert "container_name:" not in services[name], "a fixed name cannot --scale"
    for name in ROLES:
        assert "REDIS_URL: redis://redis:6379/0" in services[name]
        assert "DATABASE_URL: postgresql+psycopg://" in services[name]
    for queue in ALL_QUEUES:
        block = services[f"worker_{queue}"]
        assert re.search(rf"- -Q\n\s+- {queue}\n", block), block
        assert "ports:" not in block, "a published host port cannot --scale"


def service_blocks(rendered: str) -> dict[str, str]:
    """Each service's lines from ``compose config``'s YAML (the same layout in v1 and v2)."""
    body = rendered.split("\nservices:\n", 1)[-1] if not rendered.startswith("services:") \
        else rendered.split("services:\n", 1)[1]
    blocks: dict[str, str] = {}
    name = None
    for line in body.splitlines():
        if re.match(r"^\S", line):
            break
        header = re.match(r"^  ([A-Za-z0-9_.-]+):$", line)
        if header:
            name = header.group(1)
            blocks[name] = ""
        elif name:
            blocks[name] += line + "\n"
    return blocks
