"""A Celery app whose code is "redeployed": it registers v1 and/or v2 of one saga.

``VERSIONED_REGISTER`` names the versions this process registers ("1", "1,2" or "2"), read once
at import, as a deploy's code is. The step tasks themselves are always defined: a redeploy that
drops v1 from the registry still ships the task module, so a v1 step message reaching a v2-only
worker runs a known task and is then refused by the engine, not discarded by Celery.

- v1 ``versioned``: a, b, c (each with a compensation); b is the slow one (``plan.b.sleep``).
- v2 ``versioned``: a, b2, c, d: b renamed to b2 (another task), d added.

Every participant call is recorded in Redis (``versioned:log:<saga id>``) as
``<phase>:<step>@<VERSIONED_REGISTER>``: the order of effects and which deploy ran each one.
``plan.<step>.fail`` makes a step fail for good (a business failure), ``plan.<step>.sleep`` makes
it slow. Settings come from the environment at import: ``VERSIONED_REDIS`` (broker and backend),
``VERSIONED_DB`` (the store) and SagaSettings' own (``STEP_TIMEOUT``, ``RECOVERY_GRACE``,
``SAGAS_METRICS_PORT``, ...).
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, Task

from sagas import BusinessError, RetryPolicy, Saga, Sagas, SagaSettings, Step, StepContext

NAME = "versioned"
QUEUE = "versioned"
REGISTER = os.environ.get("VERSIONED_REGISTER", "1,2")
REDIS_URL = os.environ.get("VERSIONED_REDIS", "redis://127.0.0.1:6379/3")  # backend, ledger
BROKER_URL = os.environ.get("VERSIONED_BROKER") or REDIS_URL
DATABASE_URL = os.environ.get("VERSIONED_DB", "sqlite:////tmp/sagas-versioned.db")
FAST = RetryPolicy(attempts=2, backoff=0.05, backoff_max=0.1)
SLOW_STEP_LIMIT = 10.0  # b's time limit: well above its planned sleep

app = Celery(NAME, broker=BROKER_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json", accept_content=["json"], result_serializer="json",
    task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
    task_ignore_result=True, task_store_errors_even_if_ignored=True,
    broker_connection_retry_on_startup=True, worker_hijack_root_logger=False, timezone="UTC",
)
engine = Sagas(app, SagaSettings(database_url=DATABASE_URL, redis_url=REDIS_URL,
                                 broker_url=BROKER_URL))

_ledger: redis.Redis | None = None


def ledger() -> redis.Redis:
    global _ledger
    if _ledger is None:
        _ledger = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    return _ledger


def calls(saga_id: str) -> list[str]:
    """The participant calls of one saga, in the order they started."""
    return list(ledger().lrange(f"{NAME}:log:{saga_id}", 0, -1))


class Declined(BusinessError):
    """A planned business failure: never retried, the saga compensates."""


def _run(ctx: dict[str, Any], step: str) -> dict[str, Any]:
    context = StepContext.model_validate(ctx)
    ledger().rpush(f"{NAME}:log:{context.saga_id}", f"{context.phase}:{step}@{REGISTER}")
    plan = context.input.get("plan", {}).get(step, {})
    if context.phase == "action":
        if plan.get("sleep"):
            time.sleep(float(plan["sleep"]))
        if plan.get("fail"):
            raise Declined(f"planned failure of {step}")
    return {"step": step, "version": context.version, "ran_on": REGISTER}


def _participant(step: str) -> tuple[Task, Task]:
    @app.task(name=f"{NAME}.{step}", queue=QUEUE)
    def act(ctx: dict[str, Any]) -> dict[str, Any]:
        return _run(ctx, step)

    @app.task(name=f"{NAME}.undo_{step}", queue=QUEUE)
    def undo(ctx: dict[str, Any]) -> dict[str, Any]:
        return _run(ctx, step)

    return act, undo


TASKS = {step: _participant(step) for step in ("a", "b", "b2", "c", "d")}


def _step(name: str, time_limit: float | None = None, **kw: Any) -> Step:
    action, undo = TASKS[name]
    return Step(name, action=action, compensation=undo, queue=QUEUE, retry=FAST,
                compensation_retry=FAST, time_limit=time_limit, **kw)


V1 = Saga(NAME, [_step("a"), _step("b", time_limit=SLOW_STEP_LIMIT), _step("c")], version=1)
V2 = Saga(NAME, [_step("a"), _step("b2", time_limit=SLOW_STEP_LIMIT), _step("c"), _step("d")],
          version=2)
DEFINITIONS = {1: V1, 2: V2}

for _version in (int(v) for v in REGISTER.split(",") if v.strip()):
    engine.register(DEFINITIONS[_version])
