"""The saga dashboard: what Flower cannot show, a saga as a whole, live.

Plain HTML and JavaScript served by a FastAPI router (no build step): a list of sagas with
counts per state, a state filter and search by id; and a page per saga with its step graph
coloured by state, a timeline of every attempt and compensation, its context, and links to each
task in Flower. Pages poll small JSON endpoints under ``/dashboard/api`` (every second while the
saga runs), which read the saga store only.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import func, or_, select

from sagas.definition import Saga
from sagas.engine import Sagas
from sagas.errors import SagaNotFoundError
from sagas.runtime.message import step_task_id
from sagas.store.sql import _iso, sagas_t

router = APIRouter(prefix="/dashboard", tags=["dashboard"])

SAGA_STATES = ("PENDING", "RUNNING", "COMPENSATING", "COMPLETED", "COMPENSATED",
               "COMPENSATION_FAILED")
_ACTION_END = {"SUCCEEDED": "succeeded", "FAILED": "failed"}
_COMP_END = {"COMPENSATED": "compensated", "COMPENSATION_FAILED": "compensation_failed"}


ENGINE_STATE = "sagas_engine"


def install(app: Any, engine: Sagas) -> None:
    """Serve the dashboard of ``engine`` in the FastAPI ``app``."""
    setattr(app.state, ENGINE_STATE, engine)
    app.include_router(router)


def _engine(request: Request) -> Sagas:
    engine = getattr(request.app.state, ENGINE_STATE, None)
    if not isinstance(engine, Sagas):
        raise HTTPException(500, "the dashboard was mounted without an engine: use install()")
    return engine


# --- JSON ------------------------------------------------------------------------------------
@router.get("/api/sagas")
def api_sagas(
    request: Request,
    state: str | None = Query(None, description="only sagas in this state"),
    name: str | None = Query(None, description="only sagas of this definition"),
    q: str | None = Query(None, max_length=64, description="saga id or its beginning"),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0),
) -> dict[str, Any]:
    """Sagas newest first, with counts per state (over all sagas)."""
    store = _engine(request).store
    query = select(sagas_t.c.id, sagas_t.c.name, sagas_t.c.state, sagas_t.c.error,
                   sagas_t.c.created_at, sagas_t.c.updated_at)
    total = select(func.count()).select_from(sagas_t)
    filters = []
    if state:
        filters.append(sagas_t.c.state == state)
    if name:
        filters.append(sagas_t.c.name == name)
    if q:
        pattern = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        filters.append(or_(sagas_t.c.id == q, sagas_t.c.id.like(pattern, escape="\\")))
    for f in filters:
        query, total = query.where(f), total.where(f)
    query = query.order_by(sagas_t.c.created_at.desc(), sagas_t.c.id).limit(limit).offset(offset)
    with store.read() as conn:
        rows = conn.execute(query).all()
        count = int(conn.execute(total).scalar_one())
        counts = {r[0]: int(r[1]) for r in conn.execute(
            select(sagas_t.c.state, func.count()).group_by(sagas_t.c.state))}
    return {
        "sagas": [{"id": r.id, "name": r.name, "state": r.state, "error": r.error,
                   "created_at": _iso(r.created_at), "updated_at": _iso(r.updated_at)}
                  for r in rows],
        "total": count,
        "counts": {s: counts.get(s, 0) for s in SAGA_STATES},
    }


@router.get("/api/sagas/{saga_id}")
def api_saga(request: Request, saga_id: str) -> dict[str, Any]:
    """The saga's view (as ``GET /sagas/{id}``) plus its graph, timeline and Flower links."""
    engine = _engine(request)
    try:
        view = engine.store.get_view(saga_id)
    except SagaNotFoundError:
        raise HTTPException(404, f"no saga with id {saga_id!r}") from None
    flower = engine.settings.flower_url.rstrip("/")
    view["graph"] = graph(view, engine.sagas.get(view["name"]))
    view["timeline"] = timeline(view, flower)
    view["flower_url"] = flower
    return view


