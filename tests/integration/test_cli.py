"""The ``sagas`` console script, run as an operator runs it: a subprocess with the backend's env.

Every expected failure (unknown id, unknown saga, unreachable database or Redis) must be one line
on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Backend, broker_down, wait_for_saga
from tests.support import test_sagas as ts
from tests.support.engine import get_store, start_saga
from tests.support.services import free_port
from tests.support.terminal import run_on_terminal

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SAGAS = str(Path(sys.executable).parent / "sagas")


def sagas(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SAGAS, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], lines[0]


def steps(view: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["state"] for s in view["steps"]}


def wait_until(predicate: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def running_with_a_done(saga_id: str) -> bool:
    view = get_store().get_view(saga_id)
    return view["state"] == "RUNNING" and steps(view)["a"] == "SUCCEEDED"


def closed_port_url(kind: str) -> str:
    assert kind == "postgresql"
    return f"postgresql+psycopg://sagas@127.0.0.1:{free_port()}/sagas"


def test_db_upgrade_makes_a_fresh_database_ready_to_list(tmp_path: Path, redis_server: Any):
    from tests.conftest import _worker_env

    env = _worker_env(f"sqlite:///{tmp_path}/fresh.db")
    upgraded = sagas(env, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "saga tables up to date" in upgraded.stderr
    assert sagas(env, "db", "upgrade").returncode == 0, "upgrading twice is harmless"
    import sqlalchemy

    inspector = sqlalchemy.inspect(sqlalchemy.create_engine(env["DATABASE_URL"]))
    tables = set(inspector.get_table_names())
    assert tables == {"saga_instances", "saga_log", "saga_relay_cursor", "saga_dead_letters",
                      "saga_locks", "saga_lock_waits",
                      "sagas_alembic_version"}, "only the engine's tables, none of the sample's"
    listed = sagas(env, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {"total": 0, "items": []}
    dead = sagas(env, "dead", "--json")
    assert dead.returncode == 0, dead.stderr
    assert json.loads(dead.stdout) == {"total": 0, "counts": {}, "items": []}
    # An integer past what the store takes is a usage error naming the option, no traceback.
    for args, option in ((("list", "--offset", "9223372036854775808"), "--offset"),
                         (("list", "--version", "2147483648"), "--version"),
                         (("dead", "show", "9223372036854775808"), "'ID'"),
                         (("dead", "purge", "--older-than", "1e300"), "--older-than")):
        refused = sagas(env, *args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert option in refused.stderr and "Traceback" not in refused.stderr, refused.stderr


def test_show_json_is_the_saga_as_the_store_and_api_see_it(engine_backend: Backend):
    saga_id = start_saga(ts.linear, {"plan": {"c": {"fail": True}}})
    wait_for_saga(saga_id)
    shown = sagas(engine_backend.env, "show", saga_id, "--json")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert view == {**get_store().get_view(saga_id), "stalled": None}, "the store's, and why "\
        "it is stalled (it is not)"
    assert view["state"] == "COMPENSATED"
    assert steps(view) == {"a": "COMPENSATED", "b": "COMPENSATED", "c": "FAILED",
                           "d": "SKIPPED"}
    human = sagas(engine_backend.env, "show", saga_id)
    assert human.returncode == 0
    assert "COMPENSATED" in human.stdout and "planned failure" in human.stdout


def test_list_filters_by_state_and_name(engine_backend: Backend):
    ok = start_saga(ts.no_undo, {})
    bad = start_saga(ts.no_undo, {"plan": {"a": {"fail": True}}})
    wait_for_saga(ok)
    wait_for_saga(bad)
    listed = sagas(engine_backend.env, "list", "--name", "t_no_undo", "--state", "COMPENSATED",
                   "--limit", "500", "--json")
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)["items"]
    assert bad in {s["id"] for s in items} and ok not in {s["id"] for s in items}
    assert {(s["name"], s["state"]) for s in items} == {("t_no_undo", "COMPENSATED")}
    table = sagas(engine_backend.env, "list", "--name", "t_no_undo")
    assert table.returncode == 0 and "sagas" in table.stdout


def test_graph_prints_the_order_saga_as_text_and_mermaid(engine_backend: Backend):
    text = sagas(engine_backend.env, "graph", "order")
    assert text.returncode == 0, text.stderr
    for step in ("reserve_inventory", "charge_payment", "ship_order"):
        assert step in text.stdout
    mermaid = sagas(engine_backend.env, "graph", "order", "--mermaid")
    assert mermaid.returncode == 0
    assert mermaid.stdout.lstrip().startswith(("flowchart", "graph"))
    assert_one_line_error(sagas(engine_backend.env, "graph", "no_such_saga"), "no_such_saga")


def test_piped_at_80_columns_ids_and_states_are_whole_and_a_printed_id_works(
    engine_backend: Backend,
):
    parked = start_saga(ts.linear, {"plan": {"c": {"fail": True}, "a": {"undo_fail": True}}})
    wait_for_saga(parked)
    env = dict(engine_backend.env, COLUMNS="80")
    table = sagas(env, "list", "--name", "t_linear", "--state", "COMPENSATION_FAILED",
                  "--limit", "500")
    assert table.returncode == 0, table.stderr
    assert max(len(line) for line in table.stdout.splitlines()) <= 80
    row = next(line for line in table.stdout.splitlines() if parked in line)
    assert "COMPENSATION_FAILED" in row, "the state is whole, never 'COMPENSAT...'"
    printed = row.split()[0]
    assert printed == parked
    shown = sagas(env, "show", printed[:13])
    assert shown.returncode == 0, shown.stderr
    assert parked in shown.stdout and '"plan"' in shown.stdout, "the context is shown"
    assert "COMPENSATION_FAILED" in shown.stdout


def test_a_bad_state_or_an_unknown_saga_name_exits_2_naming_what_is_valid(
    engine_backend: Backend,
):
    bogus = sagas(engine_backend.env, "list", "--state", "bogus")
    assert bogus.returncode == 2
    assert "compensation_failed" in bogus.stderr.lower() and "running" in bogus.stderr.lower()
    assert sagas(engine_backend.env, "graph", "no_such_saga").returncode == 2
    assert sagas(engine_backend.env, "list", "--state", "completed", "--json").returncode == 0


@pytest.mark.parametrize("command", ["show", "retry", "cancel"])
def test_an_unknown_id_is_one_line_on_stderr_and_a_non_zero_exit(
    engine_backend: Backend, command: str
):
    missing = f"missing-{uuid.uuid4()}"
    assert_one_line_error(sagas(engine_backend.env, command, missing), missing)


@pytest.mark.parametrize("args", [("list",), ("show", "some-id"), ("retry", "some-id")])
def test_an_unreachable_database_is_one_clear_line(engine_backend: Backend, args: tuple[str]):
    env = {**engine_backend.env, "DATABASE_URL": closed_port_url("postgresql")}
    result = sagas(env, *args)
    assert_one_line_error(result, "unavailable", "Connection refused")


def test_cancel_compensates_a_running_saga(engine_backend: Backend):
    saga_id = start_saga(ts.linear, {"plan": {"b": {"sleep": 5.0}}})
    wait_until(lambda: running_with_a_done(saga_id), "step a to succeed")
    cancelled = sagas(engine_backend.env, "cancel", saga_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "COMPENSATING" in cancelled.stdout
    view = wait_for_saga(saga_id)
    assert view["state"] == "COMPENSATED"
    assert steps(view)["a"] == steps(view)["b"] == "COMPENSATED"
    again = sagas(engine_backend.env, "cancel", saga_id)
    assert_one_line_error(again, "COMPENSATED")


def test_retry_runs_a_failed_compensation_again(engine_backend: Backend):
    saga_id = start_saga(ts.linear, {"plan": {"a": {"undo_fail": True}, "b": {"fail": True}}})
    assert wait_for_saga(saga_id)["state"] == "COMPENSATION_FAILED"
    calls = undo_calls(saga_id)
    retried = sagas(engine_backend.env, "retry", saga_id)
    assert retried.returncode == 0, retried.stderr
    assert saga_id in retried.stdout
    wait_until(lambda: undo_calls(saga_id) > calls, "the compensation to run again")
    assert wait_for_saga(saga_id)["state"] == "COMPENSATION_FAILED", "it fails again: parked"


def test_with_the_broker_unreachable_retry_says_so_in_one_line_and_a_later_retry_goes_through(
    engine_backend: Backend,
):
    saga_id = start_saga(ts.linear, {"plan": {"a": {"undo_fail": True}, "b": {"fail": True}}})
    assert wait_for_saga(saga_id)["state"] == "COMPENSATION_FAILED"
    calls = undo_calls(saga_id)
    env = {**engine_backend.env, **broker_down(free_port())}
    assert_one_line_error(sagas(env, "retry", saga_id), "broker unavailable")
    # The retry was recorded; only the compensation's message was lost with the broker.
    assert get_store().get_view(saga_id)["state"] == "COMPENSATING"
    assert undo_calls(saga_id) == calls
    retried = sagas(engine_backend.env, "retry", saga_id)
    assert retried.returncode == 0, retried.stderr
    wait_until(lambda: undo_calls(saga_id) > calls, "the compensation to run again")
    assert wait_for_saga(saga_id)["state"] == "COMPENSATION_FAILED"


def undo_calls(saga_id: str) -> int:
    return int(ts.ledger().get(f"calls:{saga_id}:a:compensation") or 0)


def test_relay_once_publishes_what_waits_and_outbox_stats_says_so(engine_backend: Backend):
    from sagas.runtime import relay as outbox

    saga_id = start_saga(ts.linear, {})
    wait_for_saga(saga_id)
    from sqlalchemy import func, select

    from sagas.store.sql import log_t

    with get_store().read() as conn:
        mine = conn.execute(select(func.count()).where(log_t.c.saga_id == saga_id)).scalar_one()
    waiting = outbox.stats(get_store()).pending
    assert mine >= 4 and waiting >= mine, "the saga's log rows wait for the relay"
    stats = sagas(engine_backend.env, "outbox", "stats")
    assert stats.returncode == 0, stats.stderr
    assert f"pending  {waiting} log rows" in stats.stdout
    for _ in range(50):  # one batch per run; rows of earlier tests may come first
        if outbox.stats(get_store()).pending == 0:
            break
        ran = sagas(engine_backend.env, "relay", "--once", "--batch", "500")
        assert ran.returncode == 0, ran.stderr
    assert outbox.stats(get_store()).pending == 0
    as_json = json.loads(sagas(engine_backend.env, "outbox", "stats", "--json").stdout)
    assert as_json["pending"] == 0 and as_json["position"] == as_json["newest"]


def test_audit_shows_a_spinner_on_a_terminal_and_only_its_report_when_piped(
    engine_backend: Backend,
):
    """A command that may take a while on a big store says what it is doing, on a terminal."""
    wait_for_saga(start_saga(ts.linear, {}))
    code, text = run_on_terminal([SAGAS, "audit", "--no-idle"], cwd=ROOT, env=engine_backend.env)
    assert code in (0, 1), text
    assert "auditing every saga in the store" in text and "audit" in text
    piped = sagas(engine_backend.env, "audit", "--no-idle")
    assert piped.returncode == code, piped.stderr
    assert "auditing every saga" not in piped.stdout + piped.stderr
    assert "\x1b" not in piped.stdout + piped.stderr
