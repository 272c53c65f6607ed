"""The saga dashboard: what Flower cannot show, a saga as a whole, live.

Plain HTML and JavaScript served by a FastAPI router (no build step, nothing from a CDN): a list
of sagas with counts per state, their age and duration, filters by state, saga name and
"stalled", and search by id; and a page per saga with its step graph and a timeline chart of
every attempt, both drawn here as SVG, the timeline table, its context, links to each task in
Flower, and retry/cancel buttons for an operator with the admin token. Pages poll small JSON
endpoints under ``/dashboard/api`` (every second while the saga runs), which read the saga store
only; the saga's JSON carries the two SVG pictures, re-rendered at the width the page asks for.

The graph is layered by dependency depth (longest path from a root): parallel branches share a
layer, an edge that skips layers passes through reserved slots, and edges are drawn only in the
channels between layers, so none crosses a node or its label. Boxes are sized to their text
with a per-character width estimate for the monospace font the SVG sets (generous: 0.62 em, the
font's advance is 0.60 em), and the page shrinks a line to its box should a font still be wider.
"""

from __future__ import annotations

import html
import math
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from itertools import pairwise
from string import Template
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import func, or_, select

from sagas.coordinator import REDRIVEN
from sagas.definition import Saga
from sagas.engine import Sagas
from sagas.errors import SagaNotFoundError, SagaStateError
from sagas.ops.api import AdminAuth
from sagas.ops.bounds import MAX_OFFSET, MAX_VERSION
from sagas.runtime.message import step_task_id
from sagas.runtime.stalls import Stall, StallReason, stalled_clause
from sagas.settings import SagaSettings
from sagas.store.sql import _iso, sagas_t, utcnow

router = APIRouter(prefix="/dashboard", tags=["dashboard"])

SAGA_STATES = ("PENDING", "WAITING", "RUNNING", "COMPENSATING", "COMPLETED", "COMPENSATED",
               "COMPENSATION_FAILED", "FORWARD_FAILED")
LIVE_STATES = ("PENDING", "RUNNING", "COMPENSATING")
"""States in which a saga has work in flight: past its stall deadline it is stalled."""
SETTLED_STATES = ("COMPLETED", "COMPENSATED", "COMPENSATION_FAILED", "FORWARD_FAILED")
_ACTION_END = {"SUCCEEDED": "succeeded", "FAILED": "failed"}
_COMP_END = {"COMPENSATED": "compensated", "COMPENSATION_FAILED": "compensation_failed"}
RECOVERY_CAUSES = ("Redrive", "RetryRequested")
"""Causes of a step's same-state move that sent it again (recovery's, an operator's)."""
CANCEL_REASON = "cancelled by operator from the dashboard"

ENGINE_STATE = "sagas_engine"
AUTH_STATE = "sagas_dashboard_auth"


def install(app: Any, engine: Sagas, auth: AdminAuth | None = None) -> None:
    """Serve the dashboard of ``engine`` in the FastAPI ``app``.

    ``auth`` is the app's admin token check (the one its ``/sagas`` routes use): the page's
    retry and cancel need it, and answer 403 "disabled" without it.
    """
    setattr(app.state, ENGINE_STATE, engine)
    if auth is not None:
        use_auth(app, auth)
    if not getattr(app.state, "sagas_dashboard_routes", False):
        app.include_router(router)
        app.state.sagas_dashboard_routes = True


def use_auth(app: Any, auth: AdminAuth) -> None:
    """Let the dashboard's retry/cancel check ``auth`` (for an app installed without one)."""
    setattr(app.state, AUTH_STATE, auth)


def admin_auth(app: Any) -> AdminAuth | None:
    auth = getattr(app.state, AUTH_STATE, None)
    return auth if isinstance(auth, AdminAuth) else None


def _engine(request: Request) -> Sagas:
    engine = getattr(request.app.state, ENGINE_STATE, None)
    if not isinstance(engine, Sagas):
        raise HTTPException(500, "the dashboard was mounted without an engine: use install()")
    return engine


# --- time ------------------------------------------------------------------------------------
def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything the store writes is UTC."""
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _parse(iso: str | None) -> datetime | None:
    return None if not iso else _aware(datetime.fromisoformat(iso))


def _clock(at: datetime, tz_offset: int) -> str:
    """``HH:MM:SS`` in the browser's zone (``tz_offset`` as JavaScript's getTimezoneOffset)."""
    local = at.astimezone(UTC) - timedelta(minutes=tz_offset)
    return local.strftime("%H:%M:%S") + (" UTC" if tz_offset == 0 else "")


def duration_text(seconds: float) -> str:
    """A duration for people: ``850 ms``, ``4.2 s``, ``3 min 5 s``, ``2 h 10 min``, ``3 d 4 h``."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {sec} s" if sec else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