def graph(view: dict[str, Any], saga: Saga | None) -> dict[str, Any]:
    """Nodes placed in columns by depth (longest path from a root), and the edges."""
    steps = {s["name"]: s for s in view["steps"]}
    names = list(steps)
    parents: dict[str, tuple[str, ...]] = {}
    for i, n in enumerate(names):
        if saga is not None and n in saga.parents:
            parents[n] = tuple(p for p in saga.parents[n] if p in steps)
        else:  # a definition this process does not know: show the stored order as a chain
            parents[n] = (names[i - 1],) if i else ()
    level: dict[str, int] = {}
    for n in names:  # stored order is topological
        level[n] = max((level.get(p, 0) + 1 for p in parents[n]), default=0)
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
    """Every attempt and compensation from the saga's history, in the order they started."""
    entries: list[dict[str, Any]] = []
    open_: dict[tuple[str, str], dict[str, Any]] = {}
    dispatched: dict[tuple[str, str], int] = {}

    def start(step: str, phase: str, attempt: int, at: str | None, redispatch: bool) -> None:
        key = (step, phase)
        if redispatch or key not in dispatched:
            dispatched[key] = attempt  # a new message (task id); a Celery retry keeps its id
        task_id = step_task_id(view["id"], step, phase, dispatched[key])
        entry = {"step": step, "phase": phase, "attempt": attempt, "started_at": at,
                 "ended_at": None, "outcome": "running", "error": None, "task_id": task_id,
                 "flower": f"{flower}/task/{task_id}"}
        entries.append(entry)
        open_[key] = entry

    def end(step: str, phase: str, outcome: str, at: str | None, error: str | None) -> None:
        entry = open_.pop((step, phase), None)
        if entry is not None:
            entry.update(ended_at=at, outcome=outcome, error=error)

    for e in view["events"]:
        step, src, dst, at = e["step"], e["from_state"], e["to_state"], e["at"]
        if step is None:
            continue
        if dst == "RUNNING":
            again = src == "RUNNING"
            if again:
                end(step, "action", "retry", at, e["error"])
            redrive = (e["error"] or "").startswith("re-driven")
            start(step, "action", e["attempt"], at, redispatch=not again or redrive)
        elif dst == "COMPENSATING":
            again = src == "COMPENSATING"
            if again:
                end(step, "compensation", "retry", at, e["error"])
            redrive = (e["error"] or "").startswith("re-driven")
            start(step, "compensation", e["attempt"], at, redispatch=not again or redrive)
        elif dst in _ACTION_END:
            end(step, "action", _ACTION_END[dst], at, e["error"])
        elif dst in _COMP_END:
            end(step, "compensation", _COMP_END[dst], at, e["error"])
        elif dst == "SKIPPED":
            entries.append({"step": step, "phase": "skipped", "attempt": 0, "started_at": at,
                            "ended_at": at, "outcome": "skipped", "error": None,
                            "task_id": None, "flower": None})
    return entries


# --- pages ----------------------------------------------------------------------------------
@router.get("", response_class=HTMLResponse, include_in_schema=False)
@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def list_page() -> HTMLResponse:
    return HTMLResponse(_page("Sagas", _LIST_BODY, _LIST_JS))


@router.get("/sagas/{saga_id}", response_class=HTMLResponse, include_in_schema=False)
def saga_page(saga_id: str) -> HTMLResponse:
    return HTMLResponse(_page("Saga", _SAGA_BODY, _SAGA_JS))


def _page(title: str, body: str, script: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<link rel=icon href='data:,'><title>{title} · sagas</title><style>{_CSS}</style>"
        f"</head><body><header><a href='/dashboard/'>sagas</a></header><main>{body}</main>"
        f"<script>{_COMMON_JS}{script}</script></body></html>"
    )


