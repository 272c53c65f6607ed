"""The engine's HTTP surface (FastAPI): list, show, retry and cancel sagas, and health checks.

Engine-generic: it knows sagas, not orders. An application assembles it with its own routers
(see ``config.web``) and passes in its Celery app and how to read the admin token, so this
module never imports the application's settings.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
    status,
)
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sagas.coordinator import Ignored
from sagas.engine import Sagas
from sagas.errors import (
    OUTAGE_TYPES,
    IdempotencyConflictError,
    InvalidSagaInputError,
    SagaError,
    SagaLockedError,
    SagaNotFoundError,
    SagaStateError,
    StoreUnavailableError,
    outage_of,
)
from sagas.observe import metrics
from sagas.ops.bounds import MAX_OFFSET, MAX_VERSION
from sagas.runtime.stalls import stalled_among
from sagas.states import SagaState
from sagas.store.schema import SagaRow
from sagas.store.sql import Store, utcnow

log = logging.getLogger("sagas.api")

DEFAULT_MAX_BODY_BYTES = 64 * 1024
SAGA_ID = Path(min_length=1, max_length=64, description="The saga id (a Celery task id)")

# Every integer query parameter that reaches SQL is bounded (sagas.ops.bounds): a larger value
# is a 422 naming the parameter, not an OverflowError or "integer out of range" from the driver.
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Rows to skip first")]
Version = Annotated[
    int | None, Query(ge=1, le=MAX_VERSION, description="Only sagas on this definition version")
]


# --- response models ---------------------------------------------------------
class Problem(BaseModel):
    """Every error answer: one human-readable line."""

    detail: str


class FieldError(BaseModel):
    loc: list[str | int]
    field: str = Field(description="Dotted path of the offending field inside its part")
    msg: str
    type: str


class ValidationProblem(BaseModel):
    detail: list[FieldError]


class SagaSummary(BaseModel):
    id: str
    name: str
    version: int = Field(description="The saga definition's version this instance runs on")
    state: SagaState
    error: str | None
    created_at: str | None
    updated_at: str | None
    stalled: bool = Field(False, description="Live and making no progress: past its deadline, "
                          "or re-driven or held by recovery since (GET /sagas/{id} says why)")


class SagaPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[SagaSummary]


class StepView(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    state: str
    attempts: int
    compensation_attempts: int
    error: str | None
    result: Any = None
    started_at: str | None = Field(description="When its action was first sent")
    finished_at: str | None = Field(description="When its action last ended (succeeded, failed)")
    compensation_started_at: str | None = Field(
        None, description="When its compensation was first sent")
    compensation_finished_at: str | None = Field(
        None, description="When its compensation ended (compensated, or failed for good)")


class StepStallView(BaseModel):
    step: str
    phase: str
    queue: str | None = Field(description="The queue its message was sent to")
    reason: str = Field(description="queued: its message still waits in the broker (no worker "
                        "took it); redriven: recovery sent it again, nothing heard since; "
                        "overdue: past its deadline, recovery re-drives it at its next run")
    since: str = Field(description="Its last progress")
    looks: int = Field(description="Recovery's re-drives and holds since then")
    next_look: str = Field(description="When recovery looks at it again")
    time_limit: float | None
    detail: str


class StallView(BaseModel):
    since: str
    reasons: list[str]
    reason: str = Field(description="One sentence per stalled step")
    steps: list[StepStallView]


class EventView(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: int
    step: str | None
    from_state: str | None
    to_state: str
    attempt: int
    error: str | None
    at: str | None


class SagaView(BaseModel):
    """The same JSON as ``sagas show --json``; keys the store adds later pass through."""

    model_config = ConfigDict(extra="allow")

    id: str
    name: str
    version: int = Field(description="The saga definition's version this instance runs on")
    fingerprint: str | None = Field(description="Digest of that version's graph at the start")
    state: SagaState
    error: str | None
    created_at: str | None
    updated_at: str | None
    context: dict[str, Any]
    steps: list[StepView]
    events: list[EventView]
    stalled: StallView | None = Field(
        None, description="Why a live saga makes no progress, or null")


class LockView(BaseModel):
    key: str = Field(description="A semantic lock key (Saga(locks=...))")
    holder: str = Field(description="The saga that holds it")
    taken_at: datetime | None
    waiting: list[str] = Field(description="Sagas waiting for it, first in line first")


class ActionResult(BaseModel):
    id: str
    action: str
    state: SagaState
    note: str | None = Field(None, description="Why nothing changed, when nothing did")


class Health(BaseModel):
    status: str
    database: str
    broker: str


# --- auth --------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="ADMIN_TOKEN as a Bearer token")


@dataclass(frozen=True)
class AdminAuth:
    """Where the admin token comes from; callables so a changed setting takes effect."""

    token: Callable[[], str | None]
    protect_reads: Callable[[], bool] = lambda: False

    def check(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if credentials is None or not credentials.credentials:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "missing Bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        expected = self.token()
        if not expected:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, "admin actions are disabled: ADMIN_TOKEN is not set"
            )
        if not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid token")

    def admin(self) -> Callable[..., None]:
        def require_admin(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        ) -> None:
            self.check(credentials)

        return require_admin

    def reader(self) -> Callable[..., None]:
        def require_reader(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        ) -> None:
            if self.protect_reads():
                self.check(credentials)

        return require_reader


# --- health ------------------------------------------------------------------
def check_database(store: Store) -> str:
    """'ok', or why not: reads the saga table, so an unmigrated database is not healthy."""
    try:
        with store.read() as conn:
            conn.execute(select(SagaRow.id).limit(1)).all()
    except Exception as exc:
        log.warning("health: database: %s", exc)
        return f"unavailable: {_first_line(exc)}"
    return "ok"


def check_broker(celery_app: Any, timeout: float = 3.0) -> str:
    """'ok' when a broker connection can be made within ``timeout`` seconds."""
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2,
                                   timeout=timeout)
    except Exception as exc:
        log.warning("health: broker: %s", exc)
        return f"unavailable: {_first_line(exc)}"
    return "ok"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- the router --------------------------------------------------------------
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No Bearer token"},
    403: {"model": Problem, "description": "Wrong token, or admin actions disabled"},
    404: {"model": Problem, "description": "No saga with that id"},
    409: {"model": Problem, "description": "The saga's state does not allow this"},
    503: {"model": Problem, "description": "Database or broker unreachable"},
}


def saga_router(engine: Sagas, auth: AdminAuth) -> APIRouter:
    """Routes under /sagas plus /healthz for any application bound with ``Sagas(app)``."""
    router = APIRouter()
    read = [Depends(auth.reader())]
    admin = [Depends(auth.admin())]
    read_errors = {k: _ERRORS[k] for k in (401, 403, 503)}

    @router.get("/healthz", response_model=Health, tags=["health"],
                responses={503: {"model": Health, "description": "Something is down"}})
    def healthz() -> JSONResponse:
        """Database and broker reachability; 503 when either is down (for load balancers)."""
        database = check_database(engine.store)
        broker = check_broker(engine.app)
        ok = database == "ok" and broker == "ok"
        body = Health(status="ok" if ok else "unavailable", database=database, broker=broker)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @router.get("/sagas", response_model=SagaPage, tags=["sagas"], dependencies=read,
                responses=read_errors)  # type: ignore[arg-type]
    def list_sagas(
        state: Annotated[SagaState | None, Query(description="Only sagas in this state")] = None,
        name: Annotated[str | None, Query(max_length=100, description="Saga name")] = None,
        version: Version = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Offset = 0,
    ) -> SagaPage:
        """Sagas, newest first."""
        rows, total = engine.store.list_sagas(
            state=str(state) if state else None, name=name, version=version, limit=limit,
            offset=offset
        )
        stalled = stalled_among(engine.store, [r["id"] for r in rows], utcnow())
        return SagaPage(total=total, limit=limit, offset=offset, items=[
            SagaSummary.model_validate({**r, "stalled": r["id"] in stalled}) for r in rows])

    @router.get("/sagas/{saga_id}", response_model=SagaView, tags=["sagas"], dependencies=read,
                responses={k: _ERRORS[k] for k in (401, 403, 404, 503)})
    def show_saga(saga_id: Annotated[str, SAGA_ID]) -> dict[str, Any]:
        """Steps with state, attempts, timestamps and errors; context; history; why it is
        stalled."""
        return engine.view(saga_id)

    @router.get("/locks", response_model=list[LockView], tags=["sagas"], dependencies=read,
                responses=read_errors)  # type: ignore[arg-type]
    def list_locks(
        key: Annotated[str | None, Query(min_length=1, max_length=200,
                                         description="Only this key")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> list[dict[str, Any]]:
        """Semantic locks held now: each key's holder and the sagas waiting for it."""
        return engine.locks(key, limit)

    @router.post("/sagas/{saga_id}/retry", response_model=ActionResult, tags=["sagas"],
                 status_code=status.HTTP_202_ACCEPTED, dependencies=admin, responses=_ERRORS)
    def retry(saga_id: Annotated[str, SAGA_ID]) -> ActionResult:
        """Resume a parked saga (a COMPENSATION_FAILED rollback, a FORWARD_FAILED roll-forward),
        or re-drive a stalled running one."""
        return _acted(engine, saga_id, "retry", engine.retry(saga_id).ignored)

    @router.post("/sagas/{saga_id}/cancel", response_model=ActionResult, tags=["sagas"],
                 status_code=status.HTTP_202_ACCEPTED, dependencies=admin, responses=_ERRORS)
    def cancel(saga_id: Annotated[str, SAGA_ID]) -> ActionResult:
        """A running saga compensates what it did; refused (409) once its pivot succeeded."""
        decision = engine.cancel(saga_id, "cancelled through the API")
        return _acted(engine, saga_id, "cancel", decision.ignored)

    return router