# --- JSON ------------------------------------------------------------------------------------
@router.get("/api/sagas")
def api_sagas(
    request: Request,
    state: str | None = Query(None, description="only sagas in this state"),
    name: str | None = Query(None, max_length=100, description="only sagas of this definition"),
    stalled: bool = Query(False, description="only live sagas past their stall deadline"),
    version: int | None = Query(None, ge=1, le=MAX_VERSION,
                                description="only sagas on this definition version"),
    q: str | None = Query(None, max_length=64, description="saga id or its beginning"),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> dict[str, Any]:
    """Sagas newest first with age and duration, counts per state (over all sagas), names."""
    engine = _engine(request)
    now = utcnow()
    is_stalled = stalled_clause(now)
    query = select(sagas_t.c.id, sagas_t.c.name, sagas_t.c.definition_version, sagas_t.c.state,
                   sagas_t.c.error, sagas_t.c.created_at, sagas_t.c.updated_at,
                   is_stalled.label("stalled"))
    total = select(func.count()).select_from(sagas_t)
    filters = []
    if state:
        filters.append(sagas_t.c.state == state)
    if name:
        filters.append(sagas_t.c.name == name)
    if stalled:
        filters.append(is_stalled)
    if version is not None:
        filters.append(sagas_t.c.definition_version == version)
    if q:
        pattern = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        filters.append(or_(sagas_t.c.id == q, sagas_t.c.id.like(pattern, escape="\\")))
    for f in filters:
        query, total = query.where(f), total.where(f)
    query = query.order_by(sagas_t.c.created_at.desc(), sagas_t.c.id).limit(limit).offset(offset)
    with engine.store.read() as conn:
        rows = conn.execute(query).all()
        count = int(conn.execute(total).scalar_one())
        counts = {r[0]: int(r[1]) for r in conn.execute(
            select(sagas_t.c.state, func.count()).group_by(sagas_t.c.state))}
        stalled_count = int(conn.execute(
            select(func.count()).select_from(sagas_t).where(is_stalled)).scalar_one())
        stored_names = {str(r[0]) for r in conn.execute(select(sagas_t.c.name).distinct())}
    return {
        "sagas": [_summary(r, now) for r in rows],
        "total": count,
        "counts": {s: counts.get(s, 0) for s in SAGA_STATES},
        "stalled": stalled_count,
        "names": sorted(stored_names | set(engine.sagas)),
        "now": _iso(now),
    }


def _summary(row: Any, now: datetime) -> dict[str, Any]:
    created, updated = _aware(row.created_at), _aware(row.updated_at)
    settled = row.state in SETTLED_STATES
    end = (updated or now) if settled else now
    return {
        "id": row.id, "name": row.name, "version": row.definition_version, "state": row.state,
        "error": row.error,
        "created_at": _iso(created), "updated_at": _iso(updated),
        "age_s": (now - created).total_seconds() if created else None,
        "duration_s": (end - created).total_seconds() if created else None,
        "stalled": bool(row.stalled),
    }


@router.get("/api/sagas/{saga_id}")
def api_saga(
    request: Request,
    saga_id: str,
    width: int = Query(1100, ge=240, le=4000, description="pixels the page has for a picture"),
    tzo: int = Query(0, ge=-900, le=900, description="the browser's getTimezoneOffset()"),
) -> dict[str, Any]:
    """The saga's view (as ``GET /sagas/{id}``) plus its graph, timeline and Flower links.

    ``graph_svg`` and ``timeline_svg`` are the two pictures, drawn for ``width`` pixels.
    """
    engine = _engine(request)
    try:
        view = engine.store.get_view(saga_id)
    except SagaNotFoundError:
        raise HTTPException(404, f"no saga with id {saga_id!r}") from None
    now = utcnow()
    saga = engine.sagas.get(view["name"])
    flower = engine.settings.flower_url.rstrip("/")
    stall = stall_of(engine.stall(saga_id, now), engine.settings, tzo)
    entries = timeline(view, flower)
    picture = draw_graph(view, saga, stall, width)
    view["graph"] = graph(view, saga)
    view["timeline"] = entries
    view["locks"]["holders"] = {k: engine.lock_holder(k) for k in view["locks"]["waits"]}
    view["flower_url"] = flower
    view["stalled"] = stall
    view["live"] = view["state"] in LIVE_STATES
    view["actions"] = actions(view, saga, stall)
    view["graph_svg"] = picture.svg
    view["graph_orientation"] = picture.orientation
    view["timeline_svg"] = draw_timeline(view, entries, now, width, tzo, stall)
    view["timeline_legend"] = TIMELINE_LEGEND
    view["now"] = _iso(now)
    return view


def stall_of(stall: Stall | None, settings: SagaSettings, tz_offset: int = 0
             ) -> dict[str, Any] | None:
    """Why a live saga makes no progress (``Sagas.stall``, read from its log), as the page
    shows it: a sentence per stalled step, a short reason for each box, and the deadline that
    passed (a marker on the timeline) when recovery has not acted yet; else None."""
    if stall is None:
        return None

    def clock(at: datetime) -> str:
        return _clock(at, tz_offset)

    overdue = [s.next_look for s in stall.steps if s.reason is StallReason.OVERDUE]
    return {
        "since": _iso(stall.since), "deadline": _iso(min(overdue)) if overdue else None,
        "steps": [s.step for s in stall.steps],
        "reasons": {s.step: _box_reason(s.reason, s.queue, s.looks, clock(s.since))
                    for s in stall.steps},
        "kinds": {s.step: str(s.reason) for s in stall.steps},
        "reason": stall.reason(settings, clock),
    }


def _box_reason(reason: StallReason, queue: str | None, looks: int, since: str) -> str:
    """What a stalled step's box says (its first clause on one line, the rest below)."""
    if reason is StallReason.QUEUED:
        return f"queued on {queue!r} since {since}; no worker has taken it"
    if reason is StallReason.REDRIVEN:
        times = "once" if looks == 1 else f"{looks} times"
        return f"no progress since {since}; re-driven {times}"
    return f"no progress since {since}; recovery re-drives it"


def actions(view: dict[str, Any], saga: Saga | None, stall: dict[str, Any] | None
            ) -> dict[str, dict[str, Any]]:
    """Which of retry and cancel the page offers now, and why not (the POSTs decide)."""
    state = view["state"]
    if state == "COMPENSATION_FAILED":
        retry = {"allowed": True, "why": "resume the parked rollback"}
    elif state == "FORWARD_FAILED":
        retry = {"allowed": True, "why": "send the failed steps again (a fresh forward budget)"}
    elif stall is not None:
        retry = {"allowed": True, "why": "re-drive the stalled saga now"}
    else:
        retry = {"allowed": False,
                 "why": "only a parked (COMPENSATION_FAILED, FORWARD_FAILED) or stalled saga "
                        "is retried"}
    steps = {s["name"]: s["state"] for s in view["steps"]}
    pivot = saga.pivot if saga is not None else None
    if state not in ("PENDING", "WAITING", "RUNNING"):
        cancel = {"allowed": False, "why": f"a {state} saga does not cancel"}
    elif pivot is not None and steps.get(pivot) == "SUCCEEDED":
        cancel = {"allowed": False, "why": f"past its pivot {pivot!r}: it can only go forward"}
    else:
        cancel = {"allowed": True, "why": "compensate what it did"}
    return {"retry": retry, "cancel": cancel}


def _parents_of(view: dict[str, Any], saga: Saga | None) -> dict[str, tuple[str, ...]]:
    """Each step's parents, from the definition; a chain in stored order when unknown here."""
    names = [s["name"] for s in view["steps"]]
    known = set(names)
    parents: dict[str, tuple[str, ...]] = {}
    for i, n in enumerate(names):
        if saga is not None and n in saga.parents:
            parents[n] = tuple(p for p in saga.parents[n] if p in known)
        else:  # a definition this process does not know: show the stored order as a chain
            parents[n] = (names[i - 1],) if i else ()
    return parents


def _levels(names: Sequence[str], parents: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """Depth of each step: the longest path from a root (stored order is topological)."""
    level: dict[str, int] = {}
    for n in names:
        level[n] = max((level.get(p, 0) + 1 for p in parents[n]), default=0)
    return level


def graph(view: dict[str, Any], saga: Saga | None) -> dict[str, Any]:
    """Nodes with their depth (longest path from a root) and row, and the edges."""
    steps = {s["name"]: s for s in view["steps"]}
    names = list(steps)
    parents = _parents_of(view, saga)
    level = _levels(names, parents)
    rows: dict[int, int] = {}
    nodes = []
    for n in names:
        row = rows.get(level[n], 0)
        rows[level[n]] = row + 1
        pivot = bool(saga is not None and saga.pivot == n)
        nodes.append({"name": n, "state": steps[n]["state"], "level": level[n], "row": row,
                      "pivot": pivot, "attempts": steps[n]["attempts"],
                      "compensation_attempts": steps[n]["compensation_attempts"]})
    edges = [[p, n] for n in names for p in parents[n]]
    return {"nodes": nodes, "edges": edges}


def timeline(view: dict[str, Any], flower: str) -> list[dict[str, Any]]:
    """Every attempt and compensation from the saga's history, in the order they started.

    An attempt that a re-drive replaced ends with outcome ``redriven``; the attempt the re-drive
    dispatched has ``redrive`` true. An outcome is credited to the attempt the history names:
    when an older delivery's outcome came first (a slow first delivery that succeeded after a
    re-drive), that delivery's bar (and its task) gets it, and the newer one is ``superseded``.
    A re-drive recovery held (its message still waited in the broker) starts no bar: the bar in
    flight counts it in ``held``.
    """
    entries: list[dict[str, Any]] = []
    open_: dict[tuple[str, str], dict[str, Any]] = {}
    dispatched: dict[tuple[str, str], int] = {}
    by_attempt: dict[tuple[str, str, int], dict[str, Any]] = {}

    def start(step: str, phase: str, attempt: int, at: str | None, redispatch: bool,
              redrive: bool) -> None:
        key = (step, phase)
        if redispatch or key not in dispatched:
            dispatched[key] = attempt  # a new message (task id); a Celery retry keeps its id
        task_id = step_task_id(view["id"], step, phase, dispatched[key])
        entry = {"step": step, "phase": phase, "attempt": attempt, "started_at": at,
                 "ended_at": None, "outcome": "running", "error": None, "task_id": task_id,
                 "flower": f"{flower}/task/{task_id}", "redrive": redrive, "held": 0}
        entries.append(entry)
        open_[key] = entry
        by_attempt[(step, phase, attempt)] = entry

    def end(step: str, phase: str, outcome: str, at: str | None, error: str | None,
            attempt: int) -> None:
        key = (step, phase)
        current = open_.pop(key, None)
        credited = by_attempt.get((step, phase, attempt))
        if credited is None or credited is current:
            if current is not None:
                current.update(ended_at=at, outcome=outcome, error=error)
            return
        credited.update(ended_at=at, outcome=outcome, error=error)
        if current is not None:  # it may still run; its outcome no longer decides anything
            current.update(ended_at=at, outcome="superseded",
                           error=f"attempt {attempt} ended first")

    for e in view["events"]:
        step, src, dst, at = e["step"], e["from_state"], e["to_state"], e["at"]
        if step is None:
            continue
        if dst in ("RUNNING", "COMPENSATING"):
            phase = "action" if dst == "RUNNING" else "compensation"
            again = src == dst
            current = open_.get((step, phase))
            if again and current is not None and e["attempt"] <= current["attempt"]:
                current["held"] += 1  # recovery held it: no new message
                continue
            redrive = again and (e.get("cause") in RECOVERY_CAUSES or e["error"] == REDRIVEN)
            if again:
                end(step, phase, "redriven" if redrive else "retry", at,
                    None if redrive else e["error"], current["attempt"] if current else 0)
            start(step, phase, e["attempt"], at, redispatch=not again or redrive,
                  redrive=redrive)
        elif dst in _ACTION_END:
            end(step, "action", _ACTION_END[dst], at, e["error"], e["attempt"])
        elif dst in _COMP_END:
            end(step, "compensation", _COMP_END[dst], at, e["error"], e["attempt"])
        elif dst == "SKIPPED":
            entries.append({"step": step, "phase": "skipped", "attempt": 0, "started_at": at,
                            "ended_at": at, "outcome": "skipped", "error": None,
                            "task_id": None, "flower": None, "redrive": False, "held": 0})
    return entries


# --- retry and cancel --------------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="ADMIN_TOKEN as a Bearer token")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def refuse_cross_site(request: Request) -> None:
    """403 unless the request comes from this site's own pages (Fetch metadata and Origin)."""
    if request.headers.get("sec-fetch-site", "").lower() == "cross-site":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "cross-site request refused")
    origin = request.headers.get("origin")
    if origin is not None:
        host = request.headers.get("host", "").lower()
        if urlsplit(origin).netloc.lower() != host or not host:
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                "cross-site request refused: Origin does not match Host")