_CSS = """
:root{--PENDING:#9aa5b1;--RUNNING:#2f80ed;--SUCCEEDED:#27ae60;--FAILED:#eb5757;
--COMPENSATING:#f2994a;--COMPENSATED:#9b51e0;--COMPENSATION_FAILED:#a0102a;--SKIPPED:#d5dbe1;
--COMPLETED:#27ae60}
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1f2933;background:#f7f9fb}
header{background:#1f2933;padding:.6em 1.2em}header a{color:#fff;font-weight:600;
text-decoration:none}
main{padding:1em 1.2em;max-width:1200px}
table{border-collapse:collapse;width:100%;background:#fff}
td,th{padding:.35em .6em;border-bottom:1px solid #e4e7eb;text-align:left;vertical-align:top}
.badge{display:inline-block;padding:.1em .5em;border-radius:.8em;color:#fff;font-size:12px;
background:var(--PENDING)}
.counts{display:flex;gap:.5em;flex-wrap:wrap;margin:.6em 0}
.count{background:#fff;border:1px solid #e4e7eb;border-radius:.4em;padding:.4em .7em;
cursor:pointer}
.count b{display:block;font-size:20px}
.controls{display:flex;gap:.5em;margin:.6em 0}
pre{background:#fff;border:1px solid #e4e7eb;padding:.6em;overflow:auto;max-height:24em}
svg text{font-size:12px;fill:#fff;pointer-events:none}
.err{color:#a0102a;white-space:pre-wrap}
section{margin-bottom:1.4em}
"""

_COMMON_JS = r"""
const SETTLED=new Set(["COMPLETED","COMPENSATED"]);
function el(tag,attrs,...kids){const e=document.createElement(tag);
 for(const[k,v]of Object.entries(attrs||{})){if(v===null||v===undefined)continue;
  if(k==="text")e.textContent=v;else e.setAttribute(k,v);}
 for(const k of kids)if(k!==null&&k!==undefined)e.append(k);return e;}
function badge(state){const b=el("span",{class:"badge","data-state":state,text:state});
 b.style.background=`var(--${state})`;return b;}
function when(iso){return iso?new Date(iso).toLocaleTimeString([],{hour12:false,
 hour:"2-digit",minute:"2-digit",second:"2-digit",fractionalSecondDigits:3}):"";}
async function getJSON(url){const r=await fetch(url,{cache:"no-store"});
 if(!r.ok)throw new Error(`${r.status} ${url}`);return r.json();}
"""

_LIST_BODY = """
<h1>Sagas</h1>
<div class=counts id=counts></div>
<div class=controls>
 <select id=state-filter><option value="">all states</option></select>
 <input id=search placeholder="search by saga id" size=40 autocomplete=off>
 <span id=total></span>
</div>
<table><thead><tr><th>id</th><th>saga</th><th>state</th><th>started</th><th>updated</th>
<th>error</th></tr></thead><tbody id=rows></tbody></table>
"""

_LIST_JS = r"""
const STATES=["PENDING","RUNNING","COMPENSATING","COMPLETED","COMPENSATED","COMPENSATION_FAILED"];
const params=new URLSearchParams(location.search);
const filter=document.getElementById("state-filter"),search=document.getElementById("search");
for(const s of STATES)filter.append(el("option",{value:s,text:s}));
filter.value=params.get("state")||"";search.value=params.get("q")||"";
let timer=null;
async function refresh(){
 clearTimeout(timer);
 const q=new URLSearchParams();if(filter.value)q.set("state",filter.value);
 if(search.value.trim())q.set("q",search.value.trim());
 history.replaceState(null,"",q.toString()?`?${q}`:location.pathname);
 try{
  const data=await getJSON(`/dashboard/api/sagas?${q}`);
  const counts=document.getElementById("counts");counts.replaceChildren();
  for(const s of STATES){const c=el("div",{class:"count","data-state":s},
    el("b",{text:String(data.counts[s]||0)}),badge(s));
   c.onclick=()=>{filter.value=filter.value===s?"":s;refresh();};counts.append(c);}
  document.getElementById("total").textContent=`${data.total} shown by filter`;
  const rows=document.getElementById("rows");rows.replaceChildren();
  for(const s of data.sagas){rows.append(el("tr",{"data-saga-id":s.id},
   el("td",{},el("a",{href:`/dashboard/sagas/${encodeURIComponent(s.id)}`,text:s.id})),
   el("td",{text:s.name}),el("td",{},badge(s.state)),el("td",{text:when(s.created_at)}),
   el("td",{text:when(s.updated_at)}),el("td",{class:"err",text:s.error||""})));}
 }catch(e){console.warn(e);}
 timer=setTimeout(refresh,2000);
}
filter.onchange=refresh;
let typing=null;search.oninput=()=>{clearTimeout(typing);typing=setTimeout(refresh,250);};
refresh();
"""