def _acted(engine: Sagas, saga_id: str, action: str, ignored: Ignored | None) -> ActionResult:
    state = engine.handle(saga_id).state
    note = None if ignored is None else ignored.detail
    return ActionResult(id=saga_id, action=action, state=state, note=note)


# --- errors and limits -------------------------------------------------------
def _problem(code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=code, headers=headers)


def unavailable_reason(exc: BaseException) -> str | None:
    """'database' or 'broker' when ``exc`` means that server is unreachable, else None."""
    outage = outage_of(exc)
    return None if outage is None else str(outage.kind)


def install_error_handlers(app: FastAPI) -> None:
    """Expected failures become 404/409/422/503 with a JSON body; nothing leaks a bare 500."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Our own shape: FastAPI's default echoes the input back, and a NaN there
        # cannot even be serialised.
        errors = [
            FieldError(
                loc=[str(p) if not isinstance(p, int) else p for p in e.get("loc", ())],
                field=".".join(str(p) for p in e.get("loc", ())[1:]),
                msg=str(e.get("msg", "invalid")), type=str(e.get("type", "value_error")),
            ).model_dump()
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(SagaError)
    async def _saga_error(_: Request, exc: SagaError) -> JSONResponse:
        if isinstance(exc, SagaNotFoundError):
            return _problem(404, str(exc))
        if isinstance(exc, SagaLockedError):
            # The key and its holder, typed, so a client can show or wait for the holder.
            return JSONResponse({"detail": str(exc), "key": exc.key, "holder": exc.holder},
                                status_code=409)
        if isinstance(exc, SagaStateError | IdempotencyConflictError):
            return _problem(409, str(exc))
        if isinstance(exc, InvalidSagaInputError):
            return _problem(422, str(exc))
        if isinstance(exc, StoreUnavailableError):
            return _unavailable("database", exc)
        log.exception("saga error", exc_info=exc)
        return _problem(500, str(exc))

    async def _outage(_: Request, exc: Exception) -> JSONResponse:
        outage = outage_of(exc)
        if outage is None:  # an OperationalError that is not a lost connection
            log.error("unhandled error: %s: %s", type(exc).__name__, exc)
            return _problem(500, "internal error")
        return _unavailable(str(outage.kind), exc)

    # By type, so Starlette answers them in its exception middleware: one WARNING line per
    # request, not uvicorn's "Exception in ASGI application" and a traceback.
    for outage_type in OUTAGE_TYPES:
        if not issubclass(outage_type, SagaError):
            app.add_exception_handler(outage_type, _outage)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        reason = unavailable_reason(exc)
        if reason:
            return _unavailable(reason, exc)
        log.exception("unhandled error", exc_info=exc)
        return _problem(500, "internal error")


def _unavailable(what: str, exc: BaseException) -> JSONResponse:
    lines = str(exc).strip().splitlines()
    log.warning("%s unavailable: %s", what, lines[0] if lines else type(exc).__name__)
    return _problem(503, f"{what} unavailable, try again later", {"Retry-After": "5"})


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413, whether or not Content-Length is sent.

    The body is buffered (it is small by definition) and replayed to the app, so a too-large
    body is refused before any handler has acted on part of it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int | Callable[[], int] = DEFAULT_MAX_BODY_BYTES
                 ) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def limit(self) -> int:
        return self.max_bytes() if callable(self.max_bytes) else self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(limit, scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(limit, scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        response = _problem(413, f"request body over {limit} bytes")
        await response(scope, receive, send)


class RefuseNul:
    """Refuse a NUL character in the path, a query parameter or a header with a 422 naming it.

    PostgreSQL cannot store or even compare text holding NUL (the driver raises before the
    query is sent), so without this any id or filter carrying ``%00`` would be a 500. One check
    in front of every route, the dashboard's pages included, instead of one per parameter.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            where = _nul_in(scope)
            if where is not None:
                response = JSONResponse({"detail": [FieldError(
                    loc=list(where), field=where[1], msg="NUL characters are not allowed",
                    type="string_nul",
                ).model_dump()]}, status_code=422)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _nul_in(scope: Scope) -> tuple[str, str] | None:
    """``(part, name)`` of the first NUL character in the request's path, query or headers."""
    if "\x00" in scope.get("path", ""):
        return ("path", "path")
    query: bytes = scope.get("query_string", b"")
    if b"%00" in query or b"\x00" in query:
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if "\x00" in name or "\x00" in value:
                return ("query", name.replace("\x00", "\\x00"))
        return ("query", "query")
    for name, value in scope.get("headers") or ():
        if b"\x00" in value:
            return ("header", name.decode("latin-1"))
    return None


# --- metrics -----------------------------------------------------------------
def metrics_router(engine: Sagas) -> APIRouter:
    """``/metrics`` in Prometheus text; ``sagas_in_flight`` counts ``engine``'s store."""
    metrics.count_in_flight_of(lambda: engine.store)
    router = APIRouter(tags=["observability"])

    @router.get("/metrics", include_in_schema=False)
    def metrics_endpoint() -> Response:
        """Prometheus text format."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router


# --- docs ------------------------------------------------------------------------------------
def install_docs(app: FastAPI, path: str = "/docs") -> None:
    """Swagger UI at ``path`` from the installed ``swagger-ui-bundle`` (no CDN: works offline).

    Build the app with ``FastAPI(docs_url=None)`` so this replaces FastAPI's CDN-backed page.
    """
    import swagger_ui_bundle
    assets = f"{path}/assets"
    app.mount(assets, StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="swagger")

    @app.get(path, include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon-32x32.png",
        )