def _authorize(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
    refuse_cross_site(request)
    auth = admin_auth(request.app)
    if auth is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            "admin actions are disabled: the dashboard has no admin token check "
                            "(dashboard.install(app, engine, auth=...))")
    auth.check(credentials)  # the API's own comparison: 401 without a token, 403 if wrong


def _act(request: Request, saga_id: str, action: str) -> dict[str, Any]:
    engine = _engine(request)
    try:
        if action == "retry":
            decision = engine.retry(saga_id)
        else:
            decision = engine.cancel(saga_id, CANCEL_REASON)
        state = str(engine.handle(saga_id).state)
    except SagaNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except SagaStateError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    note = None if decision.ignored is None else decision.ignored.detail
    return {"id": saga_id, "action": action, "state": state, "note": note}


@router.post("/api/sagas/{saga_id}/retry", status_code=status.HTTP_202_ACCEPTED)
def api_retry(request: Request, saga_id: str, credentials: Credentials) -> dict[str, Any]:
    """Resume a parked saga's rollback, or re-drive a stalled one (admin token, same site)."""
    _authorize(request, credentials)
    return _act(request, saga_id, "retry")


@router.post("/api/sagas/{saga_id}/cancel", status_code=status.HTTP_202_ACCEPTED)
def api_cancel(request: Request, saga_id: str, credentials: Credentials) -> dict[str, Any]:
    """Compensate a running saga; 409 once its pivot succeeded (admin token, same site)."""
    _authorize(request, credentials)
    return _act(request, saga_id, "cancel")


# --- drawing: shared -------------------------------------------------------------------------
FONT = "'DejaVu Sans Mono','Liberation Mono',Menlo,Consolas,ui-monospace,monospace"
CHAR_EM = 0.62
"""Width of one character in em, for the monospace fonts of FONT (their advance is 0.60 em)."""
WIDE_EM = 1.0
"""East Asian wide and full-width characters take a whole em in those fonts' fallbacks."""


def text_width(text: str, size: float) -> float:
    """A generous estimate of ``text``'s width in pixels at ``size`` px in FONT."""
    em = 0.0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        em += WIDE_EM if unicodedata.east_asian_width(ch) in ("W", "F") else CHAR_EM
    return em * size


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


@dataclass(frozen=True)
class Paint:
    fill: str
    text: str
    border: str


