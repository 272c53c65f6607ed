"""The distribution: the wheel ships the engine only, and works in a user's own project.

The wheel is built from a copy of the checkout (so nothing lands in the repository), then
installed (not editable) into a fresh venv outside the repository. A project in a temporary
directory that has its own ``config.py`` (Celery app + engine) and ``tasks.py`` (steps + saga),
the names the repository's order sample uses, must get its own modules, run a saga with a real
worker from that venv, and be operated with that venv's ``sagas`` command.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.examples.procs import PrivateRedis, Worker, clean_env, describe, run, run_all

ROOT = Path(__file__).resolve().parents[2]
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", ".mypy_cache", ".ruff_cache", ".hypothesis", ".pytest_cache",
    "__pycache__", "*.egg-info", "build", "dist", "var", "*.db",
)
ENGINE_TABLES = {"saga_instances", "saga_log", "saga_relay_cursor", "saga_dead_letters",
                 "saga_locks", "saga_lock_waits",
                 "sagas_alembic_version"}
SAMPLE_TABLES = {"orders", "inventory_stock", "inventory_reservations", "payment_charges",
                 "payment_refunds", "shipments", "alembic_version"}


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the checkout (``python -m build``, else ``pip wheel``)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source, out = tmp / "src", tmp / "dist"
    shutil.copytree(ROOT, source, ignore=COPY_IGNORE)
    if importlib.util.find_spec("build") is not None:
        args = [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(source)]
    else:
        args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(source)]
    result = run(args, cwd=tmp, env=clean_env(), timeout=300)
    assert result.returncode == 0, describe(result)
    (built,) = out.glob("sagas-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_ships_the_sagas_package_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        record = zf.read(f"{dist_info}/RECORD").decode()
        top_level = zf.read(f"{dist_info}/top_level.txt").decode().split()
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()

    recorded = [line.split(",", 1)[0] for line in record.splitlines() if line.strip()]
    assert sorted(recorded) == sorted(names)
    tops = {n.split("/")[0] for n in recorded} - {dist_info}
    assert tops == {"sagas"}, f"top-level entries besides sagas: {sorted(tops - {'sagas'})}"
    assert top_level == ["sagas"]
    for sample in ("tasks", "config", "bench", "tests", "examples", "tripapp"):
        assert not any(n.startswith(f"{sample}/") or n == f"{sample}.py" for n in names), sample

    assert "sagas/py.typed" in names
    assert "sagas/store/migrations/env.py" in names
    versions = sorted(p.name for p in (ROOT / "sagas/store/migrations/versions").glob("*.py"))
    assert versions, "no migrations in the checkout"
    shipped = sorted(n.rsplit("/", 1)[1] for n in names
                     if n.startswith("sagas/store/migrations/versions/") and n.endswith(".py"))
    assert shipped == versions
    assert "sagas = sagas.ops.cli:main" in entry_points


# --- a user's own project, in a fresh venv ------------------------------------------------------
CONFIG_PY = '''
"""The user's own Celery app and engine, in a module named config (as the sample's package is)."""

from celery import Celery

from sagas import Sagas, SagaSettings

settings = SagaSettings()
app = Celery("shop", broker=settings.broker_url, backend=settings.redis_url, include=["tasks"])
app.conf.update(
    task_serializer="json", accept_content=["json"], task_acks_late=True,
    task_ignore_result=True, task_store_errors_even_if_ignored=True,
    worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True,
)
engine = Sagas(app, settings)
'''

TASKS_PY = '''
"""The user's steps and saga, in a module named tasks (as the sample's package is)."""

import sqlite3

from sqlalchemy.engine import make_url

from config import app, engine, settings
from sagas import Saga, Step, StepContext


def parcels():
    """The user's own table, in the same database as the saga store."""
    conn = sqlite3.connect(make_url(settings.database_url).database, timeout=30,
                           isolation_level=None)
    conn.execute("CREATE TABLE IF NOT EXISTS parcels"
                 " (key TEXT PRIMARY KEY, saga_id TEXT NOT NULL, state TEXT NOT NULL)")
    return conn


@app.task(name="shop.pack", queue="shop")
def pack(ctx):
    step = StepContext.model_validate(ctx)
    with parcels() as conn:
        conn.execute("INSERT OR IGNORE INTO parcels VALUES (?, ?, 'packed')",
                     (step.idempotency_key, step.saga_id))
    return {"parcel": step.idempotency_key, "item": step.input["item"]}


@app.task(name="shop.unpack", queue="shop")
def unpack(ctx):
    step = StepContext.model_validate(ctx)
    with parcels() as conn:
        conn.execute("UPDATE parcels SET state = 'unpacked' WHERE key = ?",
                     (step.idempotency_key,))
    return {"unpacked": step.idempotency_key}


@app.task(name="shop.send", queue="shop")
def send(ctx):
    step = StepContext.model_validate(ctx)
    return {"sent": step.results["pack"]["parcel"]}


parcel = engine.register(Saga("parcel", steps=[
    Step("pack", action=pack, compensation=unpack, queue="shop"),
    Step("send", action=send, queue="shop", pivot=True),
]))
'''

START_PY = '''
"""Start a parcel from a thread, wait on its handle there, and report what this venv imports."""

import importlib
import json
import sys
import threading

import config
import tasks

out = {}


def start():
    handle = config.engine.start(tasks.parcel, {"item": "teapot"})
    out["id"] = handle.id
    outcome = handle.wait(timeout=60)
    out["state"] = str(outcome.state)
    out["results"] = outcome.results
    out["thread"] = threading.current_thread().name


