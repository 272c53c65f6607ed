"""The web app: ``uvicorn config.web:app`` (the Procfile's ``web`` entry, on ``$PORT``).

It assembles the engine's routes (``/sagas``, ``/healthz``, ``/dashboard``, ``/metrics``) and
the order domain's (``/orders`` and the ledgers) behind one set of rules: bodies over
``MAX_BODY_BYTES`` get 413, bad input 422 with field errors (a NUL character anywhere, an integer
past its bound), an unreachable database or broker 503, and retry/cancel need the admin token.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

# The order saga and its ledger audit register with the engine when imported.
import tasks.audit
import tasks.order_saga  # noqa: F401
from config.celery_app import app as celery_app
from config.celery_app import engine
from config.settings import Settings, get_app_settings
from sagas.ops import dashboard
from sagas.ops.api import (
    AdminAuth,
    BodySizeLimit,
    RefuseNul,
    install_docs,
    install_error_handlers,
    metrics_router,
    saga_router,
)
from tasks.web import orders_router


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app; ``settings`` pins auth and limits (tests), else they are read per request.

    The database and broker are the process's own (``DATABASE_URL``, ``REDIS_URL``), as for
    the Celery app this process publishes through.
    """

    def current() -> Settings:
        return settings or get_app_settings()

    # Sagas defined in the worker's imports (SAGAS_IMPORTS) must be known here too, or
    # retry/cancel could not read their graphs.
    celery_app.loader.import_default_modules()
    auth = AdminAuth(token=lambda: current().admin_token,
                     protect_reads=lambda: current().protect_reads)
    app = FastAPI(
        title="sagas",
        summary="Orders as sagas on Celery: take orders, follow and operate their sagas.",
        version="0.1.0",
        openapi_url="/openapi.json",
        docs_url=None,  # served from the installed swagger-ui-bundle below, not from a CDN
        redoc_url=None,
    )
    install_docs(app)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=lambda: current().max_body_bytes)
    app.add_middleware(RefuseNul)
    app.include_router(saga_router(engine, auth))
    app.include_router(orders_router(auth))
    dashboard.install(app, engine, auth=auth)
    app.include_router(metrics_router(engine))

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        """Where to go from the root: the dashboard, the API docs, health."""
        return HTMLResponse(INDEX)

    return app


INDEX = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>sagas</title>
<style>body{font:16px/1.5 system-ui,sans-serif;margin:3rem;color:#1a1a1a}a{color:#0645ad}</style>
</head><body><h1>sagas: the order shop</h1><ul>
<li><a href="/dashboard">Dashboard</a>: every saga, its graph and timeline</li>
<li><a href="/docs">API docs</a> (<a href="/openapi.json">OpenAPI</a>): orders and sagas</li>
<li><a href="/healthz">Health</a> and <a href="/metrics">metrics</a></li>
</ul></body></html>"""

app = create_app()
