"""Sagas defined only for the recovery and delivery tests, with participants that crash on cue.

``crashy.act`` / ``crashy.undo`` apply an idempotent effect per idempotency key: a file created
with O_EXCL under ``$CRASHY_DIR/effects`` (files survive a Redis restart and a SIGKILL, and
creating one is atomic). Every call appends a line to ``$CRASHY_DIR/calls.log``. What a call does
is planned in the saga input under ``plan.<step>`` (``undo_plan.<step>`` for compensations):

- ``fail``: a business failure (never retried);
- ``sleep``: seconds to sleep before the effect; with ``past_soft_limit`` the sleep goes on
  through the step's soft time limit (Celery's hard limit then kills the pool process);
- ``first``: a plan of its own for the step's first call only (``{"first": {"sleep": 5}}``);
- ``crash``: ``child`` (the pool process SIGKILLs itself on every delivery), ``worker_before``
  or ``worker_after`` (the whole worker, main process included, is SIGKILLed once, before or
  after the effect), ``coordinator`` (the worker is SIGKILLed once while committing the saga
  transition that records this step's success: the coordinator dies mid-transition),
  ``store_down_on_record`` (once the effect is applied, the first SQL statement recording the
  step's success waits until a test took the database down: it writes marker
  ``<tag>.recording`` and waits for ``<tag>.db-down``; see tests/integration/test_store_outage.py),
  ``soft_limit_on_record`` (once the effect is applied, the first SQL statement recording the
  step's success raises ``SoftTimeLimitExceeded``, as billiard's signal handler does when the
  soft limit strikes a statement stuck on a cut-off database).

``t_two_pools`` runs its middle step on a queue of its own (``crashy_b``), so a test can keep
that pool down while the others run. ``t_limited_pivot``'s pivot has a 2 s time limit.

``t_recovery_unit`` runs on a queue no worker serves, so tests can inspect what recovery
publishes straight from the Redis list.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Engine, event

from config import app, engine
from sagas import BusinessError, RetryPolicy, Saga, Step

QUEUE = "crashy"
QUEUE_B = "crashy_b"
UNSERVED = "recovery_unit"
FAST = RetryPolicy(attempts=3, backoff=0.05, backoff_max=0.2)

_kill_at_commit = False
_outage_at_record: str | None = None  # the tag of a step whose success recording must fail
_soft_limit_at_record = False


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
    global _outage_at_record, _soft_limit_at_record
    if _soft_limit_at_record:
        _soft_limit_at_record = False
        raise SoftTimeLimitExceeded()
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


def times(saga_id: str, step: str, root: Path | None = None
          ) -> list[tuple[str, int, str, float]]:
    """Every (phase, attempt, "start"|"end", epoch seconds) a participant logged for a step."""
    log = crash_dir(root) / "times.log"
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        saga, name, phase, attempt, what, at = line.split()
        if (saga, name) == (saga_id, step):
            out.append((phase, int(attempt), what, float(at)))
    return out


def calls(saga_id: str, step: str, phase: str, root: Path | None = None) -> int:
    log = crash_dir(root) / "calls.log"
    if not log.exists():
        return 0
    wanted = f"{saga_id} {step} {phase}"
    return sum(1 for line in log.read_text().splitlines() if line == wanted)


def _sleep(seconds: float, past_soft_limit: bool) -> None:
    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        try:
            time.sleep(left)
        except SoftTimeLimitExceeded:
            if not past_soft_limit:
                raise


def _run(ctx: dict[str, Any]) -> dict[str, Any]:
    global _kill_at_commit, _outage_at_record, _soft_limit_at_record
    phase = ctx["phase"]
    plans = ctx["input"].get("plan" if phase == "action" else "undo_plan", {})
    plan = plans.get(ctx["step"], {})
    tag = f"{ctx['saga_id']}.{ctx['step']}.{phase}"
    first = calls(ctx["saga_id"], ctx["step"], phase) == 0
    with open(crash_dir() / "calls.log", "a") as log:
        log.write(f"{ctx['saga_id']} {ctx['step']} {phase}\n")
    with open(crash_dir() / "times.log", "a") as log:
        log.write(f"{ctx['saga_id']} {ctx['step']} {phase} {ctx['attempt']} start "
                  f"{time.time():.3f}\n")
    if first and isinstance(plan.get("first"), dict):
        plan = {**plan, **plan["first"]}
    crash = plan.get("crash")
    if crash == "child":
        os.kill(os.getpid(), signal.SIGKILL)
    if crash == "worker_before" and _once(tag):
        _kill_worker()
    if plan.get("sleep"):
        _sleep(float(plan["sleep"]), bool(plan.get("past_soft_limit")))
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
    if crash == "soft_limit_on_record" and _once(tag):
        _soft_limit_at_record = True
    with open(crash_dir() / "times.log", "a") as log:
        log.write(f"{ctx['saga_id']} {ctx['step']} {phase} {ctx['attempt']} end "
                  f"{time.time():.3f}\n")
    return {"step": ctx["step"], "applied": applied}


@app.task(name="crashy.act", queue=QUEUE)
def act(ctx: dict[str, Any]) -> dict[str, Any]:
    return _run(ctx)


@app.task(name="crashy.undo", queue=QUEUE)
def undo(ctx: dict[str, Any]) -> dict[str, Any]:
    return _run(ctx)


def _step(name: str, **kw: Any) -> Step:
    kw.setdefault("compensation", undo)
    kw.setdefault("queue", QUEUE)
    return Step(name, action=act, retry=FAST, compensation_retry=FAST, **kw)


crashy = Saga("t_crashy", steps=[_step("a"), _step("b"), _step("c")])

two_pools = Saga("t_two_pools", steps=[_step("a"), _step("b", queue=QUEUE_B), _step("c")])

limited_pivot = Saga(
    "t_limited_pivot",
    steps=[_step("a"), _step("p", pivot=True, compensation=None, time_limit=2.0),
           _step("z", compensation=None)],
)

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

for _saga in (crashy, crashy_pivot, two_pools, limited_pivot, recovery_unit, recovery_deadline,
              recovery_pivot):
    engine.register(_saga)
