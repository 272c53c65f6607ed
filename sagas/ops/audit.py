"""``sagas audit``: the engine's own invariants checked on every saga in the store.

The engine knows nothing of a domain's ledgers, but it knows what its own rows must say whatever
the domain. For every saga recorded in the store:

- COMPLETED: every step SUCCEEDED.
- COMPENSATED: nothing is left to undo: no step that declares a compensation is still
  SUCCEEDED, and no step is still running, compensating or failed to compensate. Which steps
  declare a compensation is read from the definition registered in this engine; a saga whose
  definition is not registered gets a ``definition unknown`` finding instead of a guess (the
  checks that need no definition still run).
- its log replays through the transition table (every step transition is allowed from the
  state the replay reached), and the saga row's state is the one its last log row recorded.
- a saga in flight (PENDING, RUNNING, COMPENSATING) is not far past its deadlines: its stall
  deadline, or (PENDING/RUNNING) its saga deadline, passed by more than ``recovery_grace +
  step_timeout`` means recovery is not doing its job.
- once idle (``idle=True``, the default; ``--no-idle`` while sagas still run), every saga is
  COMPLETED or COMPENSATED: COMPENSATION_FAILED and FORWARD_FAILED are ``parked`` work,
  anything else ``stuck``.

Then every check a domain added with ``engine.add_audit_check`` runs, and its findings follow.
Sagas are read in batches of ``BATCH`` by id within one read transaction (one snapshot on SQLite
and, at REPEATABLE READ, on PostgreSQL), so a huge store is never loaded whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import Connection, select

from sagas.definition import Saga
from sagas.errors import StoreUnavailableError
from sagas.states import SAGA_PARKED, SAGA_TERMINAL, SagaState, StepState
from sagas.store.log import LogEntry, entry_of, replay, replay_problems, saga_from_row
from sagas.store.sql import log_t, sagas_t, utcnow

if TYPE_CHECKING:
    from sagas.engine import AuditCheck, Sagas

BATCH = 500
"""Sagas read per round trip (their steps and last events follow in one query each)."""

RULE_COMPLETED = "completed: every step succeeded"
RULE_COMPENSATED = "compensated: nothing left to undo"
RULE_EVENTS = "history replays through the transition table"
RULE_DEADLINE = "in flight: not far past its deadline"
RULE_IDLE = "idle: every saga settled"
"""The engine's rules, as ``checks_run`` names them; each runs once per saga it applies to."""

DEFINITION_UNKNOWN = "definition unknown"
PARKED = "parked"
STUCK = "stuck"
"""Rules of findings that name a state rather than an invariant (``RULE_IDLE`` reports both)."""

IN_FLIGHT = frozenset(
    {SagaState.PENDING, SagaState.WAITING, SagaState.RUNNING, SagaState.COMPENSATING}
)
DEADLINE_STATES = frozenset({SagaState.PENDING, SagaState.WAITING, SagaState.RUNNING})
STILL_ACTIVE = frozenset({StepState.RUNNING, StepState.COMPENSATING, StepState.COMPENSATION_FAILED})

_IDLE: ContextVar[bool] = ContextVar("sagas_audit_idle", default=True)


def audit_idle() -> bool:
    """Whether the audit now running treats the system as idle (False under ``--no-idle``).

    A domain check with an "every saga finished" rule of its own reads this, so one flag governs
    the engine's rules and the domain's; outside an audit it is True.
    """
    return _IDLE.get()


@dataclass(frozen=True)
class Finding:
    rule: str
    detail: str
    saga_id: str | None = None


