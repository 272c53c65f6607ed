"""Two Celery apps, each with its own engine, broker database and store, in one module.

Both define a saga named ``twin`` with different steps: each engine must decide with its own.
``TWIN_REDIS`` is the base Redis URL (db 0 is replaced: alpha uses db 1, beta db 2), the broker
and result backend of each, unless ``TWIN_BROKERS`` names the two brokers (``alpha,beta``, e.g.
two RabbitMQ vhosts); ``ALPHA_DB`` and ``BETA_DB`` are the SQLite URLs of the two stores.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from sagas import RetryPolicy, Saga, Sagas, SagaSettings, Step, StepContext

FAST = RetryPolicy(attempts=2, backoff=0.05, backoff_max=0.1)


def _redis(db: int) -> str:
    base = os.environ.get("TWIN_REDIS", "redis://127.0.0.1:6379/0")
    return base.rsplit("/", 1)[0] + f"/{db}"


def _broker(db: int) -> str:
    brokers = [b for b in os.environ.get("TWIN_BROKERS", "").split(",") if b]
    return brokers[db - 1] if brokers else _redis(db)


def _app(name: str, db: int, store_env: str) -> tuple[Celery, Sagas]:
    app = Celery(name, broker=_broker(db), backend=_redis(db))
    app.conf.update(task_serializer="json", accept_content=["json"], task_acks_late=True,
                    task_ignore_result=True, task_store_errors_even_if_ignored=True,
                    worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True,
                    worker_hijack_root_logger=False)
    settings = SagaSettings(
        database_url=os.environ.get(store_env, f"sqlite:////tmp/{name}.db"),
        redis_url=_redis(db), broker_url=_broker(db), sagas_listeners="",
    )
    return app, Sagas(app, settings)


alpha_app, alpha = _app("alpha", 1, "ALPHA_DB")
beta_app, beta = _app("beta", 2, "BETA_DB")


@alpha_app.task(name="alpha.step")
def alpha_step(ctx: dict[str, Any]) -> dict[str, Any]:
    step = StepContext.model_validate(ctx)
    return {"app": "alpha", "step": step.step, "seen": sorted(step.results)}


@beta_app.task(name="beta.step")
def beta_step(ctx: dict[str, Any]) -> dict[str, Any]:
    step = StepContext.model_validate(ctx)
    return {"app": "beta", "step": step.step, "seen": sorted(step.results)}


alpha_twin = alpha.register(Saga("twin", [
    Step("one", action=alpha_step, queue="twin", retry=FAST),
    Step("two", action=alpha_step, queue="twin", retry=FAST),
]))
beta_twin = beta.register(Saga("twin", [
    Step("left", action=beta_step, queue="twin", retry=FAST, depends_on=()),
    Step("right", action=beta_step, queue="twin", retry=FAST, depends_on=()),
    Step("join", action=beta_step, queue="twin", retry=FAST, depends_on=("left", "right")),
]))
# A saga whose only step waits on a queue no worker serves: it stays RUNNING.
alpha_stuck = alpha.register(Saga("stuck", [Step("x", action=alpha_step, queue="nobody")]))