_SAGA_BODY = """
<h1><span id=saga-name></span> <span id=saga-state></span></h1>
<p><code id=saga-id></code> <span id=saga-error class=err></span></p>
<section><h2>Steps</h2><svg id=graph width=100% height=120></svg></section>
<section><h2>Timeline</h2><table><thead><tr><th>step</th><th>phase</th><th>attempt</th>
<th>start</th><th>end</th><th>outcome</th><th>error</th><th>task</th></tr></thead>
<tbody id=timeline></tbody></table></section>
<section><h2>Context</h2><pre id=context></pre></section>
"""

_SAGA_JS = r"""
const sagaId=decodeURIComponent(location.pathname.split("/").pop());
const NS="http://www.w3.org/2000/svg",W=130,H=34,GX=60,GY=18;
function svg(tag,attrs){const e=document.createElementNS(NS,tag);
 for(const[k,v]of Object.entries(attrs))e.setAttribute(k,v);return e;}
function drawGraph(g){
 const box=document.getElementById("graph");box.replaceChildren();
 const pos={};let maxRow=0;
 for(const n of g.nodes){pos[n.name]={x:10+n.level*(W+GX),y:10+n.row*(H+GY)};
  maxRow=Math.max(maxRow,n.row);}
 box.setAttribute("height",String(20+(maxRow+1)*(H+GY)));
 for(const[a,b]of g.edges){const p=pos[a],q=pos[b];if(!p||!q)continue;
  box.append(svg("line",{x1:p.x+W,y1:p.y+H/2,x2:q.x,y2:q.y+H/2,stroke:"#9aa5b1",
   "stroke-width":2}));}
 for(const n of g.nodes){const p=pos[n.name];
  const grp=svg("g",{class:"node","data-step":n.name,"data-state":n.state});
  const r=svg("rect",{x:p.x,y:p.y,width:W,height:H,rx:n.pivot?0:8,
   fill:`var(--${n.state})`});
  const title=svg("title",{});title.textContent=`${n.name}: ${n.state}`;
  const t=svg("text",{x:p.x+8,y:p.y+H/2+4});
  t.textContent=`${n.name}${n.pivot?" ◆":""} · ${n.state.toLowerCase()}`;
  grp.append(r,title,t);box.append(grp);}
}
function drawTimeline(items){
 const body=document.getElementById("timeline");body.replaceChildren();
 for(const it of items){
  const link=it.flower?el("a",{href:it.flower,target:"_blank",rel:"noopener",
   text:it.task_id}):"";
  body.append(el("tr",{"data-step":it.step,"data-phase":it.phase,"data-outcome":it.outcome},
   el("td",{text:it.step}),el("td",{text:it.phase}),el("td",{text:String(it.attempt)}),
   el("td",{text:when(it.started_at)}),el("td",{text:when(it.ended_at)}),
   el("td",{text:it.outcome}),el("td",{class:"err",text:it.error||""}),el("td",{},link)));}
}
let timer=null;
async function refresh(){
 let delay=1000;
 try{
  const v=await getJSON(`/dashboard/api/sagas/${encodeURIComponent(sagaId)}`);
  document.title=`${v.name} ${v.state} · sagas`;
  document.getElementById("saga-name").textContent=v.name;
  document.getElementById("saga-state").replaceChildren(badge(v.state));
  document.getElementById("saga-id").textContent=v.id;
  document.getElementById("saga-error").textContent=v.error||"";
  drawGraph(v.graph);drawTimeline(v.timeline);
  document.getElementById("context").textContent=JSON.stringify(v.context,null,2);
  if(SETTLED.has(v.state))delay=10000;
 }catch(e){console.warn(e);document.getElementById("saga-error").textContent=String(e);
  delay=3000;}
 timer=setTimeout(refresh,delay);
}
refresh();
"""
