"""One queue per participant service plus the coordinator's; a worker pool serves each."""

from __future__ import annotations

from kombu import Queue

INVENTORY = "inventory"
PAYMENT = "payment"
SHIPPING = "shipping"
SAGA = "saga"
ALL_QUEUES = (INVENTORY, PAYMENT, SHIPPING, SAGA)

task_queues = tuple(Queue(name, routing_key=name) for name in ALL_QUEUES)

task_routes = {
    "inventory.*": {"queue": INVENTORY},
    "payment.*": {"queue": PAYMENT},
    "shipping.*": {"queue": SHIPPING},
    "sagas.*": {"queue": SAGA},
    "orders.*": {"queue": SAGA},
}