# Text on fill is at least 4.5:1 for each (WCAG 2 contrast; see tests/browser).
STEP_PAINT: dict[str, Paint] = {
    "PENDING": Paint("#eef1f4", "#323f4b", "#7b8794"),
    "RUNNING": Paint("#1d4ed8", "#ffffff", "#1e3a8a"),
    "SUCCEEDED": Paint("#17693a", "#ffffff", "#0b3d20"),
    "FAILED": Paint("#b91c1c", "#ffffff", "#6f1010"),
    "COMPENSATING": Paint("#b45309", "#ffffff", "#6b3000"),
    "COMPENSATED": Paint("#6d28d9", "#ffffff", "#3b0f80"),
    "COMPENSATION_FAILED": Paint("#7f1d1d", "#ffffff", "#3d0a0a"),
    "SKIPPED": Paint("#f5f7fa", "#52606d", "#9aa5b1"),
}
SAGA_PAINT: dict[str, Paint] = {
    "PENDING": STEP_PAINT["PENDING"], "RUNNING": STEP_PAINT["RUNNING"],
    "WAITING": Paint("#fef3c7", "#78350f", "#b45309"),  # waits for a semantic lock
    "COMPENSATING": STEP_PAINT["COMPENSATING"], "COMPLETED": STEP_PAINT["SUCCEEDED"],
    "COMPENSATED": STEP_PAINT["COMPENSATED"],
    "COMPENSATION_FAILED": STEP_PAINT["COMPENSATION_FAILED"],
    "FORWARD_FAILED": STEP_PAINT["COMPENSATION_FAILED"],
}
STALL_COLOUR = "#f59e0b"
EDGE_COLOUR = "#52606d"
INK = "#1f2933"
CANVAS = "#ffffff"
_UNKNOWN = Paint("#52606d", "#ffffff", "#323f4b")


def _state_label(state: str) -> str:
    return state.lower().replace("_", " ")


# --- drawing: the graph ----------------------------------------------------------------------
NAME_PX = 13
LINE_PX = 12
NOTE_PX = 11
PAD_X = 12
LINE_H = 16
BOX_MIN_W = 84
MARGIN = 14
DUMMY = 10.0
GAP = {"TB": (56.0, 28.0), "LR": (64.0, 22.0)}
"""Per orientation: (the channel between layers, the gap between neighbours in a layer)."""


@dataclass
class _Item:
    """A node of the layered graph, or a dummy slot an edge passes a layer through."""

    key: str
    layer: int
    cross: float  # size across the layers
    along: float  # size along the layers' direction
    dummy: bool = False
    preds: list[int] = field(default_factory=list)
    succs: list[int] = field(default_factory=list)
    center: float = 0.0


@dataclass(frozen=True)
class Box:
    name: str
    x: float
    y: float
    w: float
    h: float


@dataclass(frozen=True)
class Layout:
    orientation: str  # "TB": layers top to bottom; "LR": left to right
    width: float
    height: float
    boxes: dict[str, Box]
    edges: list[tuple[str, str, str]]  # (from, to, SVG path)


def _crossings(layers: list[list[int]], items: list[_Item]) -> int:
    total = 0
    for upper, lower in pairwise(layers):
        pos_u = {it: i for i, it in enumerate(upper)}
        pos_l = {it: i for i, it in enumerate(lower)}
        pairs = [(pos_u[u], pos_l[v]) for u in upper for v in items[u].succs if v in pos_l]
        total += sum(1 for i, (a, b) in enumerate(pairs) for c, d in pairs[i + 1:]
                     if (a - c) * (b - d) < 0)
    return total


def _order(layers: list[list[int]], items: list[_Item]) -> list[list[int]]:
    """Barycenter sweeps down and up; keeps the order with the fewest crossings."""
    best = [list(layer) for layer in layers]
    best_x = _crossings(best, items)
    current = [list(layer) for layer in layers]
    for sweep in range(8):
        down = sweep % 2 == 0
        indices = range(1, len(current)) if down else range(len(current) - 2, -1, -1)
        for i in indices:
            ref = {it: k for k, it in enumerate(current[i - 1 if down else i + 1])}
            here = {it: k for k, it in enumerate(current[i])}

            def weight(it: int, ref: dict[int, int] = ref, here: dict[int, int] = here,
                       down: bool = down) -> tuple[float, int]:
                near = items[it].preds if down else items[it].succs
                seen = [ref[n] for n in near if n in ref]
                return (sum(seen) / len(seen) if seen else float(here[it]), here[it])

            current[i].sort(key=weight)
        crossings = _crossings(current, items)
        if crossings < best_x:
            best, best_x = [list(layer) for layer in current], crossings
    return best


