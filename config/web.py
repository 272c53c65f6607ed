"""The web app: ``uvicorn config.web:app`` (the Procfile's ``web`` entry, on ``$PORT``).

It assembles the engine's routes (``/sagas``, ``/healthz``, ``/dashboard``, ``/metrics``) and
the order domain's (``/orders`` and the ledgers) behind one set of rules: bodies over
``MAX_BODY_BYTES`` get 413, bad input 422 with field errors, an unreachable database or broker
503, and retry/cancel need the admin token.
"""

from __future__ import annotations

from fastapi import FastAPI

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
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=lambda: current().max_body_bytes)
    app.include_router(saga_router(engine, auth))
    app.include_router(orders_router(auth))
    dashboard.install(app, engine)
    app.include_router(metrics_router(engine))
    return app


app = create_app()
