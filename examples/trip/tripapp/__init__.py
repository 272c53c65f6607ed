"""Trip booking on your own Celery app: ``celery -A tripapp worker``, ``sagas -A tripapp ...``.

The app is an ordinary Celery app; one call, ``Sagas(app, SagaSettings())``, puts the saga
engine on it (its tasks on the ``saga`` queue, the step wrapper, the reconciler in beat). The
settings come from the environment: ``REDIS_URL`` (result backend, and broker unless
``BROKER_URL`` names another, e.g. RabbitMQ) and ``DATABASE_URL`` (the saga store; SQLite by
default).
"""

from __future__ import annotations

from celery import Celery

from sagas import RetryPolicy, Saga, Sagas, SagaSettings, Step

HOLDS = "holds"
PAYMENTS = "payments"
CONFIRMATIONS = "confirmations"
SAGA = "saga"
QUEUES = (HOLDS, PAYMENTS, CONFIRMATIONS, SAGA)

settings = SagaSettings()

app = Celery("tripapp", broker=settings.broker_url, backend=settings.redis_url)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_default_queue=SAGA,
    # Results are not read on the happy path; failures are kept for the engine's failure handler.
    task_ignore_result=True,
    task_store_errors_even_if_ignored=True,
    # At-least-once delivery: acknowledged after the task ran, one message at a time.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    timezone="UTC",
)

engine = Sagas(app, settings)

# The participants are plain tasks of this app: the engine wraps them, no task_cls needed.
from tripapp import steps  # noqa: E402 - the steps need `app`, defined above

HOLD_RETRY = RetryPolicy(attempts=3, backoff=0.2, backoff_max=2.0)

trip = engine.register(Saga(
    "trip",
    steps=[
        # Three roots: the holds run in parallel, each with its release.
        Step("flight", action=steps.hold_flight, compensation=steps.release_flight,
             queue=HOLDS, depends_on=(), retry=HOLD_RETRY, time_limit=30),
        Step("hotel", action=steps.hold_hotel, compensation=steps.release_hotel,
             queue=HOLDS, depends_on=(), retry=HOLD_RETRY, time_limit=30),
        Step("car", action=steps.hold_car, compensation=steps.release_car,
             queue=HOLDS, depends_on=(), retry=HOLD_RETRY, time_limit=30),
        # The join: runs once, after all three holds.
        Step("charge", action=steps.charge, compensation=steps.refund, queue=PAYMENTS,
             depends_on=("flight", "hotel", "car"), retry=HOLD_RETRY, time_limit=30),
        # The pivot: once the tickets are issued the trip only goes forward.
        Step("confirm", action=steps.confirm, queue=CONFIRMATIONS, pivot=True,
             depends_on=("charge",), retry=RetryPolicy(attempts=5), time_limit=30),
        # After the pivot: no compensation; a failure is retried forward, never rolled back.
        Step("notify", action=steps.notify, queue=CONFIRMATIONS, depends_on=("confirm",),
             retry=RetryPolicy(attempts=6, backoff=0.2, backoff_max=2.0), time_limit=30),
    ],
    input_model=steps.TripRequest,
))

__all__ = ["app", "engine", "trip"]
