"""The deployment files: the Procfile runs under honcho, supervisord.conf (``make up``) runs the
same commands, docker-compose.yml is a valid project with the same restart and metrics story.

``docker compose config`` needs only the docker client (no engine); it is skipped when no
compose client is installed (a failure under CI=true). The Procfile is not only parsed: honcho
starts every entry and orders placed over HTTP settle on the pools it started, with their
counts on the web app's ``/metrics`` out of the box. What supervisord does when one process
dies is tests/integration/test_supervisor.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from config.queues import ALL_QUEUES
from tests.conftest import private_broker
from tests.support.services import RedisServer, require_service
from tests.support.stack import (
    BIN,
    ROOT,
    get_until,
    metric,
    order_settles,
    place_order,
    procfile,
    seed_earlier_run,
    stack_env,
    supervisor_programs,
    unescape_supervisor,
)

ROLES = {"web", "beat", "flower", "relay", *(f"worker_{q}" for q in ALL_QUEUES)}
METRICS_DEFAULT = "export PROMETHEUS_MULTIPROC_DIR=${PROMETHEUS_MULTIPROC_DIR:-var/metrics}; "


def test_the_procfile_has_web_beat_flower_relay_and_one_worker_entry_per_queue():
    entries = procfile()
    assert set(entries) == ROLES
    for queue in ALL_QUEUES:
        command = entries[f"worker_{queue}"]
        assert re.search(rf"celery -A config worker -Q {queue}(\s|$)", command), command
    assert "celery -A config flower" in entries["flower"]
    assert "celery -A config beat" in entries["beat"]
    assert entries["relay"].endswith("exec sagas -A config relay")
    assert "sagas -A config db upgrade" in entries["web"] and "tasks.migrate" in entries["web"]
    assert "uvicorn config.web:app" in entries["web"] and "$PORT" in entries["web"].replace(
        "${PORT:-8000}", "$PORT")
    # One metrics directory for every process that counts (Flower serves its own /metrics).
    for role in ROLES - {"flower"}:
        assert entries[role].startswith(METRICS_DEFAULT), entries[role]
    assert entries["flower"].startswith("unset PROMETHEUS_MULTIPROC_DIR; ")
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


def test_make_up_runs_the_procfiles_commands_under_supervisord_restarting_what_exits():
    entries, programs = procfile(), supervisor_programs()
    assert set(programs) == set(entries)
    for name, options in programs.items():
        command = unescape_supervisor(options["command"])
        assert command.startswith("sh -c '") and command.endswith("'"), command
        # The Procfile's command, with supervisord's process name for honcho's.
        assert command[len("sh -c '"):-1] == entries[name].replace(
            "HONCHO_PROCESS_NAME", "SUPERVISOR_PROCESS_NAME"), name
        assert options["autorestart"] == "true", f"{name}: restarted when it exits"
        assert options["directory"] == "%(here)s"
        assert options["killasgroup"] == "true", f"{name}: its pool goes with it"
        assert int(options["startretries"]) >= 1 and int(options["startsecs"]) > 0
    makefile = (ROOT / "Makefile").read_text()
    up = makefile.split("\nup:", 1)[1].split("\n\n", 1)[0]
    assert "supervisord -c supervisord.conf" in up and "honcho" not in up, up
    checked = subprocess.run(
        [str(BIN / "supervisord"), "-c", str(ROOT / "supervisord.conf"), "--help"],
        capture_output=True, text=True, check=False)
    assert checked.returncode == 0, "supervisord is installed with the project (extra [local])"


@pytest.fixture
def honcho(redis_server: RedisServer, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``honcho start`` over the checkout's Procfile, run from ``tmp_path`` so that the
    Procfile's relative paths (var/metrics, the beat schedule) land there."""
    # A broker of its own (Redis database 7, or a RabbitMQ vhost): the session's workers must
    # not take these tasks.
    env = stack_env(tmp_path, private_broker("honcho", 7), redis_server.url_db(7))
    # Files of an earlier run of the stack: 41 orders that never happened in this one.
    seed_earlier_run(tmp_path / "var" / "metrics", 41)
    log = tmp_path / "honcho.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(BIN / "honcho"), "--no-colour", "-f", str(ROOT / "Procfile"), "start"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield {"web": f"http://127.0.0.1:{env['PORT']}",
               "flower": f"http://127.0.0.1:{env['FLOWER_PORT']}",
               "log": log, "process": process, "root": tmp_path}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