def _fit(desired: list[float], sizes: list[float], gap: float) -> list[float]:
    """Centres in this order nearest ``desired`` (least squares) with ``gap`` between items.

    Subtracting each item's minimum offset from the first turns the spacing constraints into
    "non-decreasing", solved exactly by pooling adjacent violators.
    """
    offsets = [0.0]
    for a, b in pairwise(sizes):
        offsets.append(offsets[-1] + (a + b) / 2 + gap)
    blocks: list[list[float]] = []  # [sum, count]
    for d, o in zip(desired, offsets, strict=True):
        blocks.append([d - o, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    values: list[float] = []
    for s, c in blocks:
        values.extend([s / c] * int(c))
    return [v + o for v, o in zip(values, offsets, strict=True)]


def layout(names: Sequence[str], parents: dict[str, tuple[str, ...]],
           sizes: dict[str, tuple[float, float]], orientation: str) -> Layout:
    """Place ``names`` (boxes of ``sizes`` (w, h)) in layers by depth, and route the edges."""
    channel, gap = GAP[orientation]
    across = 1 if orientation == "TB" else 0  # which of (w, h) lies across the layers
    level = _levels(names, parents)
    items: list[_Item] = []
    index: dict[str, int] = {}
    for n in names:
        w, h = sizes[n]
        index[n] = len(items)
        items.append(_Item(n, level[n], cross=(w, h)[1 - across], along=(w, h)[across]))
    chains: list[tuple[str, str, list[int]]] = []
    for n in names:
        for p in parents[n]:
            chain = [index[p]]
            for lay in range(level[p] + 1, level[n]):
                items.append(_Item("", lay, cross=DUMMY, along=0.0, dummy=True))
                chain.append(len(items) - 1)
            chain.append(index[n])
            for a, b in pairwise(chain):
                items[a].succs.append(b)
                items[b].preds.append(a)
            chains.append((p, n, chain))
    depth = max(level.values(), default=0) + 1
    layers: list[list[int]] = [[] for _ in range(depth)]
    for i, it in enumerate(items):
        layers[it.layer].append(i)
    layers = _order(layers, items)

    for layer in layers:  # packed, centred on 0
        sizes_ = [items[i].cross for i in layer]
        centres = _fit([0.0] * len(layer), sizes_, gap)
        for i, c in zip(layer, centres, strict=True):
            items[i].center = c
    for _ in range(4):
        for down in (True, False):
            order = range(1, depth) if down else range(depth - 2, -1, -1)
            for li in order:
                layer = layers[li]
                desired = []
                for i in layer:
                    near = items[i].preds if down else items[i].succs
                    desired.append(sum(items[n].center for n in near) / len(near) if near
                                   else items[i].center)
                centres = _fit(desired, [items[i].cross for i in layer], gap)
                for i, c in zip(layer, centres, strict=True):
                    items[i].center = c
    low = min(items[i].center - items[i].cross / 2 for i in range(len(items)))
    for it in items:
        it.center += MARGIN - low
    cross_extent = max(it.center + it.cross / 2 for it in items) + MARGIN

    band_start: list[float] = []
    band_end: list[float] = []
    at = float(MARGIN)
    for layer in layers:
        thick = max(items[i].along for i in layer)
        band_start.append(at)
        band_end.append(at + thick)
        at += thick + channel
    along_extent = band_end[-1] + MARGIN

    def point(along: float, cross: float) -> tuple[float, float]:
        return (cross, along) if orientation == "TB" else (along, cross)

    boxes: dict[str, Box] = {}
    for n in names:
        it = items[index[n]]
        a0 = band_start[it.layer] + (band_end[it.layer] - band_start[it.layer] - it.along) / 2
        x, y = point(a0, it.center - it.cross / 2)
        w, h = sizes[n]
        boxes[n] = Box(n, x, y, w, h)

    def start_of(i: int) -> float:  # where an edge enters item i, along the layers
        it = items[i]
        if it.dummy:
            return band_start[it.layer]
        return band_start[it.layer] + (band_end[it.layer] - band_start[it.layer] - it.along) / 2

    def end_of(i: int) -> float:
        it = items[i]
        if it.dummy:
            return band_end[it.layer]
        return start_of(i) + it.along

    def fmt(p: tuple[float, float]) -> str:
        return f"{_num(p[0])},{_num(p[1])}"

    edges: list[tuple[str, str, str]] = []
    for p, n, chain in chains:
        first = items[chain[0]]
        d = [f"M{fmt(point(end_of(chain[0]), first.center))}"]
        for a, b in pairwise(chain):
            ia, ib = items[a], items[b]
            leave = band_end[ia.layer]
            if end_of(a) < leave:  # a box thinner than its layer: straight out to the channel
                d.append(f"L{fmt(point(leave, ia.center))}")
            arrive = band_start[ib.layer]
            mid = (leave + arrive) / 2
            d.append(f"C{fmt(point(mid, ia.center))} {fmt(point(mid, ib.center))} "
                     f"{fmt(point(arrive, ib.center))}")
            if start_of(b) > arrive:
                d.append(f"L{fmt(point(start_of(b), ib.center))}")
            if ib.dummy:
                d.append(f"L{fmt(point(band_end[ib.layer], ib.center))}")
        edges.append((p, n, " ".join(d)))
    width, height = point(along_extent, cross_extent)
    return Layout(orientation, width, height, boxes, edges)


@dataclass(frozen=True)
class Picture:
    svg: str
    orientation: str
    width: float
    height: float


def _node_lines(step: dict[str, Any], pivot: bool, reason: str | None
                ) -> list[tuple[str, str, int]]:
    """(text, class, px) of each line in a step's box: name, state, and why it is stalled."""
    state = step["state"]
    in_flight = state in ("RUNNING", "COMPENSATING")
    parts = ["pivot"] if pivot else []
    parts.append(_state_label(state))
    tries = step["attempts"]
    undo = step["compensation_attempts"]
    if state == "RUNNING" and tries > 1:
        parts.append(f"try {tries}")
    elif tries > 1:
        parts.append(f"{tries} tries")
    if state == "COMPENSATING" and undo > 1:
        parts.append(f"undo try {undo}")
    elif undo > 1 and not in_flight:
        parts.append(f"{undo} undo tries")
    lines = [(step["name"], "name", NAME_PX), (" · ".join(parts), "state", LINE_PX)]
    if reason:
        head, _, tail = reason.partition("; ")
        lines.append((f"stalled: {head}", "stall", NOTE_PX))
        if tail:
            lines.append((tail, "stall", NOTE_PX))
    return lines


def _box_size(lines: list[tuple[str, str, int]]) -> tuple[float, float]:
    w = max(text_width(text, px) for text, _, px in lines) + 2 * PAD_X
    return math.ceil(max(w, BOX_MIN_W)), 16 + LINE_H * len(lines)


def draw_graph(view: dict[str, Any], saga: Saga | None, stall: dict[str, Any] | None,
               width: float = 1100) -> Picture:
    """The step graph as SVG: left to right when that fits in ``width``, else top to bottom.

    When neither fits, the narrower is drawn and the page scrolls it sideways.
    """
    names = [s["name"] for s in view["steps"]]
    steps = {s["name"]: s for s in view["steps"]}
    parents = _parents_of(view, saga)
    stalled_steps = set(stall["steps"]) if stall else set()
    reasons: dict[str, str] = dict(stall.get("reasons") or {}) if stall else {}
    for n in stalled_steps:
        reasons.setdefault(n, stall["reason"] if stall else "")
    lines = {n: _node_lines(steps[n], bool(saga and saga.pivot == n), reasons.get(n))
             for n in names}
    sizes = {n: _box_size(lines[n]) for n in names}
    if not names:
        return Picture("<svg xmlns='http://www.w3.org/2000/svg' width='0' height='0'></svg>",
                       "LR", 0, 0)
    chosen = layout(names, parents, sizes, "LR")
    if chosen.width > width:  # top to bottom, unless that is wider still (then it scrolls)
        down = layout(names, parents, sizes, "TB")
        chosen = down if down.width <= width or down.width < chosen.width else chosen
    w, h = math.ceil(chosen.width), math.ceil(chosen.height)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="saga-graph" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" data-orientation="{chosen.orientation}" role="img" '
        f'aria-label="steps of saga {_esc(view["name"])}" font-family="{FONT}">',
        '<defs><marker id="sg-arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        f'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        f'fill="{EDGE_COLOUR}"/></marker></defs>',
        f'<rect class="canvas" x="0" y="0" width="{w}" height="{h}" fill="{CANVAS}"/>',
    ]
    for p, n, d in chosen.edges:
        out.append(f'<path class="edge" data-from="{_esc(p)}" data-to="{_esc(n)}" d="{d}" '
                   f'fill="none" stroke="{EDGE_COLOUR}" stroke-width="1.6" '
                   'marker-end="url(#sg-arrow)"/>')
    joins = {n for n in names if len(parents[n]) > 1}
    for n in names:
        box, step = chosen.boxes[n], steps[n]
        state = step["state"]
        paint = STEP_PAINT.get(state, _UNKNOWN)
        pivot = bool(saga and saga.pivot == n)
        in_flight = state in ("RUNNING", "COMPENSATING")
        stalled = n in stalled_steps
        reason = reasons.get(n)
        classes = ["node"] + [c for c, on in (("pivot", pivot), ("in-flight", in_flight),
                                               ("stalled", stalled), ("join", n in joins)) if on]
        attrs = f'class="{" ".join(classes)}" data-step="{_esc(n)}" data-state="{_esc(state)}"'
        if stalled and reason:
            attrs += f' data-stalled-reason="{_esc(reason)}"'
        title = f"{n}: {_state_label(state)}"
        if parents[n]:
            title += f"; after {', '.join(parents[n])}"
        if step.get("error"):
            title += f"\n{step['error']}"
        for label, start_key, end_key in (
                ("action", "started_at", "finished_at"),
                ("compensation", "compensation_started_at", "compensation_finished_at")):
            began, ended = _parse(step.get(start_key)), _parse(step.get(end_key))
            if began is not None:
                title += f"\n{label}: sent {_clock(began, 0)}"
                if ended is not None:
                    took = duration_text((ended - began).total_seconds())
                    title += f", ended {_clock(ended, 0)} ({took})"
        if stalled and reason:
            title += f"\nstalled: {reason}"
        out.append(f"<g {attrs}><title>{_esc(title)}</title>")
        x, y, bw, bh = box.x, box.y, box.w, box.h
        if stalled:  # a solid amber ring; in flight only: a dashed ring of the state's colour
            out.append(f'<rect class="halo stall-ring" x="{_num(x - 5)}" y="{_num(y - 5)}" '
                       f'width="{_num(bw + 10)}" height="{_num(bh + 10)}" rx="11" fill="none" '
                       f'stroke="{STALL_COLOUR}" stroke-width="3.5"/>')
        elif in_flight:
            out.append(f'<rect class="halo" x="{_num(x - 5)}" y="{_num(y - 5)}" '
                       f'width="{_num(bw + 10)}" height="{_num(bh + 10)}" rx="11" fill="none" '
                       f'stroke="{paint.fill}" stroke-width="2.5" stroke-dasharray="6 4"/>')
        dash = ' stroke-dasharray="5 3"' if state in ("PENDING", "SKIPPED") else ""
        out.append(f'<rect class="box" x="{_num(x)}" y="{_num(y)}" width="{_num(bw)}" '
                   f'height="{_num(bh)}" rx="{0 if pivot else 8}" fill="{paint.fill}" '
                   f'stroke="{paint.border}" stroke-width="1.5"{dash}/>')
        if pivot:
            out.append(f'<rect class="pivot-ring" x="{_num(x + 3)}" y="{_num(y + 3)}" '
                       f'width="{_num(bw - 6)}" height="{_num(bh - 6)}" fill="none" '
                       f'stroke="{paint.text}" stroke-width="1"/>')
        baseline = y + 8 + 12
        for text, cls, px in lines[n]:
            weight = ' font-weight="700"' if cls == "name" else ""
            out.append(f'<text class="label {cls}" x="{_num(x + PAD_X)}" y="{_num(baseline)}" '
                       f'font-size="{px}"{weight} fill="{paint.text}" '
                       f'data-room="{_num(bw - 2 * PAD_X)}">{_esc(text)}</text>')
            baseline += LINE_H
        out.append("</g>")
    out.append("</svg>")
    return Picture("".join(out), chosen.orientation, w, h)


# --- drawing: the timeline -------------------------------------------------------------------
BAR_PAINT: dict[tuple[str, str], Paint] = {
    ("action", "succeeded"): Paint("#17693a", "#ffffff", "#0b3d20"),
    ("action", "failed"): Paint("#b91c1c", "#ffffff", "#6f1010"),
    ("action", "retry"): Paint("#a16207", "#ffffff", "#5c3700"),
    ("action", "redriven"): Paint("#52606d", "#ffffff", "#323f4b"),
    ("action", "superseded"): Paint("#4b5563", "#ffffff", "#1f2933"),
    ("action", "running"): Paint("#1d4ed8", "#ffffff", "#1e3a8a"),
    ("compensation", "compensated"): Paint("#6d28d9", "#ffffff", "#3b0f80"),
    ("compensation", "compensation_failed"): Paint("#7f1d1d", "#ffffff", "#3d0a0a"),
    ("compensation", "retry"): Paint("#a21caf", "#ffffff", "#5b0f63"),
    ("compensation", "redriven"): Paint("#52606d", "#ffffff", "#323f4b"),
    ("compensation", "superseded"): Paint("#4b5563", "#ffffff", "#1f2933"),
    ("compensation", "running"): Paint("#c2410c", "#ffffff", "#6b2406"),
    ("skipped", "skipped"): Paint("#616e7c", "#ffffff", "#3e4c59"),
}
TIMELINE_LEGEND = [
    [BAR_PAINT["action", "succeeded"].fill, "succeeded"],
    [BAR_PAINT["action", "failed"].fill, "failed"],
    [BAR_PAINT["action", "retry"].fill, "retried"],
    [BAR_PAINT["action", "redriven"].fill, "no progress, re-driven"],
    [BAR_PAINT["action", "superseded"].fill, "an older attempt ended first"],
    [BAR_PAINT["action", "running"].fill, "running"],
    [BAR_PAINT["compensation", "compensated"].fill, "undone"],
    [BAR_PAINT["compensation", "retry"].fill, "undo retried"],
    [BAR_PAINT["compensation", "running"].fill, "undoing"],
    [BAR_PAINT["compensation", "compensation_failed"].fill, "undo failed"],
]
MARKER_INK = {
    "failure": "#b91c1c", "cancel": "#9a3412", "deadline": "#9a3412", "retry": "#1d4ed8",
    "redrive": "#52606d", "held": "#92400e", "parked": "#7f1d1d", "completed": "#17693a",
    "compensated": "#6d28d9", "now": "#323f4b", "stalled": "#92400e",
}
ROW_H = 28
BAR_H = 18
TL_PX = 12
LANE_H = 17


@dataclass(frozen=True)
class Marker:
    kind: str
    at: datetime
    label: str
    detail: str


def markers(view: dict[str, Any]) -> list[Marker]:
    """Moments of the saga as a whole: failure, cancel, retry requests, re-drives, the end."""
    out: list[Marker] = []
    failed_step: str | None = None
    redrives: dict[datetime, list[str]] = {}
    holds: dict[datetime, list[str]] = {}
    attempts: dict[tuple[str, str], int] = {}
    for e in view["events"]:
        at = _parse(e["at"])
        if at is None:
            continue
        step, src, dst, error = e["step"], e["from_state"], e["to_state"], e["error"] or ""
        if step is not None:
            if dst == "FAILED":
                failed_step = step
            key = (step, dst)
            if src == dst and e["attempt"] <= attempts.get(key, 0):
                holds.setdefault(at, []).append(step)
            elif src == dst and (e.get("cause") in RECOVERY_CAUSES or error == REDRIVEN):
                redrives.setdefault(at, []).append(step)
            attempts[key] = max(attempts.get(key, 0), int(e["attempt"]))
            continue
        if dst == "COMPENSATING" and src in ("PENDING", "RUNNING"):
            if error.startswith("cancelled"):
                out.append(Marker("cancel", at, "cancel", error))
            elif "deadline" in error:
                out.append(Marker("deadline", at, "deadline passed", error))
            else:
                what = f"failure: {failed_step}" if failed_step else "failure"
                out.append(Marker("failure", at, what, error))
        elif dst == "COMPENSATING" and src == "COMPENSATION_FAILED":
            out.append(Marker("retry", at, "retry requested", "an operator resumed the rollback"))
        elif dst == "RUNNING" and src == "FORWARD_FAILED":
            out.append(Marker("retry", at, "retry requested",
                              "an operator sent the failed steps again"))
        elif dst in ("COMPENSATION_FAILED", "FORWARD_FAILED"):
            out.append(Marker("parked", at, "parked", error))
        elif dst == "COMPLETED":
            out.append(Marker("completed", at, "completed", ""))
        elif dst == "COMPENSATED":
            out.append(Marker("compensated", at, "compensated", ""))
    for at, steps in redrives.items():
        out.append(Marker("redrive", at, "re-drive", "re-driven: " + ", ".join(steps)))
    for at, steps in holds.items():
        out.append(Marker("held", at, "held", "not re-driven, its message still waits in the "
                          "broker: " + ", ".join(steps)))
    return sorted(out, key=lambda m: m.at)


def _tick_step(span: float, room: float) -> float:
    """A 1-2-5 step in seconds giving a tick at least every ~90 px of ``room``."""
    rough = span / max(1.0, room / 90)
    base = 10 ** math.floor(math.log10(rough)) if rough > 0 else 0.001
    for m in (1, 2, 5, 10):
        if base * m >= rough:
            return float(base * m)
    return float(base * 10)


def _offset_text(seconds: float, step: float) -> str:
    """A tick's offset from the saga's start, as precise as the tick step needs."""
    if seconds == 0:
        return "0"
    if seconds < 1:
        return f"+{seconds * 1000:.0f} ms"
    if step < 60 or seconds < 120:
        decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
        return f"+{seconds:.{decimals}f} s"
    if step < 3600:
        return f"+{seconds / 60:.0f} min"
    return f"+{seconds / 3600:.0f} h"


def _bar_label(labels: list[str], start: float, w: float, taken: list[tuple[float, float]],
               left_end: float, right_end: float) -> tuple[str, float, bool] | None:
    """Where a bar's label goes: (text, x, outside the bar) inside it, else after it, else
    before it, clear of what ``taken`` holds (the row's other bars and labels); None when it
    fits nowhere."""
    end = start + w
    for text in labels:
        lw = text_width(text, TL_PX - 1)
        if w >= lw + 8:
            return text, start + 4, False
        for lx in (end + 4, start - 4 - lw):
            low, high = lx - 3, lx + lw + 3
            if low >= left_end and high <= right_end and all(
                    high <= a or low >= b for a, b in taken):
                return text, lx, True
    return None


def _place_markers(moments: list[Marker], x_of: Callable[[datetime], float], width: float
                   ) -> list[tuple[Marker, float, float, int, str]]:
    """(marker, x, label x, lane, text-anchor) for each: labels in lanes above the rows, none
    over another label, and no marker's line (from its label down to the rows) through a label.

    Markers are placed in time order, and if that leaves one with no clean spot (two markers
    a few pixels apart at the right edge: the later one's label would sit on the earlier one's
    line), in reverse time order, so the later one takes the upper lane.
    """
    best: list[tuple[Marker, float, float, int, str]] = []
    least = None
    for order in (moments, moments[::-1]):
        placed, forced = _place_in_order(order, x_of, width)
        if least is None or forced < least:
            best, least = placed, forced
        if not forced:
            break
    rank = {id(m): i for i, m in enumerate(moments)}
    return sorted(best, key=lambda p: rank[id(p[0])])


def _place_in_order(moments: list[Marker], x_of: Callable[[datetime], float], width: float
                    ) -> tuple[list[tuple[Marker, float, float, int, str]], int]:
    """One placement in the given order, and how many labels found no clean spot."""
    forced = 0
    placed: list[tuple[Marker, float, float, int, str]] = []
    spans: list[tuple[int, float, float]] = []  # lane, left, right of each label placed
    for m in moments:
        x = x_of(m.at)
        w = text_width(m.label, TL_PX)
        choice: tuple[float, int, str] | None = None
        fallback: tuple[float, int, str] | None = None
        for lane in range(len(placed) + 1):
            for anchor, left in (("start", x + 4), ("end", x - 4 - w)):
                if left < 2 or left + w > width - 2:
                    continue
                low, high = left - 3, left + w + 3
                lx = left if anchor == "start" else x - 4
                fallback = fallback or (lx, len(placed), anchor)
                free = all(lane != k or high <= a or low >= b for k, a, b in spans)
                # A marker's line runs from its own label's lane down to the rows: it must not
                # pass through a label in that lane or below (nor this one's through theirs).
                uncrossed = all(not (k <= lane and low <= px <= high)
                                for _, px, _, k, _ in placed)
                clear = all(not (k >= lane and a <= x <= b) for k, a, b in spans)
                if free and uncrossed and clear:
                    choice = (lx, lane, anchor)
                    break
            if choice:
                break
        forced += choice is None
        lx, lane, anchor = choice or fallback or (x + 4, len(placed), "start")
        left = lx if anchor == "start" else lx - w
        spans.append((lane, left, left + w))
        placed.append((m, x, lx, lane, anchor))
    return placed, forced


def draw_timeline(view: dict[str, Any], entries: list[dict[str, Any]], now: datetime,
                  width: float = 1100, tz_offset: int = 0,
                  stall: dict[str, Any] | None = None) -> str:
    """Every attempt as a bar on one time axis, with the saga's moments as markers."""
    live = view["state"] in LIVE_STATES
    times = [t for t in (_parse(e["at"]) for e in view["events"]) if t is not None]
    t0 = _parse(view["created_at"]) or (min(times) if times else now)
    if times:
        t0 = min(t0, min(times))
    t_end = max([t0, *times, now] if live else [t0, *times])
    span = max((t_end - t0).total_seconds(), 0.001)
    names = [s["name"] for s in view["steps"]]
    label_w = max([text_width(n, TL_PX) for n in names] + [40.0]) + 18
    width = max(float(width), label_w + 220)
    x0, x1 = label_w + 8, width - 18

    def x_of(at: datetime | None) -> float:
        when = at or t_end
        return x0 + (when - t0).total_seconds() / span * (x1 - x0)

    moments = markers(view)
    deadline = _parse(stall["deadline"]) if stall else None
    if stall and deadline and t0 <= deadline <= t_end:
        moments.append(Marker("stalled", deadline, "stall deadline", stall["reason"]))
    if live:
        moments.append(Marker("now", now, "now", "this page's last update"))
    placed = _place_markers(moments, x_of, width)
    lane_count = max((lane for *_, lane, _ in placed), default=-1) + 1
    rows_top = 10 + LANE_H * lane_count + 6
    rows_bottom = rows_top + ROW_H * len(names)
    height = rows_bottom + 44
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="saga-timeline" width="{_num(width)}" '
        f'height="{height}" viewBox="0 0 {_num(width)} {height}" font-family="{FONT}" '
        f'font-size="{TL_PX}" role="img" aria-label="timeline of saga {_esc(view["name"])}">',
        f'<rect class="canvas" x="0" y="0" width="{_num(width)}" height="{height}" '
        f'fill="{CANVAS}"/>',
    ]
    row_of = {n: i for i, n in enumerate(names)}
    for i, n in enumerate(names):
        y = rows_top + ROW_H * i
        if i % 2:
            out.append(f'<rect class="row-bg" x="0" y="{y}" width="{_num(width)}" '
                       f'height="{ROW_H}" fill="#f3f5f8"/>')
        out.append(f'<text class="row-label" x="8" y="{y + ROW_H / 2 + 4:.0f}" fill="{INK}">'
                   f"{_esc(n)}</text>")
    step = _tick_step(span, x1 - x0)
    k = 0
    while k * step <= span + 1e-9:
        x = x0 + k * step / span * (x1 - x0)
        out.append(f'<line class="tick" x1="{_num(x)}" y1="{rows_top}" x2="{_num(x)}" '
                   f'y2="{rows_bottom + 4}" stroke="#d9dee4" stroke-width="1"/>')
        anchor = "start" if k == 0 else "end" if x > x1 - 30 else "middle"
        out.append(f'<text class="tick-label" x="{_num(x)}" y="{rows_bottom + 18}" '
                   f'text-anchor="{anchor}" fill="#3e4c59">{_offset_text(k * step, step)}'
                   "</text>")
        k += 1
    out.append(f'<text class="axis-note" x="{_num(x0)}" y="{rows_bottom + 36}" fill="#3e4c59">'
               f"from {_esc(_clock(t0, tz_offset))}, {_esc(duration_text(span))} shown"
               "</text>")
    for m, x, lx, lane, anchor in placed:
        ink = MARKER_INK[m.kind]
        ly = 10 + LANE_H * lane + 12
        out.append(f'<g class="marker" data-kind="{m.kind}"><title>{_esc(m.label)}'
                   f'{": " + _esc(m.detail) if m.detail else ""}</title>'
                   f'<line x1="{_num(x)}" y1="{ly - 11}" x2="{_num(x)}" y2="{rows_bottom}" '
                   f'stroke="{ink}" stroke-width="{2 if m.kind == "failure" else 1.5}" '
                   f'stroke-dasharray="{"none" if m.kind == "failure" else "4 3"}"/>'
                   f'<text x="{_num(lx)}" y="{ly}" text-anchor="{anchor}" fill="{ink}" '
                   f'font-weight="700">{_esc(m.label)}</text></g>')
    by_row: dict[int, list[tuple[float, float]]] = {}
    bars: list[tuple[dict[str, Any], float, float, int]] = []
    for entry in entries:
        row = row_of.get(entry["step"])
        if row is None:
            continue
        start = x_of(_parse(entry["started_at"]))
        end_at = _parse(entry["ended_at"])
        end = x_of(end_at if end_at else (now if live else t_end))
        w = max(end - start, 3.0)
        bars.append((entry, start, w, row))
        by_row.setdefault(row, []).append((start, start + w))
    for entry, start, w, row in bars:
        phase, outcome = entry["phase"], entry["outcome"]
        paint = BAR_PAINT.get((phase, outcome), _UNKNOWN)
        by = rows_top + ROW_H * row + (ROW_H - BAR_H) / 2
        ended = _parse(entry["ended_at"])
        began = _parse(entry["started_at"])
        took = ((ended or (now if live else t_end)) - began).total_seconds() if began else 0.0
        what = {"action": "attempt", "compensation": "compensation", "skipped": "skipped"}[phase]
        title = f"{entry['step']}: {what}"
        if phase != "skipped":
            title += f" {entry['attempt']}, {outcome.replace('_', ' ')}, {duration_text(took)}"
        if entry.get("redrive"):
            title += " (dispatched again by a re-drive)"
        if entry.get("held"):
            title += (f" (recovery held {entry['held']} re-drive(s): its message still waited "
                      "in the broker)")
        if entry.get("error"):
            title += f"\n{entry['error']}"
        redrive = ' data-redrive="true"' if entry.get("redrive") else ""
        out.append(f'<g class="bar" data-step="{_esc(entry["step"])}" data-phase="{phase}" '
                   f'data-outcome="{outcome}" data-attempt="{entry["attempt"]}"{redrive}>'
                   f"<title>{_esc(title)}</title>")
        out.append(f'<rect class="bar-rect" x="{_num(start)}" y="{_num(by)}" width="{_num(w)}" '
                   f'height="{BAR_H}" rx="{2 if w > 6 else 0}" fill="{paint.fill}" '
                   f'stroke="{paint.border}" stroke-width="1"/>')
        if entry.get("redrive"):  # a notch over the start: dispatched again by a re-drive
            out.append(f'<path class="redrive-notch" d="M{_num(start)},{_num(by - 1)} '
                       f'l5,-6 h-10 z" fill="{MARKER_INK["redrive"]}"/>')
        text = "skipped" if phase == "skipped" else duration_text(took)
        labels = [f"undo {text}", text] if phase == "compensation" else [text]
        others = [span for span in by_row[row] if span != (start, start + w)]
        others += [(mx - 1, mx + 1) for _, mx, *_ in placed]  # marker lines cross every row
        label = _bar_label(labels, start, w, others, x0, x1 + 16)
        if label is not None:
            words, lx, outside = label
            if outside:
                by_row[row].append((lx, lx + text_width(words, TL_PX - 1)))
            fill = INK if outside else paint.text
            cls = "bar-label outside" if outside else "bar-label"
            out.append(f'<text class="{cls}" x="{_num(lx)}" y="{_num(by + BAR_H / 2 + 4)}" '
                       f'font-size="{TL_PX - 1}" fill="{fill}">{_esc(words)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


# --- pages ----------------------------------------------------------------------------------
_ASSETS = resources.files("sagas.ops") / "dashboard_assets"


def _asset(name: str) -> str:
    return (_ASSETS / name).read_text(encoding="utf-8")


def _palette_css() -> str:
    rules = [f".badge[data-state={s}]{{background:{p.fill};color:{p.text};"
             f"border-color:{p.border}}}" for s, p in {**STEP_PAINT, **SAGA_PAINT}.items()]
    return "\n".join(rules)


def _page(title: str, body: str, script: str | None) -> str:
    tail = f"<script>{_asset('common.js')}{_asset(script)}</script>" if script else ""
    return Template(_asset("page.html")).substitute(
        title=_esc(title), css=_asset("dashboard.css") + _palette_css(), body=body, script=tail)


@router.get("", response_class=HTMLResponse, include_in_schema=False)
@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def list_page() -> HTMLResponse:
    return HTMLResponse(_page("Sagas", _asset("list.html"), "list.js"))


@router.get("/sagas/{saga_id}", response_class=HTMLResponse, include_in_schema=False)
def saga_page(request: Request, saga_id: str) -> HTMLResponse:
    engine = _engine(request)
    with engine.store.read() as conn:
        found = conn.execute(select(sagas_t.c.id).where(sagas_t.c.id == saga_id)).first()
    if found is None:
        body = Template(_asset("not_found.html")).substitute(saga_id=_esc(saga_id))
        return HTMLResponse(_page("No such saga", body, None), status_code=404)
    return HTMLResponse(_page("Saga", _asset("saga.html"), "saga.js"))
