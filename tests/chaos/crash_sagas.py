"""Sagas defined only for the recovery and delivery tests, with participants that crash on cue.

``crashy.act`` / ``crashy.undo`` apply an idempotent effect per idempotency key: a file created
with O_EXCL under ``$CRASHY_DIR/effects`` (files survive a Redis restart and a SIGKILL, and
creating one is atomic). Every call appends a line to ``$CRASHY_DIR/calls.log``. What a call does
is planned in the saga input under ``plan.<step>`` (``undo_plan.<step>`` for compensations):

- ``fail``: a business failure (never retried);
- ``sleep``: seconds to sleep before the effect;
- ``crash``: ``child`` (the pool process SIGKILLs itself on every delivery), ``worker_before``
  or ``worker_after`` (the whole worker, main process included, is SIGKILLed once, before or
  after the effect), ``coordinator`` (the worker is SIGKILLed once while committing the saga
  transition that records this step's success: the coordinator dies mid-transition),
  ``store_down_on_record`` (once the effect is applied, the first SQL statement recording the
  step's success waits until a test took the database down: it writes marker
  ``<tag>.recording`` and waits for ``<tag>.db-down``; see tests/integration/test_store_outage.py).

``t_recovery_unit`` runs on a queue no worker serves, so tests can inspect what recovery
publishes straight from the Redis list.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event

from config import app, engine
from sagas import BusinessError, RetryPolicy, Saga, Step

QUEUE = "crashy"
UNSERVED = "recovery_unit"
FAST = RetryPolicy(attempts=3, backoff=0.05, backoff_max=0.2)

_kill_at_commit = False
_outage_at_record: str | None = None  # the tag of a step whose success recording must fail


def crash_dir(root: Path | None = None) -> Path:
    path = root or Path(os.environ.get("CRASHY_DIR", "/tmp/crashy"))
    (path / "effects").mkdir(parents=True, exist_ok=True)
    (path / "markers").mkdir(parents=True, exist_ok=True)
    return path


def _once(marker: str) -> bool:
    """True the first time only, across processes and crashes."""
    try:
        os.close(os.open(crash_dir() / "markers" / marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _kill_worker() -> None:
    """SIGKILL the whole worker: its main process and every pool process (one process group)."""
    os.killpg(os.getpgrp(), signal.SIGKILL)


@event.listens_for(Engine, "commit")
def _die_while_committing(conn: Any) -> None:
    if _kill_at_commit:
        _kill_worker()


@event.listens_for(Engine, "before_cursor_execute")
def _wait_for_the_outage(*_: Any) -> None:
    """The first statement after a ``store_down_on_record`` effect: let the test stop the
    database now, then go on (and meet a server that is gone)."""
    global _outage_at_record
    tag, _outage_at_record = _outage_at_record, None
    if tag is None:
        return
    markers = crash_dir() / "markers"
    (markers / f"{tag}.recording").touch()
    deadline = time.monotonic() + 120
    while not (markers / f"{tag}.db-down").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def effects(key: str, phase: str, root: Path | None = None) -> bool:
    return (crash_dir(root) / "effects" / f"{key}.{phase}").exists()


def calls(saga_id: str, step: str, phase: str, root: Path | None = None) -> int:
    log = crash_dir(root) / "calls.log"
    if not log.exists():
        return 0
    wanted = f"{saga_id} {step} {phase}"
    return sum(1 for line in log.read_text().splitlines() if line == wanted)


def _run(ctx: dict[str, Any]) -> dict[str, Any]:
    global _kill_at_commit, _outage_at_record
    phase = ctx["phase"]
    plans = ctx["input"].get("plan" if phase == "action" else "undo_plan", {})
    plan = plans.get(ctx["step"], {})
    tag = f"{ctx['saga_id']}.{ctx['step']}.{phase}"
    with open(crash_dir() / "calls.log", "a") as log:
        log.write(f"{ctx['saga_id']} {ctx['step']} {phase}\n")
    crash = plan.get("crash")
    if crash == "child":
        os.kill(os.getpid(), signal.SIGKILL)
    if crash == "worker_before" and _once(tag):
        _kill_worker()
    if plan.get("sleep"):
        time.sleep(float(plan["sleep"]))
    if plan.get("fail"):
        raise BusinessError(f"planned failure of {ctx['step']}")
    path = crash_dir() / "effects" / f"{ctx['idempotency_key']}.{phase}"
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        applied = True
    except FileExistsError:
        applied = False  # a redelivery: the effect is already there
    if crash == "worker_after" and _once(tag):
        _kill_worker()
    if crash == "coordinator" and _once(tag):
        _kill_at_commit = True
    if crash == "store_down_on_record" and _once(tag):
        _outage_at_record = tag
    return {"step": ctx["step"], "applied": applied}


@app.task(name="crashy.act", queue=QUEUE)
def act(ctx: dict[str, Any]) -> dict[str, Any]:
    return _run(ctx)


@app.task(name="crashy.undo", queue=QUEUE)
def undo(ctx: dict[str, Any]) -> dict[str, Any]:
    return _run(ctx)


def _step(name: str, **kw: Any) -> Step:
    kw.setdefault("compensation", undo)
    return Step(name, action=act, queue=QUEUE, retry=FAST, compensation_retry=FAST, **kw)


crashy = Saga("t_crashy", steps=[_step("a"), _step("b"), _step("c")])

crashy_pivot = Saga(
    "t_crashy_pivot",
    steps=[_step("a"), _step("p", pivot=True, compensation=None), _step("z", compensation=None)],
)


def _unserved(name: str, **kw: Any) -> Step:
    kw.setdefault("compensation", "recovery_unit.undo")
    return Step(name, action="recovery_unit.act", queue=UNSERVED, **kw)


recovery_unit = Saga("t_recovery_unit", steps=[_unserved("a"), _unserved("b")])

recovery_deadline = Saga(
    "t_recovery_deadline", steps=[_unserved("a"), _unserved("b")], deadline=3600
)

recovery_pivot = Saga(
    "t_recovery_pivot",
    steps=[_unserved("a"), _unserved("p", pivot=True, compensation=None),
           _unserved("z", compensation=None)],
    deadline=3600,
)

for _saga in (crashy, crashy_pivot, recovery_unit, recovery_deadline, recovery_pivot):
    engine.register(_saga)