@pytest.mark.integration
def test_honcho_starts_every_entry_and_orders_complete_and_count_on_metrics(
    honcho: dict[str, Any],
):
    log: Path = honcho["log"]
    web, flower = honcho["web"], honcho["flower"]
    get_until(f"{web}/healthz", lambda r: r.status_code == 200, "web health", log.read_text)
    good = place_order(web)
    declined = place_order(web, quantity=2, price=400)  # over the payment limit
    assert order_settles(web, good, log.read_text) == "COMPLETED"
    assert order_settles(web, declined, log.read_text) == "COMPENSATED"
    get_until(f"{flower}/healthcheck", lambda r: r.status_code == 200, "flower", log.read_text)
    text = log.read_text()
    for role in ROLES:
        assert f"{role}.1" in text, f"honcho did not start {role}:\n{text[-4000:]}"
    assert honcho["process"].poll() is None, "no entry exited (honcho stops all when one does)"

    # The web app's /metrics adds up every process's counts: the steps ran in the workers'
    # pool processes, the sagas settled there. The earlier run's files were emptied at start.
    scraped = httpx.get(f"{web}/metrics", timeout=10).text
    counts = {
        ("sagas_started_total", ()): 2,
        ("sagas_finished_total", (("state", "COMPLETED"),)): 1,
        ("sagas_finished_total", (("state", "COMPENSATED"),)): 1,
    }
    for (name, labels), want in counts.items():
        assert metric(scraped, name, saga="order", **dict(labels)) == want, (name, labels)
    steps = {("reserve_inventory", "SUCCEEDED"): 2, ("charge_payment", "SUCCEEDED"): 1,
             ("ship_order", "SUCCEEDED"): 1, ("charge_payment", "FAILED"): 1,
             ("reserve_inventory", "COMPENSATED"): 1}
    for (step, state), want in steps.items():
        got = metric(scraped, "saga_steps_finished_total", saga="order", step=step, state=state)
        assert got == want, (step, state, got)
    timed = metric(scraped, "saga_step_duration_seconds_count", saga="order",
                   step="charge_payment", outcome="succeeded")
    assert timed == 1


# --- docker compose ----------------------------------------------------------------
def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_is_valid_with_every_role_healthchecked_restarted_and_counted():
    command = compose_command()
    # .ci/run installs one; locally its absence skips.
    require_service(command is not None, "a docker compose client (needs no engine)")
    assert command is not None
    env = {k: v for k, v in os.environ.items() if k != "BROKER_URL"} | {"ADMIN_TOKEN": "x"}
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
        assert "BROKER_URL: redis://redis:6379/0" in services[name], "Redis unless BROKER_URL"
        assert "DATABASE_URL: postgresql+psycopg://" in services[name]
    # A process that exits is restarted, as supervisord does under `make up`; the one-shot
    # migration is not.
    for name in ROLES | {"redis", "postgres"}:
        assert "restart: unless-stopped" in services[name], name
    assert re.search(r"restart: .?no.?\n", services["migrate"]), services["migrate"]
    # Metrics: one directory per container for every process that counts; the workers serve
    # their pool's on a port of their own.
    for name in ROLES - {"flower"}:
        assert "PROMETHEUS_MULTIPROC_DIR: /app/var/metrics" in services[name], name
    assert "PROMETHEUS_MULTIPROC_DIR" not in services["flower"]
    for queue in ALL_QUEUES:
        block = services[f"worker_{queue}"]
        assert re.search(rf"- -Q\n\s+- {queue}\n", block), block
        assert "ports:" not in block, "a published host port cannot --scale"
        assert re.search(r"SAGAS_METRICS_PORT: .?9101", block), block
    # RabbitMQ, when asked for: a profile, with BROKER_URL pointing at it.
    assert "rabbitmq" in services and "profiles:" in services["rabbitmq"]
    on_rabbit = subprocess.run(
        [*command, "-f", str(ROOT / "docker-compose.yml"), "config"], cwd=ROOT,
        env={**env, "BROKER_URL": "amqp://sagas:sagas@rabbitmq:5672//"}, capture_output=True,
        text=True, check=False)
    assert on_rabbit.returncode == 0, on_rabbit.stderr
    rabbit_services = service_blocks(on_rabbit.stdout)
    for name in ROLES:
        assert "BROKER_URL: amqp://sagas:sagas@rabbitmq:5672//" in rabbit_services[name]
        assert "REDIS_URL: redis://redis:6379/0" in rabbit_services[name], "results: Redis"


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