thread = threading.Thread(target=start, name="starter")
thread.start()
thread.join(90)

import sagas

out["tasks_file"] = tasks.__file__
out["config_file"] = config.__file__
out["sagas_file"] = sagas.__file__
out["sys_path"] = sys.path
out["imports"] = {}
for name in ("tasks.order_saga", "config.celery_app", "tasks.inventory", "bench", "tripapp"):
    try:
        importlib.import_module(name)
        out["imports"][name] = "importable"
    except ImportError as exc:
        out["imports"][name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
'''


@dataclass
class UserVenv:
    root: Path

    @property
    def python(self) -> str:
        return str(self.root / "bin" / "python")

    @property
    def sagas(self) -> str:
        return str(self.root / "bin" / "sagas")


@pytest.fixture(scope="session")
def user_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> UserVenv:
    """A fresh venv outside the repository with the wheel pip-installed (once per session)."""
    root = tmp_path_factory.mktemp("user-venv") / "venv"
    assert not root.resolve().is_relative_to(ROOT)
    created = run([sys.executable, "-m", "venv", str(root)], cwd=root.parent, env=clean_env())
    assert created.returncode == 0, describe(created)
    venv = UserVenv(root)
    installed = run([venv.python, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                     str(wheel)], cwd=root.parent, env=clean_env(), timeout=600)
    if installed.returncode != 0:
        pytest.fail("pip could not install the wheel and its dependencies (is an index "
                    f"reachable?)\n{describe(installed)}")
    return venv


@pytest.fixture
def project(tmp_path: Path) -> Path:
    assert not tmp_path.resolve().is_relative_to(ROOT)
    for name, text in (("config.py", CONFIG_PY), ("tasks.py", TASKS_PY), ("start.py", START_PY)):
        (tmp_path / name).write_text(textwrap.dedent(text).lstrip())
    return tmp_path


def tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {r[0] for r in rows} - {"sqlite_sequence"}


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), describe(result)
    return lines[0]


@pytest.mark.integration
@pytest.mark.slow
def test_a_user_project_with_its_own_config_and_tasks_runs_on_the_installed_wheel(
    user_venv: UserVenv, project: Path
) -> None:
    redis = PrivateRedis()
    db = project / "shop.db"
    env = clean_env(REDIS_URL=redis.url, DATABASE_URL=f"sqlite:///{db}")
    worker = None

    try:
        upgrade = run([user_venv.sagas, "-A", "config", "db", "upgrade"], cwd=project, env=env)
        assert upgrade.returncode == 0, describe(upgrade)
        assert tables(db) == ENGINE_TABLES, "db upgrade creates the engine's tables, only those"

        worker = Worker(user_venv.python, "config", ("shop", "saga"), cwd=project, env=env,
                        log_dir=project, name="shop").start()
        worker.wait_ready()

        started = run([user_venv.python, "start.py"], cwd=project, env=env, timeout=120)
        assert started.returncode == 0, describe(started) + worker.log()
        out = json.loads(started.stdout)
        assert out["state"] == "COMPLETED", out
        assert out["thread"] == "starter"
        assert out["results"]["send"] == {"sent": f"{out['id']}:pack"}

        # The user's modules are the user's; the installed engine is the venv's; nothing of
        # the repository's sample is importable from there.
        assert Path(out["tasks_file"]) == project / "tasks.py"
        assert Path(out["config_file"]) == project / "config.py"
        assert Path(out["sagas_file"]).is_relative_to(user_venv.root)
        assert not any(p and Path(p).resolve().is_relative_to(ROOT) for p in out["sys_path"])
        for name, outcome in out["imports"].items():
            assert outcome.startswith(("ModuleNotFoundError", "ImportError")), (name, outcome)
        assert "'tasks' is not a package" in out["imports"]["tasks.order_saga"]

        saga_id = out["id"]
        show, retry, cancel, missing, audit, version = run_all(
            [[user_venv.sagas, "-A", "config", *args] for args in (
                ["show", saga_id, "--json"], ["retry", saga_id], ["cancel", saga_id],
                ["show", "no-such-saga"], ["audit", "--json"])] + [[user_venv.sagas, "--version"]],
            cwd=project, env=env, timeout=60,
        )
        assert show.returncode == 0, describe(show)
        view = json.loads(show.stdout)
        assert (view["name"], view["state"]) == ("parcel", "COMPLETED")
        assert [(s["name"], s["state"]) for s in view["steps"]] == [
            ("pack", "SUCCEEDED"), ("send", "SUCCEEDED")]

        assert one_line_error(retry) == (
            f"error: saga {saga_id} is COMPLETED; there is nothing to retry")
        assert one_line_error(cancel) == (
            f"error: saga {saga_id} is COMPLETED; only a running saga cancels")
        assert missing.returncode == 2, describe(missing)

        assert audit.returncode == 0, describe(audit)
        report = json.loads(audit.stdout)
        assert report["ok"] is True and report["sagas"] > 0, report

        expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
        assert version.stdout.strip() == f"sagas {expected}", describe(version)

        found = tables(db)
        assert found == ENGINE_TABLES | {"parcels"}, found
        assert not found & SAMPLE_TABLES
    finally:
        if worker is not None:
            worker.stop()
        redis.stop()


@pytest.fixture(scope="session", autouse=True)
def _no_build_litter() -> Iterator[None]:
    """Building from the copy must leave no build/ or dist/ in the checkout."""
    before = {p.name for p in ROOT.iterdir()}
    yield
    litter = {p.name for p in ROOT.iterdir()} - before
    assert not litter & {"build", "dist"}, litter