@dataclass
class AuditReport:
    sagas: int = 0
    checks: int = 0
    """Individual checks run: each engine rule once per saga it applies to, plus each domain
    check once."""
    states: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    checks_run: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "sagas": self.sagas,
            "checks": self.checks,
            "states": dict(self.states),
            "violations": [
                {"saga": f.saga_id, "rule": f.rule, "detail": f.detail} for f in self.findings
            ],
            "checks_run": list(self.checks_run),
        }

    def summary(self) -> str:
        states = ", ".join(f"{k} {v}" for k, v in sorted(self.states.items())) or "none"
        verdict = "ok" if self.ok else _count(len(self.findings), "violation")
        return (f"audit: {_count(self.sagas, 'saga')} ({states}), "
                f"{_count(self.checks, 'check')}: {verdict}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def audit(engine: Sagas, *, idle: bool = True, now: datetime | None = None) -> AuditReport:
    """Check every saga in ``engine.store``, then every check the domains added.

    Raises ``StoreUnavailableError`` when the store cannot be read (a domain check raising it
    too: an audit that could not read the books has nothing to say about them). Any other
    exception of a domain check becomes a finding whose rule is the check's name.
    """
    now = _aware(now) if now is not None else utcnow()
    settings = engine.settings
    margin = timedelta(seconds=settings.recovery_grace + settings.step_timeout)
    definitions = {(s.name, s.version): s for s in engine._binding.all_versions()}
    rules = [RULE_COMPLETED, RULE_COMPENSATED, RULE_EVENTS, RULE_DEADLINE]
    if idle:
        rules.append(RULE_IDLE)
    report = AuditReport(checks_run=rules)

    with engine.store.read() as conn:
        if conn.dialect.name == "postgresql":
            # One snapshot for every batch: a saga and its steps never come from two moments.
            conn.execution_options(isolation_level="REPEATABLE READ")
        for batch in _saga_batches(conn):
            logs = _logs(conn, [r.id for r in batch])
            for row in batch:
                report.sagas += 1
                report.states[row.state] = report.states.get(row.state, 0) + 1
                found, ran = _check_saga(
                    row, logs.get(row.id, []), definitions.get((row.name, row.version)),
                    now=now, margin=margin, idle=idle,
                )
                report.findings.extend(found)
                report.checks += ran

    token = _IDLE.set(idle)
    try:
        for check in list(engine.audit_checks):
            name = check_name(check)
            report.checks_run.append(name)
            report.checks += 1
            report.findings.extend(_run_check(check, name, engine))
    finally:
        _IDLE.reset(token)
    return report


# --- reading the store ------------------------------------------------------------------------
class _SagaRecord(NamedTuple):
    id: str
    name: str
    version: int
    state: str
    stall_deadline: datetime | None
    deadline_at: datetime | None


def _saga_batches(conn: Connection) -> Iterator[list[_SagaRecord]]:
    columns = (sagas_t.c.id, sagas_t.c.name, sagas_t.c.definition_version, sagas_t.c.state,
               sagas_t.c.stall_deadline, sagas_t.c.deadline_at)
    after: str | None = None
    while True:
        query = select(*columns).order_by(sagas_t.c.id).limit(BATCH)
        if after is not None:
            query = query.where(sagas_t.c.id > after)
        rows = [
            _SagaRecord(str(r.id), str(r.name), int(r.definition_version or 1), str(r.state),
                        r.stall_deadline, r.deadline_at)
            for r in conn.execute(query)
        ]
        if not rows:
            return
        yield rows
        if len(rows) < BATCH:
            return
        after = rows[-1].id


def _logs(conn: Connection, saga_ids: list[str]) -> dict[str, list[LogEntry]]:
    """Each saga's log, in sequence (one query per batch)."""
    logs: dict[str, list[LogEntry]] = {}
    for r in conn.execute(
        select(log_t.c.saga_id, log_t.c.seq, log_t.c.at, log_t.c.cause, log_t.c.step,
               log_t.c.saga_state, log_t.c.transitions, log_t.c.result)
        .where(log_t.c.saga_id.in_(saga_ids))
        .order_by(log_t.c.seq)
    ):
        logs.setdefault(str(r[0]), []).append(entry_of(r[1:]))
    return logs


# --- the engine's rules -----------------------------------------------------------------------
def _check_saga(
    row: _SagaRecord,
    entries: list[LogEntry],
    definition: Saga | None,
    *,
    now: datetime,
    margin: timedelta,
    idle: bool,
) -> tuple[list[Finding], int]:
    """The findings on one saga and how many rules ran on it."""
    saga_id, name, state = row.id, row.name, row.state
    found: list[Finding] = []

    def add(rule: str, detail: str) -> None:
        found.append(Finding(rule, detail, saga_id))

    snap = replay(
        saga_from_row(saga_id, name, state, None, None, row.version, None), entries,
        definition.order if definition is not None else (),
    )
    steps = [(n, str(s.state)) for n, s in sorted(snap.steps.items())]
    ran = 2  # the history rule and the deadline rule run on every saga
    if state == SagaState.COMPLETED:
        ran += 1
        for step, step_state in steps:
            if step_state != StepState.SUCCEEDED:
                add(RULE_COMPLETED, f"step {step!r} is {step_state}")
    elif state == SagaState.COMPENSATED:
        ran += 1
        if definition is None:
            add(DEFINITION_UNKNOWN, f"saga {name!r} is not registered in this engine: which "
                                    "of its steps declare a compensation is not checked")
        for step, step_state in steps:
            if step_state in STILL_ACTIVE:
                add(RULE_COMPENSATED, f"step {step!r} is still {step_state}")
            elif step_state == StepState.SUCCEEDED and definition is not None:
                declared = definition.steps.get(step)
                if declared is None:
                    add(DEFINITION_UNKNOWN, f"step {step!r} is SUCCEEDED but not in the "
                                            f"registered definition of {name!r}")
                elif declared.compensation is not None:
                    add(RULE_COMPENSATED, f"step {step!r} is SUCCEEDED and never compensated "
                                          f"({declared.compensation_name} never ran)")

    for problem in replay_problems(entries):
        add(RULE_EVENTS, problem)
    if entries and entries[-1].saga_state != state:
        add(RULE_EVENTS, f"the saga is {state} but its last log row ({entries[-1].cause}) left "
                         f"it {entries[-1].saga_state}")

    if state in IN_FLIGHT:
        stall = row.stall_deadline
        if stall is not None and _aware(stall) < now - margin:
            add(RULE_DEADLINE, f"{state} and its stall deadline passed "
                               f"{_ago(now, stall)} ago: recovery has not re-driven it")
        deadline = row.deadline_at
        if (state in DEADLINE_STATES and deadline is not None
                and _aware(deadline) < now - margin):
            add(RULE_DEADLINE, f"{state} and its saga deadline passed "
                               f"{_ago(now, deadline)} ago: recovery has not compensated it")

    if idle:
        ran += 1
        if state in SAGA_PARKED:
            add(PARKED, f"{state}: an operator must retry or resolve it")
        elif state not in SAGA_TERMINAL:
            add(STUCK, f"{state} while the system is idle")
    return found, ran


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything the store writes is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _ago(now: datetime, then: datetime) -> str:
    return f"{(now - _aware(then)).total_seconds():.0f}s"


# --- domain checks ----------------------------------------------------------------------------
def check_name(check: AuditCheck) -> str:
    name = getattr(check, "__name__", None) or getattr(check, "__qualname__", None)
    return str(name) if name else repr(check)


def _run_check(check: AuditCheck, name: str, engine: Sagas) -> list[Finding]:
    found: list[Finding] = []
    try:
        result: Iterable[Any] | None = check(engine)
        for item in result or ():
            found.append(as_finding(item, name))
    except StoreUnavailableError:
        raise
    except Exception as exc:
        found.append(Finding(name, f"the check raised {type(exc).__name__}: {exc}"))
    return found


def as_finding(item: Any, check: str) -> Finding:
    """A domain check's finding: a ``Finding``, or a dict with rule/detail/saga keys."""
    if isinstance(item, Finding):
        return item
    if isinstance(item, Mapping):
        saga = item.get("saga", item.get("saga_id"))
        return Finding(
            rule=str(item.get("rule") or check),
            detail=str(item.get("detail", "")),
            saga_id=None if saga is None else str(saga),
        )
    return Finding(check, str(item))
