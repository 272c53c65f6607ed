"""The sample's Celery app and its saga engine: ``celery -A config worker`` finds ``config.app``.

JSON only, late acks, one message at a time per worker process. The engine is bound with the
one public call every Celery shop uses: ``Sagas(app, settings)``. The broker is ``BROKER_URL``
(Redis or RabbitMQ; default ``REDIS_URL``); the result backend is always the Redis at
``REDIS_URL`` (it only holds failures, for the engine's failure handler).
"""

from __future__ import annotations

from celery import Celery

from config import queues
from config.settings import get_app_settings
from sagas import Sagas

settings = get_app_settings()

app = Celery(
    "sagas",
    broker=settings.broker_url,
    backend=settings.redis_url,
    include=["tasks.inventory", "tasks.payment", "tasks.shipping", "tasks.order_saga",
             "tasks.audit"],
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    event_serializer="json",
    task_queues=queues.task_queues,
    task_default_queue=queues.SAGA,
    task_routes=queues.task_routes,
    # Results are not read on the happy path; failures are stored for the failure handler.
    task_ignore_result=True,
    task_store_errors_even_if_ignored=True,
    result_expires=7 * 24 * 3600,
    # Delivery is at least once: acked after the task ran; a task whose pool process dies is
    # sent again, at most SagaTask.max_retries times, then fails (the bounded worker-lost cap).
    # A message held by a worker killed whole comes back: on Redis after the visibility timeout
    # (1 h, far above the longest step time limit; recovery re-drives its saga long before
    # that), on RabbitMQ as soon as the dead worker's connection closes (RabbitMQ ignores the
    # visibility timeout; its consumer_timeout, 30 min by default, bounds how long a delivery
    # may stay unacked, countdowns included). See README, RabbitMQ.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_retry_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # A pool process that grew past this is replaced after its task (late acks: nothing lost).
    worker_max_memory_per_child=settings.worker_max_memory_per_child or None,
    broker_transport_options={"visibility_timeout": 3600},
    result_backend_transport_options={"retry_policy": {"timeout": 5.0}},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    timezone="UTC",
    imports=[m.strip() for m in settings.sagas_imports.split(",") if m.strip()],
)

# The engine's tasks, the step wrapper, and the reconciler in beat (`celery -A config beat`).
engine = Sagas(app, settings)
